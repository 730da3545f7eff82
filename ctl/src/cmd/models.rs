//! `accelctl models`: the models the daemon serves to you.

use accel_runtime::api::openai_types::ModelList;

use crate::client::{Client, CtlError};
use crate::output;

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
            ]
        })
        .collect();
    println!(
        "{}",
        output::table(&["MODEL", "FORMAT", "BACKEND", "CONTEXT"], &rows)
    );
    Ok(())
}
