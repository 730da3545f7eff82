//! A tenant's limits as cgroup files: which file gets which value, in v2 and in v1. Pure.

use crate::policy::Tenant;

/// The scheduler period `cpu.max` and `cpu.cfs_quota_us` are written against (100 ms, the
/// kernel's default).
pub const CPU_PERIOD_US: u64 = 100_000;

/// What the kernel enforces for one tenant's workers together.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TenantLimits {
    /// Hard memory limit in bytes; past it the kernel reclaims, then OOM-kills in the group.
    pub memory_max: Option<u64>,
    /// The tenant's share of the CPU under contention (the policy's `weight`).
    pub weight: u32,
    /// Cores the tenant may use at most (`limits.cpu`, e.g. 1.5).
    pub cpus: Option<f64>,
    /// Processes and threads at most.
    pub pids_max: Option<u64>,
}

impl TenantLimits {
    pub fn of(tenant: &Tenant) -> Self {
        Self {
            memory_max: tenant.limits.memory.map(|m| m.bytes()),
            weight: tenant.weight,
            cpus: tenant.limits.cpu,
            pids_max: tenant.limits.pids,
        }
    }

    /// Where reclaim starts before the hard limit (`memory.high`): nine tenths of it, so a
    /// tenant near its limit is slowed and reclaimed before it is killed.
    pub fn memory_high(&self) -> Option<u64> {
        self.memory_max.map(|max| max / 10 * 9)
    }

    fn cpu_quota_us(&self) -> Option<u64> {
        // Validation keeps `cpu` finite and at least 0.01; the kernel's least quota is 1 ms.
        self.cpus
            .map(|c| ((c * CPU_PERIOD_US as f64).round() as u64).max(1_000))
    }

    /// v2 files and values, in the order to write them (`memory.high` before `memory.max`, so a
    /// lowered limit reclaims gently first).
    pub fn v2_files(&self) -> Vec<(&'static str, String)> {
        let or_max = |v: Option<u64>| v.map_or_else(|| "max".to_owned(), |v| v.to_string());
        vec![
            ("memory.high", or_max(self.memory_high())),
            ("memory.max", or_max(self.memory_max)),
            // v2 weights run 1..=10000 around 100; a policy weight of 1 is the default 100.
            (
                "cpu.weight",
                (u64::from(self.weight) * 100).clamp(1, 10_000).to_string(),
            ),
            (
                "cpu.max",
                format!("{} {CPU_PERIOD_US}", or_max(self.cpu_quota_us())),
            ),
            ("pids.max", or_max(self.pids_max)),
        ]
    }

    /// v1 files and values, each with the controller whose hierarchy holds it. v1 has no
    /// `memory.high`; its soft limit is the nearest thing (reclaimed first under pressure).
    pub fn v1_files(&self) -> Vec<(&'static str, &'static str, String)> {
        let or_unlimited = |v: Option<u64>| v.map_or_else(|| "-1".to_owned(), |v| v.to_string());
        vec![
            (
                "memory",
                "memory.soft_limit_in_bytes",
                or_unlimited(self.memory_high()),
            ),
            (
                "memory",
                "memory.limit_in_bytes",
                or_unlimited(self.memory_max),
            ),
            // v1 shares run 2..=262144 around 1024.
            (
                "cpu",
                "cpu.shares",
                (u64::from(self.weight) * 1024)
                    .clamp(2, 262_144)
                    .to_string(),
            ),
            ("cpu", "cpu.cfs_period_us", CPU_PERIOD_US.to_string()),
            ("cpu", "cpu.cfs_quota_us", or_unlimited(self.cpu_quota_us())),
            (
                "pids",
                "pids.max",
                self.pids_max
                    .map_or_else(|| "max".to_owned(), |v| v.to_string()),
            ),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> TenantLimits {
        TenantLimits {
            memory_max: Some(1 << 30),
            weight: 3,
            cpus: Some(1.5),
            pids_max: Some(64),
        }
    }

    #[test]
    fn v2_values_follow_the_policy() {
        let files = limits().v2_files();
        let get = |name: &str| files.iter().find(|(n, _)| *n == name).unwrap().1.clone();
        assert_eq!(get("memory.max"), "1073741824");
        assert_eq!(get("memory.high"), (1073741824u64 / 10 * 9).to_string());
        assert_eq!(get("cpu.weight"), "300");
        assert_eq!(get("cpu.max"), "150000 100000");
        assert_eq!(get("pids.max"), "64");
        // High is written before max, so lowering both never leaves high above max.
        let order: Vec<&str> = files.iter().map(|(n, _)| *n).collect();
        assert!(
            order.iter().position(|n| *n == "memory.high")
                < order.iter().position(|n| *n == "memory.max")
        );
    }

    #[test]
    fn absent_limits_are_unlimited_and_weights_are_clamped() {
        let open = TenantLimits {
            memory_max: None,
            weight: 10_000,
            cpus: None,
            pids_max: None,
        };
        let v2 = open.v2_files();
        assert!(v2.contains(&("memory.max", "max".into())));
        assert!(v2.contains(&("cpu.max", "max 100000".into())));
        assert!(v2.contains(&("cpu.weight", "10000".into())));
        let v1 = open.v1_files();
        assert!(v1.contains(&("memory", "memory.limit_in_bytes", "-1".into())));
        assert!(v1.contains(&("cpu", "cpu.cfs_quota_us", "-1".into())));
        assert!(v1.contains(&("cpu", "cpu.shares", "262144".into())));
        assert!(v1.contains(&("pids", "pids.max", "max".into())));
    }

    #[test]
    fn a_tiny_cpu_share_still_gets_the_kernels_least_quota() {
        let tiny = TenantLimits {
            cpus: Some(0.001),
            ..limits()
        };
        assert!(tiny.v2_files().contains(&("cpu.max", "1000 100000".into())));
        assert!(limits()
            .v1_files()
            .contains(&("cpu", "cpu.cfs_quota_us", "150000".into())));
    }
}
