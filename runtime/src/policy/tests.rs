//! Policy parsing, validation and caller mapping on in-memory files.

use std::collections::HashMap;

use super::*;

fn src(name: &str, text: &str) -> PolicySource {
    PolicySource {
        name: name.into(),
        text: text.into(),
    }
}

fn load(text: &str) -> Result<Policy, Problems> {
    Policy::from_sources(&[src("p.yaml", text)])
}

fn problems(text: &str) -> Vec<Problem> {
    load(text).expect_err("policy should be rejected").0
}

#[derive(Default)]
struct FakeDb {
    users: HashMap<u32, String>,
    groups: HashMap<u32, String>,
}

impl UserDb for FakeDb {
    fn user_name(&self, uid: u32) -> Option<String> {
        self.users.get(&uid).cloned()
    }
    fn group_name(&self, gid: u32) -> Option<String> {
        self.groups.get(&gid).cloned()
    }
}

fn caller(uid: u32, gid: u32, groups: &[u32]) -> Caller {
    Caller {
        uid,
        gid,
        pid: None,
        groups: groups.to_vec(),
    }
}

const TWO_TEAMS: &str = "\
operators:
  groups: [admins]
tenants:
  - name: alpha
    match:
      uids: [1001, \"2000-2099\"]
      groups: [ml]
  - name: beta
    match:
      users: [bob]
      gids: [700]
    weight: 3
    class: batch
    limits:
      memory: 2GiB
      cpu: 1.5
";

#[test]
fn embedded_default_policy_serves_everyone_as_default() {
    let policy = Policy::from_sources(&[src(EMBEDDED_NAME, EMBEDDED_DEFAULT)]).unwrap();
    let db = FakeDb::default();
    let root = policy.identify(&caller(0, 0, &[]), &db).unwrap();
    assert_eq!(root.role, Role::Operator);
    let someone = policy.identify(&caller(4242, 4242, &[]), &db).unwrap();
    assert_eq!(someone.role, Role::Tenant);
    assert_eq!(someone.tenant.as_deref(), Some("default"));
    let default = policy.tenant("default").unwrap();
    assert_eq!(default.limits.max_concurrent_requests, Some(4));
    assert_eq!(default.limits.memory.map(|m| m.bytes()), Some(8 << 30));
}

#[test]
fn callers_map_by_uid_user_gid_group_and_operator_group() {
    let policy = load(TWO_TEAMS).unwrap();
    let mut db = FakeDb::default();
    db.users.insert(1500, "bob".into());
    db.groups.insert(800, "ml".into());
    db.groups.insert(900, "admins".into());

    let who = |uid, gid, groups: &[u32]| policy.identify(&caller(uid, gid, groups), &db);
    assert_eq!(
        who(1001, 1001, &[]).unwrap().tenant.as_deref(),
        Some("alpha")
    );
    assert_eq!(who(2050, 1, &[]).unwrap().matched_by, "uid 2050");
    assert_eq!(who(1500, 1, &[]).unwrap().tenant.as_deref(), Some("beta"));
    assert_eq!(who(3000, 700, &[]).unwrap().tenant.as_deref(), Some("beta"));
    // Supplementary group "ml" maps to alpha.
    let by_group = who(3000, 1, &[5, 800]).unwrap();
    assert_eq!(by_group.tenant.as_deref(), Some("alpha"));
    assert_eq!(by_group.matched_by, "group \"ml\"");
    // A uid rule beats a group rule of another tenant.
    assert_eq!(
        who(1001, 700, &[]).unwrap().tenant.as_deref(),
        Some("alpha")
    );
    // The operator group makes anyone an operator.
    assert_eq!(who(1001, 1001, &[900]).unwrap().role, Role::Operator);
    // No default tenant: an unknown caller is refused.
    assert_eq!(who(4000, 4000, &[]), None);
}

#[test]
fn bearer_tokens_map_by_hash() {
    let hash: String = validate::token_sha256("s3cret")
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let text = format!("tenants:\n  - name: api\n    match:\n      tokens_sha256: [\"{hash}\"]\n");
    let policy = load(&text).unwrap();
    assert_eq!(
        policy.identify_token("s3cret").unwrap().tenant.as_deref(),
        Some("api")
    );
    assert_eq!(policy.identify_token("wrong"), None);
}

#[test]
fn malformed_yaml_reports_line_and_column() {
    let found = problems("tenants:\n  - name: a\n    match: {uids: [1,\n");
    assert_eq!(found.len(), 1);
    assert!(found[0].line >= 3, "{}", found[0]);
    assert!(found[0].column > 0, "{}", found[0]);
    assert!(found[0].to_string().starts_with("p.yaml:"), "{}", found[0]);
}

#[test]
fn unknown_field_is_named_with_its_line() {
    let found = problems("tenants:\n  - name: a\n    limits:\n      gpus: 2\n");
    assert_eq!(found[0].line, 4, "{}", found[0]);
    assert!(found[0].message.contains("gpus"), "{}", found[0]);
}

#[test]
fn unparsable_size_is_named_with_its_line() {
    let found = problems("tenants:\n  - name: a\n    limits:\n      memory: 10XB\n");
    assert_eq!(found[0].line, 4, "{}", found[0]);
    assert!(found[0].message.contains("10XB"), "{}", found[0]);
}

#[test]
fn duplicate_tenant_names_both_places() {
    let found = problems("tenants:\n  - name: a\n  - name: b\n  - name: a\n");
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(found[0].path, "tenants[2].name");
    assert_eq!(found[0].line, 4);
    assert!(
        found[0].message.contains("already defined at p.yaml:2"),
        "{}",
        found[0]
    );
}

#[test]
fn duplicate_tenant_across_files() {
    let err = Policy::from_sources(&[
        src("base.yaml", "tenants:\n  - name: a\n"),
        src("extra.yaml", "# comment\ntenants:\n  - name: a\n"),
    ])
    .unwrap_err();
    assert_eq!(err.0.len(), 1);
    assert_eq!(err.0[0].file, "extra.yaml");
    assert_eq!(err.0[0].line, 3);
    assert!(err.0[0].message.contains("base.yaml:2"), "{}", err.0[0]);
}

#[test]
fn overlapping_uid_mappings_name_both_tenants() {
    let found = problems(
        "tenants:\n  - name: a\n    match:\n      uids: [\"1000-1999\"]\n  - name: b\n    match:\n      uids: [5, 1500]\n",
    );
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(found[0].path, "tenants[1].match.uids[1]");
    assert_eq!(found[0].line, 7);
    let msg = &found[0].message;
    assert!(
        msg.contains("uid 1500")
            && msg.contains("\"a\"")
            && msg.contains("\"b\"")
            && msg.contains("p.yaml:4"),
        "{msg}"
    );
}

#[test]
fn overlapping_groups_and_two_defaults_are_rejected() {
    let found = problems(
        "tenants:\n  - name: a\n    match: {groups: [ml], default: true}\n  - name: b\n    match: {groups: [ml], default: true}\n",
    );
    assert_eq!(found.len(), 2, "{found:?}");
    assert!(found.iter().any(|p| p.message.contains("group \"ml\"")));
    assert!(found.iter().any(|p| p.message.contains("both the default")));
}

#[test]
fn every_problem_is_reported_at_once() {
    let found = problems(
        "\
tenants:
  - name: Bad Name
    weight: 0
    limits:
      cpu: -1
      memory: 1MiB
      max_concurrent_requests: 0
      kv_blocks: 0
    match:
      uids: [\"20-10\"]
      tokens_sha256: [nothex]
    models: []
",
    );
    let paths: Vec<&str> = found.iter().map(|p| p.path.as_str()).collect();
    for expected in [
        "tenants[0].name",
        "tenants[0].weight",
        "tenants[0].limits.cpu",
        "tenants[0].limits.memory",
        "tenants[0].limits.max_concurrent_requests",
        "tenants[0].limits.kv_blocks",
        "tenants[0].match.uids[0]",
        "tenants[0].match.tokens_sha256[0]",
        "tenants[0].models",
    ] {
        assert!(paths.contains(&expected), "missing {expected} in {paths:?}");
    }
    let weight = found
        .iter()
        .find(|p| p.path == "tenants[0].weight")
        .unwrap();
    assert_eq!(weight.line, 3);
    assert!(found.iter().all(|p| p.line > 0), "{found:?}");
}

#[test]
fn unreadable_files_are_problems_and_missing_dir_is_empty() {
    let dir = tempfile::tempdir().unwrap();
    let paths = PolicyPaths {
        base: Some(dir.path().join("absent.yaml")),
        dir: Some(dir.path().join("no-such-dir")),
        trusted: true,
    };
    let err = paths.load().unwrap_err();
    assert_eq!(err.0.len(), 1);
    assert!(err.0[0].file.ends_with("absent.yaml"));

    std::fs::write(dir.path().join("b.yaml"), "tenants:\n  - name: b\n").unwrap();
    std::fs::write(dir.path().join("a.yml"), "tenants:\n  - name: a\n").unwrap();
    std::fs::write(dir.path().join("notes.txt"), "not policy").unwrap();
    std::fs::write(dir.path().join(".#b.yaml"), "not: [valid").unwrap();
    let paths = PolicyPaths {
        base: None,
        dir: Some(dir.path().to_owned()),
        trusted: true,
    };
    let policy = paths.load().unwrap();
    let names: Vec<&str> = policy.tenants.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(names, ["default", "a", "b"]);
}

#[test]
fn readme_policy_reference_is_valid_and_names_every_field() {
    use crate::yaml::doc_check::{key_paths, readme_yaml};
    use schema::*;
    let text = readme_yaml("policy-reference");
    load(&text).unwrap_or_else(|p| panic!("README policy reference is invalid: {p}"));
    let written: serde_json::Value = serde_saphyr::from_str(&text).unwrap();

    // Every field spelled out, without `..Default::default()`, so a new field fails to compile here.
    let ids = vec![IdRangeSpec { first: 1, last: 1 }];
    let names = vec!["x".to_owned()];
    let full = PolicyFile {
        operators: OperatorsSpec {
            uids: ids.clone(),
            users: names.clone(),
            gids: ids.clone(),
            groups: names.clone(),
            tokens_sha256: names.clone(),
        },
        tenants: vec![TenantSpec {
            name: "x".into(),
            matches: MatchSpec {
                uids: ids.clone(),
                users: names.clone(),
                gids: ids,
                groups: names.clone(),
                tokens_sha256: names.clone(),
                default: false,
            },
            weight: 1,
            class: PriorityClass::Interactive,
            isolation: TenantIsolation::Dedicated,
            limits: LimitsSpec {
                max_concurrent_requests: Some(1),
                tokens_per_minute: Some(1),
                kv_blocks: Some(1),
                host_kv_blocks: Some(1),
                disk_kv_blocks: Some(1),
                memory: Some(crate::units::ByteSize(1)),
                cpu: Some(1.0),
                pids: Some(1),
                max_jobs: Some(1),
            },
            encrypt_kv_at_rest: true,
            models: names.clone(),
            devices: names,
        }],
    };
    let code = serde_json::to_value(full).unwrap();
    assert_eq!(
        key_paths(&written),
        key_paths(&code),
        "README's policy reference must show every policy field"
    );
}

#[test]
fn a_token_may_not_be_both_an_operators_and_a_tenants() {
    let hash: String = validate::token_sha256("t")
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let found = problems(&format!(
        "operators:\n  tokens_sha256: [\"{hash}\"]\ntenants:\n  - name: a\n    match:\n      tokens_sha256: [\"{hash}\"]\n"
    ));
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(found[0].path, "operators.tokens_sha256[0]");
    assert_eq!(found[0].line, 2);
}

#[test]
fn bad_device_selector_is_located() {
    let found = problems("tenants:\n  - name: a\n    devices: [cpu, cuda0]\n");
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(found[0].path, "tenants[0].devices[1]");
    assert_eq!(found[0].line, 3);
}

#[test]
fn the_operators_label_cannot_be_a_tenant() {
    let found = problems("tenants:\n  - name: operator\n");
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(found[0].path, "tenants[0].name");
    assert!(
        found[0].message.contains("reserved"),
        "{}",
        found[0].message
    );
}

#[test]
fn a_non_finite_number_keeps_every_problem_located() {
    let found = problems("tenants:\n  - name: a\n    weight: 0\n    limits:\n      cpu: .inf\n");
    assert_eq!(found.len(), 2, "{found:?}");
    for p in &found {
        assert!(p.line > 0, "{p}");
    }
    assert_eq!(
        (found[0].path.as_str(), found[0].line),
        ("tenants[0].weight", 3)
    );
    assert_eq!(
        (found[1].path.as_str(), found[1].line),
        ("tenants[0].limits.cpu", 5)
    );
}

#[test]
fn every_type_error_in_every_file_is_reported_at_once() {
    let found = Policy::from_sources(&[
        src(
            "a.yaml",
            "tenants:\n  - name: a\n    weight: -1\n    match:\n      uids: [true]\n",
        ),
        src(
            "b.yaml",
            "operators:\n  gids: [\"x\"]\ntenants:\n  - name: b\n    class: urgent\n    limits: {pids: many}\n",
        ),
    ])
    .expect_err("type errors")
    .0;
    let located: Vec<(&str, &str, u64)> = found
        .iter()
        .map(|p| (p.file.as_str(), p.path.as_str(), p.line))
        .collect();
    assert_eq!(
        located,
        [
            ("a.yaml", "tenants[0].weight", 3),
            ("a.yaml", "tenants[0].match.uids[0]", 5),
            ("b.yaml", "operators.gids[0]", 2),
            ("b.yaml", "tenants[0].class", 5),
            ("b.yaml", "tenants[0].limits.pids", 6),
        ],
        "{found:#?}"
    );
    // Each says what was found and what is expected, in words an operator can act on.
    assert!(
        found[0].message.contains("integer `-1`, expected u32"),
        "{}",
        found[0]
    );
    assert!(
        found[1]
            .message
            .contains("boolean `true`, expected an id such as 1001"),
        "{}",
        found[1]
    );
    assert!(
        found[3]
            .message
            .contains("expected `interactive` or `batch`"),
        "{}",
        found[3]
    );
}
