//! The batch jobs API: `POST /v1/jobs` (a JSONL file of requests), `GET /v1/jobs`,
//! `GET /v1/jobs/{id}`, its `/output` and `/errors`, and `POST /v1/jobs/{id}/cancel`; and
//! [`serve_job_line`], through which the job runner sends each line to the same handlers as
//! API requests.
//!
//! A tenant sees only its own jobs: another tenant's job id is answered 404 exactly like an id
//! that does not exist. Operators see every job, or, acting for a tenant, that tenant's.

use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde::Serialize;

use super::openai::{self, RequestSlot};
use super::{ApiError, Authenticated};
use crate::jobs::{self, Job, JobView, SubmitError};
use crate::policy::{Identity, Role};
use crate::state::DaemonState;

type Shared = State<Arc<DaemonState>>;

/// Largest answer body the runner reads back from a handler.
/// Below the journal's record limit, so a recorded answer always fits a record.
const MAX_LINE_ANSWER_BYTES: usize = 48 << 20;
/// Bytes read from an output file per chunk of the response.
const OUTPUT_CHUNK_BYTES: usize = 1 << 20;

#[derive(Debug, Serialize)]
pub struct JobList {
    pub object: &'static str,
    pub data: Vec<JobView>,
}

/// The permit to read one job upload, held until its answer.
#[derive(Debug, Clone)]
pub(super) struct UploadPermit(#[allow(dead_code)] pub Arc<tokio::sync::OwnedSemaphorePermit>);

fn jobs_enabled(state: &DaemonState) -> Result<(), ApiError> {
    if state.jobs.enabled() {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "jobs_disabled",
            "batch jobs are not enabled in this daemon",
        ))
    }
}

/// The job named `id`, if the caller may see it; else the same 404 as for no such job.
fn visible_job(state: &DaemonState, auth: &Authenticated, id: &str) -> Result<Arc<Job>, ApiError> {
    jobs_enabled(state)?;
    jobs::is_job_id(id)
        .then(|| state.jobs.get(id))
        .flatten()
        .filter(|job| auth.may_see_tenant(&job.meta.tenant))
        .ok_or_else(|| {
            ApiError::not_found(format!(
                "no job {:?} is visible to you; see `accelctl jobs list`",
                id.chars().take(64).collect::<String>()
            ))
        })
}

pub(super) async fn submit(
    State(state): Shared,
    Extension(auth): Extension<Authenticated>,
    // Held until the job is stored: the body it admitted stays in memory until then.
    permit: Option<Extension<UploadPermit>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let _permit = permit;
    jobs_enabled(&state)?;
    let body = body.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            too_large(&state)
        } else {
            ApiError::bad_request(format!("cannot read the job file: {e}"))
        }
    })?;
    let Some(tenant) = auth.identity.tenant.clone() else {
        return Err(ApiError::bad_request(
            "a job runs as a tenant; operators name one with `accelctl --tenant NAME` (the X-Accel-Tenant header)",
        ));
    };
    let max_active = auth.policy.tenant(&tenant).and_then(|t| t.limits.max_jobs);
    let submitted_by = match &auth.peer {
        Some(peer) => format!("uid {}", peer.uid),
        None => format!("token ({})", auth.identity.matched_by),
    };
    let submitting = {
        let (state, tenant) = (state.clone(), tenant.clone());
        tokio::task::spawn_blocking(move || {
            state.jobs.submit(&tenant, &submitted_by, max_active, &body)
        })
    };
    let job = match submitting.await {
        Ok(Ok(job)) => job,
        Ok(Err(e)) => return Err(submit_error(e)),
        Err(_) => {
            return Err(ApiError::internal(
                "storing the job failed; see the daemon log",
            ))
        }
    };
    tracing::info!(job = %job.meta.id, %tenant, lines = job.meta.lines, bytes = job.meta.input_bytes, "batch job accepted");
    jobs::run::spawn(state.clone(), job.clone());
    let location = format!("/v1/jobs/{}", job.meta.id);
    Ok((
        StatusCode::CREATED,
        [(header::LOCATION, location)],
        Json(job.view()),
    )
        .into_response())
}

fn too_large(state: &DaemonState) -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "payload_too_large",
        format!(
            "the job file is larger than jobs.max_file_size ({}); split it into several jobs",
            state.jobs.config.max_file_size
        ),
    )
}

fn submit_error(e: SubmitError) -> ApiError {
    match &e {
        SubmitError::Empty | SubmitError::TooManyLines { .. } | SubmitError::DuplicateId { .. } => {
            ApiError::new(StatusCode::BAD_REQUEST, "invalid_job_file", e.to_string())
        }
        SubmitError::TooMany { .. } | SubmitError::TooManyStored { .. } => {
            ApiError::new(StatusCode::TOO_MANY_REQUESTS, "job_limit", e.to_string())
                .with_retry_after(60)
        }
        SubmitError::Disabled => {
            ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "jobs_disabled", e.to_string())
        }
        SubmitError::Io(io) if io.raw_os_error() == Some(nix::libc::ENOSPC) => ApiError::new(
            StatusCode::INSUFFICIENT_STORAGE,
            "no_space",
            "the daemon's state directory is full; the job was not stored. Retry later or ask an operator",
        ),
        SubmitError::Io(_) => {
            tracing::error!(error = %e, "cannot store a batch job");
            ApiError::internal("the job could not be stored; see the daemon log")
        }
    }
}

pub(super) async fn list(
    State(state): Shared,
    Extension(auth): Extension<Authenticated>,
) -> Result<Json<JobList>, ApiError> {
    jobs_enabled(&state)?;
    let data = state
        .jobs
        .all()
        .into_iter()
        .filter(|job| auth.may_see_tenant(&job.meta.tenant))
        .map(|job| job.view())
        .collect();
    Ok(Json(JobList {
        object: "list",
        data,
    }))
}

pub(super) async fn show(
    State(state): Shared,
    Extension(auth): Extension<Authenticated>,
    Path(id): Path<String>,
) -> Result<Json<JobView>, ApiError> {
    Ok(Json(visible_job(&state, &auth, &id)?.view()))
}

pub(super) async fn cancel(
    State(state): Shared,
    Extension(auth): Extension<Authenticated>,
    Path(id): Path<String>,
) -> Result<Json<JobView>, ApiError> {
    let job = visible_job(&state, &auth, &id)?;
    let status = job.status();
    if status.is_finished() && status != jobs::Status::Cancelled {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "job_finished",
            format!(
                "job {id} is already {}; there is nothing to cancel",
                status.as_str()
            ),
        ));
    }
    let requested = {
        let job = job.clone();
        tokio::task::spawn_blocking(move || job.request_cancel()).await
    };
    match requested {
        Ok(Ok(_)) => {
            tracing::info!(job = %id, tenant = %job.meta.tenant, "batch job cancel requested");
            Ok(Json(job.view()))
        }
        _ => Err(ApiError::internal(
            "the cancel could not be journaled; see the daemon log",
        )),
    }
}

pub(super) async fn output(
    State(state): Shared,
    Extension(auth): Extension<Authenticated>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    file_response(&state, &auth, &id, false)
}

pub(super) async fn errors(
    State(state): Shared,
    Extension(auth): Extension<Authenticated>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    file_response(&state, &auth, &id, true)
}

/// Streams the whole lines an output file holds now, in chunks read off the async threads.
fn file_response(
    state: &DaemonState,
    auth: &Authenticated,
    id: &str,
    errors: bool,
) -> Result<Response, ApiError> {
    let job = visible_job(state, auth, id)?;
    let (file, len) = job
        .output_file(errors)
        .map_err(|e| ApiError::internal(format!("cannot open the job's output: {e}")))?;
    let file = Arc::new(file);
    let chunks = futures_util::stream::unfold(0u64, move |offset| {
        let file = file.clone();
        async move {
            if offset >= len {
                return None;
            }
            let want = (len - offset).min(OUTPUT_CHUNK_BYTES as u64) as usize;
            let read = tokio::task::spawn_blocking(move || {
                use std::os::unix::fs::FileExt as _;
                let mut buf = vec![0u8; want];
                file.read_exact_at(&mut buf, offset).map(|()| buf)
            })
            .await;
            match read {
                Ok(Ok(buf)) => Some((
                    Ok::<_, std::io::Error>(Bytes::from(buf)),
                    offset + want as u64,
                )),
                Ok(Err(e)) => Some((Err(e), len)),
                Err(_) => Some((Err(std::io::Error::other("the reader stopped")), len)),
            }
        }
    });
    Ok((
        [
            (header::CONTENT_TYPE, "application/x-ndjson".to_owned()),
            (header::CONTENT_LENGTH, len.to_string()),
        ],
        Body::from_stream(chunks),
    )
        .into_response())
}

/// Serves one job line as `tenant`, in the batch class, through the API's own handler for
/// `url`; answers what a client would have received. `Err` when the tenant is no longer in
/// the policy (the job cannot go on).
pub(crate) async fn serve_job_line(
    state: &Arc<DaemonState>,
    tenant: &str,
    url: &str,
    body: Bytes,
) -> Result<jobs::run::Reply, String> {
    let policy = state.policy();
    if policy.tenant(tenant).is_none() {
        return Err(format!(
            "tenant {tenant:?} is no longer in the policy in force"
        ));
    }
    let auth = Authenticated {
        peer: None,
        identity: Identity {
            role: Role::Tenant,
            tenant: Some(tenant.to_owned()),
            matched_by: "batch job".into(),
        },
        acting_for_tenant: false,
        policy,
        batch: true,
    };
    let slot = Some(Extension(RequestSlot(Arc::new(state.job_slot(tenant)))));
    let result = match url {
        "/v1/completions" => {
            openai::completions(State(state.clone()), Extension(auth), slot, Ok(body)).await
        }
        _ => openai::chat_completions(State(state.clone()), Extension(auth), slot, Ok(body)).await,
    };
    let response = result.unwrap_or_else(IntoResponse::into_response);
    let status = response.status().as_u16();
    let retry_after = response
        .headers()
        .get(header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok());
    let (status, body) = match axum::body::to_bytes(response.into_body(), MAX_LINE_ANSWER_BYTES)
        .await
    {
        Ok(bytes) => (
            status,
            serde_json::from_slice(&bytes).unwrap_or_else(|_| {
                serde_json::Value::String(String::from_utf8_lossy(&bytes).into_owned())
            }),
        ),
        // Too large to record (or cut off): the line's failure, not a success.
        Err(e) => (
            500,
            serde_json::json!({"error": {"code": "answer_too_large", "message": format!("the answer could not be recorded: {e}; lower max_tokens or logprobs")}}),
        ),
    };
    Ok(jobs::run::Reply {
        status,
        body,
        retry_after,
    })
}
