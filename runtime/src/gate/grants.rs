//! Which device nodes a worker may open: the grants its device gate holds. Pure: the texts of
//! `/proc/devices` and the node's GPU count come in.

use std::fmt;

/// A character or block device node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum NodeKind {
    Block,
    Char,
}

impl NodeKind {
    /// The kernel's `BPF_DEVCG_DEV_*` value.
    pub fn bpf(self) -> u32 {
        match self {
            NodeKind::Block => 1,
            NodeKind::Char => 2,
        }
    }
}

/// Access bits, as the kernel's `BPF_DEVCG_ACC_*`.
pub mod access {
    pub const MKNOD: u32 = 1;
    pub const READ: u32 = 2;
    pub const WRITE: u32 = 4;
    pub const READ_WRITE: u32 = READ | WRITE;
}

/// One grant: a node (or every minor of a major) and what may be done with it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Grant {
    pub kind: NodeKind,
    pub major: u32,
    /// `None`: every minor of `major`.
    pub minor: Option<u32>,
    pub access: u32,
    /// What it is, for logs and `accelctl workers`.
    pub name: String,
}

impl Grant {
    pub fn char(major: u32, minor: Option<u32>, access: u32, name: &str) -> Self {
        Self {
            kind: NodeKind::Char,
            major,
            minor,
            access,
            name: name.to_owned(),
        }
    }
}

impl fmt::Display for Grant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self.kind {
            NodeKind::Block => 'b',
            NodeKind::Char => 'c',
        };
        let minor = self.minor.map_or_else(|| "*".to_owned(), |m| m.to_string());
        let mut rights = String::new();
        for (bit, letter) in [
            (access::READ, 'r'),
            (access::WRITE, 'w'),
            (access::MKNOD, 'm'),
        ] {
            if self.access & bit != 0 {
                rights.push(letter);
            }
        }
        write!(f, "{} ({kind} {}:{minor} {rights})", self.name, self.major)
    }
}

/// NVIDIA's character major for `/dev/nvidiaN` and `/dev/nvidiactl` (fixed by the driver).
pub const NVIDIA_MAJOR: u32 = 195;
/// `/dev/nvidiactl`'s minor.
pub const NVIDIACTL_MINOR: u32 = 255;

/// What every process needs: `/dev/null`, `/dev/zero`, `/dev/full`, `/dev/random` and
/// `/dev/urandom` (major 1), read and write; never mknod.
pub fn basics() -> Vec<Grant> {
    [
        (3, "/dev/null"),
        (5, "/dev/zero"),
        (7, "/dev/full"),
        (8, "/dev/random"),
        (9, "/dev/urandom"),
    ]
    .into_iter()
    .map(|(minor, name)| Grant::char(1, Some(minor), access::READ_WRITE, name))
    .collect()
}

/// The character major registered under `name` in `/proc/devices` text.
pub fn char_major(proc_devices: &str, name: &str) -> Option<u32> {
    proc_devices
        .lines()
        .skip_while(|l| !l.starts_with("Character devices"))
        .skip(1)
        .take_while(|l| !l.trim().is_empty() && !l.starts_with("Block devices"))
        .find_map(|l| {
            let (major, device) = l.trim().split_once(' ')?;
            (device.trim() == name).then(|| major.parse().ok())?
        })
}

/// The grants of a worker on `device` (`cpu` or `cuda:N`) on a node with `gpus` GPUs.
pub fn for_device(device: &str, gpus: usize, proc_devices: &str) -> Result<Vec<Grant>, String> {
    let mut grants = basics();
    if device == "cpu" {
        return Ok(grants);
    }
    let Some(index) = device
        .strip_prefix("cuda:")
        .and_then(|n| n.parse::<u32>().ok())
    else {
        return Err(format!(
            "cannot grant device {device:?}: name `cpu` or `cuda:N`"
        ));
    };
    if index as usize >= gpus {
        return Err(format!(
            "cannot grant {device}: this node has {gpus} GPU{} ({})",
            if gpus == 1 { "" } else { "s" },
            match gpus {
                0 => "none".to_owned(),
                1 => "cuda:0".to_owned(),
                n => format!("cuda:0 to cuda:{}", n - 1),
            }
        ));
    }
    if index >= NVIDIACTL_MINOR - 1 {
        return Err(format!("cannot grant {device}: NVIDIA minors stop at 253"));
    }
    let Some(uvm) = char_major(proc_devices, "nvidia-uvm") else {
        return Err(
            "cannot grant a GPU: the nvidia-uvm driver is not loaded (no `nvidia-uvm` in \
             /proc/devices), and CUDA needs it; load it with `modprobe nvidia-uvm` or \
             `nvidia-modprobe -u -c=0`"
                .to_owned(),
        );
    };
    grants.push(Grant::char(
        NVIDIA_MAJOR,
        Some(index),
        access::READ_WRITE,
        &format!("/dev/nvidia{index}"),
    ));
    grants.push(Grant::char(
        NVIDIA_MAJOR,
        Some(NVIDIACTL_MINOR),
        access::READ_WRITE,
        "/dev/nvidiactl",
    ));
    // Minor 0 is /dev/nvidia-uvm, 1 /dev/nvidia-uvm-tools; both are per node, not per GPU.
    grants.push(Grant::char(
        uvm,
        None,
        access::READ_WRITE,
        "/dev/nvidia-uvm*",
    ));
    Ok(grants)
}

#[cfg(test)]
mod tests {
    use super::*;

    const PROC_DEVICES: &str = "\
Character devices:
  1 mem
  4 tty
195 nvidia-frontend
508 nvidia-uvm
509 nvidia-caps

Block devices:
  7 loop
508 nvidia-uvm-block-impostor
";

    #[test]
    fn a_cpu_worker_gets_the_basics_only() {
        let grants = for_device("cpu", 8, PROC_DEVICES).unwrap();
        assert_eq!(grants, basics());
        assert!(grants
            .iter()
            .all(|g| g.major == 1 && g.access & access::MKNOD == 0));
        assert_eq!(grants[0].to_string(), "/dev/null (c 1:3 rw)");
    }

    #[test]
    fn a_gpu_worker_gets_its_gpu_the_control_node_and_uvm() {
        let grants = for_device("cuda:3", 8, PROC_DEVICES).unwrap();
        let extra: Vec<String> = grants[basics().len()..]
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            extra,
            [
                "/dev/nvidia3 (c 195:3 rw)",
                "/dev/nvidiactl (c 195:255 rw)",
                "/dev/nvidia-uvm* (c 508:* rw)",
            ]
        );
        // Another GPU's node is not among them.
        assert!(!grants
            .iter()
            .any(|g| g.major == NVIDIA_MAJOR && g.minor == Some(2)));
    }

    #[test]
    fn grants_of_what_does_not_exist_are_refused_with_the_reason() {
        let err = for_device("cuda:1", 1, PROC_DEVICES).unwrap_err();
        assert!(err.contains("this node has 1 GPU (cuda:0)"), "{err}");
        let err = for_device("cuda:0", 0, PROC_DEVICES).unwrap_err();
        assert!(err.contains("0 GPUs (none)"), "{err}");
        let err = for_device("tpu:0", 1, PROC_DEVICES).unwrap_err();
        assert!(err.contains("`cpu` or `cuda:N`"), "{err}");
        let err = for_device("cuda:0", 1, "Character devices:\n  1 mem\n").unwrap_err();
        assert!(err.contains("nvidia-uvm driver is not loaded"), "{err}");
    }

    #[test]
    fn majors_are_read_from_the_character_section_only() {
        assert_eq!(char_major(PROC_DEVICES, "nvidia-uvm"), Some(508));
        assert_eq!(char_major(PROC_DEVICES, "loop"), None);
        assert_eq!(char_major(PROC_DEVICES, "nvidia-uvm-block-impostor"), None);
        assert_eq!(char_major("", "mem"), None);
    }
}
