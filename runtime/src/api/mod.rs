//! The control API: HTTP/1.1 + JSON on the Unix socket (and optionally TCP), like the Docker
//! daemon's, so `curl --unix-socket` works.
//!
//! Owns routing, caller authentication and per-request metrics. On the Unix socket the caller is
//! its `SO_PEERCRED` credentials; on TCP a bearer token. Either way the policy maps it to an
//! [`Identity`] before any handler runs; unknown callers get 403 (401 on TCP) and nothing else.
//! Handlers see only the shared [`DaemonState`] and the identity.

mod error;
pub mod front;
mod jobs;
mod models;
mod openai;
pub mod openai_types;
mod routes;
pub mod server;
pub mod tools;
pub mod types;

use std::sync::Arc;
use std::time::Instant;

use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;

pub use self::error::ApiError;
pub(crate) use self::jobs::serve_job_line;
use crate::policy::{Caller, Identity, Role};
use crate::state::DaemonState;
use crate::state::PolicySnapshot;

/// `Retry-After` of requests refused while the daemon is drained.
const DRAIN_RETRY_AFTER_SECS: u64 = 30;

/// Header an operator sets to act for a tenant (`accelctl --tenant NAME`).
pub const ACT_FOR_TENANT_HEADER: &str = "x-accel-tenant";

/// Credentials of a Unix-socket peer, read from the socket when the connection is accepted
/// (`SO_PEERCRED` and `SO_PEERGROUPS`), so they describe the process that connected, not
/// whatever later holds its pid.
#[derive(Debug, Clone)]
pub struct PeerCred {
    pub uid: u32,
    pub gid: u32,
    pub pid: Option<i32>,
    /// Supplementary groups.
    pub groups: Arc<[u32]>,
}

impl PeerCred {
    /// Reads the peer's credentials; a peer we cannot identify is `nobody`, whom the policy
    /// refuses unless it deliberately serves uid 65534.
    pub fn of(stream: &tokio::net::UnixStream) -> Self {
        let groups: Arc<[u32]> = match crate::sys::peer_groups(stream) {
            Ok(groups) => groups.into(),
            Err(e) => {
                tracing::warn!(error = %e, "SO_PEERGROUPS failed; the peer's supplementary groups are ignored");
                Arc::from([])
            }
        };
        match stream.peer_cred() {
            Ok(cred) => PeerCred {
                uid: cred.uid(),
                gid: cred.gid(),
                pid: cred.pid(),
                groups,
            },
            Err(e) => {
                tracing::warn!(error = %e, "SO_PEERCRED failed; treating the peer as nobody");
                PeerCred {
                    uid: 65534,
                    gid: 65534,
                    pid: None,
                    groups: Arc::from([]),
                }
            }
        }
    }
}

/// Who made a request, as established by the authentication middleware, together with the
/// policy that decided it: handlers answer from this same policy, so one request never mixes
/// two policy generations.
#[derive(Debug, Clone)]
pub struct Authenticated {
    pub peer: Option<PeerCred>,
    pub identity: Identity,
    pub acting_for_tenant: bool,
    pub policy: Arc<PolicySnapshot>,
    /// Made by a batch job on its tenant's behalf: scheduled in the batch class.
    pub batch: bool,
}

impl Authenticated {
    /// Whether the caller may see what belongs to `tenant` (the tenant, its jobs, its
    /// requests): operators anything; a tenant, or an operator acting for one, only that
    /// tenant's. What it may not see is answered as if it did not exist.
    pub fn may_see_tenant(&self, tenant: &str) -> bool {
        match (&self.identity.role, &self.identity.tenant) {
            (Role::Operator, None) => true,
            (_, Some(own)) => own == tenant,
            (Role::Tenant, None) => false,
        }
    }
}

/// Which listener a router serves; decides how callers are identified.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListenerKind {
    Unix,
    Tcp,
}

/// The full API for a listener.
pub fn router(state: Arc<DaemonState>, kind: ListenerKind) -> Router {
    let body_limit = usize::try_from(state.config.max_request_body.bytes()).unwrap_or(usize::MAX);
    let job_file_limit =
        usize::try_from(state.config.jobs.max_file_size.bytes()).unwrap_or(usize::MAX);
    let authenticated = Router::new()
        .route("/v1/status", get(routes::status))
        .route("/v1/whoami", get(routes::whoami))
        .route("/v1/tenants", get(routes::tenants))
        .route("/v1/tenants/{name}", get(routes::tenant))
        .route("/v1/policy/reload", post(routes::reload_policy))
        .route("/v1/drain", post(routes::drain))
        .route("/v1/requests", get(routes::requests))
        .route("/v1/requests/{id}/cancel", post(routes::cancel_request))
        .route(
            "/v1/tokens",
            post(routes::create_token).get(routes::list_tokens),
        )
        .route(
            "/v1/tokens/{id}",
            axum::routing::delete(routes::revoke_token),
        )
        .route("/v1/undrain", post(routes::undrain))
        .route("/v1/devices", get(routes::devices))
        .route("/v1/scheduler", get(routes::scheduler))
        .route("/v1/workers", get(routes::workers))
        .route("/v1/models", get(openai::list_models).post(models::load))
        .route(
            "/v1/models/{name}",
            get(openai::retrieve_model).delete(models::unload),
        )
        .route("/v1/models/{name}/load", get(models::load_status))
        .route("/v1/completions", post(openai::completions))
        .route("/v1/chat/completions", post(openai::chat_completions))
        .route(
            "/v1/jobs",
            post(jobs::submit)
                .layer(DefaultBodyLimit::max(job_file_limit))
                .get(jobs::list),
        )
        .route("/v1/jobs/{id}", get(jobs::show))
        .route("/v1/jobs/{id}/output", get(jobs::output))
        .route("/v1/jobs/{id}/errors", get(jobs::errors))
        .route("/v1/jobs/{id}/cancel", post(jobs::cancel))
        .route("/metrics", get(routes::metrics))
        // Layers run bottom up: authentication first, so a refused caller's body is never read.
        .route_layer(middleware::from_fn_with_state(state.clone(), read_body))
        .route_layer(middleware::from_fn_with_state(
            (state.clone(), kind),
            authenticate,
        ));
    Router::new()
        .route("/healthz", get(routes::healthz))
        .merge(authenticated)
        .fallback(routes::unknown_route)
        .method_not_allowed_fallback(routes::method_not_allowed)
        .layer(DefaultBodyLimit::max(body_limit))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            record_metrics,
        ))
        .with_state(state)
}

/// The metrics-only listener for Prometheus: `/metrics` and `/healthz`, no authentication.
pub fn metrics_router(state: Arc<DaemonState>) -> Router {
    Router::new()
        .route("/metrics", get(routes::metrics_unauthenticated))
        .route("/healthz", get(routes::healthz))
        .fallback(routes::unknown_route)
        .layer(middleware::from_fn_with_state(
            state.clone(),
            record_metrics,
        ))
        .with_state(state)
}

/// Keeps the in-flight gauge right even when a request future is dropped midway
/// (client gone, drain timeout).
struct InFlight<'a>(&'a prometheus::IntGauge);

impl<'a> InFlight<'a> {
    fn enter(gauge: &'a prometheus::IntGauge) -> Self {
        gauge.inc();
        Self(gauge)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// The method as a metric label: the standard ones by name, anything else as `other`, so a
/// client cannot create unbounded series.
fn method_label(method: &axum::http::Method) -> &'static str {
    use axum::http::Method;
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        Method::PATCH => "PATCH",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    }
}

async fn record_metrics(
    State(state): State<Arc<DaemonState>>,
    request: Request,
    next: Next,
) -> Response {
    // Routes are the router's templates (`/v1/tenants/{name}`), never raw paths: bounded labels.
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    let method = method_label(request.method());
    let metrics = &state.metrics;
    let start = Instant::now();
    let response = {
        let _in_flight = InFlight::enter(&metrics.api_in_flight);
        next.run(request).await
    };
    let status = response.status().as_u16().to_string();
    let labels = [route.as_str(), method, status.as_str()];
    metrics.api_requests.with_label_values(&labels).inc();
    metrics
        .api_request_duration
        .with_label_values(&labels)
        .observe(start.elapsed().as_secs_f64());
    response
}

fn bearer_token(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(axum::http::header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
        .map(str::trim)
}

async fn authenticate(
    State((state, kind)): State<(Arc<DaemonState>, ListenerKind)>,
    mut request: Request,
    next: Next,
) -> Response {
    match identify(&state, kind, &request) {
        Ok(auth) => {
            request.extensions_mut().insert(auth);
            next.run(request).await
        }
        // Refused callers are not kept: the connection closes after the answer, unread.
        Err(e) => closing(e.into_response()),
    }
}

/// Marks a response as the connection's last.
fn closing(mut response: Response) -> Response {
    response.headers_mut().insert(
        axum::http::header::CONNECTION,
        axum::http::HeaderValue::from_static("close"),
    );
    response
}

/// Reads the whole request body before the handler runs, within `request_timeout` and
/// `max_request_body`; a slower or larger one gets 408 or 413 and the connection closes. An
/// inference request first takes its tenant's request slot, so requests still sending their
/// bodies count against `limits.max_concurrent_requests`.
async fn read_body(
    State(state): State<Arc<DaemonState>>,
    request: Request,
    next: Next,
) -> Response {
    use http_body_util::BodyExt as _;

    let (mut parts, body) = request.into_parts();
    let inference = parts.method == axum::http::Method::POST
        && matches!(parts.uri.path(), "/v1/completions" | "/v1/chat/completions");
    let new_work =
        inference || (parts.method == axum::http::Method::POST && parts.uri.path() == "/v1/jobs");
    if new_work && state.draining() {
        return closing(
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "draining",
                "the daemon is drained and takes no new requests; retry later or on another node",
            )
            .with_retry_after(DRAIN_RETRY_AFTER_SECS)
            .into_response(),
        );
    }
    if inference {
        if let Some(auth) = parts.extensions.get::<Authenticated>() {
            match openai::take_slot(&state, auth) {
                Ok(slot) => {
                    parts.extensions.insert(slot);
                }
                Err(e) => return closing(e.into_response()),
            }
        }
    }
    // A job file may be far larger than a request, so few are read at once.
    let job_upload = parts.method == axum::http::Method::POST && parts.uri.path() == "/v1/jobs";
    let limit = if job_upload {
        let Some(permit) = state.jobs.upload_permit() else {
            return closing(
                ApiError::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    "uploads_busy",
                    "other job files are being uploaded now; retry in a few seconds",
                )
                .with_retry_after(2)
                .into_response(),
            );
        };
        parts
            .extensions
            .insert(jobs::UploadPermit(Arc::new(permit)));
        state.config.jobs.max_file_size.bytes()
    } else {
        state.config.max_request_body.bytes()
    };
    let limit = usize::try_from(limit).unwrap_or(usize::MAX);
    let deadline = state.config.request_timeout;
    let collected = tokio::time::timeout(
        deadline,
        http_body_util::Limited::new(body, limit).collect(),
    )
    .await;
    let bytes = match collected {
        Ok(Ok(collected)) => collected.to_bytes(),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => {
            let error = if job_upload {
                ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "payload_too_large",
                    format!(
                        "the job file is larger than jobs.max_file_size ({}); split it into several jobs",
                        state.config.jobs.max_file_size
                    ),
                )
            } else {
                ApiError::payload_too_large()
            };
            return closing(error.into_response());
        }
        Ok(Err(e)) => {
            return closing(
                ApiError::bad_request(format!("cannot read the request body: {e}")).into_response(),
            )
        }
        Err(_) => {
            return closing(
                ApiError::new(
                    StatusCode::REQUEST_TIMEOUT,
                    "request_timeout",
                    format!(
                        "the request body did not arrive within {}s (request_timeout); send the whole request at once",
                        deadline.as_secs()
                    ),
                )
                .into_response(),
            )
        }
    };
    next.run(Request::from_parts(parts, axum::body::Body::from(bytes)))
        .await
}

fn identify(
    state: &DaemonState,
    kind: ListenerKind,
    request: &Request,
) -> Result<Authenticated, ApiError> {
    let policy = state.policy();
    let (peer, mut identity) = match kind {
        ListenerKind::Unix => {
            let Some(peer) = request.extensions().get::<PeerCred>().cloned() else {
                return Err(ApiError::internal(
                    "peer credentials missing on a Unix-socket request",
                ));
            };
            let caller = Caller {
                uid: peer.uid,
                gid: peer.gid,
                pid: peer.pid,
                groups: peer.groups.to_vec(),
            };
            let identity = policy.identify(&caller, state.user_db.as_ref()).ok_or_else(|| {
                ApiError::forbidden(format!(
                    "uid {} (gid {}) is not mapped to any tenant by the policy in force; ask an operator to add it to a tenant's `match` rules",
                    peer.uid, peer.gid
                ))
            })?;
            (Some(peer), identity)
        }
        ListenerKind::Tcp => {
            let unauthorized =
                |message: &str| ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", message);
            let token = bearer_token(request.headers())
                .ok_or_else(|| unauthorized("send `Authorization: Bearer TOKEN`; tokens are configured per tenant in the policy"))?;
            // The policy's tokens first, then those created at run time, whose tenant must
            // still be in the policy.
            let identity = policy
                .identify_token(token)
                .or_else(|| {
                    let entry = state.tokens.lookup(token)?;
                    policy.tenant(&entry.tenant)?;
                    Some(Identity {
                        role: Role::Tenant,
                        tenant: Some(entry.tenant),
                        matched_by: format!("token {}", entry.id),
                    })
                })
                .ok_or_else(|| {
                    unauthorized(
                        "the bearer token is not known to the policy in force or was revoked",
                    )
                })?;
            (None, identity)
        }
    };

    let mut acting_for_tenant = false;
    if let Some(value) = request.headers().get(ACT_FOR_TENANT_HEADER) {
        let name = value.to_str().map_err(|_| {
            ApiError::bad_request(format!("header {ACT_FOR_TENANT_HEADER} is not valid text"))
        })?;
        match identity.role {
            Role::Operator => {
                if policy.tenant(name).is_none() {
                    return Err(ApiError::not_found(format!("no tenant named {name:?} in the policy in force; see `accelctl tenants list`")));
                }
                // Who acted: the socket peer's uid and pid, or the TCP peer's address and the
                // policy rule its token matched.
                tracing::info!(
                    uid = peer.as_ref().map(|p| p.uid),
                    pid = peer.as_ref().and_then(|p| p.pid),
                    address = request
                        .extensions()
                        .get::<server::TcpPeer>()
                        .map(|p| p.0.to_string()),
                    matched_by = ?identity.matched_by,
                    tenant = name,
                    path = %request.uri().path(),
                    "operator acting for tenant"
                );
                identity.tenant = Some(name.to_owned());
                acting_for_tenant = true;
            }
            Role::Tenant if identity.tenant.as_deref() == Some(name) => {}
            Role::Tenant => {
                return Err(ApiError::forbidden(format!(
                    "only operators may act for another tenant ({ACT_FOR_TENANT_HEADER}: {name})"
                )));
            }
        }
    }
    Ok(Authenticated {
        peer,
        identity,
        acting_for_tenant,
        policy,
        batch: false,
    })
}

/// Answers 404 as JSON for anything unrouted.
pub(crate) fn unknown_route_error(path: &str) -> ApiError {
    ApiError::not_found(format!(
        "no such endpoint: {path}; see the API section of the README"
    ))
}
