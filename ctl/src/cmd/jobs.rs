//! `accelctl jobs submit|list|show|cancel|output`: batch jobs (a tenant sees its own; an
//! operator every tenant's, or one with `--tenant`).

use std::path::PathBuf;
use std::time::Duration;

use accel_runtime::jobs::JobView;
use clap::Subcommand;
use hyper::Method;

use crate::client::{Client, CtlError};
use crate::output;

#[derive(Debug, Subcommand)]
pub enum JobsCommand {
    /// Submit a JSONL file of requests (OpenAI's batch input format) as a job.
    Submit {
        /// The file: one `{"custom_id", "method": "POST", "url", "body"}` per line.
        file: PathBuf,
        /// Wait until the job finishes, showing its progress.
        #[arg(long)]
        wait: bool,
    },
    /// List the jobs you may see, newest first.
    List,
    /// Show one job: status, counts, timestamps.
    Show {
        /// The job's id.
        id: String,
    },
    /// Cancel a job; lines answered so far keep their answers.
    Cancel {
        /// The job's id.
        id: String,
    },
    /// Print a job's answers (JSONL, in the order they completed).
    Output {
        /// The job's id.
        id: String,
        /// Print the failed lines instead.
        #[arg(long)]
        errors: bool,
    },
}

#[derive(Debug, serde::Deserialize)]
struct JobList {
    data: Vec<JobView>,
}

fn progress(job: &JobView) -> String {
    let c = &job.request_counts;
    format!("{}/{}", c.completed + c.failed, c.total)
}

fn show(job: &JobView) -> String {
    let time = |t: Option<u64>| t.map_or_else(|| "-".to_owned(), |t| t.to_string());
    let mut pairs = vec![
        ("id", job.id.clone()),
        ("tenant", job.tenant.clone()),
        ("status", job.status.as_str().to_owned()),
        ("answered", progress(job)),
        ("completed", job.request_counts.completed.to_string()),
        ("failed", job.request_counts.failed.to_string()),
        ("created_at", job.created_at.to_string()),
        ("in_progress_at", time(job.in_progress_at)),
        (
            "finished_at",
            time(job.completed_at.or(job.cancelled_at).or(job.failed_at)),
        ),
        (
            "input",
            format!("{} bytes, sha256 {}", job.input_bytes, job.input_sha256),
        ),
    ];
    if let Some(error) = &job.error {
        pairs.push(("error", error.clone()));
    }
    output::fields(&pairs)
}

pub async fn run(client: &Client, command: &JobsCommand, json: bool) -> Result<(), CtlError> {
    match command {
        JobsCommand::Submit { file, wait } => {
            let body = std::fs::read(file)
                .map_err(|e| CtlError::Usage(format!("cannot read {}: {e}", file.display())))?;
            let (_, bytes) = client
                .post_raw("/v1/jobs", body, "application/x-ndjson")
                .await?;
            let raw: serde_json::Value = serde_json::from_slice(&bytes)
                .map_err(|e| CtlError::Other(format!("acceld sent invalid JSON: {e}")))?;
            let mut job: JobView = serde_json::from_value(raw.clone())
                .map_err(|e| CtlError::Other(format!("unexpected answer: {e}")))?;
            if *wait {
                job = wait_for(client, &job.id, !json).await?;
                if json {
                    println!(
                        "{}",
                        output::json(&serde_json::to_value(&job).unwrap_or_default())
                    );
                } else {
                    println!("{}", show(&job));
                }
            } else if json {
                println!("{}", output::json(&raw));
            } else {
                println!("{}", job.id);
            }
        }
        JobsCommand::List => {
            let (list, raw): (JobList, _) = client.get_json("/v1/jobs").await?;
            if json {
                println!("{}", output::json(&raw));
                return Ok(());
            }
            let rows: Vec<Vec<String>> = list
                .data
                .iter()
                .map(|j| {
                    vec![
                        j.id.clone(),
                        j.tenant.clone(),
                        j.status.as_str().to_owned(),
                        progress(j),
                        j.request_counts.failed.to_string(),
                        j.created_at.to_string(),
                    ]
                })
                .collect();
            println!(
                "{}",
                output::table(
                    &["ID", "TENANT", "STATUS", "ANSWERED", "FAILED", "CREATED"],
                    &rows
                )
            );
        }
        JobsCommand::Show { id } => {
            let (job, raw): (JobView, _) = client.get_json(&format!("/v1/jobs/{id}")).await?;
            if json {
                println!("{}", output::json(&raw));
            } else {
                println!("{}", show(&job));
            }
        }
        JobsCommand::Cancel { id } => {
            let (_, bytes) = client
                .request(Method::POST, &format!("/v1/jobs/{id}/cancel"), None)
                .await?;
            let raw: serde_json::Value = serde_json::from_slice(&bytes)
                .map_err(|e| CtlError::Other(format!("acceld sent invalid JSON: {e}")))?;
            if json {
                println!("{}", output::json(&raw));
            } else {
                let job: JobView = serde_json::from_value(raw)
                    .map_err(|e| CtlError::Other(format!("unexpected answer: {e}")))?;
                println!("{} {}", job.id, job.status.as_str());
            }
        }
        JobsCommand::Output { id, errors } => {
            let which = if *errors { "errors" } else { "output" };
            let mut stdout = std::io::stdout().lock();
            client
                .get_to(&format!("/v1/jobs/{id}/{which}"), &mut stdout)
                .await?;
        }
    }
    Ok(())
}

/// Polls the job until it finishes, with a progress line on stderr when `live`.
async fn wait_for(client: &Client, id: &str, live: bool) -> Result<JobView, CtlError> {
    use std::io::Write as _;
    loop {
        let (job, _): (JobView, _) = client.get_json(&format!("/v1/jobs/{id}")).await?;
        if live {
            let mut err = std::io::stderr().lock();
            let _ = write!(
                err,
                "\r{id}: {} {} answered, {} failed   ",
                job.status.as_str(),
                progress(&job),
                job.request_counts.failed
            );
            let _ = err.flush();
        }
        if job.status.is_finished() {
            if live {
                eprintln!();
            }
            return Ok(job);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
