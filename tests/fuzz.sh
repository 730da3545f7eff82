#!/usr/bin/env bash
# Runs every fuzz target of tests/fuzz.rs for an hour each (ACCEL_FUZZ_SECONDS to change it),
# optimised, and prints each target's executions per second. A crash leaves its input in
# ACCEL_FUZZ_OUT (default /tmp); copy it to tests/fixtures/fuzz/<target>-<what>, fix it, and
# the regression test keeps it fixed.
set -euo pipefail
cd "$(dirname "$0")/.."
export ACCEL_FUZZ_SECONDS="${ACCEL_FUZZ_SECONDS:-3600}"
export ACCEL_FUZZ_SEED="${ACCEL_FUZZ_SEED:-$(date +%s)}"
cargo test --release -p accel-tests --test fuzz -- --test-threads 1 --nocapture 2>&1 \
  | grep -E 'fuzz [a-z_]+: |panicked|test result'
