//! Tenant policy: who the tenants are, how callers map to them, and their shares and limits.
//!
//! Owns the policy model from YAML text to a validated, immutable [`Policy`]. A policy is the
//! base file (the shipped default embedded in the binary, or `policy_file` from the daemon
//! config) plus every `*.yaml` / `*.yml` in the policy directory, in name order. Building one
//! is pure apart from [`PolicyPaths::read_sources`]; a live daemon swaps the whole `Arc<Policy>`
//! on reload, so a request sees either the old policy or the new one, never a mix.
//!
//! Invariants of a [`Policy`]: tenant names are unique and valid label/cgroup names; no uid,
//! gid, user, group or token maps to two tenants; at most one tenant is the default.

pub mod identity;
pub mod schema;
mod validate;

pub use self::validate::RESERVED_TENANT_NAME;

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use self::identity::{Caller, Identity, Role, UserDb};
pub use self::schema::{IdRangeSpec, LimitsSpec, PriorityClass, TenantIsolation};
use crate::yaml::{Problem, Problems};

/// The shipped default policy, compiled in so a daemon with no files still has one.
pub const EMBEDDED_DEFAULT: &str = include_str!("../../../cgroup-policies/default.yaml");
/// How the embedded default policy is named in messages.
pub const EMBEDDED_NAME: &str = "<embedded default policy>";

/// The text of one policy file and the name it is reported under.
#[derive(Debug, Clone)]
pub struct PolicySource {
    pub name: String,
    pub text: String,
}

/// Where the daemon reads its policy from.
#[derive(Debug, Clone, Default)]
pub struct PolicyPaths {
    /// The base policy; `None` means the embedded default.
    pub base: Option<PathBuf>,
    /// A directory of extra policy files; a missing directory contributes nothing.
    pub dir: Option<PathBuf>,
    /// Refuse files and directories others than root (or our user) could write. The daemon
    /// sets this; `accelctl policy check` does not (it only reads what it is shown).
    pub trusted: bool,
}

impl PolicyPaths {
    /// Reads every policy source, reporting each unreadable file as a problem.
    pub fn read_sources(&self) -> Result<Vec<PolicySource>, Problems> {
        let mut sources = Vec::new();
        let mut problems = Vec::new();
        match &self.base {
            None => sources.push(PolicySource {
                name: EMBEDDED_NAME.to_owned(),
                text: EMBEDDED_DEFAULT.to_owned(),
            }),
            Some(path) => match read_source(path, self.trusted) {
                Ok(source) => sources.push(source),
                Err(problem) => problems.push(problem),
            },
        }
        if let Some(dir) = &self.dir {
            let untrusted = match self.trusted && dir.exists() {
                true => crate::sys::check_trusted(dir).err(),
                false => None,
            };
            match std::fs::read_dir(dir) {
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                _ if untrusted.is_some() => {
                    let reason = untrusted.unwrap_or_default();
                    problems.push(file_problem(dir, format!("policy directory {reason}")));
                }
                Err(e) => problems.push(file_problem(
                    dir,
                    format!("cannot read policy directory: {e}"),
                )),
                Ok(entries) => {
                    let mut paths: Vec<PathBuf> = entries
                        .filter_map(|entry| entry.ok().map(|e| e.path()))
                        .filter(|p| {
                            matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml"))
                        })
                        // Editor backups and lock files (.#x.yaml, .x.yaml) are not policy.
                        .filter(|p| {
                            !p.file_name()
                                .and_then(|n| n.to_str())
                                .is_some_and(|n| n.starts_with('.'))
                        })
                        .collect();
                    paths.sort();
                    for path in paths {
                        match read_source(&path, self.trusted) {
                            Ok(source) => sources.push(source),
                            Err(problem) => problems.push(problem),
                        }
                    }
                }
            }
        }
        if problems.is_empty() {
            Ok(sources)
        } else {
            Err(Problems(problems))
        }
    }

    /// Reads and validates the whole policy.
    pub fn load(&self) -> Result<Policy, Problems> {
        Policy::from_sources(&self.read_sources()?)
    }
}

fn file_problem(path: &Path, message: String) -> Problem {
    Problem {
        file: path.display().to_string(),
        path: String::new(),
        line: 0,
        column: 0,
        message,
    }
}

fn read_source(path: &Path, trusted: bool) -> Result<PolicySource, Problem> {
    // One open, checked on its descriptor and read from it: a file swapped between a check
    // by path and a read by path could make a user an operator.
    let text = crate::sys::read_checked_file(path, crate::yaml::MAX_YAML_BYTES, trusted)
        .map_err(|reason| file_problem(path, format!("policy file {reason}")))?;
    Ok(PolicySource {
        name: path.display().to_string(),
        text,
    })
}

/// Validates one policy file on its own, as `accelctl policy check FILE` does.
pub fn check_file(path: &Path) -> Result<Policy, Problems> {
    let source = read_source(path, false).map_err(|p| Problems(vec![p]))?;
    Policy::from_sources(&[source])
}

/// A validated policy.
#[derive(Debug, Clone, Serialize)]
pub struct Policy {
    pub tenants: Vec<Tenant>,
    pub operators: Operators,
    /// The files it was built from, in order.
    pub sources: Vec<String>,
}

/// Callers who are operators, besides root.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Operators {
    pub uids: Vec<IdRangeSpec>,
    pub users: Vec<String>,
    pub gids: Vec<IdRangeSpec>,
    pub groups: Vec<String>,
    #[serde(skip)]
    pub tokens_sha256: Vec<[u8; 32]>,
}

/// A validated tenant.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Tenant {
    pub name: String,
    pub weight: u32,
    pub class: PriorityClass,
    pub isolation: TenantIsolation,
    pub limits: LimitsSpec,
    /// Its KV blocks in the disk tier are sealed (AES-256-GCM).
    #[serde(default)]
    pub encrypt_kv_at_rest: bool,
    pub models: Vec<String>,
    pub devices: Vec<String>,
    #[serde(rename = "match")]
    pub matches: Matchers,
    /// Where it is defined: `file:line`.
    pub defined_at: String,
}

/// Validated caller-to-tenant rules.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Matchers {
    pub uids: Vec<IdRangeSpec>,
    pub users: Vec<String>,
    pub gids: Vec<IdRangeSpec>,
    pub groups: Vec<String>,
    pub default: bool,
    /// Count only: token hashes are secrets-adjacent and never shown.
    pub tokens: usize,
    #[serde(skip)]
    pub tokens_sha256: Vec<[u8; 32]>,
}

impl Policy {
    /// Parses and validates policy files together, returning every problem found in any of them.
    pub fn from_sources(sources: &[PolicySource]) -> Result<Policy, Problems> {
        validate::build(sources)
    }

    /// The tenant named `name`.
    pub fn tenant(&self, name: &str) -> Option<&Tenant> {
        self.tenants.iter().find(|t| t.name == name)
    }
}

impl Tenant {
    /// Whether this tenant may use the model `name`.
    pub fn allows_model(&self, name: &str) -> bool {
        self.models.iter().any(|m| m == "*" || m == name)
    }
}

#[cfg(test)]
mod tests;
