//! Who is calling: maps a caller's credentials to operator, a tenant, or nobody.
//!
//! Pure given a [`UserDb`] (the seam for user and group name lookups). Resolution order, first
//! match wins:
//! 1. uid 0, or an operator rule (uid, user, gid, group; primary or supplementary groups): operator;
//! 2. a tenant's `uids`, then `users` (the caller's uid and its user name);
//! 3. a tenant's `gids`, then `groups`, by the caller's primary group, then its supplementary
//!    groups in the order the kernel reports them;
//! 4. the default tenant, if the policy has one;
//! 5. otherwise the caller is refused.
//!
//! On the TCP listener the caller is a bearer token instead, matched by its SHA-256.

use serde::Serialize;

use super::validate::token_sha256;
use super::{IdRangeSpec, Policy, Tenant};

/// Credentials of a local caller, from `SO_PEERCRED` plus its supplementary groups.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub uid: u32,
    pub gid: u32,
    pub pid: Option<i32>,
    /// Supplementary groups (may include the primary one).
    pub groups: Vec<u32>,
}

/// Name lookups for users and groups (the system's NSS in the daemon, a map in tests).
pub trait UserDb {
    fn user_name(&self, uid: u32) -> Option<String>;
    fn group_name(&self, gid: u32) -> Option<String>;
}

/// What a caller may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Operator,
    Tenant,
}

/// The result of identifying a caller.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Identity {
    pub role: Role,
    /// The tenant a tenant caller maps to; for operators, the tenant they act for, if any.
    pub tenant: Option<String>,
    /// The rule that matched, for logs and `whoami`: "uid 0", "group \"ml\"", "default tenant".
    pub matched_by: String,
}

fn in_ranges(ranges: &[IdRangeSpec], id: u32) -> bool {
    ranges.iter().any(|r| r.first <= id && id <= r.last)
}

impl Policy {
    /// Maps a local caller to operator or tenant; `None` when no rule matches.
    pub fn identify(&self, caller: &Caller, db: &dyn UserDb) -> Option<Identity> {
        let operator = |matched_by: String| Identity {
            role: Role::Operator,
            tenant: None,
            matched_by,
        };
        let tenant = |t: &Tenant, matched_by: String| Identity {
            role: Role::Tenant,
            tenant: Some(t.name.clone()),
            matched_by,
        };
        if caller.uid == 0 {
            return Some(operator("uid 0".into()));
        }
        // Name lookups may go to NSS (LDAP, sssd): do them only if some rule names users or groups.
        let names_users = !self.operators.users.is_empty()
            || self.tenants.iter().any(|t| !t.matches.users.is_empty());
        let names_groups = !self.operators.groups.is_empty()
            || self.tenants.iter().any(|t| !t.matches.groups.is_empty());
        let user = if names_users {
            db.user_name(caller.uid)
        } else {
            None
        };
        let mut gids = vec![caller.gid];
        gids.extend(caller.groups.iter().copied().filter(|g| *g != caller.gid));
        let group_names: Vec<Option<String>> = gids
            .iter()
            .map(|g| {
                if names_groups {
                    db.group_name(*g)
                } else {
                    None
                }
            })
            .collect();

        let ops = &self.operators;
        if in_ranges(&ops.uids, caller.uid) {
            return Some(operator(format!("operator uid {}", caller.uid)));
        }
        if let Some(u) = user.as_ref().filter(|u| ops.users.contains(u)) {
            return Some(operator(format!("operator user {u:?}")));
        }
        for (gid, name) in gids.iter().zip(&group_names) {
            if in_ranges(&ops.gids, *gid) {
                return Some(operator(format!("operator gid {gid}")));
            }
            if let Some(n) = name.as_ref().filter(|n| ops.groups.contains(n)) {
                return Some(operator(format!("operator group {n:?}")));
            }
        }

        for t in &self.tenants {
            if in_ranges(&t.matches.uids, caller.uid) {
                return Some(tenant(t, format!("uid {}", caller.uid)));
            }
        }
        if let Some(u) = &user {
            if let Some(t) = self.tenants.iter().find(|t| t.matches.users.contains(u)) {
                return Some(tenant(t, format!("user {u:?}")));
            }
        }
        for (gid, name) in gids.iter().zip(&group_names) {
            if let Some(t) = self
                .tenants
                .iter()
                .find(|t| in_ranges(&t.matches.gids, *gid))
            {
                return Some(tenant(t, format!("gid {gid}")));
            }
            if let Some(n) = name {
                if let Some(t) = self.tenants.iter().find(|t| t.matches.groups.contains(n)) {
                    return Some(tenant(t, format!("group {n:?}")));
                }
            }
        }
        self.tenants
            .iter()
            .find(|t| t.matches.default)
            .map(|t| tenant(t, "default tenant".into()))
    }

    /// Maps a bearer token (TCP listener) to operator or tenant; `None` when unknown.
    pub fn identify_token(&self, token: &str) -> Option<Identity> {
        let hash = token_sha256(token);
        if self.operators.tokens_sha256.contains(&hash) {
            return Some(Identity {
                role: Role::Operator,
                tenant: None,
                matched_by: "operator token".into(),
            });
        }
        self.tenants
            .iter()
            .find(|t| t.matches.tokens_sha256.contains(&hash))
            .map(|t| Identity {
                role: Role::Tenant,
                tenant: Some(t.name.clone()),
                matched_by: "bearer token".into(),
            })
    }
}
