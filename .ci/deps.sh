#!/usr/bin/env bash
# Installs what the test suite needs beyond the Rust toolchain, idempotently:
# promtool (Debian package `prometheus`) to lint the live /metrics output.
set -euo pipefail

need=()
command -v promtool >/dev/null 2>&1 || need+=(prometheus)
command -v sha256sum >/dev/null 2>&1 || need+=(coreutils)

if [ ${#need[@]} -eq 0 ]; then
  exit 0
fi

sudo=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then
    sudo="sudo"
  else
    echo "deps: would install ${need[*]} but am neither root nor able to sudo; the tests that need them will say so" >&2
    exit 0
  fi
fi
echo "deps: installing ${need[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
$sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
