//! The daemon's own configuration (`/etc/accel/acceld.yaml`): where it listens, where it keeps
//! state, where its policy lives, how it logs.
//!
//! Every field has a default, so no file is needed: a missing file at the default path means
//! "all defaults"; a missing file named explicitly is an error. Tenant policy is not here (see
//! `policy`); this file changes only with a restart.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::engine::sampling::SamplingDefaults;
use crate::policy::PolicyPaths;
use crate::units::ByteSize;
use crate::yaml::{Document, PathProblem, Problem, Problems};

/// Where the daemon looks for its config when none is named.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/accel/acceld.yaml";
/// Largest request body the API accepts, at most.
pub const MAX_REQUEST_BODY_LIMIT: u64 = 1 << 30;
/// Largest `jobs.max_file_size` the config may set.
pub const MAX_JOB_FILE_LIMIT: u64 = 4 << 30;
/// Largest `jobs.max_lines` the config may set.
pub const MAX_JOB_LINES_LIMIT: usize = 1_000_000;

/// Daemon configuration.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct DaemonConfig {
    /// Path of the control socket.
    pub socket: PathBuf,
    /// Group owning the socket; callers need it (or root) to connect. `null`: the daemon's group.
    pub socket_group: Option<String>,
    /// Permission bits of the socket, octal.
    pub socket_mode: String,
    /// Optional TCP listener for the same API, authenticated by bearer tokens (e.g. `127.0.0.1:8470`).
    pub tcp_listen: Option<SocketAddr>,
    /// Optional TCP listener serving only `/metrics` for Prometheus (e.g. `127.0.0.1:9400`).
    pub metrics_listen: Option<SocketAddr>,
    /// Durable state: the lock file, journals.
    pub state_dir: PathBuf,
    /// Base tenant policy; `null` uses the default policy embedded in the binary.
    pub policy_file: Option<PathBuf>,
    /// Directory of extra policy files (`*.yaml`), merged after the base; may be absent.
    pub policy_dir: Option<PathBuf>,
    pub log: LogConfig,
    /// Compute backend for models that do not choose: `auto` (the first GPU when there is
    /// one, else the CPU), `cpu`, or `cuda:N`.
    pub backend: BackendChoice,
    /// Where CUDA kernels compiled for this node's GPUs are cached.
    pub kernel_cache: PathBuf,
    /// Largest request body accepted on the API; larger ones get 413.
    pub max_request_body: ByteSize,
    /// How long SIGTERM waits for in-flight requests before closing them.
    #[serde(with = "crate::units::duration_str")]
    pub drain_timeout: Duration,
    /// How long a client may take to send a whole request (headers, then body); slower
    /// requests get 408 and the connection is closed.
    #[serde(with = "crate::units::duration_str")]
    pub request_timeout: Duration,
    /// Connections served at once on each listener.
    pub max_connections: usize,
    /// Connections one client (a uid on the socket, an address on TCP) may hold open; more
    /// are refused at once. Operators are not limited by this.
    pub max_connections_per_client: usize,
    /// Of `max_connections`, how many only operators may use, so root can always connect.
    pub operator_connections: usize,
    /// Where downloaded models live (the default model is fetched here by `make model`).
    pub model_cache: PathBuf,
    /// Models to serve. The default is SmolLM2-135M-Instruct from the model cache; if that file
    /// is missing the daemon says so and serves a small generated model instead.
    pub models: Vec<ModelSpec>,
    /// How each device's requests are shared between tenants.
    pub scheduler: SchedulerConfig,
    /// Where models' engines run: `off` (threads inside acceld) or `shared` (a worker process
    /// per model, as `worker_user`, with no capabilities).
    pub isolation: Isolation,
    /// The user workers run as; `null`: `accel-worker` if it exists, else `nobody`.
    pub worker_user: Option<String>,
    /// A block of user and group ids, one per worker, so that workers cannot signal one
    /// another or read one another's files; `null`: the worker user's range in `/etc/subuid`
    /// and `/etc/subgid` (`make install` reserves one), else every worker runs as
    /// `worker_user`.
    pub worker_uids: Option<crate::worker::uids::UidRange>,
    /// Limits on the shared workers together (the `_shared` pool group); dedicated tenants'
    /// workers are under their own policy limits instead.
    pub shared_pool: PoolLimits,
    /// Batch jobs (`POST /v1/jobs`): their limits and how hard each runs.
    pub jobs: JobsConfig,
    /// The KV disk tier's files (models with `disk_blocks`), best on a local NVMe; `null`:
    /// `state_dir/kv`. Emptied at start: nothing in it outlives the daemon that wrote it.
    pub kv_disk_dir: Option<PathBuf>,
}

/// Limits on batch jobs, kept under `state_dir/jobs`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct JobsConfig {
    /// Largest JSONL file a job may be; larger gets 413.
    pub max_file_size: ByteSize,
    /// Most requests (non-blank lines) in one job.
    pub max_lines: usize,
    /// Jobs a tenant may have unfinished at once (a tenant's `limits.max_jobs` overrides).
    pub max_active_per_tenant: u32,
    /// Jobs a tenant may have stored, finished ones included (they go after `retention`).
    pub max_stored_per_tenant: u32,
    /// Lines of one job in flight at once.
    pub concurrency: usize,
    /// How long a finished job's files are kept before they are deleted.
    #[serde(with = "crate::units::duration_str")]
    pub retention: Duration,
}

impl Default for JobsConfig {
    fn default() -> Self {
        Self {
            max_file_size: ByteSize(64 << 20),
            max_lines: 50_000,
            max_active_per_tenant: 4,
            max_stored_per_tenant: 100,
            concurrency: 8,
            retention: Duration::from_secs(7 * 24 * 3600),
        }
    }
}

/// Kernel limits on a group of workers; an absent one is unlimited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PoolLimits {
    /// Host memory (cgroup `memory.max`).
    pub memory: Option<ByteSize>,
    /// CPU cores (cgroup `cpu.max`), e.g. 1.5.
    pub cpu: Option<f64>,
    /// Processes and threads (cgroup `pids.max`).
    pub pids: Option<u64>,
}

/// Where models' engines run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Isolation {
    /// In threads of acceld itself, as root.
    #[default]
    Off,
    /// In worker processes, unprivileged, one per model, serving every tenant.
    Shared,
}

/// Scheduling across tenants; one scheduler per device applies it to every model there.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct SchedulerConfig {
    /// `fair_share` (weighted, by virtual token counters), `fcfs`, `round_robin` or
    /// `priority` (a tenant's weight is its priority).
    pub policy: crate::sched::PolicyKind,
    /// Requests one tenant may have waiting on one device; more get 429 with Retry-After.
    pub max_queued_per_tenant: usize,
    /// What a prompt token and a generated token cost in the fair-share counters.
    pub prefill_price: f64,
    pub decode_price: f64,
}

impl DaemonConfig {
    /// The connection limits of each API listener.
    pub fn connection_limits(&self) -> crate::api::server::ConnectionLimits {
        crate::api::server::ConnectionLimits {
            total: self.max_connections,
            per_client: self.max_connections_per_client,
            reserved_for_operators: self.operator_connections,
            header_timeout: self.request_timeout,
        }
    }

    /// Where the KV disk tier keeps its files.
    pub fn kv_disk_root(&self) -> PathBuf {
        self.kv_disk_dir
            .clone()
            .unwrap_or_else(|| self.state_dir.join("kv"))
    }

    /// Where `model`'s disk tier keeps its files: a directory of its own under
    /// [`DaemonConfig::kv_disk_root`] (model names may be `..`, hence the prefix).
    pub fn kv_disk_dir_of(&self, model: &str) -> PathBuf {
        self.kv_disk_root().join(format!("model-{model}"))
    }
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        let pricing = crate::sched::Pricing::default();
        Self {
            policy: crate::sched::PolicyKind::default(),
            max_queued_per_tenant: 256,
            prefill_price: pricing.prefill,
            decode_price: pricing.decode,
        }
    }
}

/// How a model's sequences are preempted when its KV cache runs out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PreemptionMode {
    /// Swap or recompute, whichever a measurement at start-up says is faster.
    #[default]
    Auto,
    /// Move the sequence's KV blocks to host memory (recompute when swap space is full).
    Swap,
    /// Drop the blocks and prefill the sequence again later.
    Recompute,
}

/// One model to load at start.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    /// The name clients ask for (`model` in requests); `[a-z0-9._-]`.
    pub name: String,
    /// A Hugging Face folder or a `.gguf` file. A relative path is taken in `model_cache`.
    pub path: PathBuf,
    /// Overrides the daemon's `backend` for this model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend: Option<BackendChoice>,
    /// KV-cache blocks of 16 tokens for this model's sequences.
    #[serde(default = "default_kv_blocks")]
    pub kv_blocks: usize,
    /// Most sequences in one batched step.
    #[serde(default = "default_max_sequences")]
    pub max_sequences: usize,
    /// Most tokens in one batched step (prefill chunks plus decode tokens).
    #[serde(default = "default_max_batch_tokens")]
    pub max_batch_tokens: usize,
    /// Host-memory blocks for preempted sequences' KV cache (0: always recompute).
    #[serde(default = "default_swap_blocks")]
    pub swap_blocks: usize,
    /// Disk-tier blocks (files under `kv_disk_dir`) for preempted sequences once the host
    /// blocks are full (0: no disk tier). Not used by engines in worker processes yet.
    #[serde(default)]
    pub disk_blocks: usize,
    /// `auto`, `swap` or `recompute`.
    #[serde(default)]
    pub preemption: PreemptionMode,
    /// Keep full KV blocks for reuse by the same tenant's later requests that start with the
    /// same tokens (never across tenants).
    #[serde(default = "default_prefix_cache")]
    pub prefix_cache: bool,
    /// Sampling for requests that leave these fields out; over the model's own
    /// `generation_config.json`, if it has one.
    #[serde(default, skip_serializing_if = "SamplingDefaults::is_empty")]
    pub sampling_defaults: SamplingDefaults,
    /// Where this model's disk tier keeps its files: set by the daemon from `kv_disk_dir`,
    /// never read from a config or a request.
    #[serde(skip)]
    pub disk_dir: Option<PathBuf>,
}

/// The default model's name and file.
pub const DEFAULT_MODEL_NAME: &str = "smollm2-135m-instruct";
pub const DEFAULT_MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

fn default_kv_blocks() -> usize {
    1024
}

fn default_max_sequences() -> usize {
    32
}

fn default_max_batch_tokens() -> usize {
    512
}

fn default_swap_blocks() -> usize {
    128
}

fn default_prefix_cache() -> bool {
    true
}

impl ModelSpec {
    /// What is wrong with this model's fields, each at `{at}.<field>` (the config's
    /// `models[i]`, or an operator's load request).
    pub fn problems(&self, at: &str) -> Vec<PathProblem> {
        let mut out = Vec::new();
        let valid = !self.name.is_empty()
            && self.name.len() <= 64
            && self.name.chars().all(|c| {
                c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '_' | '-')
            });
        if !valid {
            out.push(PathProblem::new(
                format!("{at}name"),
                format!("{:?} is not a model name: use 1-64 of a-z, 0-9, '.', '_', '-' (it becomes a metric label)", self.name.chars().take(80).collect::<String>()),
            ));
        }
        for (field, value, min, max) in [
            ("kv_blocks", self.kv_blocks, 1, 1 << 24),
            ("max_sequences", self.max_sequences, 1, 4096),
            ("max_batch_tokens", self.max_batch_tokens, 1, 1 << 20),
            ("swap_blocks", self.swap_blocks, 0, 1 << 24),
            ("disk_blocks", self.disk_blocks, 0, 1 << 24),
        ] {
            if value < min || value > max {
                out.push(PathProblem::new(
                    format!("{at}{field}"),
                    format!("{value} is out of range: use {min} to {max}"),
                ));
            }
        }
        for problem in self.sampling_defaults.validate() {
            out.push(PathProblem::new(format!("{at}sampling_defaults"), problem));
        }
        out
    }

    /// The built-in default: SmolLM2-135M-Instruct (Q4_1 GGUF) from the model cache.
    pub fn default_model() -> Self {
        Self {
            name: DEFAULT_MODEL_NAME.into(),
            path: PathBuf::from(DEFAULT_MODEL_FILE),
            backend: None,
            kv_blocks: default_kv_blocks(),
            max_sequences: default_max_sequences(),
            max_batch_tokens: default_max_batch_tokens(),
            swap_blocks: default_swap_blocks(),
            disk_blocks: 0,
            preemption: PreemptionMode::Auto,
            prefix_cache: true,
            // SmolLM2-Instruct's model card samples at these; its GGUF file carries none.
            sampling_defaults: SamplingDefaults {
                temperature: Some(0.2),
                top_p: Some(0.9),
                ..SamplingDefaults::default()
            },
            disk_dir: None,
        }
    }
}

/// Logging.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    pub format: LogFormat,
    /// A `tracing` filter: `info`, `debug`, `accel_runtime=debug,info`. `RUST_LOG` overrides it.
    pub level: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    Human,
    /// One JSON object per line (for journald/ELK pipelines).
    Json,
}

/// Where a model runs: `auto` (the first GPU when there is one, else the CPU), `cpu`, or
/// `cuda:N` (`cuda` alone is `cuda:0`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(try_from = "String", into = "String")]
pub enum BackendChoice {
    Auto,
    Cpu,
    Cuda(u32),
}

impl std::fmt::Display for BackendChoice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BackendChoice::Auto => f.write_str("auto"),
            BackendChoice::Cpu => f.write_str("cpu"),
            BackendChoice::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

impl TryFrom<String> for BackendChoice {
    type Error = String;

    fn try_from(value: String) -> Result<Self, String> {
        let bad = || {
            format!("unknown backend {value:?}: expected auto, cpu, cuda or cuda:N (a GPU index)")
        };
        match value.as_str() {
            "auto" => Ok(BackendChoice::Auto),
            "cpu" => Ok(BackendChoice::Cpu),
            "cuda" => Ok(BackendChoice::Cuda(0)),
            other => other
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(BackendChoice::Cuda)
                .ok_or_else(bad),
        }
    }
}

impl From<BackendChoice> for String {
    fn from(choice: BackendChoice) -> String {
        choice.to_string()
    }
}

impl Default for DaemonConfig {
    fn default() -> Self {
        Self {
            socket: PathBuf::from("/run/accel/acceld.sock"),
            socket_group: Some("accel".into()),
            socket_mode: "0660".into(),
            tcp_listen: None,
            metrics_listen: None,
            state_dir: PathBuf::from("/var/lib/accel"),
            policy_file: None,
            policy_dir: Some(PathBuf::from("/etc/accel/policies.d")),
            log: LogConfig::default(),
            backend: BackendChoice::Auto,
            max_request_body: ByteSize(1 << 20),
            drain_timeout: Duration::from_secs(30),
            request_timeout: Duration::from_secs(30),
            max_connections: 1024,
            max_connections_per_client: 64,
            operator_connections: 32,
            model_cache: PathBuf::from("/var/cache/accel/models"),
            kernel_cache: PathBuf::from("/var/cache/accel/kernels"),
            models: vec![ModelSpec::default_model()],
            scheduler: SchedulerConfig::default(),
            isolation: Isolation::Off,
            worker_user: None,
            worker_uids: None,
            shared_pool: PoolLimits::default(),
            jobs: JobsConfig::default(),
            kv_disk_dir: None,
        }
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            format: LogFormat::Human,
            level: "info".into(),
        }
    }
}

impl DaemonConfig {
    /// Loads the config at `path`, or the defaults when `path` is the default path and absent.
    pub fn load(path: Option<&Path>) -> Result<Self, Problems> {
        let (path, explicit) = match path {
            Some(p) => (p, true),
            None => (Path::new(DEFAULT_CONFIG_PATH), false),
        };
        if !explicit && !path.exists() {
            return Ok(Self::default());
        }
        // Run as root, the daemon trusts its config only if no one else could have written it.
        let trusted = nix::unistd::geteuid().is_root();
        let text = match crate::sys::read_checked_file(path, crate::yaml::MAX_YAML_BYTES, trusted) {
            Ok(text) => text,
            Err(reason) => {
                return Err(Problems(vec![Problem {
                    file: path.display().to_string(),
                    path: String::new(),
                    line: 0,
                    column: 0,
                    message: format!("config file {reason}"),
                }]))
            }
        };
        Self::parse(&path.display().to_string(), &text)
    }

    /// Parses and validates config text.
    pub fn parse(file: &str, text: &str) -> Result<Self, Problems> {
        let doc = Document::<DaemonConfig>::parse(file, text).map_err(Problems)?;
        let problems = doc.value.validate();
        if problems.is_empty() {
            Ok(doc.value)
        } else {
            Err(Problems(doc.locate_all(problems)))
        }
    }

    /// Every problem with the values, by YAML path.
    pub fn validate(&self) -> Vec<PathProblem> {
        let mut out = Vec::new();
        let jobs = &self.jobs;
        if jobs.max_file_size.bytes() == 0 || jobs.max_file_size.bytes() > MAX_JOB_FILE_LIMIT {
            out.push(PathProblem::new(
                "jobs.max_file_size",
                format!("must be between 1 byte and {}GiB", MAX_JOB_FILE_LIMIT >> 30),
            ));
        }
        if !(1..=MAX_JOB_LINES_LIMIT).contains(&jobs.max_lines) {
            out.push(PathProblem::new(
                "jobs.max_lines",
                format!("must be between 1 and {MAX_JOB_LINES_LIMIT}"),
            ));
        }
        if !(1..=1024).contains(&jobs.concurrency) {
            out.push(PathProblem::new(
                "jobs.concurrency",
                "must be between 1 and 1024 lines in flight per job",
            ));
        }
        if jobs.max_stored_per_tenant < jobs.max_active_per_tenant {
            out.push(PathProblem::new(
                "jobs.max_stored_per_tenant",
                "below jobs.max_active_per_tenant; raise it to at least that",
            ));
        }
        if jobs.max_active_per_tenant == 0 {
            out.push(PathProblem::new(
                "jobs.max_active_per_tenant",
                "0 would refuse every job; give at least 1",
            ));
        }
        if let Some(problem) = self.worker_uids.as_ref().and_then(|r| r.problem()) {
            out.push(PathProblem::new("worker_uids", problem));
        }
        let pool = &self.shared_pool;
        if pool.cpu.is_some_and(|c| !(c.is_finite() && c >= 0.01)) {
            out.push(PathProblem::new(
                "shared_pool.cpu",
                "not a positive number of cores (at least 0.01); leave it out for no limit",
            ));
        }
        if pool.memory.is_some_and(|m| m.bytes() < 16 << 20) {
            out.push(PathProblem::new(
                "shared_pool.memory",
                "below the 16MiB a worker needs to start; leave it out for no limit",
            ));
        }
        if pool.pids == Some(0) {
            out.push(PathProblem::new(
                "shared_pool.pids",
                "0 would stop every shared worker from starting; leave it out for no limit",
            ));
        }
        for (field, path) in [
            ("socket", &self.socket),
            ("state_dir", &self.state_dir),
            ("kernel_cache", &self.kernel_cache),
        ] {
            if !path.is_absolute() {
                out.push(PathProblem::new(
                    field,
                    format!("{} is not an absolute path", path.display()),
                ));
            }
        }
        for (field, path) in [
            ("policy_file", &self.policy_file),
            ("policy_dir", &self.policy_dir),
            ("kv_disk_dir", &self.kv_disk_dir),
        ] {
            if let Some(path) = path.as_ref().filter(|p| !p.is_absolute()) {
                out.push(PathProblem::new(
                    field,
                    format!("{} is not an absolute path", path.display()),
                ));
            }
        }
        if let Err(message) = self.socket_mode_bits() {
            out.push(PathProblem::new("socket_mode", message));
        }
        if let Some(group) = self.socket_group.as_ref().filter(|g| g.trim().is_empty()) {
            out.push(PathProblem::new(
                "socket_group",
                format!("{group:?} is empty; use null for the daemon's group"),
            ));
        }
        if self.tcp_listen.is_some() && self.tcp_listen == self.metrics_listen {
            out.push(PathProblem::new(
                "metrics_listen",
                "is the same address as tcp_listen; the API listener already serves /metrics",
            ));
        }
        let body = self.max_request_body.bytes();
        if !(1024..=MAX_REQUEST_BODY_LIMIT).contains(&body) {
            out.push(PathProblem::new(
                "max_request_body",
                format!(
                    "{} is out of range: use 1KiB to {}",
                    self.max_request_body,
                    ByteSize(MAX_REQUEST_BODY_LIMIT)
                ),
            ));
        }
        if self.drain_timeout > Duration::from_secs(3600) {
            out.push(PathProblem::new(
                "drain_timeout",
                "is longer than 1h; systemd would kill the daemon first",
            ));
        }
        if !self.model_cache.is_absolute() {
            out.push(PathProblem::new(
                "model_cache",
                format!("{} is not an absolute path", self.model_cache.display()),
            ));
        }
        for (i, model) in self.models.iter().enumerate() {
            let path = format!("models[{i}]");
            out.extend(model.problems(&format!("{path}.")));
            if self.models[..i].iter().any(|m| m.name == model.name) {
                out.push(PathProblem::new(
                    format!("{path}.name"),
                    format!("model {:?} is listed twice", model.name),
                ));
            }
        }
        if self.request_timeout < Duration::from_secs(1)
            || self.request_timeout > Duration::from_secs(3600)
        {
            out.push(PathProblem::new(
                "request_timeout",
                format!("{:?} is out of range: use 1s to 1h", self.request_timeout),
            ));
        }
        if self.max_connections == 0 || self.max_connections > 1_000_000 {
            out.push(PathProblem::new(
                "max_connections",
                format!("{} is out of range: use 1 to 1000000", self.max_connections),
            ));
        }
        if self.max_connections_per_client == 0
            || self.max_connections_per_client > self.max_connections
        {
            out.push(PathProblem::new(
                "max_connections_per_client",
                format!(
                    "{} is out of range: use 1 to max_connections ({})",
                    self.max_connections_per_client, self.max_connections
                ),
            ));
        }
        if self.operator_connections >= self.max_connections {
            out.push(PathProblem::new(
                "operator_connections",
                format!(
                    "{} leaves tenants no connection: use less than max_connections ({})",
                    self.operator_connections, self.max_connections
                ),
            ));
        }
        let queued = self.scheduler.max_queued_per_tenant;
        if queued == 0 || queued > 1_000_000 {
            out.push(PathProblem::new(
                "scheduler.max_queued_per_tenant",
                format!("{queued} is out of range: use 1 to 1000000"),
            ));
        }
        for (field, price) in [
            ("prefill_price", self.scheduler.prefill_price),
            ("decode_price", self.scheduler.decode_price),
        ] {
            if !(price.is_finite() && price > 0.0 && price <= 1000.0) {
                out.push(PathProblem::new(
                    format!("scheduler.{field}"),
                    format!("{price} is out of range: use a number above 0 and at most 1000"),
                ));
            }
        }
        if let Err(e) = self.log.level.parse::<tracing_subscriber::EnvFilter>() {
            out.push(PathProblem::new(
                "log.level",
                format!("{:?} is not a valid filter: {e}", self.log.level),
            ));
        }
        out
    }

    /// The socket permission bits, parsed from the octal string.
    pub fn socket_mode_bits(&self) -> Result<u32, String> {
        let text = self.socket_mode.trim();
        match u32::from_str_radix(text.strip_prefix("0o").unwrap_or(text), 8) {
            Ok(bits) if bits <= 0o777 => Ok(bits),
            _ => Err(format!(
                "{:?} is not an octal permission mode like \"0660\"",
                self.socket_mode
            )),
        }
    }

    /// The file or folder of a model: absolute as given, relative within `model_cache`.
    pub fn model_path(&self, spec: &ModelSpec) -> PathBuf {
        if spec.path.is_absolute() {
            spec.path.clone()
        } else {
            self.model_cache.join(&spec.path)
        }
    }

    /// Where the tenant policy is read from.
    pub fn policy_paths(&self) -> PolicyPaths {
        PolicyPaths {
            base: self.policy_file.clone(),
            dir: self.policy_dir.clone(),
            trusted: true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHIPPED: &str = include_str!("../dist/acceld.yaml");

    #[test]
    fn shipped_config_file_is_the_defaults_and_names_every_field() {
        use crate::yaml::doc_check::{key_paths, readme_yaml};
        let shipped = DaemonConfig::parse("acceld.yaml", SHIPPED).unwrap();
        assert_eq!(shipped, DaemonConfig::default());
        let written: serde_json::Value = serde_saphyr::from_str(SHIPPED).unwrap();
        let code = serde_json::to_value(DaemonConfig::default()).unwrap();
        assert_eq!(
            key_paths(&written),
            key_paths(&code),
            "runtime/dist/acceld.yaml must list every config field"
        );
        assert_eq!(
            readme_yaml("config-reference"),
            SHIPPED,
            "README's config reference must equal runtime/dist/acceld.yaml"
        );
    }

    #[test]
    fn empty_file_is_all_defaults() {
        assert_eq!(
            DaemonConfig::parse("c.yaml", "").unwrap(),
            DaemonConfig::default()
        );
        assert_eq!(DaemonConfig::default().socket_mode_bits(), Ok(0o660));
    }

    #[test]
    fn fields_override_defaults() {
        let config = DaemonConfig::parse(
            "c.yaml",
            "socket: /tmp/x.sock\nsocket_mode: \"0600\"\nmetrics_listen: 127.0.0.1:9400\nlog: {format: json}\ndrain_timeout: 5s\nmax_request_body: 64KiB\n",
        )
        .unwrap();
        assert_eq!(config.socket, Path::new("/tmp/x.sock"));
        assert_eq!(config.socket_mode_bits(), Ok(0o600));
        assert_eq!(config.log.format, LogFormat::Json);
        assert_eq!(config.log.level, "info");
        assert_eq!(config.drain_timeout, Duration::from_secs(5));
        assert_eq!(config.max_request_body.bytes(), 65536);
        assert_eq!(
            config.metrics_listen,
            Some("127.0.0.1:9400".parse().unwrap())
        );
    }

    #[test]
    fn every_problem_is_reported_with_its_line() {
        let err = DaemonConfig::parse(
            "c.yaml",
            "socket: relative.sock\nsocket_mode: \"999\"\nmax_request_body: 10\nstate_dir: /var/lib/accel\n",
        )
        .unwrap_err();
        let found: Vec<(&str, u64)> = err.0.iter().map(|p| (p.path.as_str(), p.line)).collect();
        assert_eq!(
            found,
            [("socket", 1), ("socket_mode", 2), ("max_request_body", 3)]
        );
    }

    #[test]
    fn a_block_of_worker_ids_is_read_and_checked() {
        let config = DaemonConfig::parse(
            "c.yaml",
            "worker_uids: {first: 3400000, count: 1000}
",
        )
        .unwrap();
        assert_eq!(
            config.worker_uids,
            Some(crate::worker::uids::UidRange {
                first: 3_400_000,
                count: 1000
            })
        );
        let err =
            DaemonConfig::parse("c.yaml", "\nworker_uids: {first: 1000, count: 10}\n").unwrap_err();
        assert_eq!((err.0[0].path.as_str(), err.0[0].line), ("worker_uids", 2));
        assert!(err.0[0].message.contains("below 65536"), "{err}");
        let err = DaemonConfig::parse("c.yaml", "worker_uids: {first: 3400000}\n").unwrap_err();
        assert!(err.0[0].message.contains("count"), "{err}");
    }

    #[test]
    fn a_models_sampling_defaults_are_read_and_checked() {
        let config = DaemonConfig::parse(
            "c.yaml",
            "models:\n  - name: m\n    path: m.gguf\n    sampling_defaults: {temperature: 0.3, top_k: 40}\n",
        )
        .unwrap();
        let defaults = config.models[0].sampling_defaults;
        assert_eq!(
            (defaults.temperature, defaults.top_k, defaults.top_p),
            (Some(0.3), Some(40), None)
        );
        let err = DaemonConfig::parse(
            "c.yaml",
            "models:\n  - name: m\n    path: m.gguf\n    sampling_defaults: {top_p: 1.5}\n",
        )
        .unwrap_err();
        assert_eq!(err.0[0].path, "models[0].sampling_defaults", "{err}");
        assert!(err.0[0].message.contains("top_p is 1.5"), "{err}");
        let err = DaemonConfig::parse(
            "c.yaml",
            "models:\n  - name: m\n    path: m.gguf\n    sampling_defaults: {temprature: 1}\n",
        )
        .unwrap_err();
        assert!(err.0[0].message.contains("temprature"), "{err}");
    }

    #[test]
    fn backends_are_auto_cpu_or_a_gpu_index() {
        for (text, want) in [
            ("auto", BackendChoice::Auto),
            ("cpu", BackendChoice::Cpu),
            ("cuda", BackendChoice::Cuda(0)),
            ("cuda:3", BackendChoice::Cuda(3)),
        ] {
            let config = DaemonConfig::parse("c.yaml", &format!("backend: {text}\n")).unwrap();
            assert_eq!(config.backend, want);
        }
        assert_eq!(BackendChoice::Cuda(0).to_string(), "cuda:0");
    }

    #[test]
    fn unknown_fields_and_bad_values_are_errors() {
        let err = DaemonConfig::parse("c.yaml", "sockett: /x\n").unwrap_err();
        assert!(err.0[0].message.contains("sockett"), "{err}");
        let err = DaemonConfig::parse("c.yaml", "\nbackend: tpu\n").unwrap_err();
        assert_eq!(err.0[0].line, 2, "{err}");
        assert!(err.0[0].message.contains("cuda:N"), "{err}");
        let err = DaemonConfig::parse("c.yaml", "backend: cuda:x\n").unwrap_err();
        assert!(err.0[0].message.contains("\"cuda:x\""), "{err}");
        let err = DaemonConfig::parse("c.yaml", "max_request_body: 10XB\n").unwrap_err();
        assert!(err.0[0].message.contains("10XB"), "{err}");
        // A value of the wrong kind names its field.
        let err = DaemonConfig::parse("c.yaml", "log: {}\ntcp_listen: nowhere\n").unwrap_err();
        assert_eq!(
            (err.0[0].path.as_str(), err.0[0].line),
            ("tcp_listen", 2),
            "{err}"
        );
        // Every wrong value comes at once, in file order.
        let err = DaemonConfig::parse(
            "c.yaml",
            "tcp_listen: nowhere\nmax_connections: -5\nmodels:\n  - name: m\n    path: /m\n    swap_blocks: lots\n",
        )
        .unwrap_err();
        let paths: Vec<&str> = err.0.iter().map(|p| p.path.as_str()).collect();
        assert_eq!(
            paths,
            ["tcp_listen", "max_connections", "models[0].swap_blocks"],
            "{err}"
        );
    }

    #[test]
    fn missing_default_file_is_defaults_but_missing_named_file_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let err = DaemonConfig::load(Some(&dir.path().join("none.yaml"))).unwrap_err();
        assert!(err.to_string().contains("config file cannot open"), "{err}");
    }
}
