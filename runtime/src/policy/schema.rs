//! The tenant policy file format: what operators write in YAML, deserialized as is.
//!
//! Every struct denies unknown fields so a typo is an error, not a silently ignored limit.
//! Nothing here is checked beyond types; `validate` turns these into a [`super::Policy`].

use serde::{Deserialize, Serialize};

use crate::units::ByteSize;

/// One policy file. Several files (the base policy plus a policy directory) make a policy.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyFile {
    /// Who may administer the daemon, besides root (always an operator).
    #[serde(default)]
    pub operators: OperatorsSpec,
    /// Tenants defined in this file.
    #[serde(default)]
    pub tenants: Vec<TenantSpec>,
}

/// Callers who are operators.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct OperatorsSpec {
    #[serde(default)]
    pub uids: Vec<IdRangeSpec>,
    #[serde(default)]
    pub users: Vec<String>,
    #[serde(default)]
    pub gids: Vec<IdRangeSpec>,
    /// Group names whose members are operators (the "admin group").
    #[serde(default)]
    pub groups: Vec<String>,
    /// SHA-256 (hex) of bearer tokens accepted on the TCP listener for operators.
    #[serde(default)]
    pub tokens_sha256: Vec<String>,
}

/// A tenant: a team or service with its share of the node.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TenantSpec {
    pub name: String,
    /// How callers are mapped to this tenant.
    #[serde(default, rename = "match")]
    pub matches: MatchSpec,
    /// Share under contention, relative to other tenants' weights.
    #[serde(default = "default_weight")]
    pub weight: u32,
    #[serde(default)]
    pub class: PriorityClass,
    /// `shared` workers, or `dedicated` ones of its own (with the daemon's `isolation: shared`).
    #[serde(default)]
    pub isolation: TenantIsolation,
    #[serde(default)]
    pub limits: LimitsSpec,
    /// Seal the tenant's KV blocks in the disk tier with AES-256-GCM, under a key generated
    /// when the daemon needs it and held only in its memory.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub encrypt_kv_at_rest: bool,
    /// Model names (or `*`) this tenant may use.
    #[serde(default = "everything")]
    pub models: Vec<String>,
    /// Device selectors (`cpu`, `cuda:0`, a GPU UUID, or `*`) this tenant may use.
    #[serde(default = "everything")]
    pub devices: Vec<String>,
}

/// Caller-to-tenant mapping rules.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MatchSpec {
    #[serde(default)]
    pub uids: Vec<IdRangeSpec>,
    #[serde(default)]
    pub users: Vec<String>,
    #[serde(default)]
    pub gids: Vec<IdRangeSpec>,
    #[serde(default)]
    pub groups: Vec<String>,
    /// SHA-256 (hex) of bearer tokens accepted on the TCP listener for this tenant.
    #[serde(default)]
    pub tokens_sha256: Vec<String>,
    /// Catch-all: callers no other rule maps land here. At most one tenant may set it.
    #[serde(default)]
    pub default: bool,
}

/// Scheduling class.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PriorityClass {
    /// Latency-sensitive requests, scheduled ahead of batch work.
    #[default]
    Interactive,
    /// Throughput work that yields to interactive requests.
    Batch,
}

/// Whose worker processes serve a tenant.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TenantIsolation {
    /// The pool every tenant shares.
    #[default]
    Shared,
    /// Workers of its own, in its cgroup under its `memory`, `cpu` and `pids` limits.
    Dedicated,
}

/// Per-tenant limits; an absent limit means unlimited.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_concurrent_requests: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens_per_minute: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kv_blocks: Option<u64>,
    /// Host-tier KV blocks (swap space) the tenant's preempted sequences may hold per device;
    /// past it a preemption recomputes instead (0: never swapped).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_kv_blocks: Option<u64>,
    /// Disk-tier KV blocks the tenant's preempted sequences may hold per device once the host
    /// tier is full; past it a preemption recomputes instead (0: never swapped to disk).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_kv_blocks: Option<u64>,
    /// Host memory of the tenant's workers (cgroup `memory.max`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<ByteSize>,
    /// CPU cores of the tenant's workers (cgroup `cpu.max`), e.g. 1.5.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu: Option<f64>,
    /// Processes and threads of the tenant's workers (cgroup `pids.max`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pids: Option<u64>,
    /// Unfinished batch jobs at once (default: the config's `jobs.max_active_per_tenant`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_jobs: Option<u32>,
}

/// A uid or gid, or an inclusive range written `"1000-1999"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdRangeSpec {
    pub first: u32,
    pub last: u32,
}

/// Written back the way it is read: `1001` or `"1000-1999"`.
impl Serialize for IdRangeSpec {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if self.first == self.last {
            s.serialize_u32(self.first)
        } else {
            s.serialize_str(&format!("{}-{}", self.first, self.last))
        }
    }
}

impl<'de> Deserialize<'de> for IdRangeSpec {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Id;
        impl serde::de::Visitor<'_> for Id {
            type Value = IdRangeSpec;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("an id such as 1001, or an inclusive range such as \"1000-1999\"")
            }

            fn visit_u64<E: serde::de::Error>(self, id: u64) -> Result<IdRangeSpec, E> {
                let id = u32::try_from(id).map_err(|_| {
                    E::custom(format!("{id} is larger than the largest id, {}", u32::MAX))
                })?;
                Ok(IdRangeSpec {
                    first: id,
                    last: id,
                })
            }

            fn visit_i64<E: serde::de::Error>(self, id: i64) -> Result<IdRangeSpec, E> {
                match u64::try_from(id) {
                    Ok(id) => self.visit_u64(id),
                    Err(_) => Err(E::custom(format!("{id} is negative; ids start at 0"))),
                }
            }

            fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<IdRangeSpec, E> {
                let parse = |s: &str| -> Option<u32> { s.trim().parse().ok() };
                let (first, last) = match text.split_once('-') {
                    Some((a, b)) => (parse(a), parse(b)),
                    None => (parse(text), parse(text)),
                };
                match (first, last) {
                    (Some(first), Some(last)) => Ok(IdRangeSpec { first, last }),
                    _ => Err(E::custom(format!(
                        "cannot parse {text:?} as an id or an id range; write 1001 or \"1000-1999\""
                    ))),
                }
            }
        }
        d.deserialize_any(Id)
    }
}

fn default_weight() -> u32 {
    1
}

fn everything() -> Vec<String> {
    vec!["*".to_owned()]
}
