//! `accelctl drain|undrain`: stop taking new requests while in-flight ones finish, and
//! resume (operators only).

use std::time::{Duration, Instant};

use accel_runtime::api::types::{DrainStatus, Status};

use crate::client::{Client, CtlError};
use crate::output;

pub async fn run(
    client: &Client,
    drained: bool,
    wait: Option<Duration>,
    json: bool,
) -> Result<(), CtlError> {
    let path = if drained { "/v1/drain" } else { "/v1/undrain" };
    let (mut status, mut raw): (DrainStatus, _) =
        client.post_json(path, &serde_json::json!({})).await?;
    if let Some(timeout) = wait.filter(|_| drained) {
        // Until the in-flight inference requests have finished.
        let deadline = Instant::now() + timeout;
        loop {
            let (now, _): (Status, _) = client.get_json("/v1/status").await?;
            status.inference_in_flight = now.api.inference_in_flight;
            if status.inference_in_flight == 0 {
                break;
            }
            if Instant::now() >= deadline {
                return Err(CtlError::Other(format!(
                    "drained, but {} requests were still in flight after {}s",
                    status.inference_in_flight,
                    timeout.as_secs()
                )));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        raw = serde_json::to_value(&status).unwrap_or(raw);
    }
    if json {
        println!("{}", output::json(&raw));
    } else {
        println!(
            "{}",
            output::fields(&[
                ("state", status.state.clone()),
                ("changed", status.changed.to_string()),
                ("in_flight", status.inference_in_flight.to_string()),
            ])
        );
    }
    Ok(())
}
