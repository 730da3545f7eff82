//! `accelctl requests [cancel ID]`: generation requests in flight (tenant, model, age, tokens
//! so far), and cancelling one.

use accel_runtime::api::types::RequestList;
use clap::Subcommand;
use hyper::Method;

use crate::client::{Client, CtlError};
use crate::output;

#[derive(Debug, Subcommand)]
pub enum RequestsCommand {
    /// Cancel a request in flight: it ends with 410 `cancelled` and its memory is freed.
    Cancel {
        /// The request's id (as `accelctl requests` lists it).
        id: String,
    },
}

pub async fn run(
    client: &Client,
    command: Option<&RequestsCommand>,
    json: bool,
) -> Result<(), CtlError> {
    if let Some(RequestsCommand::Cancel { id }) = command {
        let (_, bytes) = client
            .request(Method::POST, &format!("/v1/requests/{id}/cancel"), None)
            .await?;
        if json {
            println!("{}", String::from_utf8_lossy(&bytes));
        } else {
            println!("cancelled {id}");
        }
        return Ok(());
    }
    let (list, raw): (RequestList, _) = client.get_json("/v1/requests").await?;
    if json {
        println!("{}", output::json(&raw));
        return Ok(());
    }
    let rows: Vec<Vec<String>> = list
        .data
        .iter()
        .map(|r| {
            vec![
                r.id.clone(),
                r.tenant.clone(),
                r.model.clone(),
                if r.batch {
                    "job"
                } else if r.stream {
                    "stream"
                } else {
                    "whole"
                }
                .to_owned(),
                format!("{:.1}s", r.age_seconds),
                r.prompt_tokens.to_string(),
                r.completion_tokens.to_string(),
            ]
        })
        .collect();
    println!(
        "{}",
        output::table(
            &[
                "ID",
                "TENANT",
                "MODEL",
                "KIND",
                "AGE",
                "PROMPT",
                "GENERATED"
            ],
            &rows
        )
    );
    Ok(())
}
