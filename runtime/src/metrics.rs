//! Prometheus metrics: one registry per daemon, every family named `accel_*` in base units.
//!
//! Owns metric definitions and the text exposition. Other modules record through the typed
//! fields of [`Metrics`]; nothing else registers families, so names and labels stay consistent.

use prometheus::{
    Encoder as _, Histogram, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec,
    Opts, Registry, TextEncoder,
};

/// Latency buckets for control-API requests, in seconds (100µs to 30s).
const API_LATENCY_BUCKETS: &[f64] = &[
    0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0,
];

/// Errors while setting up metrics: a bug in a family's definition, not a runtime condition.
#[derive(Debug, thiserror::Error)]
#[error("failed to register metric family: {0}")]
pub struct MetricsError(#[from] prometheus::Error);

/// The daemon's metric families.
#[derive(Debug, Clone)]
pub struct Metrics {
    registry: Registry,
    pub api_requests: IntCounterVec,
    pub api_request_duration: HistogramVec,
    pub api_in_flight: IntGauge,
    pub policy_reloads: IntCounterVec,
    pub policy_last_reload_success: IntGauge,
    pub tenants_configured: IntGauge,
    pub tenant_weight: IntGaugeVec,
    pub policy_load_duration: Histogram,
    pub prompt_tokens: IntCounterVec,
    pub generation_tokens: IntCounterVec,
    pub time_to_first_token: HistogramVec,
    pub inter_token_latency: HistogramVec,
    pub request_duration: HistogramVec,
    pub inference_requests: IntCounterVec,
    pub tenant_requests_in_flight: IntGaugeVec,
    pub models_loaded: IntGaugeVec,
    pub model_up: IntGaugeVec,
    pub workers: WorkerMetrics,
    pub peak_resident_memory: IntGauge,
    pub device_info: IntGaugeVec,
    pub device_memory: IntGaugeVec,
    pub backend_memory: IntGaugeVec,
    pub kv_cache: IntGaugeVec,
    pub sched: SchedMetrics,
}

/// A model's worker process, labelled `model` and `worker` (its group, `<model>-<device>`);
/// refreshed before each scrape from the worker's cgroup and device gate.
#[derive(Debug, Clone)]
pub struct WorkerMetrics {
    pub up: IntGaugeVec,
    pub restarts: IntGaugeVec,
    pub memory: IntGaugeVec,
    pub memory_peak: IntGaugeVec,
    pub cpu_seconds: prometheus::GaugeVec,
    pub oom_kills: IntGaugeVec,
    pub device_denials: IntGaugeVec,
}

impl WorkerMetrics {
    fn new(registry: &Registry) -> Result<Self, prometheus::Error> {
        let labels = &["model", "worker"];
        let gauge = |name: &str, help: &str| -> Result<IntGaugeVec, prometheus::Error> {
            let g = IntGaugeVec::new(Opts::new(name, help), labels)?;
            registry.register(Box::new(g.clone()))?;
            Ok(g)
        };
        let cpu_seconds = prometheus::GaugeVec::new(
            Opts::new(
                "accel_worker_cpu_seconds",
                "CPU time the worker's cgroup has used, in seconds (since the daemon started).",
            ),
            labels,
        )?;
        registry.register(Box::new(cpu_seconds.clone()))?;
        Ok(Self {
            up: gauge(
                "accel_worker_up",
                "1 while the model's worker process runs.",
            )?,
            restarts: gauge(
                "accel_worker_restarts",
                "Workers started to replace a lost one (crashed, killed, hung).",
            )?,
            memory: gauge(
                "accel_worker_memory_bytes",
                "Memory the worker's cgroup uses now.",
            )?,
            memory_peak: gauge(
                "accel_worker_memory_peak_bytes",
                "Most memory the worker's cgroup has used, where the kernel keeps it.",
            )?,
            cpu_seconds,
            oom_kills: gauge(
                "accel_worker_oom_kills",
                "Processes the kernel killed in the worker's cgroup for want of memory.",
            )?,
            device_denials: gauge(
                "accel_worker_device_denials",
                "Device opens the worker's device gate refused.",
            )?,
        })
    }
}

/// Latency buckets for inference, in seconds (1ms to 5 minutes).
const INFERENCE_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
];

impl Metrics {
    /// Marks a model served (`accel_models_loaded`).
    pub fn model_loaded(&self, m: &crate::runner::ModelHandle) {
        self.models_loaded
            .with_label_values(&[
                m.info.name.as_str(),
                m.info.format.as_str(),
                m.info.backend.as_str(),
            ])
            .set(1);
    }

    pub fn new() -> Result<Self, MetricsError> {
        let registry = Registry::new();

        let build_info = IntGaugeVec::new(
            Opts::new("accel_build_info", "Build of the running acceld; always 1."),
            &["version", "arch"],
        )?;
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION"), std::env::consts::ARCH])
            .set(1);
        registry.register(Box::new(build_info))?;

        #[cfg(target_os = "linux")]
        registry.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))?;

        let api_requests = IntCounterVec::new(
            Opts::new(
                "accel_api_requests_total",
                "Control-API requests answered, by route, method and HTTP status.",
            ),
            &["route", "method", "status"],
        )?;
        let api_request_duration = HistogramVec::new(
            HistogramOpts::new(
                "accel_api_request_duration_seconds",
                "Control-API request latency, from request to response head.",
            )
            .buckets(API_LATENCY_BUCKETS.to_vec()),
            &["route", "method", "status"],
        )?;
        let api_in_flight = IntGauge::new(
            "accel_api_requests_in_flight",
            "Control-API requests being handled now.",
        )?;
        let policy_reloads = IntCounterVec::new(
            Opts::new(
                "accel_policy_reloads_total",
                "Policy reloads attempted, by result (success or failure).",
            ),
            &["result"],
        )?;
        let policy_last_reload_success = IntGauge::new(
            "accel_policy_last_reload_success_timestamp_seconds",
            "Unix time of the last policy load that took effect.",
        )?;
        let tenants_configured = IntGauge::new(
            "accel_tenants_configured",
            "Tenants in the policy in force.",
        )?;
        let tenant_weight = IntGaugeVec::new(
            Opts::new(
                "accel_tenant_weight",
                "Fair-share weight of each tenant in the policy in force.",
            ),
            &["tenant"],
        )?;
        let policy_load_duration = Histogram::with_opts(
            HistogramOpts::new(
                "accel_policy_load_duration_seconds",
                "Time to read and validate the policy.",
            )
            .buckets(API_LATENCY_BUCKETS.to_vec()),
        )?;
        let tm = &["tenant", "model"];
        let prompt_tokens = IntCounterVec::new(
            Opts::new(
                "accel_prompt_tokens_total",
                "Prompt tokens processed, by tenant and model.",
            ),
            tm,
        )?;
        let generation_tokens = IntCounterVec::new(
            Opts::new(
                "accel_generation_tokens_total",
                "Tokens generated, by tenant and model.",
            ),
            tm,
        )?;
        let histogram = |name: &str, help: &str| {
            HistogramVec::new(
                HistogramOpts::new(name, help).buckets(INFERENCE_BUCKETS.to_vec()),
                tm,
            )
        };
        let time_to_first_token = histogram(
            "accel_time_to_first_token_seconds",
            "From request accepted to its first generated token.",
        )?;
        let inter_token_latency = histogram(
            "accel_inter_token_latency_seconds",
            "Between consecutive generated tokens of a request.",
        )?;
        let request_duration = histogram(
            "accel_request_duration_seconds",
            "Inference request latency, end to end.",
        )?;
        let inference_requests = IntCounterVec::new(
            Opts::new(
                "accel_inference_requests_total",
                "Inference requests finished, by tenant, model and finish reason.",
            ),
            &["tenant", "model", "finish_reason"],
        )?;
        let tenant_requests_in_flight = IntGaugeVec::new(
            Opts::new(
                "accel_tenant_requests_in_flight",
                "Inference requests in flight, by tenant.",
            ),
            &["tenant"],
        )?;
        let models_loaded = IntGaugeVec::new(
            Opts::new(
                "accel_model_info",
                "Models served; always 1, with their format and backend.",
            ),
            &["model", "format", "backend"],
        )?;
        for family in [&prompt_tokens, &generation_tokens, &inference_requests] {
            registry.register(Box::new(family.clone()))?;
        }
        for family in [
            &time_to_first_token,
            &inter_token_latency,
            &request_duration,
        ] {
            registry.register(Box::new(family.clone()))?;
        }
        registry.register(Box::new(tenant_requests_in_flight.clone()))?;
        registry.register(Box::new(models_loaded.clone()))?;
        let model_up = IntGaugeVec::new(
            Opts::new(
                "accel_model_up",
                "1 while a model's device loop serves, 0 once it has stopped.",
            ),
            &["model"],
        )?;
        registry.register(Box::new(model_up.clone()))?;
        let workers = WorkerMetrics::new(&registry)?;
        let peak_resident_memory = IntGauge::new(
            "accel_process_peak_resident_memory_bytes",
            "Peak resident memory of the daemon since it started (getrusage ru_maxrss).",
        )?;
        registry.register(Box::new(peak_resident_memory.clone()))?;
        let device_info = IntGaugeVec::new(
            Opts::new(
                "accel_device_info",
                "GPUs on this node; always 1. `device` is the GPU UUID, as in DCGM.",
            ),
            &["device", "index", "name", "compute_capability"],
        )?;
        let device_memory = IntGaugeVec::new(
            Opts::new("accel_device_memory_total_bytes", "Memory of each GPU."),
            &["device"],
        )?;
        let backend_memory = IntGaugeVec::new(
            Opts::new(
                "accel_backend_memory_bytes",
                "Memory a model's GPU backend holds, by use: context (the CUDA context, on the first model of a GPU), weights, kv_cache, activations, workspace (cuBLAS, dequantized tiles, step metadata), swap_staging (device), pinned_host (page-locked host).",
            ),
            &["device", "model", "use"],
        )?;
        let kv_cache = IntGaugeVec::new(
            Opts::new(
                "accel_kv_cache_bytes",
                "KV-cache memory held by each tenant's sequences, per model; `device` is the GPU UUID or `cpu`.",
            ),
            &["device", "model", "tenant"],
        )?;
        registry.register(Box::new(backend_memory.clone()))?;
        registry.register(Box::new(kv_cache.clone()))?;
        registry.register(Box::new(device_info.clone()))?;
        registry.register(Box::new(device_memory.clone()))?;

        // Both outcomes exist from the start so rate() and alerts see zeros, not absent series.
        for result in ["success", "failure"] {
            policy_reloads.with_label_values(&[result]);
        }

        registry.register(Box::new(api_requests.clone()))?;
        registry.register(Box::new(api_request_duration.clone()))?;
        registry.register(Box::new(api_in_flight.clone()))?;
        registry.register(Box::new(policy_reloads.clone()))?;
        registry.register(Box::new(policy_last_reload_success.clone()))?;
        registry.register(Box::new(tenants_configured.clone()))?;
        registry.register(Box::new(tenant_weight.clone()))?;
        registry.register(Box::new(policy_load_duration.clone()))?;

        let sched = SchedMetrics::new(&registry)?;
        Ok(Self {
            registry,
            api_requests,
            api_request_duration,
            api_in_flight,
            policy_reloads,
            policy_last_reload_success,
            tenants_configured,
            tenant_weight,
            policy_load_duration,
            prompt_tokens,
            generation_tokens,
            time_to_first_token,
            inter_token_latency,
            request_duration,
            inference_requests,
            tenant_requests_in_flight,
            models_loaded,
            model_up,
            workers,
            peak_resident_memory,
            device_info,
            device_memory,
            backend_memory,
            kv_cache,
            sched,
        })
    }

    /// Records what the policy now in force looks like.
    pub fn set_policy(&self, policy: &crate::policy::Policy) {
        self.tenants_configured.set(policy.tenants.len() as i64);
        self.tenant_weight.reset();
        for tenant in &policy.tenants {
            self.tenant_weight
                .with_label_values(&[tenant.name.as_str()])
                .set(i64::from(tenant.weight));
        }
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        self.policy_last_reload_success.set(now);
    }

    /// The text exposition format (version 0.0.4).
    pub fn render(&self) -> Result<String, prometheus::Error> {
        self.peak_resident_memory.set(peak_resident_bytes() as i64);
        let mut buffer = Vec::new();
        TextEncoder::new().encode(&self.registry.gather(), &mut buffer)?;
        String::from_utf8(buffer).map_err(|e| prometheus::Error::Msg(e.to_string()))
    }
}

/// Peak resident memory of this process in bytes (Linux reports ru_maxrss in KiB).
pub fn peak_resident_bytes() -> u64 {
    nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_SELF)
        .map(|usage| u64::try_from(usage.max_rss()).unwrap_or(0) * 1024)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_has_build_info_and_counts_requests() {
        let metrics = Metrics::new().unwrap();
        metrics
            .api_requests
            .with_label_values(&["/healthz", "GET", "200"])
            .inc();
        let text = metrics.render().unwrap();
        assert!(
            text.contains(&format!(
                "accel_build_info{{arch=\"{}\",version=\"{}\"}} 1",
                std::env::consts::ARCH,
                env!("CARGO_PKG_VERSION")
            )),
            "{text}"
        );
        assert!(
            text.contains(
                "accel_api_requests_total{method=\"GET\",route=\"/healthz\",status=\"200\"} 1"
            ),
            "{text}"
        );
        assert!(
            text.contains("accel_policy_reloads_total{result=\"failure\"} 0"),
            "{text}"
        );
        assert!(text.contains("process_resident_memory_bytes"), "{text}");
        // Peak RSS is at least the few MiB any Rust test process has touched.
        let peak = text
            .lines()
            .find_map(|l| l.strip_prefix("accel_process_peak_resident_memory_bytes "))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0);
        assert!(peak > 1 << 20, "{text}");
    }
}

/// The scheduler's families, shared with every device's loop.
#[derive(Debug, Clone)]
pub struct SchedMetrics {
    pub waiting: IntGaugeVec,
    pub running: IntGaugeVec,
    pub swapped: IntGaugeVec,
    pub kv_blocks: IntGaugeVec,
    pub virtual_counter: prometheus::GaugeVec,
    pub tokens: IntCounterVec,
    pub preemptions: IntCounterVec,
    pub rejections: IntCounterVec,
    pub queue_time: HistogramVec,
    pub prefix_queries: IntCounterVec,
    pub prefix_hits: IntCounterVec,
    pub prefix_hit_tokens: IntCounterVec,
    pub prefix_evictions: IntCounterVec,
    pub prefix_cold: IntCounterVec,
    pub tier_capacity: IntGaugeVec,
    pub tier_free: IntGaugeVec,
    pub tier_blocks: IntGaugeVec,
    pub swaps: IntCounterVec,
    pub swap_bytes: IntCounterVec,
    pub swap_failures: IntCounterVec,
    pub disk_auth_failures: IntCounterVec,
}

impl SchedMetrics {
    fn new(registry: &Registry) -> Result<Self, prometheus::Error> {
        let dt = &["device", "tenant"];
        let gauge = |name: &str, help: &str| IntGaugeVec::new(Opts::new(name, help), dt);
        let this = Self {
            waiting: gauge(
                "accel_scheduler_waiting_requests",
                "Requests waiting for admission, by device and tenant.",
            )?,
            running: gauge(
                "accel_scheduler_running_sequences",
                "Sequences admitted and holding KV blocks on the device, by device and tenant.",
            )?,
            swapped: gauge(
                "accel_scheduler_swapped_sequences",
                "Preempted sequences whose KV blocks are in host memory, by device and tenant.",
            )?,
            kv_blocks: gauge(
                "accel_scheduler_kv_blocks",
                "KV blocks committed to a tenant's running sequences (its limits.kv_blocks counts these).",
            )?,
            virtual_counter: prometheus::GaugeVec::new(
                Opts::new(
                    "accel_scheduler_virtual_counter",
                    "Weighted service received (the fair-share policy's virtual token counter), by device and tenant.",
                ),
                dt,
            )?,
            tokens: IntCounterVec::new(
                Opts::new(
                    "accel_scheduled_tokens_total",
                    "Tokens run through the engine, by tenant, model and phase (prefill, decode, recompute).",
                ),
                &["tenant", "model", "phase"],
            )?,
            preemptions: IntCounterVec::new(
                Opts::new(
                    "accel_preemptions_total",
                    "Sequences preempted, by tenant, model and kind (swap or recompute).",
                ),
                &["tenant", "model", "kind"],
            )?,
            rejections: IntCounterVec::new(
                Opts::new(
                    "accel_request_rejections_total",
                    "Requests refused by the scheduler, by tenant, model and reason.",
                ),
                &["tenant", "model", "reason"],
            )?,
            queue_time: HistogramVec::new(
                HistogramOpts::new(
                    "accel_queue_time_seconds",
                    "Time from submission to first admission, by tenant and model.",
                )
                .buckets(INFERENCE_BUCKETS.to_vec()),
                &["tenant", "model"],
            )?,
            prefix_queries: IntCounterVec::new(
                Opts::new(
                    "accel_prefix_cache_queries_total",
                    "Sequences started through the prefix cache, by tenant and model.",
                ),
                &["tenant", "model"],
            )?,
            prefix_hits: IntCounterVec::new(
                Opts::new(
                    "accel_prefix_cache_hits_total",
                    "Sequences that started holding cached blocks, by tenant and model.",
                ),
                &["tenant", "model"],
            )?,
            prefix_hit_tokens: IntCounterVec::new(
                Opts::new(
                    "accel_prefix_cache_hit_tokens_total",
                    "Tokens held from the prefix cache instead of computed, by tenant and model.",
                ),
                &["tenant", "model"],
            )?,
            prefix_evictions: IntCounterVec::new(
                Opts::new(
                    "accel_prefix_cache_evictions_total",
                    "Cached blocks nobody held, evicted for room, by model.",
                ),
                &["model"],
            )?,
            prefix_cold: IntCounterVec::new(
                Opts::new(
                    "accel_prefix_cache_cold_blocks_total",
                    "Cached blocks evicted from the device and kept down the tiers, by model and event (demoted: moved to host or disk; promoted: brought back for a prompt; dropped: let go for room or unreadable).",
                ),
                &["model", "event"],
            )?,
            tier_capacity: IntGaugeVec::new(
                Opts::new(
                    "accel_kv_tier_capacity_blocks",
                    "KV blocks of a model in each tier (device, host, disk), by device and model.",
                ),
                &["device", "model", "tier"],
            )?,
            tier_free: IntGaugeVec::new(
                Opts::new(
                    "accel_kv_tier_free_blocks",
                    "KV blocks no sequence holds in each tier, by device and model.",
                ),
                &["device", "model", "tier"],
            )?,
            tier_blocks: IntGaugeVec::new(
                Opts::new(
                    "accel_kv_tier_blocks",
                    "KV blocks a tenant's sequences hold in each tier (device: committed to running ones; host, disk: swapped out), by device and tenant.",
                ),
                &["device", "tenant", "tier"],
            )?,
            swaps: IntCounterVec::new(
                Opts::new(
                    "accel_kv_swaps_total",
                    "Sequences swapped, by model, tier (host, disk) and direction (out, in).",
                ),
                &["model", "tier", "direction"],
            )?,
            swap_bytes: IntCounterVec::new(
                Opts::new(
                    "accel_kv_swap_bytes_total",
                    "KV bytes swapped, by model, tier and direction.",
                ),
                &["model", "tier", "direction"],
            )?,
            swap_failures: IntCounterVec::new(
                Opts::new(
                    "accel_kv_swap_failures_total",
                    "Swaps that failed (the sequence is recomputed: a full disk, an I/O error, a block failing authentication), by model, tier and direction.",
                ),
                &["model", "tier", "direction"],
            )?,
            disk_auth_failures: IntCounterVec::new(
                Opts::new(
                    "accel_kv_disk_auth_failures_total",
                    "Sealed disk-tier blocks that failed authentication when read back (never returned), by model.",
                ),
                &["model"],
            )?,
        };
        for family in [
            &this.prefix_evictions,
            &this.prefix_cold,
            &this.swaps,
            &this.swap_bytes,
            &this.swap_failures,
            &this.disk_auth_failures,
        ] {
            registry.register(Box::new(family.clone()))?;
        }
        for family in [&this.tier_capacity, &this.tier_free, &this.tier_blocks] {
            registry.register(Box::new(family.clone()))?;
        }
        registry.register(Box::new(this.prefix_queries.clone()))?;
        registry.register(Box::new(this.prefix_hits.clone()))?;
        registry.register(Box::new(this.prefix_hit_tokens.clone()))?;
        registry.register(Box::new(this.waiting.clone()))?;
        registry.register(Box::new(this.running.clone()))?;
        registry.register(Box::new(this.swapped.clone()))?;
        registry.register(Box::new(this.kv_blocks.clone()))?;
        registry.register(Box::new(this.virtual_counter.clone()))?;
        registry.register(Box::new(this.tokens.clone()))?;
        registry.register(Box::new(this.preemptions.clone()))?;
        registry.register(Box::new(this.rejections.clone()))?;
        registry.register(Box::new(this.queue_time.clone()))?;
        Ok(this)
    }
}
