//! The policies shipped in `cgroup-policies/`: each one loads, and means what its comments say.
//! Also `accelctl policy check` on good and bad files.

// Tests unwrap freely: a failure is a test failure, not an operator's input.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};

use accel_runtime::policy::{check_file, Caller, PriorityClass, Role, UserDb};

fn policies_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../cgroup-policies")
}

struct NoNames;

impl UserDb for NoNames {
    fn user_name(&self, _: u32) -> Option<String> {
        None
    }
    fn group_name(&self, _: u32) -> Option<String> {
        None
    }
}

fn caller(uid: u32, gid: u32) -> Caller {
    Caller {
        uid,
        gid,
        pid: None,
        groups: Vec::new(),
    }
}

#[test]
fn every_shipped_policy_loads() {
    let mut files: Vec<PathBuf> = std::fs::read_dir(policies_dir().join("examples"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.push(policies_dir().join("default.yaml"));
    assert!(files.len() >= 3, "{files:?}");
    for file in files {
        let policy = check_file(&file).unwrap_or_else(|p| panic!("{}: {p}", file.display()));
        assert!(!policy.tenants.is_empty(), "{}", file.display());
    }
}

#[test]
fn default_policy_file_is_the_embedded_one() {
    let on_disk = std::fs::read_to_string(policies_dir().join("default.yaml")).unwrap();
    assert_eq!(on_disk, accel_runtime::policy::EMBEDDED_DEFAULT);
}

#[test]
fn production_example_refuses_strangers_and_ranks_search_highest() {
    let policy = check_file(&policies_dir().join("examples/production.yaml")).unwrap();
    assert_eq!(policy.identify(&caller(12345, 12345), &NoNames), None);
    let search = policy.identify(&caller(20042, 1), &NoNames).unwrap();
    assert_eq!(search.tenant.as_deref(), Some("search"));
    let research = policy.identify(&caller(1, 30500), &NoNames).unwrap();
    assert_eq!(research.tenant.as_deref(), Some("research"));
    let weights: Vec<u32> = policy.tenants.iter().map(|t| t.weight).collect();
    assert_eq!(weights, [4, 2, 1]);
    assert_eq!(
        policy.tenant("eval-batch").unwrap().class,
        PriorityClass::Batch
    );
    assert!(!policy
        .tenant("search")
        .unwrap()
        .allows_model("some-other-model"));
    assert!(policy.tenant("research").unwrap().allows_model("anything"));
}

#[test]
fn kiosk_example_serves_one_uid_and_one_model() {
    let policy = check_file(&policies_dir().join("examples/single-model-kiosk.yaml")).unwrap();
    assert_eq!(
        policy
            .identify(&caller(5000, 5000), &NoNames)
            .unwrap()
            .tenant
            .as_deref(),
        Some("kiosk")
    );
    assert_eq!(policy.identify(&caller(5001, 5001), &NoNames), None);
    assert_eq!(
        policy.identify(&caller(0, 0), &NoNames).unwrap().role,
        Role::Operator
    );
    let kiosk = policy.tenant("kiosk").unwrap();
    assert_eq!(kiosk.models, ["smollm2-135m-instruct"]);
    assert_eq!(kiosk.devices, ["cpu"]);
}

#[test]
fn accelctl_policy_check_reports_line_and_column() {
    let dir = accel_tests::shared_tempdir();
    let good = policies_dir().join("examples/production.yaml");
    let out = std::process::Command::new(accel_tests::bin("accelctl"))
        .args(["policy", "check"])
        .arg(&good)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("ok: 3 tenant(s)"));

    let bad = dir.path().join("bad.yaml");
    std::fs::write(&bad, "tenants:\n  - name: a\n    match: {uids: [1, 2\n").unwrap();
    let out = std::process::Command::new(accel_tests::bin("accelctl"))
        .args(["policy", "check"])
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(5));
    let err = String::from_utf8_lossy(&out.stderr);
    let located = format!("{}:", bad.display());
    let rest = err
        .split(&located)
        .nth(1)
        .unwrap_or_else(|| panic!("no location in {err}"));
    let mut numbers = rest.split(':').take(2).map(|n| n.parse::<u32>());
    assert!(
        matches!((numbers.next(), numbers.next()), (Some(Ok(l)), Some(Ok(c))) if l >= 3 && c > 0),
        "{err}"
    );

    // Files checked together, as the daemon merges them: the duplicate spans two files.
    let other = dir.path().join("other.yaml");
    std::fs::write(&other, "tenants:\n  - name: search\n").unwrap();
    let out = std::process::Command::new(accel_tests::bin("accelctl"))
        .args(["policy", "check", "--json"])
        .arg(&good)
        .arg(&other)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(5));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["valid"], false);
    assert_eq!(report["problems"][0]["line"], 2);
    assert!(report["problems"][0]["message"]
        .as_str()
        .unwrap()
        .contains("duplicate tenant \"search\""));
}
