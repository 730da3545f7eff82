#!/bin/sh
# Reserves a block of 65536 subordinate user and group ids for the worker user (default
# accel-worker) unless it has one: acceld runs each worker as an id of its own from it. The
# block starts past every range already in /etc/subuid and /etc/subgid (and at 2^20 at the
# least), on a 65536 boundary. With PRINT=1, only says which block it would reserve.
set -eu
user=${1:-accel-worker}
subuid=${SUBUID_FILE:-/etc/subuid}
subgid=${SUBGID_FILE:-/etc/subgid}
if grep -q "^$user:" "$subuid" 2>/dev/null && grep -q "^$user:" "$subgid" 2>/dev/null; then
	echo "$user already has subordinate ids"
	exit 0
fi
start=$(cat "$subuid" "$subgid" 2>/dev/null | awk -F: '
	BEGIN { end = 1048576 }
	NF == 3 && $2 ~ /^[0-9]+$/ && $3 ~ /^[0-9]+$/ { if ($2 + $3 > end) end = $2 + $3 }
	END { printf "%d\n", int((end + 65535) / 65536) * 65536 }')
last=$((start + 65535))
if [ "$last" -ge 2147483648 ]; then
	echo "no room below 2^31 for $user's ids; set worker_uids in acceld.yaml instead" >&2
	exit 1
fi
if [ "${PRINT:-}" = 1 ]; then
	echo "$start-$last"
	exit 0
fi
usermod --add-subuids "$start-$last" --add-subgids "$start-$last" "$user"
echo "reserved ids $start-$last for $user's workers"
