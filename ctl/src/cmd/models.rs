//! `accelctl models`: the models the daemon serves to you.

use accel_runtime::api::openai_types::ModelList;
use accel_runtime::engine::sampling::SamplingDefaults;

use crate::client::{Client, CtlError};
use crate::output;

/// A model's sampling defaults as `temperature=0.2 top_p=0.9`; `-` when it has none.
fn sampling(defaults: &SamplingDefaults) -> String {
    let fields = [
        ("temperature", defaults.temperature.map(|v| v.to_string())),
        ("top_p", defaults.top_p.map(|v| v.to_string())),
        ("top_k", defaults.top_k.map(|v| v.to_string())),
        (
            "repetition_penalty",
            defaults.repetition_penalty.map(|v| v.to_string()),
        ),
    ];
    let set: Vec<String> = fields
        .iter()
        .filter_map(|(name, value)| value.as_ref().map(|v| format!("{name}={v}")))
        .collect();
    if set.is_empty() {
        "-".into()
    } else {
        set.join(" ")
    }
}

pub async fn run(client: &Client, json: bool) -> Result<(), CtlError> {
    let (list, raw): (ModelList, _) = client.get_json("/v1/models").await?;
    if json {
        println!("{}", output::json(&raw));
        return Ok(());
    }
    let rows: Vec<Vec<String>> = list
        .data
        .iter()
        .map(|m| {
            vec![
                m.id.clone(),
                m.format.clone(),
                m.backend.clone(),
                m.context_length.to_string(),
                sampling(&m.sampling_defaults),
            ]
        })
        .collect();
    println!(
        "{}",
        output::table(
            &["MODEL", "FORMAT", "BACKEND", "CONTEXT", "SAMPLING"],
            &rows
        )
    );
    Ok(())
}
