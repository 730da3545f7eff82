//! `accelctl tenants list|show`: tenants in the policy in force (a tenant sees only itself).

use accel_runtime::api::types::TenantList;
use accel_runtime::policy::{PriorityClass, Tenant};
use clap::Subcommand;

use crate::client::{Client, CtlError};
use crate::output;

#[derive(Debug, Subcommand)]
pub enum TenantsCommand {
    /// List tenants with their weights and limits.
    List,
    /// Show one tenant in full: mapping rules, limits, models, devices.
    Show {
        /// Tenant name.
        name: String,
    },
}

pub fn class(c: PriorityClass) -> &'static str {
    match c {
        PriorityClass::Interactive => "interactive",
        PriorityClass::Batch => "batch",
    }
}

fn isolation(i: accel_runtime::policy::TenantIsolation) -> &'static str {
    match i {
        accel_runtime::policy::TenantIsolation::Shared => "shared",
        accel_runtime::policy::TenantIsolation::Dedicated => "dedicated",
    }
}

pub async fn run(client: &Client, command: &TenantsCommand, json: bool) -> Result<(), CtlError> {
    match command {
        TenantsCommand::List => {
            let (list, raw): (TenantList, _) = client.get_json("/v1/tenants").await?;
            if json {
                println!("{}", output::json(&raw));
                return Ok(());
            }
            let rows: Vec<Vec<String>> = list
                .tenants
                .iter()
                .map(|t| {
                    let l = &t.limits;
                    vec![
                        t.name.clone(),
                        t.weight.to_string(),
                        class(t.class).into(),
                        output::limit(l.max_concurrent_requests),
                        output::limit(l.tokens_per_minute),
                        output::limit(l.kv_blocks),
                        output::limit(l.memory),
                        output::limit(l.cpu),
                        output::limit(l.pids),
                        t.models.join(","),
                    ]
                })
                .collect();
            println!(
                "{}",
                output::table(
                    &[
                        "NAME",
                        "WEIGHT",
                        "CLASS",
                        "CONCURRENT",
                        "TOKENS/MIN",
                        "KV-BLOCKS",
                        "MEMORY",
                        "CPU",
                        "PIDS",
                        "MODELS"
                    ],
                    &rows
                )
            );
        }
        TenantsCommand::Show { name } => {
            // Tenant names are [a-z0-9_-]; anything else cannot exist and must not reach the URL.
            if name.is_empty()
                || !name
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_')
            {
                return Err(CtlError::Usage(format!("{name:?} is not a tenant name: names are lowercase letters, digits, '-' and '_'")));
            }
            let (t, raw): (Tenant, _) = client.get_json(&format!("/v1/tenants/{name}")).await?;
            if json {
                println!("{}", output::json(&raw));
                return Ok(());
            }
            let ids = |v: &[accel_runtime::policy::IdRangeSpec]| {
                v.iter()
                    .map(|r| {
                        if r.first == r.last {
                            r.first.to_string()
                        } else {
                            format!("{}-{}", r.first, r.last)
                        }
                    })
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            let m = &t.matches;
            let l = &t.limits;
            println!(
                "{}",
                output::fields(&[
                    ("name", t.name.clone()),
                    ("defined at", t.defined_at.clone()),
                    ("weight", t.weight.to_string()),
                    ("class", class(t.class).into()),
                    ("match uids", ids(&m.uids)),
                    ("match users", m.users.join(", ")),
                    ("match gids", ids(&m.gids)),
                    ("match groups", m.groups.join(", ")),
                    ("match tokens", m.tokens.to_string()),
                    ("default tenant", m.default.to_string()),
                    ("max concurrent", output::limit(l.max_concurrent_requests)),
                    ("tokens/minute", output::limit(l.tokens_per_minute)),
                    ("kv blocks", output::limit(l.kv_blocks)),
                    ("memory", output::limit(l.memory)),
                    ("cpu", output::limit(l.cpu)),
                    ("pids", output::limit(l.pids)),
                    ("models", t.models.join(", ")),
                    ("devices", t.devices.join(", ")),
                    ("isolation", isolation(t.isolation).into()),
                ])
            );
            // Its dedicated workers, with what their cgroups use.
            let workers: Vec<accel_runtime::worker::WorkerReport> =
                serde_json::from_value(raw["workers"].clone()).unwrap_or_default();
            for w in workers {
                println!(
                    "worker {}: {} on {}, pid {}, memory {} MiB, restarts {}, OOM kills {}",
                    w.worker,
                    w.model,
                    w.device,
                    w.pid.map_or_else(|| "-".to_owned(), |p| p.to_string()),
                    w.memory_bytes.map_or(0, |b| b >> 20),
                    w.restarts,
                    w.oom_kills.unwrap_or(0),
                );
            }
        }
    }
    Ok(())
}
