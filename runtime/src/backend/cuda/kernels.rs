//! The CUDA C sources in `cuda-kernels/`, compiled at run time with NVRTC to machine code for
//! the GPU found (`sm_XY` from its compute capability), cached on disk by source hash,
//! architecture and NVRTC version, and loaded once per device.
//!
//! Machine code rather than PTX: PTX from an NVRTC newer than the driver (a pip-installed
//! CUDA 13.2 runtime on a 13.0 driver) is refused at load time, while a cubin of the same major
//! version loads.
//!
//! Each `.cu` file is one module with `dtype.cuh` inlined, as CI's NVRTC check compiles it.
//! A cache hit needs no NVRTC at all; a miss without NVRTC installed is a clear error.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaFunction};
use cudarc::nvrtc::Ptx;
use sha2::{Digest as _, Sha256};

const DTYPE_HEADER: &str = include_str!("../../../../cuda-kernels/dtype.cuh");

/// Kernel source files, by module name.
pub const SOURCES: [(&str, &str); 5] = [
    (
        "elementwise",
        include_str!("../../../../cuda-kernels/elementwise.cu"),
    ),
    ("quant", include_str!("../../../../cuda-kernels/quant.cu")),
    (
        "attention",
        include_str!("../../../../cuda-kernels/attention.cu"),
    ),
    ("kv", include_str!("../../../../cuda-kernels/kv.cu")),
    (
        "sampling",
        include_str!("../../../../cuda-kernels/sampling.cu"),
    ),
];

/// A source with the shared header inlined, ready for NVRTC.
pub fn expand(source: &str) -> String {
    let header = DTYPE_HEADER.replace("#pragma once", "");
    source.replace("#include \"dtype.cuh\"", &header)
}

/// Why the kernels could not be made ready.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("NVRTC (libnvrtc.so) is not installed and {module} for {arch} is not in the kernel cache {cache}; install the CUDA runtime compiler (e.g. the cuda-nvrtc package)")]
    NoCompiler {
        module: &'static str,
        arch: String,
        cache: String,
    },
    #[error("NVRTC could not compile {module} for {arch}: {log}")]
    Compile {
        module: &'static str,
        arch: String,
        log: String,
    },
    #[error("the driver could not load {module}: {detail}")]
    Load {
        module: &'static str,
        detail: String,
    },
    #[error("kernel {name} is missing from {module}: {detail}")]
    Missing {
        module: &'static str,
        name: &'static str,
        detail: String,
    },
}

/// The NVRTC version, if NVRTC can be loaded.
fn nvrtc_version() -> Option<(i32, i32)> {
    // SAFETY: only tries to dlopen the library by its usual names.
    if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        return None;
    }
    let (mut major, mut minor) = (0, 0);
    // SAFETY: the library is present; nvrtcVersion writes two ints.
    unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut major, &mut minor) }
        .result()
        .ok()?;
    Some((major, minor))
}

/// Cache file name: the hash of everything that decides the PTX.
fn cache_key(source: &str, arch: &str, nvrtc: Option<(i32, i32)>) -> String {
    let mut hash = Sha256::new();
    hash.update(source.as_bytes());
    hash.update(arch.as_bytes());
    if let Some((major, minor)) = nvrtc {
        hash.update(format!("nvrtc {major}.{minor}").as_bytes());
    }
    let digest = hash.finalize();
    digest.iter().take(16).map(|b| format!("{b:02x}")).collect()
}

/// Returns machine code for `module` from the cache, or compiles and caches it. The cache key
/// includes the NVRTC version when NVRTC is present; without NVRTC any cached build for the
/// same source and architecture is used.
fn cubin_for(
    module: &'static str,
    source: &str,
    arch: &str,
    cache: Option<&Path>,
) -> Result<Vec<u8>, KernelError> {
    cubin_with(module, source, arch, cache, nvrtc_version())
}

/// [`cubin_for`] with the NVRTC version given (None: as if NVRTC were not installed).
fn cubin_with(
    module: &'static str,
    source: &str,
    arch: &str,
    cache: Option<&Path>,
    nvrtc: Option<(i32, i32)>,
) -> Result<Vec<u8>, KernelError> {
    let file = |version| {
        cache.map(|dir| {
            dir.join(format!(
                "{module}-{arch}-{}.cubin",
                cache_key(source, arch, version)
            ))
        })
    };
    let Some(version) = nvrtc else {
        // Without a compiler, take any cached build of this exact source for this arch.
        if let Some(dir) = cache {
            let prefix = format!("{module}-{arch}-");
            let sources_hash = cache_key(source, arch, None);
            let marker = dir.join(format!("{prefix}{sources_hash}.source"));
            if let Ok(name) = std::fs::read_to_string(&marker) {
                if let Ok(cubin) = std::fs::read(dir.join(name.trim())) {
                    return Ok(cubin);
                }
            }
        }
        return Err(KernelError::NoCompiler {
            module,
            arch: arch.to_owned(),
            cache: cache.map_or("(none)".into(), |d| d.display().to_string()),
        });
    };
    let path: Option<PathBuf> = file(Some(version));
    if let Some(cubin) = path.as_ref().and_then(|p| std::fs::read(p).ok()) {
        return Ok(cubin);
    }
    let cubin = compile(module, source, arch)?;
    if let (Some(path), Some(dir)) = (path, cache) {
        store(dir, &path, &cubin, module, arch, source);
    }
    Ok(cubin)
}

/// Compiles one module to machine code for `arch` (`sm_90`) with NVRTC.
fn compile(module: &'static str, source: &str, arch: &str) -> Result<Vec<u8>, KernelError> {
    use cudarc::nvrtc::{result, sys};
    let failed = |log: String| KernelError::Compile {
        module,
        arch: arch.to_owned(),
        log,
    };
    let source = std::ffi::CString::new(source)
        .map_err(|_| failed("the source contains a NUL byte".into()))?;
    let name = std::ffi::CString::new(format!("{module}.cu"))
        .map_err(|_| failed("the module name contains a NUL byte".into()))?;
    let prog =
        result::create_program(&source, Some(&name)).map_err(|e| failed(format!("{e:?}")))?;
    let options = [
        format!("--gpu-architecture={arch}"),
        "--std=c++17".into(),
        "-default-device".into(),
    ];
    // SAFETY: `prog` was just created and is destroyed exactly once below; the buffers handed
    // to NVRTC are sized by the sizes it reports.
    let built = unsafe {
        let compiled = result::compile_program(prog, &options);
        let built = match compiled {
            Err(e) => {
                let log = result::get_program_log(prog)
                    .map(|chars| {
                        let bytes: Vec<u8> = chars
                            .iter()
                            .take_while(|&&c| c != 0)
                            .map(|&c| c as u8)
                            .collect();
                        String::from_utf8_lossy(&bytes).into_owned()
                    })
                    .unwrap_or_else(|_| format!("{e:?}"));
                Err(failed(log))
            }
            Ok(()) => {
                let mut size = 0usize;
                sys::nvrtcGetCUBINSize(prog, &mut size)
                    .result()
                    .and_then(|()| {
                        let mut cubin = vec![0u8; size];
                        sys::nvrtcGetCUBIN(prog, cubin.as_mut_ptr().cast())
                            .result()
                            .map(|()| cubin)
                    })
                    .map_err(|e| failed(format!("cannot fetch the machine code: {e:?}")))
            }
        };
        let _ = result::destroy_program(prog);
        built
    };
    built
}

/// Writes a compiled module to the cache atomically (a failure only costs a recompile later).
fn store(dir: &Path, path: &Path, cubin: &[u8], module: &str, arch: &str, source: &str) {
    let write = || -> std::io::Result<()> {
        std::fs::create_dir_all(dir)?;
        let tmp = path.with_extension(format!("tmp{}", std::process::id()));
        std::fs::write(&tmp, cubin)?;
        std::fs::rename(&tmp, path)?;
        // Remember which file holds this source's build, for hosts without NVRTC.
        let marker = dir.join(format!(
            "{module}-{arch}-{}.source",
            cache_key(source, arch, None)
        ));
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        std::fs::write(marker, name)
    };
    if let Err(e) = write() {
        tracing::warn!(dir = %dir.display(), error = %e, "cannot cache compiled CUDA kernels");
    }
}

/// Every kernel the backend launches, by module.
pub const ENTRY_POINTS: [(&str, &str); 23] = [
    ("elementwise", "embed"),
    ("elementwise", "rms_norm"),
    ("elementwise", "rope"),
    ("elementwise", "silu_mul"),
    ("elementwise", "add"),
    ("elementwise", "add_bias"),
    ("elementwise", "gather_rows"),
    ("quant", "dequantize_rows"),
    ("quant", "matvec"),
    ("attention", "paged_attention"),
    ("attention", "paged_attention_partial_g4_c2"),
    ("attention", "paged_attention_partial_g4_c4"),
    ("attention", "paged_attention_partial_g4_c8"),
    ("attention", "paged_attention_partial_g8_c2"),
    ("attention", "paged_attention_partial_g8_c4"),
    ("attention", "paged_attention_partial_g8_c8"),
    ("attention", "paged_attention_combine"),
    ("kv", "write_kv"),
    ("kv", "gather_kv_blocks"),
    ("kv", "scatter_kv_blocks"),
    ("sampling", "argmax"),
    ("sampling", "softmax_temperature"),
    ("sampling", "top_k"),
];

/// Every kernel the backend launches.
#[derive(Debug)]
pub struct Kernels {
    pub embed: CudaFunction,
    pub rms_norm: CudaFunction,
    pub rope: CudaFunction,
    pub silu_mul: CudaFunction,
    pub add: CudaFunction,
    pub add_bias: CudaFunction,
    pub gather_rows: CudaFunction,
    pub dequantize_rows: CudaFunction,
    pub matvec: CudaFunction,
    pub paged_attention: CudaFunction,
    /// Split-context attention by (query heads per KV head ≤ 4 or 8, head_dim ≤ 64, 128
    /// or 256): `[g4_c2, g4_c4, g4_c8, g8_c2, g8_c4, g8_c8]`.
    pub paged_attention_partial: [CudaFunction; 6],
    pub paged_attention_combine: CudaFunction,
    pub write_kv: CudaFunction,
    pub gather_kv_blocks: CudaFunction,
    pub scatter_kv_blocks: CudaFunction,
    pub argmax: CudaFunction,
    pub softmax_temperature: CudaFunction,
    pub top_k: CudaFunction,
}

/// Compiles every module for `arch` into `cache` (or finds it there already), so that
/// processes that may not write the cache (workers, each running as a user of its own) load
/// them without compiling; returns how many modules there are. Only the daemon writes the
/// cache: code one worker compiled is never loaded by another.
pub fn precompile(arch: &str, cache: &Path) -> Result<usize, KernelError> {
    for (name, source) in SOURCES {
        cubin_for(name, &expand(source), arch, Some(cache))?;
    }
    Ok(SOURCES.len())
}

impl Kernels {
    /// Compiles (or takes from `cache`) and loads every module for `arch` (`sm_90`).
    pub fn load(
        ctx: &Arc<CudaContext>,
        arch: &str,
        cache: Option<&Path>,
    ) -> Result<Self, KernelError> {
        let mut modules = Vec::new();
        for (name, source) in SOURCES {
            let expanded = expand(source);
            let cubin = cubin_for(name, &expanded, arch, cache)?;
            let module =
                ctx.load_module(Ptx::from_binary(cubin))
                    .map_err(|e| KernelError::Load {
                        module: name,
                        detail: format!("{e:?}"),
                    })?;
            modules.push((name, module));
        }
        let mut functions = std::collections::HashMap::new();
        for (module, name) in ENTRY_POINTS {
            let (_, m) =
                modules
                    .iter()
                    .find(|(n, _)| *n == module)
                    .ok_or(KernelError::Missing {
                        module,
                        name,
                        detail: "no such module".into(),
                    })?;
            let function = m.load_function(name).map_err(|e| KernelError::Missing {
                module,
                name,
                detail: format!("{e:?}"),
            })?;
            functions.insert(name, function);
        }
        let mut function = |_module: &'static str, name: &'static str| {
            functions.remove(name).ok_or(KernelError::Missing {
                module: "any",
                name,
                detail: "not listed in ENTRY_POINTS".into(),
            })
        };
        Ok(Self {
            embed: function("elementwise", "embed")?,
            rms_norm: function("elementwise", "rms_norm")?,
            rope: function("elementwise", "rope")?,
            silu_mul: function("elementwise", "silu_mul")?,
            add: function("elementwise", "add")?,
            add_bias: function("elementwise", "add_bias")?,
            gather_rows: function("elementwise", "gather_rows")?,
            dequantize_rows: function("quant", "dequantize_rows")?,
            matvec: function("quant", "matvec")?,
            paged_attention: function("attention", "paged_attention")?,
            paged_attention_partial: [
                function("attention", "paged_attention_partial_g4_c2")?,
                function("attention", "paged_attention_partial_g4_c4")?,
                function("attention", "paged_attention_partial_g4_c8")?,
                function("attention", "paged_attention_partial_g8_c2")?,
                function("attention", "paged_attention_partial_g8_c4")?,
                function("attention", "paged_attention_partial_g8_c8")?,
            ],
            paged_attention_combine: function("attention", "paged_attention_combine")?,
            write_kv: function("kv", "write_kv")?,
            gather_kv_blocks: function("kv", "gather_kv_blocks")?,
            scatter_kv_blocks: function("kv", "scatter_kv_blocks")?,
            argmax: function("sampling", "argmax")?,
            softmax_temperature: function("sampling", "softmax_temperature")?,
            top_k: function("sampling", "top_k")?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expanded_sources_inline_the_header_once_and_include_nothing() {
        for (name, source) in SOURCES {
            let expanded = expand(source);
            assert!(!expanded.contains("#include"), "{name}");
            assert_eq!(
                expanded
                    .matches("__device__ __forceinline__ float weight_at")
                    .count(),
                1,
                "{name}"
            );
        }
    }

    /// Runs where NVRTC can be loaded (`make test` puts the PyPI wheel's library on
    /// LD_LIBRARY_PATH): the sources compile to machine code with the backend's options, every
    /// kernel it launches is in it, builds are cached, and a host without NVRTC finds them.
    #[test]
    fn kernels_compile_with_nvrtc_and_are_cached() {
        let Some(version) = nvrtc_version() else {
            assert_ne!(
                std::env::var("ACCEL_REQUIRE_NVRTC").as_deref(),
                Ok("1"),
                "ACCEL_REQUIRE_NVRTC=1 but NVRTC (libnvrtc.so) cannot be loaded"
            );
            eprintln!("skipped: NVRTC (libnvrtc.so) cannot be loaded here");
            return;
        };
        let dir = tempfile::tempdir().unwrap();
        // Everything compiled into the cache first, as the daemon does for its workers.
        assert_eq!(precompile("sm_80", dir.path()).unwrap(), SOURCES.len());
        for (module, source) in SOURCES {
            let expanded = expand(source);
            let build = |version| cubin_with(module, &expanded, "sm_80", Some(dir.path()), version);
            let cubin = build(Some(version)).unwrap_or_else(|e| panic!("{e}"));
            assert!(cubin.starts_with(b"\x7fELF"), "{module}: not machine code");
            for (m, entry) in ENTRY_POINTS {
                if m == module {
                    // The ELF symbol table names every kernel, NUL-terminated.
                    let symbol = format!("{entry}\0");
                    assert!(
                        cubin.windows(symbol.len()).any(|w| w == symbol.as_bytes()),
                        "{module}: no entry {entry}"
                    );
                }
            }
            assert_eq!(
                build(Some(version)).unwrap(),
                cubin,
                "{module}: a cache hit"
            );
            assert_eq!(
                build(None).unwrap(),
                cubin,
                "{module}: the cached build serves a host without NVRTC"
            );
            let err = cubin_with(module, &expanded, "sm_90", Some(dir.path()), None).unwrap_err();
            assert!(err.to_string().contains("not in the kernel cache"), "{err}");
        }
        let err = cubin_with(
            "broken",
            "extern \"C\" __global__ void f() { no_such_name = 1; }",
            "sm_80",
            None,
            Some(version),
        )
        .unwrap_err();
        assert!(err.to_string().contains("no_such_name"), "{err}");
    }

    #[test]
    fn cache_keys_change_with_source_arch_and_compiler() {
        let base = cache_key("a", "sm_90", Some((12, 9)));
        assert_ne!(base, cache_key("b", "sm_90", Some((12, 9))));
        assert_ne!(base, cache_key("a", "sm_80", Some((12, 9))));
        assert_ne!(base, cache_key("a", "sm_90", Some((13, 0))));
        assert_eq!(base, cache_key("a", "sm_90", Some((12, 9))));
    }
}
