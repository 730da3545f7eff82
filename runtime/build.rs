//! Compiles the eBPF programs in `bpf/` with clang and generates their Rust skeletons (the
//! device gate's loader in `src/gate/`).

use std::ffi::OsStr;
use std::path::PathBuf;
use std::process::Command;

const GATE: &str = "../bpf/device_gate.bpf.c";

fn main() {
    println!("cargo:rerun-if-changed={GATE}");
    let clang = std::env::var_os("CLANG").unwrap_or_else(|| "clang".into());
    if Command::new(&clang).arg("--version").output().is_err() {
        panic!(
            "building acceld needs clang for its eBPF device gate (bpf/); install the build \
             dependencies with `bash .ci/build-deps.sh` (Debian: clang libelf-dev zlib1g-dev \
             pkg-config), or point CLANG at a clang binary"
        );
    }
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let arch = std::env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_else(|_| "x86_64".into());
    // Debian keeps <asm/types.h> under the multiarch directory, where clang -target bpf does
    // not look by itself.
    let multiarch = format!("-I/usr/include/{arch}-linux-gnu");
    libbpf_cargo::SkeletonBuilder::new()
        .source(GATE)
        .clang(&clang)
        .clang_args([OsStr::new(&multiarch)])
        .build_and_generate(out.join("device_gate.skel.rs"))
        .unwrap_or_else(|e| panic!("compiling {GATE}: {e:#}"));
}
