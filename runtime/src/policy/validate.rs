//! Turns parsed policy files into a [`Policy`], collecting every problem with its file, YAML
//! path and line rather than stopping at the first.
//!
//! Per-field checks run file by file; cross-file checks (duplicate tenants, a uid mapped to two
//! tenants, two default tenants) run over everything and name both places.

use sha2::Digest as _;

use super::schema::{IdRangeSpec, MatchSpec, OperatorsSpec, PolicyFile, TenantSpec};
use super::{Matchers, Operators, Policy, PolicySource, Tenant};
use crate::yaml::{Document, PathProblem, Problem, Problems};

/// Largest weight: keeps virtual-time arithmetic far from overflow.
pub const MAX_WEIGHT: u32 = 10_000;
/// The label of operators' requests made for no tenant, so no tenant may have it.
pub const RESERVED_TENANT_NAME: &str = "operator";

/// Longest tenant name: it becomes a cgroup directory and a metric label.
pub const MAX_TENANT_NAME: usize = 63;

/// Where one claim (a uid range, a user name, ...) was made.
struct Claim<'a> {
    tenant: &'a str,
    doc: usize,
    path: String,
}

pub(super) fn build(sources: &[PolicySource]) -> Result<Policy, Problems> {
    let mut problems: Vec<Problem> = Vec::new();
    let mut docs = Vec::new();
    for source in sources {
        match Document::<PolicyFile>::parse(&source.name, &source.text) {
            Ok(doc) => docs.push(doc),
            Err(found) => problems.extend(found),
        }
    }

    let mut per_doc: Vec<Vec<PathProblem>> = docs.iter().map(|_| Vec::new()).collect();
    let mut tenants = Vec::new();
    let mut operators = Operators::default();

    for (d, doc) in docs.iter().enumerate() {
        let out = &mut per_doc[d];
        merge_operators(&mut operators, &doc.value.operators, out);
        for (i, spec) in doc.value.tenants.iter().enumerate() {
            let pos = doc.locate(&format!("tenants[{i}]"));
            let tenant = check_tenant(spec, &format!("tenants[{i}]"), out);
            tenants.push((
                d,
                i,
                Tenant {
                    defined_at: format!("{}:{}", doc.file, pos.line),
                    ..tenant
                },
            ));
        }
    }

    cross_checks(&docs, &tenants, &mut per_doc);

    for (doc, found) in docs.iter().zip(per_doc) {
        problems.extend(doc.locate_all(found));
    }
    if !problems.is_empty() {
        return Err(Problems(problems));
    }
    Ok(Policy {
        tenants: tenants.into_iter().map(|(_, _, t)| t).collect(),
        operators,
        sources: sources.iter().map(|s| s.name.clone()).collect(),
    })
}

fn check_ranges(ranges: &[IdRangeSpec], path: &str, out: &mut Vec<PathProblem>) {
    for (j, r) in ranges.iter().enumerate() {
        if r.first > r.last {
            out.push(PathProblem::new(
                format!("{path}[{j}]"),
                format!(
                    "range {}-{} is reversed; write {}-{}",
                    r.first, r.last, r.last, r.first
                ),
            ));
        }
    }
}

fn check_names(names: &[String], what: &str, path: &str, out: &mut Vec<PathProblem>) {
    for (j, name) in names.iter().enumerate() {
        if name.trim().is_empty() || name.contains(char::is_whitespace) {
            out.push(PathProblem::new(
                format!("{path}[{j}]"),
                format!("{what} name {name:?} is empty or contains spaces"),
            ));
        }
    }
}

fn check_tokens(tokens: &[String], path: &str, out: &mut Vec<PathProblem>) -> Vec<[u8; 32]> {
    let mut hashes = Vec::new();
    for (j, token) in tokens.iter().enumerate() {
        match decode_sha256(token) {
            Some(hash) => hashes.push(hash),
            None => out.push(PathProblem::new(
                format!("{path}[{j}]"),
                "expected 64 hex digits, the SHA-256 of the token (`printf %s TOKEN | sha256sum`)",
            )),
        }
    }
    hashes
}

/// Parses 64 hex digits into 32 bytes.
pub(crate) fn decode_sha256(hex: &str) -> Option<[u8; 32]> {
    let hex = hex.trim();
    if hex.len() != 64 || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

/// The SHA-256 of a bearer token, as policy files store it.
pub(crate) fn token_sha256(token: &str) -> [u8; 32] {
    sha2::Sha256::digest(token.as_bytes()).into()
}

fn merge_operators(into: &mut Operators, spec: &OperatorsSpec, out: &mut Vec<PathProblem>) {
    check_ranges(&spec.uids, "operators.uids", out);
    check_ranges(&spec.gids, "operators.gids", out);
    check_names(&spec.users, "user", "operators.users", out);
    check_names(&spec.groups, "group", "operators.groups", out);
    let tokens = check_tokens(&spec.tokens_sha256, "operators.tokens_sha256", out);
    into.uids.extend(&spec.uids);
    into.gids.extend(&spec.gids);
    into.users.extend(spec.users.iter().cloned());
    into.groups.extend(spec.groups.iter().cloned());
    into.tokens_sha256.extend(tokens);
}

/// `*`, `cpu`, `cuda:N`, or an NVIDIA GPU UUID as `nvidia-smi -L` prints it.
fn valid_device_selector(selector: &str) -> bool {
    match selector {
        "*" | "cpu" => true,
        s if s.starts_with("cuda:") => s["cuda:".len()..].parse::<u32>().is_ok(),
        s if s.starts_with("GPU-") => {
            let rest = &s["GPU-".len()..];
            !rest.is_empty() && rest.chars().all(|c| c.is_ascii_hexdigit() || c == '-')
        }
        _ => false,
    }
}

fn valid_tenant_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_lowercase() || c.is_ascii_digit())
        && name.len() <= MAX_TENANT_NAME
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_')
}

fn check_tenant(spec: &TenantSpec, path: &str, out: &mut Vec<PathProblem>) -> Tenant {
    if spec.name == RESERVED_TENANT_NAME {
        out.push(PathProblem::new(
            format!("{path}.name"),
            format!("tenant name {RESERVED_TENANT_NAME:?} is reserved: operators' own requests are counted and labelled under it; choose another name"),
        ));
    } else if !valid_tenant_name(&spec.name) {
        out.push(PathProblem::new(
            format!("{path}.name"),
            format!(
                "tenant name {:?} is not valid: use 1-{MAX_TENANT_NAME} lowercase letters, digits, '-' or '_', starting with a letter or digit (it names a cgroup and a metric label)",
                spec.name
            ),
        ));
    }
    if spec.weight == 0 || spec.weight > MAX_WEIGHT {
        out.push(PathProblem::new(
            format!("{path}.weight"),
            format!(
                "weight {} is out of range: use 1 to {MAX_WEIGHT}",
                spec.weight
            ),
        ));
    }
    let limits = &spec.limits;
    let lpath = format!("{path}.limits");
    if limits.max_concurrent_requests == Some(0) {
        out.push(PathProblem::new(
            format!("{lpath}.max_concurrent_requests"),
            "0 would refuse every request; raise it or remove the tenant",
        ));
    }
    if limits.max_jobs == Some(0) {
        out.push(PathProblem::new(
            format!("{lpath}.max_jobs"),
            "0 would refuse every batch job; raise it or leave it out for the config's default",
        ));
    }
    if limits.tokens_per_minute == Some(0) {
        out.push(PathProblem::new(
            format!("{lpath}.tokens_per_minute"),
            "0 would refuse every request; raise it or leave it out for no limit",
        ));
    }
    if let Some(cpu) = limits.cpu {
        if !(cpu.is_finite() && cpu >= 0.01) {
            out.push(PathProblem::new(
                format!("{lpath}.cpu"),
                format!("cpu {cpu} is not a positive number of cores (at least 0.01)"),
            ));
        }
    }
    if let Some(memory) = limits.memory {
        if memory.bytes() < 16 << 20 {
            out.push(PathProblem::new(
                format!("{lpath}.memory"),
                format!("memory {memory} is below the 16MiB a worker needs to start"),
            ));
        }
    }
    if limits.kv_blocks == Some(0) {
        out.push(PathProblem::new(
            format!("{lpath}.kv_blocks"),
            "0 would refuse every request; raise it or leave it out for no limit",
        ));
    }
    if limits.pids == Some(0) {
        out.push(PathProblem::new(
            format!("{lpath}.pids"),
            "0 would stop the tenant's worker from starting",
        ));
    }
    for (field, list) in [("models", &spec.models), ("devices", &spec.devices)] {
        if list.is_empty() {
            out.push(PathProblem::new(
                format!("{path}.{field}"),
                format!("an empty list allows no {field}; use [\"*\"] for all"),
            ));
        }
        check_names(
            list,
            field.trim_end_matches('s'),
            &format!("{path}.{field}"),
            out,
        );
    }
    for (j, device) in spec.devices.iter().enumerate() {
        if !valid_device_selector(device) {
            out.push(PathProblem::new(
                format!("{path}.devices[{j}]"),
                format!("{device:?} is not a device selector: use \"*\", \"cpu\", \"cuda:N\" or a GPU UUID (GPU-...)"),
            ));
        }
    }
    Tenant {
        name: spec.name.clone(),
        weight: spec.weight,
        class: spec.class,
        isolation: spec.isolation,
        limits: spec.limits.clone(),
        encrypt_kv_at_rest: spec.encrypt_kv_at_rest,
        models: spec.models.clone(),
        devices: spec.devices.clone(),
        matches: check_matches(&spec.matches, &format!("{path}.match"), out),
        defined_at: String::new(),
    }
}

fn check_matches(spec: &MatchSpec, path: &str, out: &mut Vec<PathProblem>) -> Matchers {
    check_ranges(&spec.uids, &format!("{path}.uids"), out);
    check_ranges(&spec.gids, &format!("{path}.gids"), out);
    check_names(&spec.users, "user", &format!("{path}.users"), out);
    check_names(&spec.groups, "group", &format!("{path}.groups"), out);
    let tokens_sha256 = check_tokens(&spec.tokens_sha256, &format!("{path}.tokens_sha256"), out);
    Matchers {
        uids: spec.uids.clone(),
        users: spec.users.clone(),
        gids: spec.gids.clone(),
        groups: spec.groups.clone(),
        default: spec.default,
        tokens: tokens_sha256.len(),
        tokens_sha256,
    }
}

fn overlaps(a: &IdRangeSpec, b: &IdRangeSpec) -> bool {
    a.first <= b.last && b.first <= a.last
}

fn describe(r: &IdRangeSpec) -> String {
    if r.first == r.last {
        r.first.to_string()
    } else {
        format!("{}-{}", r.first, r.last)
    }
}

fn cross_checks(
    docs: &[Document<PolicyFile>],
    tenants: &[(usize, usize, Tenant)],
    per_doc: &mut [Vec<PathProblem>],
) {
    let place = |claim: &Claim| {
        let pos = docs[claim.doc].locate(&claim.path);
        format!("{}:{}", docs[claim.doc].file, pos.line)
    };

    // Duplicate names.
    for (k, (d, i, t)) in tenants.iter().enumerate() {
        if let Some((d0, i0, _)) = tenants[..k].iter().find(|(_, _, t0)| t0.name == t.name) {
            let first = Claim {
                tenant: &t.name,
                doc: *d0,
                path: format!("tenants[{i0}].name"),
            };
            per_doc[*d].push(PathProblem::new(
                format!("tenants[{i}].name"),
                format!(
                    "duplicate tenant {:?}: already defined at {}; rename one or merge them",
                    t.name,
                    place(&first)
                ),
            ));
        }
    }

    // At most one default tenant.
    let defaults: Vec<_> = tenants
        .iter()
        .filter(|(_, _, t)| t.matches.default)
        .collect();
    for (d, i, t) in defaults.iter().skip(1) {
        let (d0, i0, t0) = defaults[0];
        let first = Claim {
            tenant: &t0.name,
            doc: *d0,
            path: format!("tenants[{i0}].match.default"),
        };
        per_doc[*d].push(PathProblem::new(
            format!("tenants[{i}].match.default"),
            format!(
                "tenant {:?} and tenant {:?} ({}) are both the default; only one tenant may catch unmatched callers",
                t.name,
                t0.name,
                place(&first)
            ),
        ));
    }

    // No id range, name or token may map to two tenants.
    type RangeOf = fn(&Matchers) -> &Vec<IdRangeSpec>;
    for (field, ranges_of) in [
        ("uids", (|m: &Matchers| &m.uids) as RangeOf),
        ("gids", (|m: &Matchers| &m.gids) as RangeOf),
    ] {
        let mut seen: Vec<(IdRangeSpec, Claim)> = Vec::new();
        for (d, i, t) in tenants {
            for (j, r) in ranges_of(&t.matches).iter().enumerate() {
                let path = format!("tenants[{i}].match.{field}[{j}]");
                if let Some((r0, c0)) = seen
                    .iter()
                    .find(|(r0, c0)| c0.tenant != t.name && overlaps(r0, r))
                {
                    per_doc[*d].push(PathProblem::new(
                        path.clone(),
                        format!(
                            "{} {} of tenant {:?} overlaps {} of tenant {:?} ({}); a caller must map to one tenant",
                            field.trim_end_matches('s'),
                            describe(r),
                            t.name,
                            describe(r0),
                            c0.tenant,
                            place(c0)
                        ),
                    ));
                }
                seen.push((
                    *r,
                    Claim {
                        tenant: &t.name,
                        doc: *d,
                        path,
                    },
                ));
            }
        }
    }
    type NamesOf = fn(&Matchers) -> &Vec<String>;
    for (field, names_of) in [
        ("users", (|m: &Matchers| &m.users) as NamesOf),
        ("groups", (|m: &Matchers| &m.groups) as NamesOf),
    ] {
        let mut seen: Vec<(&str, Claim)> = Vec::new();
        for (d, i, t) in tenants {
            for (j, name) in names_of(&t.matches).iter().enumerate() {
                let path = format!("tenants[{i}].match.{field}[{j}]");
                if let Some((_, c0)) = seen
                    .iter()
                    .find(|(n0, c0)| *n0 == name && c0.tenant != t.name)
                {
                    per_doc[*d].push(PathProblem::new(
                        path.clone(),
                        format!(
                            "{} {name:?} maps to tenant {:?} and to tenant {:?} ({}); a caller must map to one tenant",
                            field.trim_end_matches('s'),
                            t.name,
                            c0.tenant,
                            place(c0)
                        ),
                    ));
                }
                seen.push((
                    name,
                    Claim {
                        tenant: &t.name,
                        doc: *d,
                        path,
                    },
                ));
            }
        }
    }
    // A token is either an operator's or one tenant's: an operator token would silently win.
    for (d, doc) in docs.iter().enumerate() {
        for (j, hex) in doc.value.operators.tokens_sha256.iter().enumerate() {
            let Some(hash) = decode_sha256(hex) else {
                continue;
            };
            if let Some((_, _, t)) = tenants
                .iter()
                .find(|(_, _, t)| t.matches.tokens_sha256.contains(&hash))
            {
                per_doc[d].push(PathProblem::new(
                    format!("operators.tokens_sha256[{j}]"),
                    format!("this token also maps to tenant {:?}; issue operators and tenants different tokens", t.name),
                ));
            }
        }
    }
    let mut seen_tokens: Vec<([u8; 32], Claim)> = Vec::new();
    for (d, i, t) in tenants {
        for (j, hash) in t.matches.tokens_sha256.iter().enumerate() {
            let path = format!("tenants[{i}].match.tokens_sha256[{j}]");
            if let Some((_, c0)) = seen_tokens
                .iter()
                .find(|(h0, c0)| h0 == hash && c0.tenant != t.name)
            {
                per_doc[*d].push(PathProblem::new(
                    path.clone(),
                    format!(
                        "this token also maps to tenant {:?} ({}); issue each tenant its own token",
                        c0.tenant,
                        place(c0)
                    ),
                ));
            }
            seen_tokens.push((
                *hash,
                Claim {
                    tenant: &t.name,
                    doc: *d,
                    path,
                },
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tenant_names() {
        for ok in ["default", "ml-team", "a", "team_2", "9lives"] {
            assert!(valid_tenant_name(ok), "{ok}");
        }
        for bad in ["", "Search", "-x", "a b", "a/b", &"x".repeat(64)] {
            assert!(!valid_tenant_name(bad), "{bad}");
        }
    }

    #[test]
    fn device_selectors() {
        for ok in [
            "*",
            "cpu",
            "cuda:0",
            "cuda:12",
            "GPU-8f6c1a2e-1b2c-4d5e-9f00-0123456789ab",
        ] {
            assert!(valid_device_selector(ok), "{ok}");
        }
        for bad in ["cuda0", "cuda:", "cuda:x", "gpu", "GPU-", "GPU-xyz", ""] {
            assert!(!valid_device_selector(bad), "{bad}");
        }
    }

    #[test]
    fn sha256_hex() {
        let hash = token_sha256("secret");
        let hex: String = hash.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(
            hex,
            "2bb80d537b1da3e38bd30361aa855686bde0eacd7162fef6a25fe97bf527a25b"
        );
        assert_eq!(decode_sha256(&hex), Some(hash));
        assert_eq!(decode_sha256("abc"), None);
        assert_eq!(decode_sha256(&"zz".repeat(32)), None);
        // from_str_radix alone would accept a sign.
        assert_eq!(decode_sha256(&format!("+1{}", "0".repeat(62))), None);
    }
}
