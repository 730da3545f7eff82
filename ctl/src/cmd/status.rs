//! `accelctl status`: the daemon's version, uptime, backend, policy and listeners.

use accel_runtime::api::types::Status;

use crate::client::{Client, CtlError};
use crate::output;

pub async fn run(client: &Client, json: bool) -> Result<(), CtlError> {
    let (status, raw): (Status, _) = client.get_json("/v1/status").await?;
    if json {
        println!("{}", output::json(&raw));
        return Ok(());
    }
    println!(
        "{}",
        output::fields(&[
            ("version", status.version),
            ("pid", status.pid.to_string()),
            ("state", status.state),
            ("uptime", format!("{:.0}s", status.uptime_seconds)),
            (
                "backend",
                format!(
                    "{} (configured: {})",
                    status.backend.active, status.backend.configured
                )
            ),
            (
                "policy",
                format!(
                    "generation {}, {} tenant(s)",
                    status.policy.generation, status.policy.tenants
                )
            ),
            ("policy sources", status.policy.sources.join(", ")),
            ("socket", status.api.socket),
            (
                "tcp listener",
                status.api.tcp_listen.unwrap_or_else(|| "off".into())
            ),
            (
                "metrics listener",
                status.api.metrics_listen.unwrap_or_else(|| "off".into())
            ),
            (
                "requests in flight",
                status.api.requests_in_flight.to_string()
            ),
        ])
    );
    Ok(())
}
