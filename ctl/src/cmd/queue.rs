//! `accelctl queue`: each device's scheduler now: per tenant, requests waiting, sequences
//! running and swapped out, KV blocks held, the fair-share counter and the token bucket.

use accel_runtime::api::types::SchedulerStatus;
use accel_runtime::runner::DeviceSchedule;

use crate::client::{Client, CtlError};
use crate::output;

/// The per-tenant table of one device.
pub fn device_table(device: &DeviceSchedule) -> String {
    let rows: Vec<Vec<String>> = device
        .tenants
        .iter()
        .map(|t| {
            vec![
                t.tenant.clone(),
                t.weight.to_string(),
                super::tenants::class(t.class).into(),
                t.waiting.to_string(),
                t.running.to_string(),
                t.swapped.to_string(),
                t.kv_blocks.to_string(),
                format!("{:.0}", t.virtual_counter),
                output::limit(t.bucket_tokens.map(|b| format!("{b:.0}"))),
                (t.stats.preempted_swap + t.stats.preempted_recompute).to_string(),
            ]
        })
        .collect();
    output::table(
        &[
            "TENANT",
            "WEIGHT",
            "CLASS",
            "WAITING",
            "RUNNING",
            "SWAPPED",
            "KV_BLOCKS",
            "COUNTER",
            "BUCKET",
            "PREEMPTED",
        ],
        &rows,
    )
}

pub async fn run(client: &Client, json: bool) -> Result<(), CtlError> {
    let (status, raw): (SchedulerStatus, _) = client.get_json("/v1/scheduler").await?;
    if json {
        println!("{}", output::json(&raw));
        return Ok(());
    }
    for (i, device) in status.devices.iter().enumerate() {
        if i > 0 {
            println!();
        }
        println!(
            "{} (policy {}; models: {})",
            device.device,
            device.policy,
            device.models.join(", ")
        );
        println!("{}", device_table(device));
    }
    if status.devices.is_empty() {
        println!("no device serves a model");
    }
    Ok(())
}
