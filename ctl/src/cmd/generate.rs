//! `accelctl generate` and `accelctl chat`: send a prompt or a chat message and stream the
//! answer to the terminal as it is generated.

use std::io::Write as _;

use accel_runtime::api::openai_types::{ChatResponse, CompletionResponse, ModelList};
use clap::Args;
use serde_json::json;

use crate::client::{Client, CtlError};
use crate::output;

/// Options shared by `generate` and `chat`.
#[derive(Debug, Args)]
pub struct GenerationArgs {
    /// Model to use (default: the first the daemon lists).
    #[arg(long, short = 'm')]
    pub model: Option<String>,
    /// Most tokens to generate.
    #[arg(long, default_value_t = 256)]
    pub max_tokens: usize,
    /// Sampling temperature; 0 is greedy (default: the model's, as `accelctl models` shows).
    #[arg(long)]
    pub temperature: Option<f32>,
    /// Nucleus sampling: keep the most likely tokens up to this probability mass.
    #[arg(long)]
    pub top_p: Option<f32>,
    /// Keep only the k most likely tokens.
    #[arg(long)]
    pub top_k: Option<usize>,
    /// Seed for reproducible sampling.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Stop when this text appears (repeatable).
    #[arg(long)]
    pub stop: Vec<String>,
}

async fn default_model(client: &Client, args: &GenerationArgs) -> Result<String, CtlError> {
    if let Some(model) = &args.model {
        return Ok(model.clone());
    }
    let (list, _): (ModelList, _) = client.get_json("/v1/models").await?;
    list.data
        .first()
        .map(|m| m.id.clone())
        .ok_or_else(|| CtlError::Other("the daemon serves no model you may use".into()))
}

fn body(model: String, args: &GenerationArgs, stream: bool) -> serde_json::Value {
    json!({
        "model": model,
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "top_k": args.top_k,
        "seed": args.seed,
        "stop": args.stop,
        "stream": stream,
    })
}

/// Streams `path` and prints each text delta; `text_of` pulls the delta out of a chunk.
async fn stream(
    client: &Client,
    path: &str,
    request: &serde_json::Value,
    text_of: fn(&serde_json::Value) -> Option<&str>,
) -> Result<(), CtlError> {
    let mut stdout = std::io::stdout().lock();
    let mut failure = None;
    client
        .post_sse(path, request, |data| {
            if data == "[DONE]" {
                return Ok(());
            }
            let chunk: serde_json::Value = serde_json::from_str(data)
                .map_err(|e| CtlError::Other(format!("bad chunk from acceld: {e}")))?;
            if let Some(error) = chunk.get("error") {
                failure = Some(
                    error["message"]
                        .as_str()
                        .unwrap_or("generation failed")
                        .to_owned(),
                );
                return Ok(());
            }
            if let Some(text) = text_of(&chunk) {
                let _ = stdout.write_all(text.as_bytes());
                let _ = stdout.flush();
            }
            Ok(())
        })
        .await?;
    let _ = writeln!(stdout);
    match failure {
        Some(message) => Err(CtlError::Other(message)),
        None => Ok(()),
    }
}

pub async fn generate(
    client: &Client,
    prompt: &str,
    args: &GenerationArgs,
    json: bool,
) -> Result<(), CtlError> {
    let model = default_model(client, args).await?;
    let mut request = body(model, args, !json);
    request["prompt"] = json!(prompt);
    if json {
        let (_, raw): (CompletionResponse, _) =
            client.post_json("/v1/completions", &request).await?;
        println!("{}", output::json(&raw));
        return Ok(());
    }
    stream(client, "/v1/completions", &request, |c| {
        c["choices"][0]["text"].as_str()
    })
    .await
}

pub async fn chat(
    client: &Client,
    message: &str,
    system: Option<&str>,
    args: &GenerationArgs,
    json: bool,
) -> Result<(), CtlError> {
    let model = default_model(client, args).await?;
    let mut messages = Vec::new();
    if let Some(system) = system {
        messages.push(json!({"role": "system", "content": system}));
    }
    messages.push(json!({"role": "user", "content": message}));
    let mut request = body(model, args, !json);
    request["messages"] = json!(messages);
    if json {
        let (_, raw): (ChatResponse, _) =
            client.post_json("/v1/chat/completions", &request).await?;
        println!("{}", output::json(&raw));
        return Ok(());
    }
    stream(client, "/v1/chat/completions", &request, |c| {
        c["choices"][0]["delta"]["content"].as_str()
    })
    .await
}
