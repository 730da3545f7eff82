//! `accelctl top`: a live view of each device's scheduler, refreshed in place: per tenant,
//! its share of the tokens served since the last refresh, tokens per second, queue, running
//! sequences and KV blocks.

use std::collections::HashMap;
use std::io::{IsTerminal, Write as _};
use std::time::{Duration, Instant};

use accel_runtime::api::types::SchedulerStatus;
use clap::Args;
use serde_json::json;

use crate::client::{Client, CtlError};
use crate::output;

#[derive(Debug, Args)]
pub struct TopArgs {
    /// Seconds between refreshes.
    #[arg(long, default_value_t = 1.0)]
    pub interval: f64,
    /// Stop after this many refreshes (0: until interrupted).
    #[arg(long, short = 'n', default_value_t = 0)]
    pub iterations: u64,
}

/// Tokens served so far per (device, tenant).
type Served = HashMap<(String, String), u64>;

fn served(status: &SchedulerStatus) -> Served {
    status
        .devices
        .iter()
        .flat_map(|d| {
            d.tenants.iter().map(|t| {
                (
                    (d.device.clone(), t.tenant.clone()),
                    t.stats.prefill_tokens + t.stats.decode_tokens,
                )
            })
        })
        .collect()
}

pub async fn run(client: &Client, args: &TopArgs, json: bool) -> Result<(), CtlError> {
    if !(args.interval.is_finite() && (0.1..=3600.0).contains(&args.interval)) {
        return Err(CtlError::Usage(format!(
            "--interval {} is out of range: use 0.1 to 3600 seconds",
            args.interval
        )));
    }
    let in_place = !json && std::io::stdout().is_terminal();
    let mut previous: Option<(Instant, Served)> = None;
    let mut refreshes = 0u64;
    loop {
        let (status, _): (SchedulerStatus, _) = client.get_json("/v1/scheduler").await?;
        let now = Instant::now();
        let totals = served(&status);
        let rates: HashMap<(String, String), f64> = match &previous {
            Some((at, before)) => {
                let seconds = now.duration_since(*at).as_secs_f64().max(1e-3);
                totals
                    .iter()
                    .map(|(k, v)| {
                        let delta = v.saturating_sub(before.get(k).copied().unwrap_or(0));
                        (k.clone(), delta as f64 / seconds)
                    })
                    .collect()
            }
            None => HashMap::new(),
        };
        let mut out = String::new();
        let mut records = Vec::new();
        for device in &status.devices {
            let device_rate: f64 = device
                .tenants
                .iter()
                .filter_map(|t| rates.get(&(device.device.clone(), t.tenant.clone())))
                .sum();
            out.push_str(&format!(
                "{}  policy {}  {:.0} tok/s  models: {}\n",
                device.device,
                device.policy,
                device_rate,
                device.models.join(", ")
            ));
            let rows: Vec<Vec<String>> = device
                .tenants
                .iter()
                .map(|t| {
                    let rate = rates
                        .get(&(device.device.clone(), t.tenant.clone()))
                        .copied()
                        .unwrap_or(0.0);
                    let share = if device_rate > 0.0 {
                        rate / device_rate
                    } else {
                        0.0
                    };
                    records.push(json!({
                        "device": device.device,
                        "tenant": t.tenant,
                        "weight": t.weight,
                        "share": share,
                        "tokens_per_second": rate,
                        "waiting": t.waiting,
                        "running": t.running,
                        "swapped": t.swapped,
                        "kv_blocks": t.kv_blocks,
                    }));
                    vec![
                        t.tenant.clone(),
                        t.weight.to_string(),
                        format!("{:.1}%", share * 100.0),
                        format!("{rate:.0}"),
                        t.waiting.to_string(),
                        t.running.to_string(),
                        t.swapped.to_string(),
                        t.kv_blocks.to_string(),
                    ]
                })
                .collect();
            out.push_str(&output::table(
                &[
                    "TENANT",
                    "WEIGHT",
                    "SHARE",
                    "TOK/S",
                    "WAITING",
                    "RUNNING",
                    "SWAPPED",
                    "KV_BLOCKS",
                ],
                &rows,
            ));
            out.push_str("\n\n");
        }
        if json {
            println!("{}", json!({ "tenants": records }));
        } else if in_place {
            // Home the cursor and clear the screen, like top(1).
            print!("\x1b[H\x1b[2J{out}");
        } else {
            print!("{out}");
        }
        let _ = std::io::stdout().flush();
        previous = Some((now, totals));
        refreshes += 1;
        if args.iterations != 0 && refreshes >= args.iterations {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_secs_f64(args.interval)).await;
    }
}
