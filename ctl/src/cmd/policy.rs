//! `accelctl policy check|reload`: validate policy files locally, or make the daemon reread its own.

use std::path::PathBuf;

use accel_runtime::api::types::{ReloadRequest, ReloadResponse};
use accel_runtime::policy::{Policy, PolicySource, EMBEDDED_DEFAULT, EMBEDDED_NAME};
use accel_runtime::yaml::{Problem, Problems};
use clap::Subcommand;

use crate::client::{Client, CtlError};
use crate::output;

#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Validate policy files without a daemon; several files are checked together, as the daemon merges them.
    Check {
        /// Policy YAML files.
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// Check the files on top of the embedded default policy, as a daemon without `policy_file` merges them.
        #[arg(long)]
        with_default: bool,
    },
    /// Make the daemon reread its policy files; a policy with problems is rejected and the old one stays.
    Reload {
        /// Only validate what is on disk; change nothing.
        #[arg(long)]
        dry_run: bool,
    },
}

pub async fn run(client: &Client, command: &PolicyCommand, json: bool) -> Result<(), CtlError> {
    match command {
        PolicyCommand::Check {
            files,
            with_default,
        } => check(files, *with_default, json),
        PolicyCommand::Reload { dry_run } => {
            let (answer, raw): (ReloadResponse, _) = client
                .post_json("/v1/policy/reload", &ReloadRequest { dry_run: *dry_run })
                .await?;
            if json {
                println!("{}", output::json(&raw));
            } else if answer.applied {
                println!(
                    "policy reloaded: generation {}, {} tenant(s) from {}",
                    answer.generation,
                    answer.tenants,
                    answer.sources.join(", ")
                );
                for change in &answer.pending {
                    println!("pending: {change}");
                }
            } else {
                println!(
                    "policy on disk is valid ({} tenant(s)); nothing changed (dry run)",
                    answer.tenants
                );
            }
            Ok(())
        }
    }
}

fn check(files: &[PathBuf], with_default: bool, json: bool) -> Result<(), CtlError> {
    let mut sources = Vec::new();
    if with_default {
        sources.push(PolicySource {
            name: EMBEDDED_NAME.to_owned(),
            text: EMBEDDED_DEFAULT.to_owned(),
        });
    }
    let mut unreadable = Vec::new();
    for file in files {
        match std::fs::read_to_string(file) {
            Ok(text) => sources.push(PolicySource {
                name: file.display().to_string(),
                text,
            }),
            Err(e) => unreadable.push(Problem {
                file: file.display().to_string(),
                path: String::new(),
                line: 0,
                column: 0,
                message: format!("cannot read: {e}"),
            }),
        }
    }
    let result = if unreadable.is_empty() {
        Policy::from_sources(&sources)
    } else {
        Err(Problems(unreadable))
    };
    match result {
        Ok(policy) => {
            if json {
                let value = serde_json::json!({"valid": true, "tenants": policy.tenants.len(), "files": policy.sources});
                println!("{}", output::json(&value));
            } else {
                println!(
                    "ok: {} tenant(s) in {}",
                    policy.tenants.len(),
                    policy.sources.join(", ")
                );
            }
            Ok(())
        }
        Err(problems) => {
            if json {
                let value = serde_json::json!({"valid": false, "problems": problems.0});
                println!("{}", output::json(&value));
            }
            Err(CtlError::InvalidPolicy(problems))
        }
    }
}
