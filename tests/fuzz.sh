#!/usr/bin/env bash
# Runs every fuzz target of tests/fuzz.rs, optimised, for an hour in all (ACCEL_FUZZ_HOURS to
# change the total, or ACCEL_FUZZ_SECONDS per target), and prints each target's executions per
# second. A crash leaves its input in ACCEL_FUZZ_OUT (default /tmp); copy it to
# tests/fixtures/fuzz/<target>-<what>, fix it, and the regression test keeps it fixed.
set -euo pipefail
cd "$(dirname "$0")/.."
targets=$(grep -c '^fn fuzz_' tests/fuzz.rs)
hours="${ACCEL_FUZZ_HOURS:-1}"
export ACCEL_FUZZ_SECONDS="${ACCEL_FUZZ_SECONDS:-$(python3 -c "print(int($hours * 3600 / $targets))")}"
export ACCEL_FUZZ_SEED="${ACCEL_FUZZ_SEED:-$(date +%s)}"
echo "fuzz: $targets targets, $ACCEL_FUZZ_SECONDS s each, seed $ACCEL_FUZZ_SEED" >&2
cargo test --release -p accel-tests --test fuzz -- --test-threads 1 --nocapture 2>&1 \
  | grep -E 'fuzz [a-z_]+: |panicked|test result'
