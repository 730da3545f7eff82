//! `accelctl devices`: the GPUs the daemon found (those your tenant may use).

use accel_runtime::devices::DeviceReport;

use crate::client::{Client, CtlError};
use crate::output;

pub async fn run(client: &Client, json: bool) -> Result<(), CtlError> {
    let (report, raw): (DeviceReport, _) = client.get_json("/v1/devices").await?;
    if json {
        println!("{}", output::json(&raw));
        return Ok(());
    }
    if report.devices.is_empty() {
        println!(
            "no GPU: {}; models run on the CPU backend",
            report.reason.as_deref().unwrap_or("none visible to you")
        );
        return Ok(());
    }
    let rows: Vec<Vec<String>> = report
        .devices
        .iter()
        .map(|d| {
            vec![
                format!("cuda:{}", d.index),
                d.name.clone(),
                d.uuid.clone(),
                format!("{:.1} GiB", d.memory_bytes as f64 / (1u64 << 30) as f64),
                d.compute_capability.clone(),
            ]
        })
        .collect();
    println!(
        "{}",
        output::table(&["DEVICE", "NAME", "UUID", "MEMORY", "COMPUTE"], &rows)
    );
    Ok(())
}
