//! `accelctl memory`: the KV memory hierarchy of each device: per model, each tier's blocks
//! (device, host, disk) used and free; per tenant, the blocks its sequences hold in each.

use accel_runtime::api::types::SchedulerStatus;
use accel_runtime::runner::DeviceSchedule;

use crate::client::{Client, CtlError};
use crate::output;

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / f64::from(1u32 << 20))
}

/// Each model's tiers: capacity, used, free, in blocks and bytes.
pub fn model_table(device: &DeviceSchedule) -> String {
    let rows: Vec<Vec<String>> = device
        .memory
        .iter()
        .flat_map(|m| {
            m.tiers.iter().map(move |t| {
                let free = t.capacity.saturating_sub(t.used);
                vec![
                    m.model.clone(),
                    t.tier.clone(),
                    t.capacity.to_string(),
                    t.used.to_string(),
                    free.to_string(),
                    mib(t.capacity as u64 * m.block_bytes),
                ]
            })
        })
        .collect();
    output::table(&["MODEL", "TIER", "BLOCKS", "USED", "FREE", "SIZE"], &rows)
}

/// Each tenant's blocks in each tier (its interactive and batch work together).
pub fn tenant_table(device: &DeviceSchedule) -> String {
    let mut by_tenant: std::collections::BTreeMap<&str, [usize; 3]> = Default::default();
    for t in &device.tenants {
        let row = by_tenant.entry(t.tenant.as_str()).or_default();
        row[0] += t.kv_blocks;
        row[1] += t.host_kv_blocks;
        row[2] += t.disk_kv_blocks;
    }
    let rows: Vec<Vec<String>> = by_tenant
        .into_iter()
        .map(|(tenant, [device, host, disk])| {
            vec![
                tenant.to_owned(),
                device.to_string(),
                host.to_string(),
                disk.to_string(),
            ]
        })
        .collect();
    output::table(&["TENANT", "DEVICE", "HOST", "DISK"], &rows)
}

pub async fn run(client: &Client, json: bool) -> Result<(), CtlError> {
    let (status, raw): (SchedulerStatus, _) = client.get_json("/v1/scheduler").await?;
    if json {
        let memory: Vec<serde_json::Value> = raw["devices"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|d| {
                serde_json::json!({
                    "device": d["device"],
                    "models": d["memory"],
                    "tenants": d["tenants"].as_array().into_iter().flatten().map(|t| serde_json::json!({
                        "tenant": t["tenant"],
                        "class": t["class"],
                        "kv_blocks": t["kv_blocks"],
                        "host_kv_blocks": t["host_kv_blocks"],
                        "disk_kv_blocks": t["disk_kv_blocks"],
                    })).collect::<Vec<_>>(),
                })
            })
            .collect();
        println!(
            "{}",
            output::json(&serde_json::json!({ "devices": memory }))
        );
        return Ok(());
    }
    for (i, device) in status.devices.iter().enumerate() {
        if i > 0 {
            println!();
        }
        println!("{}", device.device);
        println!("{}", model_table(device));
        println!();
        println!("{}", tenant_table(device));
    }
    if status.devices.is_empty() {
        println!("no device serves a model");
    }
    Ok(())
}
