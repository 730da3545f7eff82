//! Handlers of the control API. Each one checks what the caller may see or do; none of them
//! touches a kernel interface.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::{header, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};

use super::error::{json_body, ApiError};
use super::types::{
    ApiStatus, BackendStatus, CreateToken, CreatedToken, DrainStatus, Health, PolicyStatus,
    ReloadRequest, ReloadResponse, RequestList, SchedulerStatus, Status, TenantList, TokenList,
    WhoAmI,
};
use super::{unknown_route_error, Authenticated};
use crate::policy::Role;
use crate::state::DaemonState;

type Shared = State<Arc<DaemonState>>;

pub(super) async fn healthz(State(state): Shared) -> Response {
    let models_down: Vec<String> = state
        .models()
        .iter()
        .filter(|m| !m.is_up())
        .map(|m| m.info.name.clone())
        .collect();
    let status = if state.draining() {
        "draining"
    } else if !models_down.is_empty() {
        "degraded"
    } else {
        "ok"
    };
    let code = if status == "ok" {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        code,
        Json(Health {
            status: status.into(),
            models_down,
        }),
    )
        .into_response()
}

pub(super) async fn whoami(Extension(auth): Extension<Authenticated>) -> Json<WhoAmI> {
    Json(WhoAmI {
        uid: auth.peer.as_ref().map(|p| p.uid),
        gid: auth.peer.as_ref().map(|p| p.gid),
        pid: auth.peer.as_ref().and_then(|p| p.pid),
        role: auth.identity.role,
        tenant: auth.identity.tenant,
        acting_for_tenant: auth.acting_for_tenant,
        matched_by: auth.identity.matched_by,
    })
}

pub(super) async fn status(
    State(state): Shared,
    Extension(auth): Extension<Authenticated>,
) -> Json<Status> {
    let policy = &auth.policy;
    let config = &state.config;
    Json(Status {
        version: env!("CARGO_PKG_VERSION").into(),
        pid: std::process::id(),
        started_at: state
            .started_at
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        uptime_seconds: state.started.elapsed().as_secs_f64(),
        state: if state.draining() {
            "draining"
        } else {
            "serving"
        }
        .into(),
        backend: BackendStatus {
            configured: config.backend.to_string(),
            active: {
                let models = state.models();
                let mut active: Vec<&str> =
                    models.iter().map(|m| m.info.backend.as_str()).collect();
                active.sort_unstable();
                active.dedup();
                if active.is_empty() {
                    "none".into()
                } else {
                    active.join(", ")
                }
            },
        },
        peak_resident_bytes: crate::metrics::peak_resident_bytes(),
        policy: PolicyStatus {
            generation: policy.generation,
            loaded_at: policy.loaded_at,
            sources: policy.sources.clone(),
            tenants: policy.tenants.len(),
        },
        api: ApiStatus {
            socket: config.socket.display().to_string(),
            tcp_listen: config.tcp_listen.map(|a| a.to_string()),
            metrics_listen: config.metrics_listen.map(|a| a.to_string()),
            requests_in_flight: state.metrics.api_in_flight.get(),
            inference_in_flight: state.inference_in_flight(),
        },
    })
}

/// Operators see every tenant; a tenant (or an operator acting for one) sees only itself.
pub(super) async fn tenants(Extension(auth): Extension<Authenticated>) -> Json<TenantList> {
    let visible = auth
        .policy
        .tenants
        .iter()
        .filter(|t| auth.may_see_tenant(&t.name))
        .cloned()
        .collect();
    Json(TenantList { tenants: visible })
}

pub(super) async fn tenant(
    State(state): Shared,
    Extension(auth): Extension<Authenticated>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    let policy = &auth.policy;
    let may_see = auth.may_see_tenant(&name);
    // A tenant asking about another gets the same answer as for a tenant that does not exist,
    // so tenant names do not leak.
    match policy.tenant(&name).filter(|_| may_see) {
        Some(t) => {
            // With the workers dedicated to it, if any.
            let workers: Vec<crate::worker::WorkerReport> = state
                .models()
                .iter()
                .flat_map(|m| {
                    m.workers()
                        .iter()
                        .filter(|w| w.tenant() == Some(t.name.as_str()))
                        .map(|w| w.report(&m.info.name))
                })
                .collect();
            let mut view = serde_json::to_value(t)
                .map_err(|e| ApiError::internal(format!("cannot show the tenant: {e}")))?;
            if let Some(object) = view.as_object_mut() {
                object.insert(
                    "workers".into(),
                    serde_json::to_value(workers).unwrap_or_default(),
                );
            }
            Ok(Json(view).into_response())
        }
        None => Err(ApiError::not_found(format!(
            "no tenant named {name:?} is visible to you; see `accelctl tenants list`"
        ))),
    }
}

/// Operators see every GPU; a tenant sees those its policy's `devices` selectors allow.
pub(super) async fn devices(
    State(state): Shared,
    Extension(auth): Extension<Authenticated>,
) -> Json<crate::devices::DeviceReport> {
    let mut report = state.devices.clone();
    if let Some(tenant) = auth
        .identity
        .tenant
        .as_deref()
        .and_then(|t| auth.policy.tenant(t))
    {
        report.devices.retain(|d| {
            tenant
                .devices
                .iter()
                .any(|s| s == "*" || *s == d.uuid || *s == format!("cuda:{}", d.index))
        });
    }
    Json(report)
}

pub(super) async fn reload_policy(
    State(state): Shared,
    Extension(auth): Extension<Authenticated>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<ReloadResponse>, ApiError> {
    if auth.identity.role != Role::Operator {
        return Err(ApiError::operators_only("reloading the policy"));
    }
    let request: ReloadRequest = json_body(body)?;
    tracing::info!(
        uid = auth.peer.as_ref().map(|p| p.uid),
        dry_run = request.dry_run,
        "policy reload requested over the API"
    );
    match state.reload_policy(request.dry_run).await {
        Ok(reloaded) => Ok(Json(ReloadResponse {
            applied: reloaded.applied,
            generation: reloaded.generation,
            tenants: reloaded.tenants,
            sources: reloaded.sources,
            pending: reloaded.pending,
        })),
        Err(problems) => {
            let mut error = ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_policy",
                format!(
                    "the new policy was rejected and the one in force is unchanged; fix the {} listed in `problems` and reload again",
                    if problems.0.len() == 1 { "problem".to_owned() } else { format!("{} problems", problems.0.len()) }
                ),
            );
            error.problems = problems.0;
            Err(error)
        }
    }
}

/// An operator's drain: new inference requests and jobs get 503 with `Retry-After` while
/// in-flight ones finish; `/healthz` says `draining` so load balancers move away.
pub(super) async fn drain(
    State(state): Shared,
    Extension(auth): Extension<Authenticated>,
) -> Result<Json<DrainStatus>, ApiError> {
    set_drained(&state, &auth, true)
}

pub(super) async fn undrain(
    State(state): Shared,
    Extension(auth): Extension<Authenticated>,
) -> Result<Json<DrainStatus>, ApiError> {
    set_drained(&state, &auth, false)
}

fn set_drained(
    state: &DaemonState,
    auth: &Authenticated,
    drained: bool,
) -> Result<Json<DrainStatus>, ApiError> {
    let what = if drained { "draining" } else { "undraining" };
    if auth.identity.role != Role::Operator {
        return Err(ApiError::operators_only(what));
    }
    if !drained && state.stopping() {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "stopping",
            "the daemon is stopping; it cannot be undrained",
        ));
    }
    let changed = state.set_drained(drained);
    tracing::info!(
        uid = auth.peer.as_ref().map(|p| p.uid),
        changed,
        in_flight = state.inference_in_flight(),
        "{what} requested by an operator"
    );
    Ok(Json(DrainStatus {
        state: if state.draining() {
            "draining"
        } else {
            "serving"
        }
        .into(),
        changed,
        inference_in_flight: state.inference_in_flight(),
    }))
}

/// `GET /v1/requests`: generation requests in flight, oldest first.
pub(super) async fn requests(
    State(state): Shared,
    Extension(auth): Extension<Authenticated>,
) -> Json<RequestList> {
    let mut data = state.requests.list();
    data.retain(|r| auth.may_see_tenant(&r.tenant));
    Json(RequestList { data })
}

/// `POST /v1/requests/{id}/cancel`: ends the request with 410 `cancelled` and frees its
/// sequence. Another tenant's request is 404, as one that is not in flight.
pub(super) async fn cancel_request(
    State(state): Shared,
    Extension(auth): Extension<Authenticated>,
    Path(id): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let visible = state
        .requests
        .tenant_of(&id)
        .is_some_and(|tenant| auth.may_see_tenant(&tenant));
    if !visible || !state.requests.cancel(&id) {
        return Err(ApiError::not_found(format!(
            "no request {:?} is in flight for you; see `accelctl requests`",
            id.chars().take(64).collect::<String>()
        )));
    }
    tracing::info!(request = %id, uid = auth.peer.as_ref().map(|p| p.uid), "request cancelled over the API");
    Ok(Json(serde_json::json!({"id": id, "cancelled": true})))
}

/// `POST /v1/tokens {"tenant": NAME}`: a new bearer token for the tenant, shown only in this
/// answer (operators only).
pub(super) async fn create_token(
    State(state): Shared,
    Extension(auth): Extension<Authenticated>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    if auth.identity.role != Role::Operator {
        return Err(ApiError::operators_only("creating tokens"));
    }
    let request: CreateToken = super::error::required_json(body)?;
    if auth.policy.tenant(&request.tenant).is_none() {
        return Err(ApiError::not_found(format!(
            "no tenant named {:?} in the policy in force; see `accelctl tenants list`",
            request.tenant.chars().take(64).collect::<String>()
        )));
    }
    let created_by = auth.peer.as_ref().map_or_else(
        || auth.identity.matched_by.clone(),
        |p| format!("uid {}", p.uid),
    );
    let created = {
        let state = state.clone();
        let tenant = request.tenant.clone();
        tokio::task::spawn_blocking(move || state.tokens.create(&tenant, &created_by)).await
    };
    match created {
        Ok(Ok((entry, token))) => {
            tracing::info!(id = %entry.id, tenant = %entry.tenant, by = %entry.created_by, "bearer token created");
            Ok((
                StatusCode::CREATED,
                Json(CreatedToken {
                    id: entry.id,
                    tenant: entry.tenant,
                    created_at: entry.created_at,
                    token,
                }),
            )
                .into_response())
        }
        Ok(Err(crate::tokens::TokenError::TooMany)) => Err(ApiError::new(
            StatusCode::CONFLICT,
            "too_many_tokens",
            crate::tokens::TokenError::TooMany.to_string(),
        )),
        Ok(Err(e)) => Err(ApiError::internal(e.to_string())),
        Err(_) => Err(ApiError::internal("creating the token failed")),
    }
}

/// `GET /v1/tokens`: every run-time token (id, tenant, hash, when, by whom), never the token.
pub(super) async fn list_tokens(
    State(state): Shared,
    Extension(auth): Extension<Authenticated>,
) -> Result<Json<TokenList>, ApiError> {
    if auth.identity.role != Role::Operator {
        return Err(ApiError::operators_only("listing tokens"));
    }
    Ok(Json(TokenList {
        data: state.tokens.list(),
    }))
}

/// `DELETE /v1/tokens/{id}`: revokes a token at once.
pub(super) async fn revoke_token(
    State(state): Shared,
    Extension(auth): Extension<Authenticated>,
    Path(id): Path<String>,
) -> Result<Json<crate::tokens::TokenEntry>, ApiError> {
    if auth.identity.role != Role::Operator {
        return Err(ApiError::operators_only("revoking tokens"));
    }
    let revoked = {
        let state = state.clone();
        let id = id.clone();
        tokio::task::spawn_blocking(move || state.tokens.revoke(&id)).await
    };
    match revoked {
        Ok(Ok(Some(entry))) => {
            tracing::info!(id = %entry.id, tenant = %entry.tenant, "bearer token revoked");
            Ok(Json(entry))
        }
        Ok(Ok(None)) => Err(ApiError::not_found(format!(
            "no token {:?}; see `accelctl tokens list`",
            id.chars().take(64).collect::<String>()
        ))),
        Ok(Err(e)) => Err(ApiError::internal(e.to_string())),
        Err(_) => Err(ApiError::internal("revoking the token failed")),
    }
}

/// Each device's scheduler: policy, models and per-tenant queues, shares and counters.
pub(super) async fn scheduler(
    State(state): Shared,
    Extension(auth): Extension<Authenticated>,
) -> Json<SchedulerStatus> {
    let tenant = match auth.identity.role {
        Role::Operator => None,
        _ => Some(auth.identity.tenant.clone().unwrap_or_default()),
    };
    let allowed = tenant.as_deref().and_then(|t| auth.policy.tenant(t));
    let mut devices: Vec<crate::runner::DeviceSchedule> = Vec::new();
    for model in state.models().iter() {
        let mut schedule = model.schedule();
        if devices.iter().any(|d| d.device == schedule.device) {
            continue;
        }
        if let Some(me) = &tenant {
            schedule.tenants.retain(|t| &t.tenant == me);
            schedule
                .models
                .retain(|m| allowed.is_some_and(|t| t.allows_model(m)));
            schedule
                .memory
                .retain(|m| allowed.is_some_and(|t| t.allows_model(&m.model)));
        }
        devices.push(schedule);
    }
    Json(SchedulerStatus { devices })
}

/// Every model's worker process: pid, user, restarts, and its cgroup's use (operators only).
pub(super) async fn workers(
    State(state): Shared,
    Extension(auth): Extension<Authenticated>,
) -> Result<Json<crate::worker::WorkersStatus>, ApiError> {
    if auth.identity.role != Role::Operator {
        return Err(ApiError::operators_only("/v1/workers"));
    }
    let workers = state
        .models()
        .iter()
        .flat_map(|m| m.workers().iter().map(|w| w.report(&m.info.name)))
        .collect();
    let isolation = match state.config.isolation {
        crate::config::Isolation::Off => "off",
        crate::config::Isolation::Shared => "shared",
    };
    Ok(Json(crate::worker::WorkersStatus {
        isolation: isolation.to_owned(),
        workers,
    }))
}

pub(super) async fn metrics(
    State(state): Shared,
    Extension(auth): Extension<Authenticated>,
) -> Result<Response, ApiError> {
    if auth.identity.role != Role::Operator {
        return Err(ApiError::operators_only("/metrics on the control socket"));
    }
    metrics_unauthenticated(State(state)).await
}

pub(super) async fn metrics_unauthenticated(State(state): Shared) -> Result<Response, ApiError> {
    state.refresh_model_metrics();
    let text = state
        .metrics
        .render()
        .map_err(|e| ApiError::internal(format!("cannot encode metrics: {e}")))?;
    Ok((
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
        .into_response())
}

pub(super) async fn unknown_route(uri: Uri) -> ApiError {
    unknown_route_error(uri.path())
}

pub(super) async fn method_not_allowed(uri: Uri) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        format!(
            "{} does not accept this method; see the API section of the README",
            uri.path()
        ),
    )
}
