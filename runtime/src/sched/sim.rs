//! A simulator that drives the scheduler with synthetic tenants and a cost model of the
//! engine, in virtual time. The fairness tests, the planning bench and the README's fairness
//! report all run it; nothing here touches a device.
//!
//! Each simulated step: arrivals up to now are submitted, the scheduler plans, every planned
//! sequence is advanced as the engine would (a sequence samples when its pending tokens are
//! all fed), finished requests are removed, and the clock moves by the cost model's step time.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::{ModelParams, NewSeq, PolicyKind, Pricing, Scheduler, SeqKey, TenantParams};

/// How a simulated tenant sends requests.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Arrivals {
    /// Always keeps this many requests queued or running (a flood).
    Backlogged { outstanding: usize },
    /// A Poisson process of this many requests per second.
    Poisson { per_second: f64 },
}

/// A synthetic tenant.
#[derive(Debug, Clone)]
pub struct SimTenant {
    pub name: String,
    pub params: TenantParams,
    pub arrivals: Arrivals,
    /// Prompt and output lengths, drawn uniformly from these inclusive ranges.
    pub prompt: (usize, usize),
    pub output: (usize, usize),
    /// The `max_tokens` its requests declare (default: the drawn output length).
    pub max_tokens: Option<usize>,
    /// Seconds of virtual time during which it sends.
    pub active: (f64, f64),
}

impl SimTenant {
    /// A tenant that floods with fixed-size requests, active the whole run.
    pub fn flood(name: &str, weight: u32, prompt: usize, output: usize) -> Self {
        Self {
            name: name.into(),
            params: TenantParams {
                weight,
                ..TenantParams::default()
            },
            arrivals: Arrivals::Backlogged { outstanding: 64 },
            prompt: (prompt, prompt),
            output: (output, output),
            max_tokens: None,
            active: (0.0, f64::INFINITY),
        }
    }
}

/// Step time of the simulated engine: a fixed cost plus a cost per token.
#[derive(Debug, Clone, Copy)]
pub struct CostModel {
    pub step_seconds: f64,
    pub token_seconds: f64,
}

impl Default for CostModel {
    fn default() -> Self {
        // Roughly a small model on a CPU: 20 ms a step plus 0.2 ms a token.
        Self {
            step_seconds: 0.02,
            token_seconds: 0.0002,
        }
    }
}

#[derive(Debug, Clone)]
pub struct SimConfig {
    pub policy: PolicyKind,
    pub pricing: Pricing,
    pub model: ModelParams,
    pub cost: CostModel,
    pub tenants: Vec<SimTenant>,
    pub steps: usize,
    pub seed: u64,
}

impl SimConfig {
    /// A single model with room for `max_sequences` and `kv_blocks` blocks of 16 tokens.
    pub fn new(tenants: Vec<SimTenant>, steps: usize) -> Self {
        Self {
            policy: PolicyKind::FairShare,
            pricing: Pricing::default(),
            model: ModelParams {
                block_size: 16,
                total_blocks: 4096,
                swap_blocks: 0,
                swap_min_tokens: usize::MAX,
                disk_blocks: 0,
                disk_swap_min_tokens: usize::MAX,
                max_sequences: 8,
                max_batch_tokens: 256,
                price: 1.0,
                reserve_max_tokens: false,
            },
            cost: CostModel::default(),
            tenants,
            steps,
            seed: 7,
        }
    }
}

/// What a run produced.
#[derive(Debug, Clone, Default)]
pub struct SimResult {
    /// Virtual time at the end of each step.
    pub time: Vec<f64>,
    /// Per step, each tenant's cumulative service (prefill and decode tokens at their prices).
    pub service: Vec<Vec<f64>>,
    /// Per tenant, each finished request's time to first token in seconds.
    pub ttft: Vec<Vec<f64>>,
    /// Per tenant, tokens generated.
    pub generated: Vec<u64>,
    /// Per tenant, requests finished.
    pub finished: Vec<u64>,
    /// Steps in which nothing ran while some sequence waited (work conservation).
    pub idle_steps_with_work: usize,
    /// Preemptions seen.
    pub preemptions: usize,
    /// Sums over steps of tokens held by running sequences and of the token capacity of the
    /// blocks committed to them.
    pub live_tokens: u64,
    pub committed_tokens: u64,
}

impl SimResult {
    /// Mean share of committed KV capacity that holds live tokens.
    pub fn block_utilisation(&self) -> f64 {
        self.live_tokens as f64 / self.committed_tokens.max(1) as f64
    }

    /// Tokens generated per virtual second, all tenants.
    pub fn throughput(&self) -> f64 {
        self.generated.iter().sum::<u64>() as f64 / self.time.last().copied().unwrap_or(1.0)
    }

    /// The largest `|service_a / w_a - service_b / w_b|` over the steps from `from` on.
    pub fn max_weighted_gap(&self, a: usize, wa: f64, b: usize, wb: f64, from: usize) -> f64 {
        self.service
            .iter()
            .skip(from)
            .map(|s| (s[a] / wa - s[b] / wb).abs())
            .fold(0.0, f64::max)
    }
}

struct Live {
    tenant: usize,
    prompt: usize,
    output: usize,
    generated: usize,
    pending: usize,
    arrived: f64,
    first_token: Option<f64>,
}

/// Runs a simulation.
pub fn run(config: &SimConfig) -> SimResult {
    let mut sched = Scheduler::new(config.policy, config.pricing);
    let model = sched.add_model(config.model.clone());
    let mut rng = ChaCha8Rng::seed_from_u64(config.seed);
    let n = config.tenants.len();
    let mut result = SimResult {
        ttft: vec![Vec::new(); n],
        generated: vec![0; n],
        finished: vec![0; n],
        ..SimResult::default()
    };
    let mut live: std::collections::HashMap<SeqKey, Live> = std::collections::HashMap::new();
    let mut outstanding = vec![0usize; n];
    let mut next_poisson: Vec<f64> = config
        .tenants
        .iter()
        .map(|t| match t.arrivals {
            Arrivals::Poisson { per_second } => t.active.0 + exp_sample(&mut rng, per_second),
            Arrivals::Backlogged { .. } => f64::INFINITY,
        })
        .collect();
    let mut service = vec![0.0f64; n];
    let mut next_key: SeqKey = 0;
    let mut now = 0.0f64;
    for _ in 0..config.steps {
        for (i, t) in config.tenants.iter().enumerate() {
            let active = now >= t.active.0 && now < t.active.1;
            let mut arrivals = 0;
            match t.arrivals {
                Arrivals::Backlogged { outstanding: want } if active => {
                    arrivals = want.saturating_sub(outstanding[i]);
                }
                Arrivals::Poisson { per_second } => {
                    while next_poisson[i] <= now && next_poisson[i] < t.active.1 {
                        arrivals += 1;
                        next_poisson[i] += exp_sample(&mut rng, per_second);
                    }
                }
                Arrivals::Backlogged { .. } => {}
            }
            for _ in 0..arrivals {
                let prompt = rng.random_range(t.prompt.0..=t.prompt.1);
                let output = rng.random_range(t.output.0..=t.output.1);
                let key = next_key;
                next_key += 1;
                let submitted = sched.submit(
                    NewSeq {
                        key,
                        tenant: t.name.clone(),
                        params: t.params.clone(),
                        model,
                        prompt_len: prompt,
                        max_tokens: t.max_tokens.unwrap_or(output).max(output),
                    },
                    now,
                );
                if submitted.is_ok() {
                    outstanding[i] += 1;
                    live.insert(
                        key,
                        Live {
                            tenant: i,
                            prompt,
                            output,
                            generated: 0,
                            pending: prompt,
                            arrived: now,
                            first_token: None,
                        },
                    );
                }
            }
        }
        let plan = sched.plan(now);
        result.preemptions += plan.preempt.len();
        result.live_tokens += sched.live_tokens(model) as u64;
        result.committed_tokens += (sched.used_blocks(model) * config.model.block_size) as u64;
        for &(key, kind) in &plan.preempt {
            if kind == super::PreemptKind::Recompute {
                if let Some(l) = live.get_mut(&key) {
                    // Everything known is fed again.
                    l.pending = l.prompt + l.generated;
                }
            }
        }
        if plan.run.is_empty() && !sched.is_empty() {
            result.idle_steps_with_work += 1;
        }
        let tokens: usize = plan.run.iter().map(|&(_, t)| t).sum();
        now += config.cost.step_seconds + config.cost.token_seconds * tokens as f64;
        for &(key, fed) in &plan.run {
            let Some(l) = live.get_mut(&key) else {
                continue;
            };
            let before_prompt = (l.prompt + l.generated).saturating_sub(l.pending);
            let prefill = l.prompt.saturating_sub(before_prompt).min(fed);
            service[l.tenant] += prefill as f64 * config.pricing.prefill
                + (fed - prefill) as f64 * config.pricing.decode;
            l.pending -= fed;
            let sampled = l.pending == 0;
            if sampled {
                l.generated += 1;
                l.pending = 1;
                result.generated[l.tenant] += 1;
                if l.first_token.is_none() {
                    l.first_token = Some(now);
                }
            }
            sched.advance(key, fed, sampled, now);
            if l.generated >= l.output {
                let t = l.tenant;
                result.ttft[t].push(l.first_token.unwrap_or(now) - l.arrived);
                result.finished[t] += 1;
                outstanding[t] -= 1;
                live.remove(&key);
                sched.remove(key);
            }
        }
        result.time.push(now);
        result.service.push(service.clone());
    }
    result
}

fn exp_sample(rng: &mut ChaCha8Rng, rate: f64) -> f64 {
    let u: f64 = rng.random_range(f64::EPSILON..1.0);
    -u.ln() / rate.max(1e-9)
}

/// The fairness report in the README: for each scenario, service shares and the worst gap.
pub fn fairness_report() -> String {
    let mut out = String::from(
        "| scenario | policy | tenants (weight) | service share | expected | worst weighted gap / bound |\n|---|---|---|---|---|---|\n",
    );
    let floods = |(wa, pa, oa): (u32, usize, usize), (wb, pb, ob): (u32, usize, usize)| {
        vec![
            SimTenant::flood("a", wa, pa, oa),
            SimTenant::flood("b", wb, pb, ob),
        ]
    };
    let cases: Vec<(&str, PolicyKind, Vec<SimTenant>)> = vec![
        (
            "two floods, 1:1",
            PolicyKind::FairShare,
            floods((1, 64, 64), (1, 256, 16)),
        ),
        (
            "two floods, 1:3",
            PolicyKind::FairShare,
            floods((1, 64, 64), (3, 64, 64)),
        ),
        (
            "two floods, 1:3",
            PolicyKind::Fcfs,
            floods((1, 64, 64), (3, 64, 64)),
        ),
        (
            "two floods, 1:3",
            PolicyKind::RoundRobin,
            floods((1, 64, 64), (3, 64, 64)),
        ),
    ];
    for (name, policy, tenants) in cases {
        let mut config = SimConfig::new(tenants.clone(), 6000);
        config.policy = policy;
        let r = run(&config);
        let last = r.service.last().cloned().unwrap_or_default();
        let total: f64 = last.iter().sum();
        let weights: Vec<f64> = tenants.iter().map(|t| f64::from(t.params.weight)).collect();
        let wsum: f64 = weights.iter().sum();
        let bound = 2.0 * largest_request_cost(&tenants, &config.pricing);
        let gap = r.max_weighted_gap(0, weights[0], 1, weights[1], 0);
        out.push_str(&format!(
            "| {name} | {} | {} | {} | {} | {:.2} |\n",
            policy.as_str(),
            tenants
                .iter()
                .map(|t| format!("{} ({})", t.name, t.params.weight))
                .collect::<Vec<_>>()
                .join(", "),
            last.iter()
                .map(|s| format!("{:.3}", s / total.max(1.0)))
                .collect::<Vec<_>>()
                .join(" : "),
            weights
                .iter()
                .map(|w| format!("{:.3}", w / wsum))
                .collect::<Vec<_>>()
                .join(" : "),
            gap / bound,
        ));
    }
    out
}

/// Block utilisation and throughput with blocks committed on demand (or, with `reserve`,
/// reserved for `max_tokens` at admission), under one load: two floods whose requests declare
/// `max_tokens` 256 but stop after 16 to 256 tokens, on a pool of 1,024 blocks with room for
/// 64 sequences.
pub fn utilisation(reserve: bool) -> SimResult {
    let tenant = |name: &str| SimTenant {
        name: name.into(),
        params: TenantParams::default(),
        arrivals: Arrivals::Backlogged { outstanding: 64 },
        prompt: (32, 256),
        output: (16, 256),
        max_tokens: Some(256),
        active: (0.0, f64::INFINITY),
    };
    let mut config = SimConfig::new(vec![tenant("a"), tenant("b")], 4000);
    config.model.total_blocks = 1024;
    config.model.max_sequences = 64;
    config.model.max_batch_tokens = 512;
    config.model.reserve_max_tokens = reserve;
    run(&config)
}

/// [`utilisation`] both ways, as the README's table.
pub fn utilisation_report() -> String {
    let mut out = String::from(
        "| KV blocks | block utilisation | generated tok/s (simulated) | preemptions |\n|---|---|---|---|\n",
    );
    for (reserve, what) in [
        (true, "reserved for prompt + max_tokens"),
        (false, "committed on demand"),
    ] {
        let r = utilisation(reserve);
        out.push_str(&format!(
            "| {what} | {:.2} | {:.0} | {} |\n",
            r.block_utilisation(),
            r.throughput(),
            r.preemptions
        ));
    }
    out
}

/// The price of the largest request any of `tenants` sends: the VTC bound is twice this.
pub fn largest_request_cost(tenants: &[SimTenant], pricing: &Pricing) -> f64 {
    tenants
        .iter()
        .map(|t| t.prompt.1 as f64 * pricing.prefill + t.output.1 as f64 * pricing.decode)
        .fold(0.0, f64::max)
}
