//! Accelerators on this node: NVIDIA GPUs enumerated through the CUDA driver, which cudarc
//! loads at run time, for `/v1/devices`, `/v1/status`, `accelctl devices` and the metrics'
//! `device` label (the GPU UUID, so series join with DCGM's).
//!
//! With no driver installed, or no GPU, the list is empty and the reason is reported: nothing
//! here panics or fails the daemon. Enumeration uses the driver's device queries only; it
//! creates no CUDA context and allocates no GPU memory.

use serde::{Deserialize, Serialize};

/// One GPU.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Device {
    /// CUDA ordinal (`cuda:N`).
    pub index: u32,
    pub name: String,
    /// As `nvidia-smi -L` prints it: `GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx`.
    pub uuid: String,
    pub memory_bytes: u64,
    /// `major.minor`, e.g. `9.0`.
    pub compute_capability: String,
}

/// What the node has, and why there is nothing when there is nothing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceReport {
    pub devices: Vec<Device>,
    /// Whether the CUDA driver could be loaded and initialised.
    pub cuda_driver: bool,
    /// Why no device is listed, when none is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// Formats a CUDA UUID the way nvidia-smi and DCGM do.
pub fn format_uuid(bytes: [u8; 16]) -> String {
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "GPU-{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

/// Enumerates the GPUs.
pub fn discover() -> DeviceReport {
    use cudarc::driver::{result, sys};

    let none = |cuda_driver: bool, reason: String| DeviceReport {
        devices: Vec::new(),
        cuda_driver,
        reason: Some(reason),
    };
    // SAFETY: only tries to dlopen the driver library by its usual names; no symbol is called.
    if !unsafe { sys::is_culib_present() } {
        return none(
            false,
            "the NVIDIA driver library (libcuda.so) is not installed".into(),
        );
    }
    if let Err(e) = result::init() {
        return none(false, format!("the CUDA driver did not initialise: {e:?}"));
    }
    let count = match result::device::get_count() {
        Ok(n) => n,
        Err(e) => return none(true, format!("cannot count CUDA devices: {e:?}")),
    };
    if count == 0 {
        return none(true, "the CUDA driver reports no device".into());
    }
    let mut devices = Vec::new();
    for ordinal in 0..count {
        let device = match result::device::get(ordinal) {
            Ok(d) => d,
            Err(e) => {
                tracing::warn!(ordinal, error = ?e, "cannot open CUDA device");
                continue;
            }
        };
        let name = result::device::get_name(device).unwrap_or_else(|_| "unknown".into());
        let uuid = result::device::get_uuid(device)
            .map(|u| format_uuid(u.bytes.map(|b| b as u8)))
            .unwrap_or_default();
        // SAFETY: `device` is a handle the driver just returned for a valid ordinal.
        let memory_bytes = unsafe { result::device::total_mem(device) }.map_or(0, |m| m as u64);
        let attribute = |attr| {
            // SAFETY: as above; the attribute is a plain integer query.
            unsafe { result::device::get_attribute(device, attr) }.unwrap_or(0)
        };
        let major =
            attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR);
        let minor =
            attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR);
        devices.push(Device {
            index: ordinal as u32,
            name,
            uuid,
            memory_bytes,
            compute_capability: format!("{major}.{minor}"),
        });
    }
    DeviceReport {
        cuda_driver: true,
        reason: devices
            .is_empty()
            .then(|| "no CUDA device could be opened".into()),
        devices,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uuids_look_like_nvidia_smi() {
        let bytes = [
            0x8f, 0x6c, 0x1a, 0x2e, 0x1b, 0x2c, 0x4d, 0x5e, 0x9f, 0x00, 0x01, 0x23, 0x45, 0x67,
            0x89, 0xab,
        ];
        assert_eq!(
            format_uuid(bytes),
            "GPU-8f6c1a2e-1b2c-4d5e-9f00-0123456789ab"
        );
    }

    #[test]
    fn discovery_is_consistent_with_or_without_a_gpu() {
        let report = discover();
        if report.devices.is_empty() {
            let reason = report.reason.as_deref().unwrap_or_default();
            assert!(!reason.is_empty(), "an empty list says why");
            eprintln!("no GPU here: {reason}");
        } else {
            for d in &report.devices {
                assert!(report.cuda_driver);
                assert!(d.uuid.starts_with("GPU-") && d.uuid.len() == 40, "{d:?}");
                assert!(d.memory_bytes > 0 && d.compute_capability != "0.0", "{d:?}");
            }
        }
    }
}
