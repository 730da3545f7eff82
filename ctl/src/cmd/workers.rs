//! `accelctl workers`: the models' worker processes and what their cgroups use.

use accel_runtime::worker::WorkersStatus;

use crate::client::{Client, CtlError};
use crate::output;

pub async fn run(client: &Client, json: bool) -> Result<(), CtlError> {
    let (status, raw): (WorkersStatus, _) = client.get_json("/v1/workers").await?;
    if json {
        println!("{}", output::json(&raw));
        return Ok(());
    }
    if status.workers.is_empty() {
        println!(
            "no worker processes (isolation: {}); models' engines run inside acceld",
            status.isolation
        );
        return Ok(());
    }
    let mib = |b: Option<u64>| {
        b.map_or_else(
            || "-".to_owned(),
            |b| format!("{:.0} MiB", b as f64 / (1u64 << 20) as f64),
        )
    };
    let rows: Vec<Vec<String>> = status
        .workers
        .iter()
        .map(|w| {
            vec![
                w.worker.clone(),
                w.model.clone(),
                w.device.clone(),
                w.pid
                    .map_or_else(|| "restarting".to_owned(), |p| p.to_string()),
                w.user.clone(),
                w.restarts.to_string(),
                mib(w.memory_bytes),
                mib(w.memory_peak_bytes),
                w.cpu_seconds
                    .map_or_else(|| "-".to_owned(), |s| format!("{s:.1} s")),
                w.oom_kills
                    .map_or_else(|| "-".to_owned(), |n| n.to_string()),
                w.device_denials
                    .map_or_else(|| "-".to_owned(), |n| n.to_string()),
            ]
        })
        .collect();
    println!(
        "{}",
        output::table(
            &[
                "WORKER",
                "MODEL",
                "DEVICE",
                "PID",
                "USER",
                "RESTARTS",
                "MEMORY",
                "PEAK",
                "CPU",
                "OOM KILLS",
                "DENIED"
            ],
            &rows
        )
    );
    Ok(())
}
