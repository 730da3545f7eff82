//! Operators' changes to the served models: `POST /v1/models` loads one (answered at once,
//! followed with `GET /v1/models/{name}/load`), `DELETE /v1/models/{name}` unloads one.
//! Tenants' view of the list is the OpenAI one in [`super::openai`].

use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};

use super::error::ApiError;
use super::types::UnloadStatus;
use super::Authenticated;
use crate::config::ModelSpec;
use crate::policy::Role;
use crate::served::{ChangeRefused, LoadStatus};
use crate::state::DaemonState;

type Shared = State<Arc<DaemonState>>;

/// Longest grace an unload may give its requests.
const MAX_GRACE: Duration = Duration::from_secs(3600);

fn refused(e: ChangeRefused) -> ApiError {
    let (status, code) = match &e {
        ChangeRefused::AlreadyServed(_)
        | ChangeRefused::AlreadyLoading(_)
        | ChangeRefused::Unloading(_) => (StatusCode::CONFLICT, "model_exists"),
        ChangeRefused::TooManyLoads(_) => (StatusCode::TOO_MANY_REQUESTS, "too_many_loads"),
        ChangeRefused::NotServed(_) => (StatusCode::NOT_FOUND, "model_not_found"),
        ChangeRefused::Unavailable(_) | ChangeRefused::Failed { .. } => {
            (StatusCode::SERVICE_UNAVAILABLE, "unavailable")
        }
    };
    ApiError::new(status, code, e.to_string())
}

/// Only root may load from anywhere; other operators load from the model cache, so the
/// operator group cannot make the daemon (root) open any file it likes. For them the path is
/// checked before anything is opened (no `..`, inside the cache), then resolved (a link out of
/// the cache, at the path or among a folder's files, is refused), and the model is loaded from
/// the resolved path. The cache belongs to root: what is checked here stays as checked.
fn checked_path(
    state: &DaemonState,
    auth: &Authenticated,
    spec: &ModelSpec,
) -> Result<std::path::PathBuf, ApiError> {
    let cache = &state.config.model_cache;
    let path = state.config.model_path(spec);
    let root = auth.peer.as_ref().is_some_and(|p| p.uid == 0);
    let outside = || {
        ApiError::forbidden(format!(
            "path: {} is outside the model cache ({}); only root may load models from elsewhere: put the model in the cache",
            path.display(),
            cache.display()
        ))
    };
    let escapes = path
        .components()
        .any(|c| c == std::path::Component::ParentDir);
    if !root && (escapes || !path.starts_with(cache)) {
        return Err(outside());
    }
    let resolved = std::fs::canonicalize(&path).map_err(|e| {
        ApiError::bad_request(format!(
            "path: cannot open {}: {e}; give a .gguf file or a Hugging Face model folder (a relative path is taken in the model cache, {})",
            path.display(),
            cache.display()
        ))
    })?;
    if root {
        return Ok(resolved);
    }
    let cache = std::fs::canonicalize(cache).map_err(|_| outside())?;
    if !resolved.starts_with(&cache) {
        return Err(outside());
    }
    if resolved.is_dir() {
        let entries = std::fs::read_dir(&resolved).map_err(|e| {
            ApiError::bad_request(format!("path: cannot list {}: {e}", resolved.display()))
        })?;
        for (n, entry) in entries.flatten().enumerate() {
            // All of them, or none: an unchecked file could be one the loader opens.
            if n >= crate::runner::fleet::MAX_MODEL_FILES {
                return Err(ApiError::bad_request(format!(
                    "path: {} holds more than {} files; a model folder has far fewer",
                    resolved.display(),
                    crate::runner::fleet::MAX_MODEL_FILES
                )));
            }
            let target = std::fs::canonicalize(entry.path()).unwrap_or_default();
            if !target.starts_with(&cache) {
                return Err(ApiError::forbidden(format!(
                    "path: {} links outside the model cache ({}); only root may load such a model",
                    entry.path().display(),
                    cache.display()
                )));
            }
        }
    }
    Ok(resolved)
}

/// `POST /v1/models`: starts loading a model given as a config file's `models` entry (name,
/// path, backend, kv_blocks, ...); 202 with its progress.
pub(super) async fn load(
    State(state): Shared,
    Extension(auth): Extension<Authenticated>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    if auth.identity.role != Role::Operator {
        return Err(ApiError::operators_only("loading models"));
    }
    let spec: ModelSpec = super::error::required_json(body)?;
    let problems = spec.problems("");
    if !problems.is_empty() {
        let listed: Vec<String> = problems
            .iter()
            .map(|p| format!("{}: {}", p.path, p.message))
            .collect();
        return Err(ApiError::bad_request(listed.join("; ")));
    }
    let mut spec = spec;
    spec.path = {
        let state = state.clone();
        let auth = auth.clone();
        let spec = spec.clone();
        tokio::task::spawn_blocking(move || checked_path(&state, &auth, &spec))
            .await
            .map_err(|e| ApiError::internal(format!("checking the path failed: {e}")))??
    };
    let uid = auth.peer.as_ref().map(|p| p.uid);
    tracing::info!(?uid, model = %spec.name, path = %spec.path.display(), "model load requested by an operator");
    let status = state.load_model(spec).map_err(refused)?;
    Ok((StatusCode::ACCEPTED, Json(status)).into_response())
}

/// `GET /v1/models/{name}/load`: the progress or outcome of the model's latest load.
pub(super) async fn load_status(
    State(state): Shared,
    Extension(auth): Extension<Authenticated>,
    Path(name): Path<String>,
) -> Result<Json<LoadStatus>, ApiError> {
    if auth.identity.role != Role::Operator {
        return Err(ApiError::operators_only("following model loads"));
    }
    state.served.load_status(&name).map(Json).ok_or_else(|| {
        ApiError::not_found(format!(
            "no load of model {:?} is running or recent; start one with accelctl models load",
            name.chars().take(64).collect::<String>()
        ))
    })
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct UnloadQuery {
    /// Seconds requests in flight may take to finish; the daemon's drain_timeout by default.
    grace: Option<f64>,
}

/// `DELETE /v1/models/{name}[?grace=S]`: unloads a model; answers once its engines are gone.
pub(super) async fn unload(
    State(state): Shared,
    Extension(auth): Extension<Authenticated>,
    Path(name): Path<String>,
    query: Result<Query<UnloadQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<UnloadStatus>, ApiError> {
    if auth.identity.role != Role::Operator {
        return Err(ApiError::operators_only("unloading models"));
    }
    let Query(query) = query.map_err(|e| {
        ApiError::bad_request(format!("{e}; the only parameter is grace (seconds)"))
    })?;
    let grace = match query.grace {
        None => state.config.drain_timeout.min(MAX_GRACE),
        Some(s) if s.is_finite() && (0.0..=MAX_GRACE.as_secs_f64()).contains(&s) => {
            Duration::from_secs_f64(s)
        }
        Some(s) => {
            return Err(ApiError::bad_request(format!(
                "grace: {s} is out of range: use 0 to {} seconds",
                MAX_GRACE.as_secs()
            )))
        }
    };
    let uid = auth.peer.as_ref().map(|p| p.uid);
    tracing::info!(?uid, model = %name, ?grace, "model unload requested by an operator");
    // On a task of its own: a client that goes away during the grace period does not stop the
    // unload half-way (the model off the list, its engine or metrics left behind).
    let unloading = {
        let (state, name) = (state.clone(), name.clone());
        tokio::spawn(async move { state.unload_model(&name, grace).await })
    };
    let retired = unloading
        .await
        .map_err(|e| ApiError::internal(format!("the unload failed: {e}")))?
        .map_err(refused)?;
    Ok(Json(UnloadStatus {
        model: name,
        finished: retired.finished,
        cancelled: retired.cancelled,
    }))
}
