#!/usr/bin/env python3
"""Compile-checks every CUDA kernel source in cuda-kernels/ with NVRTC, for each target
architecture, without a GPU: NVRTC comes from the PyPI wheel nvidia-cuda-nvrtc-cu12 (installed
into a cache directory on first use) and is called through ctypes. Any error or warning fails.
A further build to sm_90 machine code with ptxas' report fails on any kernel that spills
registers to local memory (a silent slowdown).

    python3 .ci/nvrtc_check.py            # compute_80, compute_90, and the sm_90 spill check
"""

import ctypes
import glob
import os
import re
import subprocess
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
KERNELS = os.path.join(ROOT, "cuda-kernels")
ARCHS = ["compute_80", "compute_90"]
CACHE = os.environ.get("ACCEL_NVRTC_CACHE", "/var/cache/accel/nvrtc")
WHEEL = "nvidia-cuda-nvrtc-cu12==12.9.86"


def library():
    lib = os.path.join(CACHE, "nvidia", "cuda_nvrtc", "lib", "libnvrtc.so.12")
    if not os.path.exists(lib):
        os.makedirs(CACHE, exist_ok=True)
        print(f"nvrtc_check: installing {WHEEL} into {CACHE}", file=sys.stderr)
        subprocess.check_call([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", CACHE, WHEEL])
    return ctypes.CDLL(lib)


def check(nvrtc, path, headers, arch, extra=()):
    prog = ctypes.c_void_p()
    names = (ctypes.c_char_p * len(headers))(*[os.path.basename(h).encode() for h in headers])
    texts = (ctypes.c_char_p * len(headers))(*[open(h, "rb").read() for h in headers])
    src = open(path, "rb").read()
    rc = nvrtc.nvrtcCreateProgram(ctypes.byref(prog), src, os.path.basename(path).encode(), len(headers), texts, names)
    if rc != 0:
        return f"nvrtcCreateProgram failed ({rc})"
    opts = [f"--gpu-architecture={arch}".encode(), b"--std=c++17", b"-default-device", *extra]
    arr = (ctypes.c_char_p * len(opts))(*opts)
    rc = nvrtc.nvrtcCompileProgram(prog, len(opts), arr)
    size = ctypes.c_size_t()
    nvrtc.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    nvrtc.nvrtcGetProgramLog(prog, log)
    nvrtc.nvrtcDestroyProgram(ctypes.byref(prog))
    text = log.value.decode(errors="replace").strip()
    if extra:
        # ptxas' report: only spills are problems.
        if rc != 0:
            return text or f"compile failed ({rc})"
        spills = [m.group(0) for m in re.finditer(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
                  if int(m.group(1)) or int(m.group(2))]
        return "\n".join(spills) or None
    if rc != 0 or text:
        return text or f"compile failed ({rc})"
    return None


def main():
    nvrtc = library()
    sources = sorted(glob.glob(os.path.join(KERNELS, "*.cu")))
    headers = sorted(glob.glob(os.path.join(KERNELS, "*.cuh")))
    if not sources:
        sys.exit("nvrtc_check: no .cu files found")
    failed = False
    for path in sources:
        for arch in ARCHS:
            problem = check(nvrtc, path, headers, arch)
            name = os.path.relpath(path, ROOT)
            if problem:
                failed = True
                print(f"nvrtc_check: {name} ({arch}):\n{problem}", file=sys.stderr)
            else:
                print(f"nvrtc_check: {name} ({arch}) ok")
        problem = check(nvrtc, path, headers, "sm_90", extra=(b"--ptxas-options=-v",))
        if problem:
            failed = True
            print(f"nvrtc_check: {name} (sm_90) spills registers:\n{problem}", file=sys.stderr)
        else:
            print(f"nvrtc_check: {name} (sm_90) no register spills")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
