//! Device and page-locked host memory for the CUDA backend, every allocation through one
//! ledger: what each kind of use holds (weights, KV cache, activations, workspace, swap
//! staging, page-locked swap space), checked against an optional budget before the driver is
//! asked, and released when the buffer drops.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use cudarc::driver::{result, sys, CudaSlice, CudaStream, DevicePtr as _};

use crate::backend::BackendError;

/// What an allocation is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Use {
    /// The device's CUDA context (shared by every model on it; booked by the first).
    Context,
    Weights,
    KvCache,
    Activations,
    /// cuBLAS workspace, dequantized weight tiles, step metadata.
    Workspace,
    /// Device staging for swap copies.
    SwapStaging,
    /// Page-locked host memory holding swapped-out KV blocks.
    PinnedHost,
}

impl Use {
    pub const ALL: [Use; 7] = [
        Use::Context,
        Use::Weights,
        Use::KvCache,
        Use::Activations,
        Use::Workspace,
        Use::SwapStaging,
        Use::PinnedHost,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Use::Context => "context",
            Use::Weights => "weights",
            Use::KvCache => "kv_cache",
            Use::Activations => "activations",
            Use::Workspace => "workspace",
            Use::SwapStaging => "swap_staging",
            Use::PinnedHost => "pinned_host",
        }
    }

    fn on_device(self) -> bool {
        self != Use::PinnedHost
    }
}

/// Bytes held per use, and the device budget.
#[derive(Debug)]
pub struct Ledger {
    device: String,
    held: [AtomicU64; 7],
    /// Device bytes this backend may hold (None: whatever the GPU has).
    budget: Option<u64>,
}

impl Ledger {
    pub fn new(device: String, budget: Option<u64>) -> Arc<Self> {
        Arc::new(Self {
            device,
            held: Default::default(),
            budget,
        })
    }

    pub fn held(&self, what: Use) -> u64 {
        self.held[what as usize].load(Ordering::Relaxed)
    }

    /// Bytes held by each use.
    pub fn by_use(&self) -> Vec<(&'static str, u64)> {
        Use::ALL.iter().map(|&u| (u.name(), self.held(u))).collect()
    }

    /// Device bytes held, all uses together.
    pub fn device_total(&self) -> u64 {
        Use::ALL
            .iter()
            .filter(|u| u.on_device())
            .map(|&u| self.held(u))
            .sum()
    }

    fn oom(&self, what: Use, bytes: usize, detail: &str) -> BackendError {
        BackendError::OutOfMemory {
            memory: if what.on_device() {
                "device"
            } else {
                "page-locked host"
            },
            what: format!("{} on {} ({detail})", what.name(), self.device),
            bytes,
        }
    }

    /// Books `bytes` for `what`, refusing when the device budget would be exceeded.
    fn reserve(&self, what: Use, bytes: usize) -> Result<(), BackendError> {
        let counter = &self.held[what as usize];
        counter.fetch_add(bytes as u64, Ordering::Relaxed);
        if let (Some(budget), true) = (self.budget, what.on_device()) {
            let total = self.device_total();
            if total > budget {
                counter.fetch_sub(bytes as u64, Ordering::Relaxed);
                return Err(self.oom(
                    what,
                    bytes,
                    &format!("budget {budget} bytes, {} in use", total - bytes as u64),
                ));
            }
        }
        Ok(())
    }

    /// Books memory allocated outside this ledger (the CUDA context), for good.
    pub fn book(&self, what: Use, bytes: u64) {
        self.held[what as usize].fetch_add(bytes, Ordering::Relaxed);
    }

    fn release(&self, what: Use, bytes: usize) {
        self.held[what as usize].fetch_sub(bytes as u64, Ordering::Relaxed);
    }

    /// Allocates `bytes` of device memory on `stream` (freed on it, in stream order).
    pub fn alloc(
        self: &Arc<Self>,
        stream: &Arc<CudaStream>,
        what: Use,
        bytes: usize,
    ) -> Result<DeviceBuffer, BackendError> {
        // Zero-sized buffers still get a real (one-byte) allocation so pointers are valid.
        let size = bytes.max(1);
        self.reserve(what, size)?;
        // SAFETY: the memory is uninitialised; every user writes before reading (kernels fill
        // activations, uploads fill weights) or the contents are documented as unspecified.
        match unsafe { stream.alloc::<u8>(size) } {
            Ok(slice) => Ok(DeviceBuffer {
                slice,
                bytes: size,
                what,
                ledger: Arc::clone(self),
            }),
            Err(e) => {
                self.release(what, size);
                if e.0 == sys::cudaError_enum::CUDA_ERROR_OUT_OF_MEMORY {
                    Err(self.oom(what, size, "the GPU has no more free memory"))
                } else {
                    Err(BackendError::Device {
                        device: self.device.clone(),
                        op: "alloc",
                        detail: format!("{e:?}"),
                    })
                }
            }
        }
    }

    /// Allocates page-locked host memory, cached (not write-combined: the host reads it back
    /// when spilling to disk, and write-combined memory is slow to read).
    pub fn alloc_pinned(self: &Arc<Self>, bytes: usize) -> Result<PinnedBuffer, BackendError> {
        let size = bytes.max(1);
        self.reserve(Use::PinnedHost, size)?;
        // SAFETY: cuMemHostAlloc with flags 0 (portable to this context only, cached); the
        // pointer is freed exactly once, in PinnedBuffer's Drop.
        match unsafe { result::malloc_host(size, 0) } {
            Ok(ptr) => Ok(PinnedBuffer {
                ptr: ptr.cast(),
                bytes: size,
                ledger: Arc::clone(self),
            }),
            Err(e) => {
                self.release(Use::PinnedHost, size);
                Err(self.oom(Use::PinnedHost, size, &format!("{e:?}")))
            }
        }
    }
}

/// Device memory booked in a [`Ledger`].
#[derive(Debug)]
pub struct DeviceBuffer {
    slice: CudaSlice<u8>,
    bytes: usize,
    what: Use,
    ledger: Arc<Ledger>,
}

impl DeviceBuffer {
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// The device address. Event tracking is off in this backend (it orders its two streams
    /// itself), so the guard cudarc returns has nothing to record.
    pub fn ptr(&self) -> u64 {
        let (ptr, _guard) = self.slice.device_ptr(self.slice.stream());
        ptr
    }
}

impl Drop for DeviceBuffer {
    fn drop(&mut self) {
        // The CudaSlice frees itself on its stream after this; the free is a driver call,
        // which needs the context current on whichever thread drops the buffer.
        let _ = self.slice.context().bind_to_thread();
        self.ledger.release(self.what, self.bytes);
    }
}

/// Page-locked host memory booked in a [`Ledger`].
#[derive(Debug)]
pub struct PinnedBuffer {
    ptr: *mut u8,
    bytes: usize,
    ledger: Arc<Ledger>,
}

// SAFETY: the buffer is plain host memory owned by this value; access goes through &self /
// &mut self, and the device only touches it through copies the backend orders on its streams.
unsafe impl Send for PinnedBuffer {}
// SAFETY: as above; shared references only hand out the address.
unsafe impl Sync for PinnedBuffer {}

impl PinnedBuffer {
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    pub fn ptr(&self) -> *mut u8 {
        self.ptr
    }
}

impl Drop for PinnedBuffer {
    fn drop(&mut self) {
        // SAFETY: allocated by cuMemHostAlloc in alloc_pinned and freed only here. cuMemFreeHost
        // waits for nothing, so the backend synchronises its copy stream before dropping this.
        if let Err(e) = unsafe { result::free_host(self.ptr.cast()) } {
            tracing::warn!(error = ?e, "freeing page-locked host memory failed");
        }
        self.ledger.release(Use::PinnedHost, self.bytes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_budget_counts_device_uses_only() {
        let ledger = Ledger::new("cuda:0".into(), Some(1000));
        ledger.reserve(Use::Weights, 600).unwrap();
        ledger.reserve(Use::PinnedHost, 5000).unwrap();
        let err = ledger.reserve(Use::Activations, 500).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("activations on cuda:0"), "{text}");
        assert!(text.contains("budget 1000 bytes, 600 in use"), "{text}");
        assert_eq!(ledger.held(Use::Activations), 0, "a refusal books nothing");
        ledger.reserve(Use::Activations, 400).unwrap();
        assert_eq!(ledger.device_total(), 1000);
        ledger.release(Use::Weights, 600);
        assert_eq!(ledger.device_total(), 400);
        assert_eq!(ledger.held(Use::PinnedHost), 5000);
    }
}
