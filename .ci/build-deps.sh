#!/usr/bin/env bash
# Installs what building acceld needs beyond the Rust toolchain, idempotently: clang compiles
# the eBPF device gate (bpf/), and the vendored libbpf it is loaded with links libelf and zlib
# found through pkg-config.
set -euo pipefail

need=()
command -v clang >/dev/null 2>&1 || need+=(clang)
command -v pkg-config >/dev/null 2>&1 || need+=(pkg-config)
pkg-config --exists libelf 2>/dev/null || need+=(libelf-dev)
pkg-config --exists zlib 2>/dev/null || need+=(zlib1g-dev)
[ -e /usr/include/linux/bpf.h ] || need+=(linux-libc-dev)
command -v make >/dev/null 2>&1 || need+=(make)

[ ${#need[@]} -eq 0 ] && exit 0

sudo=""
if [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1; then
  sudo="sudo"
fi
if [ "$(id -u)" -ne 0 ] && [ -z "$sudo" ]; then
  echo "build-deps: acceld needs ${need[*]} to build (its eBPF device gate); install them as root" >&2
  exit 1
fi
echo "build-deps: installing ${need[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
$sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
