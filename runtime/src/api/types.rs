//! Request and response bodies of the control API, shared by the daemon and `accelctl`.
//!
//! These are the wire contract: fields are only added, never renamed, and every response type
//! deserializes what older daemons sent (new fields have defaults).

use serde::{Deserialize, Serialize};

use crate::policy::{Role, Tenant};
use crate::yaml::Problem;

/// The JSON error envelope: `{"error": {"code", "message"}}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ErrorDetail {
    /// Stable machine-readable code, e.g. `forbidden`, `invalid_policy`.
    pub code: String,
    /// What went wrong and what to do about it.
    pub message: String,
    /// For `invalid_policy`: every problem found.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub problems: Vec<Problem>,
}

/// `GET /healthz`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Health {
    /// `ok`; `draining` during shutdown, or `degraded` when a model's device loop has stopped
    /// (both with HTTP 503).
    pub status: String,
    /// Models that cannot serve.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub models_down: Vec<String>,
}

/// `GET /v1/whoami`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WhoAmI {
    /// The caller's uid, gid and pid (absent on the TCP listener).
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub pid: Option<i32>,
    pub role: Role,
    /// The tenant the caller is, or acts for.
    pub tenant: Option<String>,
    /// True when an operator is acting for `tenant`.
    #[serde(default)]
    pub acting_for_tenant: bool,
    /// The policy rule that matched.
    pub matched_by: String,
}

/// `GET /v1/status`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Status {
    pub version: String,
    pub pid: u32,
    /// Unix time the daemon started.
    pub started_at: u64,
    pub uptime_seconds: f64,
    /// `serving`, or `draining` during shutdown.
    pub state: String,
    pub backend: BackendStatus,
    /// Peak resident memory of the daemon so far.
    #[serde(default)]
    pub peak_resident_bytes: u64,
    pub policy: PolicyStatus,
    pub api: ApiStatus,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BackendStatus {
    /// What the config asks for: `auto`, `cpu` or `cuda:N`.
    pub configured: String,
    /// The backends serving the loaded models (`cpu`, `cuda:0`, ...), comma-separated.
    pub active: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PolicyStatus {
    /// Increments on every policy that takes effect; 1 at start.
    pub generation: u64,
    /// Unix time the policy in force was loaded.
    pub loaded_at: u64,
    pub sources: Vec<String>,
    pub tenants: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ApiStatus {
    pub socket: String,
    pub tcp_listen: Option<String>,
    pub metrics_listen: Option<String>,
    pub requests_in_flight: i64,
    /// Inference requests in flight (batch job lines not counted).
    #[serde(default)]
    pub inference_in_flight: usize,
}

/// `POST /v1/drain` and `/v1/undrain`: the daemon's state after the call.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DrainStatus {
    /// `draining` or `serving`.
    pub state: String,
    /// Whether this call changed it.
    pub changed: bool,
    pub inference_in_flight: usize,
}

/// `GET /v1/scheduler`: each device's scheduler and its tenants (a tenant sees only itself
/// and the models it may use).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SchedulerStatus {
    pub devices: Vec<crate::runner::DeviceSchedule>,
}

/// `GET /v1/tenants`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TenantList {
    pub tenants: Vec<Tenant>,
}

/// `POST /v1/policy/reload` request; an empty body means the defaults.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReloadRequest {
    /// Validate the policy on disk without putting it in force.
    #[serde(default)]
    pub dry_run: bool,
}

/// `POST /v1/policy/reload` response.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReloadResponse {
    /// Whether the policy was put in force (false for a dry run).
    pub applied: bool,
    pub generation: u64,
    pub tenants: usize,
    pub sources: Vec<String>,
    /// Changes of tenants' isolation (`dedicated`) that served models take once they are
    /// loaded again; a placed model keeps the workers it has.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pending: Vec<String>,
}

/// `POST /v1/tokens`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateToken {
    pub tenant: String,
}

/// The answer to `POST /v1/tokens`: the only time the token is shown.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CreatedToken {
    pub id: String,
    pub tenant: String,
    pub created_at: u64,
    pub token: String,
}

/// `GET /v1/requests`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RequestList {
    pub data: Vec<crate::requests::RequestView>,
}

/// `GET /v1/tokens`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TokenList {
    pub data: Vec<crate::tokens::TokenEntry>,
}

/// `DELETE /v1/models/{name}`: what became of the unloaded model's requests.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct UnloadStatus {
    pub model: String,
    /// In flight when the unload began, and ended on their own during the grace period.
    pub finished: usize,
    /// Still running when the grace period ran out: they ended with an error saying why.
    pub cancelled: usize,
}
