//! `accelctl bench`: a load generator. Replays a workload (synthetic lengths or a JSONL of real
//! prompts) against the socket or the TCP API, at a fixed concurrency or an arrival rate, for
//! one or several tenants at once, every request streamed; reports per tenant requests/s,
//! tokens/s, time to first token and inter-token latency (p50/p90/p99), as a table or JSON,
//! with a progress line on stderr while it runs.
//!
//! The workload is drawn from `--seed` before anything is sent, so two runs send the same
//! requests in the same order.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use accel_runtime::api::ACT_FOR_TENANT_HEADER;
use clap::Args;
use http_body_util::{BodyExt as _, Full};
use hyper::body::Bytes;
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use rand::{Rng as _, SeedableRng as _};
use serde::Serialize;
use serde_json::{json, Value};

use crate::client::{exchange, whole_answer, Client, CtlError, SseData};
use crate::output;

/// Most requests one run may send (the workload is drawn up front).
const MAX_REQUESTS: usize = 1_000_000;
/// Most clients at once.
const MAX_CONCURRENCY: usize = 4096;
/// Largest prompts file read.
const MAX_PROMPTS_FILE: u64 = 256 << 20;

/// Words that common tokenizers keep as one token each, for prompts of about N tokens.
const WORDS: &[&str] = &[
    "the", "of", "and", "to", "in", "is", "that", "for", "it", "as", "was", "with", "be", "by",
    "on", "not", "he", "this", "are", "or", "his", "from", "at", "which", "but", "have", "an",
    "had", "they", "you", "were", "their", "one", "all", "we", "can", "her", "has", "there",
    "been", "if", "more", "when", "will", "would", "who", "so", "no", "time", "day", "world",
    "water", "house", "city", "river", "light", "night", "story", "road", "tree",
];

/// A length: `N`, or `A-B` drawn uniformly.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dist {
    low: usize,
    high: usize,
}

impl std::str::FromStr for Dist {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let parse = |t: &str| {
            t.trim()
                .parse::<usize>()
                .map_err(|_| format!("{t:?} is not a whole number"))
        };
        let (low, high) = match s.split_once('-') {
            Some((a, b)) => (parse(a)?, parse(b)?),
            None => (parse(s)?, parse(s)?),
        };
        if low == 0 || low > high || high > 1_000_000 {
            return Err(format!("{s:?}: give N or A-B with 1 <= A <= B <= 1000000"));
        }
        Ok(Self { low, high })
    }
}

impl Dist {
    fn draw(self, rng: &mut impl rand::Rng) -> usize {
        rng.random_range(self.low..=self.high)
    }
}

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Send to the TCP API at this address (`http://HOST:PORT`) instead of the socket; each
    /// tenant then needs a --token.
    #[arg(long, value_name = "URL")]
    url: Option<String>,
    /// A tenant's bearer token for --url, as NAME=TOKEN; repeat for several tenants.
    #[arg(long = "token", value_name = "NAME=TOKEN")]
    tokens: Vec<String>,
    /// Tenants to spread the requests over, round robin (on the socket, as an operator acting
    /// for each). Default: the caller itself (or the --token tenants).
    #[arg(long, value_delimiter = ',', value_name = "NAME,...")]
    tenants: Vec<String>,
    /// The model (default: the first one listed).
    #[arg(long)]
    model: Option<String>,
    /// Clients at once; each sends its next request when its last ends. With --rate, the most
    /// requests in flight.
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
    /// Open loop: requests per second, arriving at random (Poisson), instead of closed-loop
    /// clients.
    #[arg(long)]
    rate: Option<f64>,
    /// Requests to send in all.
    #[arg(long, default_value_t = 64)]
    requests: usize,
    /// Stop sending after this many seconds (requests in flight finish).
    #[arg(long, value_name = "SECONDS")]
    duration: Option<f64>,
    /// Prompt length in tokens, about: N, or A-B drawn uniformly.
    #[arg(long, default_value = "64")]
    prompt_tokens: Dist,
    /// Generated tokens per request: N, or A-B drawn uniformly (exact: end-of-sequence is
    /// ignored for synthetic prompts).
    #[arg(long, default_value = "64")]
    output_tokens: Dist,
    /// A JSONL file of real prompts, `{"prompt": "..."}` or `{"messages": [...]}` per line,
    /// used in turn instead of synthetic ones.
    #[arg(long, value_name = "FILE")]
    prompts: Option<PathBuf>,
    /// Sampling temperature of every request (default: the model's own default); 0 is
    /// greedy.
    #[arg(long)]
    temperature: Option<f64>,
    /// Generate exactly the drawn output lengths for --prompts too (synthetic prompts always
    /// do).
    #[arg(long)]
    ignore_eos: bool,
    /// Seed of the drawn lengths and words.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Also time `GET /healthz` every 10 ms while the load runs, from a thread at real-time
    /// priority where this process may use it (as root): on a host whose cores the daemon's
    /// compute fills, an ordinary thread's wait for a core would be most of what is timed.
    #[arg(long)]
    probe_health: bool,
}

/// Where requests go.
#[derive(Debug, Clone)]
enum Target {
    Socket(PathBuf),
    Tcp(String),
}

/// One request of the workload.
#[derive(Debug, Clone)]
struct Spec {
    tenant: usize,
    path: &'static str,
    body: Bytes,
}

/// What one request came to.
#[derive(Debug, Clone, Default)]
struct Sample {
    ok: bool,
    error: Option<String>,
    ttft: Option<f64>,
    gaps: Vec<f64>,
    completion_tokens: u64,
}

#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Percentiles {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
}

fn percentiles(values: &mut [f64]) -> Option<Percentiles> {
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    let at = |q: f64| {
        let i = ((values.len() as f64 * q).ceil() as usize).clamp(1, values.len()) - 1;
        values[i] * 1000.0
    };
    Some(Percentiles {
        p50: at(0.50),
        p90: at(0.90),
        p99: at(0.99),
    })
}

#[derive(Debug, Clone, Serialize)]
pub struct TenantReport {
    pub tenant: String,
    pub requests: usize,
    pub errors: usize,
    pub requests_per_second: f64,
    pub output_tokens: u64,
    pub tokens_per_second: f64,
    pub ttft_ms: Option<Percentiles>,
    pub itl_ms: Option<Percentiles>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub model: String,
    pub target: String,
    pub mode: String,
    pub seconds: f64,
    pub tenants: Vec<TenantReport>,
    pub total: TenantReport,
    pub health_ms: Option<Percentiles>,
    /// How the `/healthz` probe was scheduled: `realtime`, or `normal` with the reason.
    pub health_probe: Option<String>,
    /// The first few distinct errors, with counts.
    pub errors: BTreeMap<String, usize>,
    /// CPU time this load generator used (on the daemon's host it competes with the daemon).
    pub client_cpu_seconds: Option<f64>,
}

/// CPU time this process has used, from the scheduler's own count.
fn own_cpu_seconds() -> Option<f64> {
    let text = std::fs::read_to_string("/proc/self/schedstat").ok()?;
    let ns: f64 = text.split_whitespace().next()?.parse().ok()?;
    Some(ns / 1e9)
}

/// One `GET /healthz` with blocking I/O; Ok when it answered 200.
fn health_once(target: &Target) -> std::io::Result<()> {
    fn exchange(mut s: impl std::io::Read + std::io::Write) -> std::io::Result<()> {
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")?;
        let mut answer = [0u8; 512];
        let mut len = 0;
        loop {
            let n = s.read(&mut answer[len.min(511)..])?;
            if n == 0 {
                break;
            }
            len = (len + n).min(512);
        }
        if answer.starts_with(b"HTTP/1.1 200") {
            Ok(())
        } else {
            Err(std::io::Error::other("not 200"))
        }
    }
    let timeout = Some(Duration::from_secs(10));
    match target {
        Target::Socket(path) => {
            let s = std::os::unix::net::UnixStream::connect(path)?;
            s.set_read_timeout(timeout)?;
            exchange(s)
        }
        Target::Tcp(address) => {
            let s = std::net::TcpStream::connect(address)?;
            s.set_read_timeout(timeout)?;
            exchange(s)
        }
    }
}

fn usage(message: impl Into<String>) -> CtlError {
    CtlError::Usage(message.into())
}

pub async fn run(client: &Client, args: &BenchArgs, json_out: bool) -> Result<(), CtlError> {
    if args.requests == 0 || args.requests > MAX_REQUESTS {
        return Err(usage(format!("--requests must be 1 to {MAX_REQUESTS}")));
    }
    if args.concurrency == 0 || args.concurrency > MAX_CONCURRENCY {
        return Err(usage(format!(
            "--concurrency must be 1 to {MAX_CONCURRENCY}"
        )));
    }
    if args.rate.is_some_and(|r| !(r.is_finite() && r > 0.0)) {
        return Err(usage(
            "--rate must be a positive number of requests per second",
        ));
    }
    let (target, tenants, headers) = plan_target(client, args)?;
    let model = match &args.model {
        Some(m) => m.clone(),
        None => first_model(&target, headers.first().cloned().flatten()).await?,
    };
    let specs = workload(args, &model, tenants.len())?;

    let samples: Arc<Mutex<Vec<(usize, Sample)>>> = Arc::new(Mutex::new(Vec::new()));
    let done = Arc::new(AtomicUsize::new(0));
    let tokens = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let deadline = args
        .duration
        .map(|d| start + Duration::from_secs_f64(d.max(0.0)));
    let headers = Arc::new(headers);
    let specs = Arc::new(specs);

    let stop_probe = Arc::new(std::sync::atomic::AtomicBool::new(false));
    // On a thread of its own, with blocking sockets: the probe's latency is the daemon's,
    // not this process's event loop, which is busy with the streams. At real-time priority
    // where allowed, since the kernel can leave an ordinary thread waiting a whole tick (4 ms
    // at 250 Hz) behind the daemon's compute threads before it runs to read the answer.
    let probe = args
        .probe_health
        .then(|| {
            let (target, stop) = (target.clone(), stop_probe.clone());
            std::thread::Builder::new()
                .name("health-probe".into())
                .spawn(move || {
                    let priority = match accel_runtime::sys::realtime_thread() {
                        Ok(()) => "realtime".to_owned(),
                        Err(e) => format!("normal ({e})"),
                    };
                    let mut times = Vec::with_capacity(100_000);
                    while !stop.load(Ordering::Relaxed) {
                        let t = Instant::now();
                        if health_once(&target).is_ok() {
                            times.push(t.elapsed().as_secs_f64());
                        }
                        std::thread::sleep(Duration::from_millis(10));
                    }
                    (times, priority)
                })
        })
        .transpose()
        .map_err(|e| CtlError::Other(format!("cannot start the /healthz probe thread: {e}")))?;
    let cpu_before = own_cpu_seconds();

    // A live line where someone watches; nothing in logs.
    let live = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let progress = {
        let (done, tokens, failed) = (done.clone(), tokens.clone(), failed.clone());
        let total = specs.len();
        tokio::spawn(async move {
            if !live {
                return;
            }
            loop {
                tokio::time::sleep(Duration::from_millis(500)).await;
                let elapsed = start.elapsed().as_secs_f64();
                let mut err = std::io::stderr().lock();
                let _ = write!(
                    err,
                    "\r[{elapsed:6.1}s] {}/{total} done, {} errors, {:.0} tok/s   ",
                    done.load(Ordering::Relaxed),
                    failed.load(Ordering::Relaxed),
                    tokens.load(Ordering::Relaxed) as f64 / elapsed.max(1e-9)
                );
                let _ = err.flush();
            }
        })
    };

    let record = {
        let (samples, done, failed) = (samples.clone(), done.clone(), failed.clone());
        move |tenant: usize, sample: Sample| {
            if !sample.ok {
                failed.fetch_add(1, Ordering::Relaxed);
            }
            done.fetch_add(1, Ordering::Relaxed);
            samples
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .push((tenant, sample));
        }
    };
    let mut tasks = tokio::task::JoinSet::new();
    match args.rate {
        None => {
            let next = Arc::new(AtomicUsize::new(0));
            for _ in 0..args.concurrency.min(specs.len()) {
                let (next, specs, headers, target, record, tokens) = (
                    next.clone(),
                    specs.clone(),
                    headers.clone(),
                    target.clone(),
                    record.clone(),
                    tokens.clone(),
                );
                tasks.spawn(async move {
                    loop {
                        if deadline.is_some_and(|d| Instant::now() >= d) {
                            break;
                        }
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some(spec) = specs.get(i) else { break };
                        let sample =
                            one(&target, spec, headers[spec.tenant].clone(), &tokens).await;
                        record(spec.tenant, sample);
                    }
                });
            }
        }
        Some(rate) => {
            let slots = Arc::new(tokio::sync::Semaphore::new(args.concurrency));
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(args.seed ^ 0x5eed);
            let mut due = Instant::now();
            for spec in specs.iter().cloned() {
                // Exponential gaps: a Poisson process of `rate` arrivals a second.
                let u: f64 = rng.random_range(f64::EPSILON..1.0);
                due += Duration::from_secs_f64(-u.ln() / rate);
                tokio::time::sleep_until(due.into()).await;
                if deadline.is_some_and(|d| Instant::now() >= d) {
                    break;
                }
                let Ok(permit) = slots.clone().acquire_owned().await else {
                    break;
                };
                let (headers, target, record, tokens) = (
                    headers.clone(),
                    target.clone(),
                    record.clone(),
                    tokens.clone(),
                );
                tasks.spawn(async move {
                    let _permit = permit;
                    let sample = one(&target, &spec, headers[spec.tenant].clone(), &tokens).await;
                    record(spec.tenant, sample);
                });
            }
        }
    }
    while tasks.join_next().await.is_some() {}
    let seconds = start.elapsed().as_secs_f64();
    progress.abort();
    if live {
        eprintln!();
    }
    stop_probe.store(true, Ordering::Relaxed);
    let client_cpu_seconds = own_cpu_seconds().zip(cpu_before).map(|(a, b)| a - b);
    let (health, health_probe) = match probe.map(|p| p.join()) {
        Some(Ok((mut times, priority))) => (percentiles(&mut times), Some(priority)),
        Some(Err(_)) | None => (None, None),
    };
    let samples = std::mem::take(
        &mut *samples
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner),
    );
    let mut report = summarize(&model, &target, args, &tenants, seconds, samples, health);
    report.client_cpu_seconds = client_cpu_seconds;
    report.health_probe = health_probe;
    if json_out {
        println!(
            "{}",
            output::json(&serde_json::to_value(&report).unwrap_or_default())
        );
    } else {
        print_report(&report);
    }
    if report.total.requests == 0 || report.total.errors == report.total.requests {
        return Err(CtlError::Other(format!(
            "no request succeeded: {:?}",
            report.errors
        )));
    }
    Ok(())
}

/// The target, the tenants' names, and each tenant's identifying header.
#[allow(clippy::type_complexity)]
fn plan_target(
    client: &Client,
    args: &BenchArgs,
) -> Result<(Target, Vec<String>, Vec<Option<(&'static str, String)>>), CtlError> {
    match &args.url {
        Some(url) => {
            let address = url
                .strip_prefix("http://")
                .ok_or_else(|| usage("--url must be http://HOST:PORT"))?
                .trim_end_matches('/')
                .to_owned();
            let mut pairs = Vec::new();
            for t in &args.tokens {
                let (name, token) = t
                    .split_once('=')
                    .ok_or_else(|| usage(format!("--token {t:?}: give NAME=TOKEN")))?;
                pairs.push((name.to_owned(), token.to_owned()));
            }
            if pairs.is_empty() {
                return Err(usage("--url needs at least one --token NAME=TOKEN"));
            }
            if !args.tenants.is_empty() {
                pairs.retain(|(name, _)| args.tenants.contains(name));
                if pairs.len() != args.tenants.len() {
                    return Err(usage("every --tenants name needs a --token NAME=TOKEN"));
                }
            }
            let names = pairs.iter().map(|(n, _)| n.clone()).collect();
            let headers = pairs
                .into_iter()
                .map(|(_, token)| Some(("authorization", format!("Bearer {token}"))))
                .collect();
            Ok((Target::Tcp(address), names, headers))
        }
        None => {
            let target = Target::Socket(client.socket.clone());
            if args.tenants.is_empty() {
                let name = client.tenant.clone().unwrap_or_else(|| "(caller)".into());
                let header = client.tenant.clone().map(|t| (ACT_FOR_TENANT_HEADER, t));
                return Ok((target, vec![name], vec![header]));
            }
            let headers = args
                .tenants
                .iter()
                .map(|t| Some((ACT_FOR_TENANT_HEADER, t.clone())))
                .collect();
            Ok((target, args.tenants.clone(), headers))
        }
    }
}

/// The requests to send, drawn from the seed.
fn workload(args: &BenchArgs, model: &str, tenants: usize) -> Result<Vec<Spec>, CtlError> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(args.seed);
    let real: Option<Vec<Value>> = match &args.prompts {
        Some(path) => {
            let size = std::fs::metadata(path)
                .map_err(|e| usage(format!("cannot read {}: {e}", path.display())))?
                .len();
            if size > MAX_PROMPTS_FILE {
                return Err(usage(format!(
                    "{} is over {} MiB",
                    path.display(),
                    MAX_PROMPTS_FILE >> 20
                )));
            }
            let text = std::fs::read_to_string(path)
                .map_err(|e| usage(format!("cannot read {}: {e}", path.display())))?;
            let mut lines = Vec::new();
            for (i, line) in text
                .lines()
                .enumerate()
                .filter(|(_, l)| !l.trim().is_empty())
            {
                let v: Value = serde_json::from_str(line)
                    .map_err(|e| usage(format!("{} line {}: {e}", path.display(), i + 1)))?;
                if v.get("prompt").is_none() && v.get("messages").is_none() {
                    return Err(usage(format!(
                        "{} line {}: needs \"prompt\" or \"messages\"",
                        path.display(),
                        i + 1
                    )));
                }
                lines.push(v);
            }
            if lines.is_empty() {
                return Err(usage(format!("{} has no prompts", path.display())));
            }
            Some(lines)
        }
        None => None,
    };
    let mut specs = Vec::with_capacity(args.requests);
    for i in 0..args.requests {
        let max_tokens = args.output_tokens.draw(&mut rng);
        let mut body = json!({
            "model": model, "max_tokens": max_tokens, "stream": true,
            "stream_options": {"include_usage": true},
        });
        if let Some(t) = args.temperature {
            body["temperature"] = json!(t);
        }
        let path = match &real {
            Some(lines) => {
                let line = &lines[i % lines.len()];
                if args.ignore_eos {
                    body["ignore_eos"] = json!(true);
                }
                if let Some(messages) = line.get("messages") {
                    body["messages"] = messages.clone();
                    "/v1/chat/completions"
                } else {
                    body["prompt"] = line["prompt"].clone();
                    "/v1/completions"
                }
            }
            None => {
                let words = args.prompt_tokens.draw(&mut rng);
                let prompt: Vec<&str> = (0..words)
                    .map(|_| WORDS[rng.random_range(0..WORDS.len())])
                    .collect();
                body["prompt"] = json!(prompt.join(" "));
                body["ignore_eos"] = json!(true);
                "/v1/completions"
            }
        };
        specs.push(Spec {
            tenant: i % tenants.max(1),
            path,
            body: Bytes::from(body.to_string()),
        });
    }
    Ok(specs)
}

async fn first_model(
    target: &Target,
    header: Option<(&'static str, String)>,
) -> Result<String, CtlError> {
    let response = send(target, Method::GET, "/v1/models", None, header).await?;
    let (_, bytes) = whole_answer("/v1/models", response).await?;
    let models: Value =
        serde_json::from_slice(&bytes).map_err(|e| CtlError::Other(format!("/v1/models: {e}")))?;
    models["data"][0]["id"]
        .as_str()
        .map(str::to_owned)
        .ok_or_else(|| CtlError::Other("no model is served to you; pass --model".into()))
}

async fn send(
    target: &Target,
    method: Method,
    path: &str,
    body: Option<Bytes>,
    header: Option<(&'static str, String)>,
) -> Result<hyper::Response<hyper::body::Incoming>, CtlError> {
    let mut builder = Request::builder()
        .method(method)
        .uri(path)
        .header(hyper::header::HOST, "localhost");
    if let Some((name, value)) = header {
        builder = builder.header(name, value);
    }
    if body.is_some() {
        builder = builder.header(hyper::header::CONTENT_TYPE, "application/json");
    }
    let request = builder
        .body(Full::new(body.unwrap_or_default()))
        .map_err(|e| CtlError::Other(format!("cannot build the request: {e}")))?;
    let failed = |e: String| CtlError::Other(e);
    match target {
        Target::Socket(socket) => {
            let stream = tokio::net::UnixStream::connect(socket)
                .await
                .map_err(|e| failed(format!("connect {}: {e}", socket.display())))?;
            exchange(TokioIo::new(stream), request)
                .await
                .map_err(failed)
        }
        Target::Tcp(address) => {
            let stream = tokio::net::TcpStream::connect(address)
                .await
                .map_err(|e| failed(format!("connect {address}: {e}")))?;
            let _ = stream.set_nodelay(true);
            exchange(TokioIo::new(stream), request)
                .await
                .map_err(failed)
        }
    }
}

/// Sends one streamed request and times its tokens.
async fn one(
    target: &Target,
    spec: &Spec,
    header: Option<(&'static str, String)>,
    streamed: &AtomicU64,
) -> Sample {
    let started = Instant::now();
    let mut sample = Sample::default();
    let response = match send(
        target,
        Method::POST,
        spec.path,
        Some(spec.body.clone()),
        header,
    )
    .await
    {
        Ok(r) => r,
        Err(e) => {
            sample.error = Some(e.to_string());
            return sample;
        }
    };
    let status = response.status();
    let mut body = response.into_body();
    if !status.is_success() {
        let bytes = body
            .collect()
            .await
            .map(|c| c.to_bytes())
            .unwrap_or_default();
        let code = serde_json::from_slice::<Value>(&bytes)
            .ok()
            .and_then(|v| v["error"]["code"].as_str().map(str::to_owned))
            .unwrap_or_default();
        sample.error = Some(format!("{} {code}", status.as_u16()));
        return sample;
    }
    let mut events = SseData::default();
    let mut last: Option<Instant> = None;
    while let Some(frame) = body.frame().await {
        let Ok(frame) = frame else {
            sample.error = Some("the stream broke".into());
            return sample;
        };
        let Some(data) = frame.data_ref() else {
            continue;
        };
        for data in events.push(data) {
            if data == "[DONE]" {
                sample.ok = sample.error.is_none();
                continue;
            }
            let Ok(chunk) = serde_json::from_str::<Value>(&data) else {
                continue;
            };
            if let Some(code) = chunk["error"]["code"].as_str() {
                sample.error = Some(format!("stream error {code}"));
                continue;
            }
            if let Some(n) = chunk["usage"]["completion_tokens"].as_u64() {
                sample.completion_tokens = n;
            }
            // A chunk with a choice is a token (its text may be empty mid-character).
            let has_token = chunk["choices"]
                .as_array()
                .is_some_and(|c| !c.is_empty() && c[0]["finish_reason"].is_null());
            if has_token {
                streamed.fetch_add(1, Ordering::Relaxed);
                let now = Instant::now();
                match last {
                    None => sample.ttft = Some((now - started).as_secs_f64()),
                    Some(prev) => sample.gaps.push((now - prev).as_secs_f64()),
                }
                last = Some(now);
            }
        }
    }
    if !sample.ok && sample.error.is_none() {
        sample.error = Some("the stream ended without [DONE]".into());
    }
    sample
}

fn summarize(
    model: &str,
    target: &Target,
    args: &BenchArgs,
    tenants: &[String],
    seconds: f64,
    samples: Vec<(usize, Sample)>,
    health: Option<Percentiles>,
) -> Report {
    let mut errors: BTreeMap<String, usize> = BTreeMap::new();
    let seconds = seconds.max(1e-9);
    let report_of = |name: String, samples: &[&Sample]| {
        let mut ttft: Vec<f64> = samples.iter().filter_map(|s| s.ttft).collect();
        let mut itl: Vec<f64> = samples
            .iter()
            .flat_map(|s| s.gaps.iter().copied())
            .collect();
        let output_tokens: u64 = samples.iter().map(|s| s.completion_tokens).sum();
        TenantReport {
            tenant: name,
            requests: samples.len(),
            errors: samples.iter().filter(|s| !s.ok).count(),
            requests_per_second: samples.iter().filter(|s| s.ok).count() as f64 / seconds,
            output_tokens,
            tokens_per_second: output_tokens as f64 / seconds,
            ttft_ms: percentiles(&mut ttft),
            itl_ms: percentiles(&mut itl),
        }
    };
    for (_, s) in &samples {
        if let Some(e) = &s.error {
            if errors.len() < 16 || errors.contains_key(e) {
                *errors.entry(e.clone()).or_default() += 1;
            }
        }
    }
    let per_tenant = tenants
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let mine: Vec<&Sample> = samples
                .iter()
                .filter(|(t, _)| *t == i)
                .map(|(_, s)| s)
                .collect();
            report_of(name.clone(), &mine)
        })
        .collect();
    let all: Vec<&Sample> = samples.iter().map(|(_, s)| s).collect();
    Report {
        model: model.to_owned(),
        target: match target {
            Target::Socket(p) => p.display().to_string(),
            Target::Tcp(a) => format!("http://{a}"),
        },
        mode: match args.rate {
            Some(r) => format!("rate {r}/s, at most {} in flight", args.concurrency),
            None => format!("{} clients", args.concurrency),
        },
        seconds,
        tenants: per_tenant,
        total: report_of("total".into(), &all),
        health_ms: health,
        health_probe: None,
        errors,
        client_cpu_seconds: None,
    }
}

fn print_report(report: &Report) {
    let ms = |p: Option<Percentiles>| {
        p.map_or_else(
            || "-".to_owned(),
            |p| format!("{:.1}/{:.1}/{:.1}", p.p50, p.p90, p.p99),
        )
    };
    let rows: Vec<Vec<String>> = report
        .tenants
        .iter()
        .chain(std::iter::once(&report.total))
        .map(|t| {
            vec![
                t.tenant.clone(),
                t.requests.to_string(),
                t.errors.to_string(),
                format!("{:.2}", t.requests_per_second),
                format!("{:.1}", t.tokens_per_second),
                ms(t.ttft_ms),
                ms(t.itl_ms),
            ]
        })
        .collect();
    println!(
        "{} on {} ({}), {:.1}s",
        report.model, report.target, report.mode, report.seconds
    );
    println!(
        "{}",
        output::table(
            &[
                "TENANT",
                "REQUESTS",
                "ERRORS",
                "REQ/S",
                "TOK/S",
                "TTFT MS P50/90/99",
                "ITL MS P50/90/99"
            ],
            &rows
        )
    );
    if let Some(h) = report.health_ms {
        println!(
            "/healthz under load: p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms (probe at {} priority)",
            h.p50,
            h.p90,
            h.p99,
            report.health_probe.as_deref().unwrap_or("normal")
        );
    }
    for (error, n) in &report.errors {
        println!("error x{n}: {error}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lengths_parse_and_are_bounded() {
        assert_eq!("64".parse::<Dist>(), Ok(Dist { low: 64, high: 64 }));
        assert_eq!("8-16".parse::<Dist>(), Ok(Dist { low: 8, high: 16 }));
        assert!("0".parse::<Dist>().is_err());
        assert!("16-8".parse::<Dist>().is_err());
        assert!("x".parse::<Dist>().is_err());
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        let d: Dist = "8-16".parse().unwrap();
        assert!((0..1000)
            .map(|_| d.draw(&mut rng))
            .all(|n| (8..=16).contains(&n)));
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        let mut v: Vec<f64> = (1..=100).map(|i| f64::from(i) / 1000.0).collect();
        let p = percentiles(&mut v).unwrap();
        assert_eq!((p.p50, p.p90, p.p99), (50.0, 90.0, 99.0));
        assert!(percentiles(&mut []).is_none());
    }
}
