//! `accelctl models [list | load | unload]`: the models the daemon serves to you, and an
//! operator's loads (with a progress bar) and unloads while it runs.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::time::Duration;

use accel_runtime::api::openai_types::ModelList;
use accel_runtime::api::types::UnloadStatus;
use accel_runtime::config::{BackendChoice, ModelSpec, PreemptionMode};
use accel_runtime::engine::sampling::SamplingDefaults;
use accel_runtime::served::LoadStatus;
use clap::Subcommand;

use crate::client::{Client, CtlError};
use crate::output;

#[derive(Debug, Subcommand)]
pub enum ModelsCommand {
    /// List the models you may use (the default).
    List,
    /// Load a model while the daemon runs, with a progress bar (operators only). It is served
    /// until it is unloaded or the daemon stops; add it to the config to load it at every start.
    Load {
        /// The name clients will ask for: 1-64 of a-z, 0-9, '.', '_', '-'.
        name: String,
        /// A .gguf file or a Hugging Face model folder; a relative path is taken in the daemon's
        /// model cache (only root may load from outside it).
        path: PathBuf,
        /// Where it runs: auto, cpu or cuda:N (the daemon's backend by default).
        #[arg(long)]
        backend: Option<String>,
        /// KV-cache blocks of 16 tokens.
        #[arg(long, value_name = "N")]
        kv_blocks: Option<usize>,
        /// Most sequences in one batched step.
        #[arg(long, value_name = "N")]
        max_sequences: Option<usize>,
        /// Most tokens in one batched step.
        #[arg(long, value_name = "N")]
        max_batch_tokens: Option<usize>,
        /// Host-memory blocks for preempted sequences (0: always recompute).
        #[arg(long, value_name = "N")]
        swap_blocks: Option<usize>,
        /// Disk-tier blocks for preempted sequences once the host blocks are full (0: none).
        #[arg(long, value_name = "N")]
        disk_blocks: Option<usize>,
        /// auto, swap or recompute.
        #[arg(long)]
        preemption: Option<String>,
        /// Share nothing between requests: no prefix cache for this model.
        #[arg(long)]
        no_prefix_cache: bool,
        /// Return once the daemon accepted the load, without following it.
        #[arg(long)]
        no_wait: bool,
    },
    /// Unload a model (operators only): new requests for it get 404 at once, requests in flight
    /// may finish for the grace period, then end with an error; its memory is freed.
    Unload {
        /// The model's name, as `accelctl models` lists it.
        name: String,
        /// Seconds requests in flight may take to finish (the daemon's drain_timeout by default;
        /// 0 ends them now).
        #[arg(long, value_name = "SECONDS")]
        grace: Option<f64>,
    },
}

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

pub async fn run(
    client: &Client,
    command: Option<&ModelsCommand>,
    json: bool,
) -> Result<(), CtlError> {
    match command {
        None | Some(ModelsCommand::List) => list(client, json).await,
        Some(ModelsCommand::Load {
            name,
            path,
            backend,
            kv_blocks,
            max_sequences,
            max_batch_tokens,
            swap_blocks,
            disk_blocks,
            preemption,
            no_prefix_cache,
            no_wait,
        }) => {
            let defaults = ModelSpec::default_model();
            let spec = ModelSpec {
                name: name.clone(),
                path: path.clone(),
                backend: backend
                    .as_deref()
                    .map(|b| BackendChoice::try_from(b.to_owned()))
                    .transpose()
                    .map_err(|e| CtlError::Usage(format!("--backend: {e}")))?,
                kv_blocks: kv_blocks.unwrap_or(defaults.kv_blocks),
                max_sequences: max_sequences.unwrap_or(defaults.max_sequences),
                max_batch_tokens: max_batch_tokens.unwrap_or(defaults.max_batch_tokens),
                swap_blocks: swap_blocks.unwrap_or(defaults.swap_blocks),
                disk_blocks: disk_blocks.unwrap_or(defaults.disk_blocks),
                preemption: match preemption.as_deref() {
                    None | Some("auto") => PreemptionMode::Auto,
                    Some("swap") => PreemptionMode::Swap,
                    Some("recompute") => PreemptionMode::Recompute,
                    Some(other) => {
                        return Err(CtlError::Usage(format!(
                            "--preemption: {other:?} is not one of auto, swap, recompute"
                        )))
                    }
                },
                prefix_cache: !no_prefix_cache,
                sampling_defaults: SamplingDefaults::default(),
                disk_dir: None,
            };
            load(client, &spec, !no_wait, json).await
        }
        Some(ModelsCommand::Unload { name, grace }) => {
            let path = match grace {
                Some(s) => format!("/v1/models/{name}?grace={s}"),
                None => format!("/v1/models/{name}"),
            };
            let (status, raw): (UnloadStatus, _) = client.delete_json(&path).await?;
            if json {
                println!("{}", output::json(&raw));
            } else {
                println!(
                    "unloaded {}: {} requests in flight finished, {} ended",
                    status.model, status.finished, status.cancelled
                );
            }
            Ok(())
        }
    }
}

/// A progress bar for a load: `[#######.........]  45%  120/268 MiB  reading`.
fn bar(status: &LoadStatus) -> String {
    const WIDTH: usize = 30;
    let mib = |b: u64| b as f64 / f64::from(1 << 20);
    let fraction = if status.bytes_total == 0 {
        0.0
    } else {
        (status.bytes_read as f64 / status.bytes_total as f64).clamp(0.0, 1.0)
    };
    let filled = (fraction * WIDTH as f64).round() as usize;
    format!(
        "{} [{}{}] {:3.0}%  {:.0}/{:.0} MiB  {}",
        status.model,
        "#".repeat(filled),
        ".".repeat(WIDTH - filled),
        fraction * 100.0,
        mib(status.bytes_read),
        mib(status.bytes_total),
        status.state
    )
}

/// Asks the daemon to load `spec`; follows the load to its end unless `wait` is false.
async fn load(client: &Client, spec: &ModelSpec, wait: bool, json: bool) -> Result<(), CtlError> {
    let (mut status, raw): (LoadStatus, _) = client.post_json("/v1/models", spec).await?;
    if !wait {
        if json {
            println!("{}", output::json(&raw));
        } else {
            println!(
                "loading {}: `accelctl models` lists it once it is ready",
                spec.name
            );
        }
        return Ok(());
    }
    let live = !json && std::io::stderr().is_terminal();
    let path = format!("/v1/models/{}/load", spec.name);
    let mut raw = raw;
    while !matches!(status.state.as_str(), "ready" | "failed") {
        if live {
            eprint!("\r\x1b[2K{}", bar(&status));
            let _ = std::io::stderr().flush();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        (status, raw) = client.get_json(&path).await?;
    }
    if live {
        eprintln!("\r\x1b[2K{}", bar(&status));
    }
    if json {
        println!("{}", output::json(&raw));
    }
    match (status.state.as_str(), status.error) {
        ("ready", _) => {
            if !json {
                println!(
                    "loaded {} on {} in {:.1} s",
                    status.model,
                    status.backend.as_deref().unwrap_or("?"),
                    status.elapsed_ms as f64 / 1000.0
                );
            }
            Ok(())
        }
        (_, why) => Err(CtlError::Other(format!(
            "loading {} failed: {}",
            status.model,
            why.unwrap_or_else(|| "see the daemon log".into())
        ))),
    }
}

async fn list(client: &Client, json: bool) -> Result<(), CtlError> {
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
