#!/usr/bin/env bash
# The GPU check: CUDA tests and benchmarks on a machine with an NVIDIA GPU, CUDA 13, PyTorch
# and transformers, but no Rust toolchain and no internet. The executables come prebuilt in
# gpu-bin/ (tests/gpu/build.sh); the small fixtures are in the repository; the SmolLM2-shaped
# model is made here with transformers. Everything lands under $OUT (default ./gpu-out), and
# a summary table is printed last. Exits non-zero if any step failed.
#
#     bash tests/gpu/build.sh          # on the build host
#     bash tests/gpu/check.sh          # on the GPU machine (about 5 minutes on an H200)
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-$PWD/gpu-out}
BIN=${ACCEL_GPU_BIN:-$PWD/gpu-bin}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$OUT"
# NVRTC and cuBLAS may exist only as the pip packages PyTorch brings (nvidia/cu13/lib and the
# like): put their folders on the library path, since the backend loads them by name.
pip_cuda_libs=$(python3 - <<'PY' 2>/dev/null
import glob, os
try:
    import nvidia
except ImportError:
    raise SystemExit
dirs = sorted({os.path.dirname(p) for base in nvidia.__path__
               for p in glob.glob(os.path.join(base, "**", "lib*.so*"), recursive=True)
               if os.path.basename(p).startswith(("libnvrtc.so", "libcublas.so", "libcublasLt.so"))})
print(":".join(dirs))
PY
)
[ -n "$pip_cuda_libs" ] && export LD_LIBRARY_PATH="$pip_cuda_libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
echo "library path for NVRTC and cuBLAS: ${LD_LIBRARY_PATH:-(system default)}"
export ACCEL_REQUIRE_GPU=1
export ACCEL_FIXTURES=$PWD/tests/fixtures
export ACCEL_KERNEL_CACHE=$WORK/kernels
export ACCEL_GPU_MODEL=$WORK/smollm2-shaped
export ACCEL_BENCH_JSON=$OUT/bench.json
export ACCEL_BIN_DIR=$BIN  # acceld, for the test of the daemon serving on the GPU
export RUST_BACKTRACE=1
failed=()

# step NAME SECONDS COMMAND...: runs a step with a time limit, output to $OUT/NAME.txt.
step() {
    local name=$1 limit=$2
    shift 2
    echo "== $name"
    local start=$SECONDS
    timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.txt"
    local rc=${PIPESTATUS[0]}
    echo "== $name: exit $rc after $((SECONDS - start)) s"
    [ "$rc" -eq 0 ] || failed+=("$name (exit $rc)")
}

{ nvidia-smi -L; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; } > "$OUT/gpu.txt" 2>&1
cat "$OUT/gpu.txt"
step make_model 180 python3 tests/gpu/make_model.py "$ACCEL_GPU_MODEL"
step tests 240 "$BIN/cuda-tests" --test-threads=1
step bench 240 "$BIN/cuda-bench" --bench
step hf_decode 120 python3 tests/gpu/hf_decode.py "$ACCEL_GPU_MODEL" "$OUT/hf.json" 1 64

python3 - "$OUT" <<'PY'
import json, os, re, sys
out = sys.argv[1]
def load(name):
    try:
        return json.load(open(os.path.join(out, name)))
    except (OSError, ValueError):
        return {}
bench, hf = load("bench.json"), load("hf.json")
tests = open(os.path.join(out, "tests.txt"), errors="replace").read() if os.path.exists(os.path.join(out, "tests.txt")) else ""
result = re.findall(r"test result: .*", tests)
rows = [("CUDA tests", result[-1] if result else "did not finish", "")]
def ratio(key, goal):
    v = bench.get(key)
    return ("-" if v is None else f"{v:.2f}", f">= {goal}")
for key, label in [("attention_64x2048_ratio", "paged attention, 64 x 2048 tokens / d2d copy"),
                   ("attention_16x4096_ratio", "paged attention, 16 x 4096 tokens / d2d copy")]:
    rows.append((label, *ratio(key, 0.6)))
rows.append(("swap out / pinned memcpy", *ratio("swap_out_ratio", 0.8)))
rows.append(("swap in / pinned memcpy", *ratio("swap_in_ratio", 0.8)))
for batch, goal in [(1, "3"), (64, "-")]:
    ours, theirs = bench.get(f"decode_bf16_batch{batch}_tok_s"), hf.get(f"batch{batch}_tok_s")
    if ours and theirs:
        rows.append((f"decode bf16 batch {batch}: accel {ours:.0f} vs transformers {theirs:.0f} tok/s", f"{ours / theirs:.2f}x", f">= {goal}x" if goal != "-" else ""))
    else:
        rows.append((f"decode bf16 batch {batch}", "missing", ""))
width = max(len(r[0]) for r in rows)
print("\n" + "=" * 20 + " GPU check summary " + "=" * 20)
for what, value, goal in rows:
    print(f"{what:<{width}}  {value:>12}  {goal}")
PY
if [ ${#failed[@]} -gt 0 ]; then
    echo "FAILED: ${failed[*]}"
    exit 1
fi
echo "all GPU checks passed"
