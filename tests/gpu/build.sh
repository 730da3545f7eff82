#!/usr/bin/env bash
# Builds the CUDA test and benchmark executables and the daemon (release, debug info stripped)
# into gpu-bin/, for tests/gpu/check.sh on a GPU machine that has no Rust toolchain. Run on an
# x86-64 host with the workspace's toolchain; the executables need only glibc 2.34 or later
# (CUDA is loaded at run time).
set -euo pipefail
cd "$(dirname "$0")/../.."
out=gpu-bin
mkdir -p "$out"

# Prints the path of the executable cargo built for target $1 from cargo's JSON messages.
executable() {
    python3 -c '
import json, sys
name = sys.argv[1]
paths = [m["executable"] for m in map(json.loads, sys.stdin)
         if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == name]
if not paths:
    sys.exit(f"build.sh: cargo built no executable named {name}")
print(paths[-1])' "$1"
}

tests=$(cargo test --release -p accel-tests --test cuda --no-run --message-format=json | executable cuda)
bench=$(cargo bench -p accel-benches --bench cuda --no-run --message-format=json | executable cuda)
daemon=$(cargo build --release --locked -p accel-runtime --bin acceld --message-format=json | executable acceld)
cp "$tests" "$out/cuda-tests"
cp "$bench" "$out/cuda-bench"
cp "$daemon" "$out/acceld"
strip --strip-debug "$out/cuda-tests" "$out/cuda-bench" "$out/acceld"
du -h "$out"/*
