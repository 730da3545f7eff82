//! The node under load and its journal, each against a bound measured in the same run:
//! - generated tokens/s with 1, 8, 32 and 128 clients through the whole daemon (the built
//!   `acceld` on a socket, driven by the built `accelctl bench`: HTTP, tenants, scheduler,
//!   streaming), against the same engine driven directly at the same batch (one prefill step,
//!   then decode steps, sampling in the caller); the ratio is what the API path costs. Every
//!   request has the same `PROMPT` token ids (a token-id prompt) and exactly `OUTPUT` tokens.
//! - `/healthz` over the socket while the 128 streams run (p50/p90/p99, `--probe-health`; the
//!   probe thread runs at real-time priority when allowed, so that what is timed is the
//!   daemon's answer and not the probe's own wait for a core the daemon's compute fills).
//! - the journal: job lines accepted per second (a `LINES`-line file submitted: written and
//!   fsync'd before it counts) against writing and fsyncing the same bytes to a plain file; and
//!   one answer journaled (appended and `fdatasync`ed, then written to the output file)
//!   against a bare append and `fdatasync` of the same bytes, in the same directory.
//!
//! `cargo build --release --bins && cargo bench -p accel-benches --bench load`. Uses the
//! default model (SmolLM2-135M-Instruct) when it is in the model cache, else the generated one.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use accel_runtime::backend::cpu::CpuBackend;
use accel_runtime::config::{DaemonConfig, JobsConfig};
use accel_runtime::engine::Engine;
use criterion::Criterion;

const PROMPT: usize = 16;
const OUTPUT: usize = 16;
const CLIENTS: [usize; 4] = [1, 8, 32, 128];
const LINES: usize = 10_000;

fn prompt(i: usize, vocab: usize) -> Vec<u32> {
    (0..PROMPT)
        .map(|t| ((i * 131 + t * 7 + 100) % vocab) as u32)
        .collect()
}

/// A daemon serving the model on a socket in `dir`, stopped when dropped.
struct Daemon {
    child: Child,
    socket: PathBuf,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_daemon(dir: &Path, model: Option<&Path>) -> Daemon {
    std::fs::create_dir_all(dir).expect("daemon dir");
    let socket = dir.join("acceld.sock");
    let model_lines = match model {
        // Room for 128 sequences, and their prompts in one step as the direct run has them.
        Some(path) => format!(
            "models:\n  - name: bench\n    path: {}\n    kv_blocks: 1024\n    max_sequences: 128\n    max_batch_tokens: 2048\n",
            path.display()
        ),
        None => "models: []\n".into(),
    };
    let config = dir.join("acceld.yaml");
    std::fs::write(
        &config,
        format!(
            "socket: {}\nsocket_mode: \"0600\"\nsocket_group: null\nstate_dir: {}\npolicy_file: null\npolicy_dir: {}\nlog: {{level: warn}}\n{model_lines}",
            socket.display(),
            dir.join("state").display(),
            dir.join("policies.d").display(),
        ),
    )
    .expect("config");
    let child = Command::new(accel_benches::built("acceld"))
        .arg("--config")
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("acceld");
    let deadline = Instant::now() + Duration::from_secs(60);
    while std::os::unix::net::UnixStream::connect(&socket).is_err() {
        assert!(Instant::now() < deadline, "acceld did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    Daemon { child, socket }
}

/// One `accelctl bench` run of `clients` requests at once; its JSON report.
fn bench_run(daemon: &Daemon, prompts: &Path, clients: usize, probe: bool) -> serde_json::Value {
    let mut command = Command::new(accel_benches::built("accelctl"));
    command
        .env("ACCEL_SOCKET", &daemon.socket)
        // Greedy, as the direct run samples.
        .args([
            "--json",
            "bench",
            "--model",
            "bench",
            "--ignore-eos",
            "--temperature",
            "0",
        ])
        .arg("--prompts")
        .arg(prompts)
        .args(["--output-tokens", &OUTPUT.to_string()])
        .args(["--concurrency", &clients.to_string()])
        .args(["--requests", &clients.to_string()]);
    if probe {
        command.arg("--probe-health");
    }
    let out = command.output().expect("accelctl bench");
    assert!(
        out.status.success(),
        "accelctl bench failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("bench JSON")
}

fn main() {
    let mut c = Criterion::default().configure_from_args();
    let (model, _, source) = accel_benches::default_model();
    let vocab = model.config.vocab_size;
    println!(
        "model: {}",
        source.as_ref().map_or(
            "the generated model (the API run needs the default model; skipped)".to_owned(),
            |p| p.display().to_string()
        )
    );
    let dir = tempfile::tempdir_in("/var/tmp").expect("temp dir");

    // Throughput: the engine driven directly, and the whole daemon, at each client count.
    let mut engine = Engine::new(
        CpuBackend::default(),
        model.config.clone(),
        &model.weights,
        1024,
        16,
    )
    .expect("engine");
    let prompts_file = dir.path().join("prompts.jsonl");
    {
        let mut f = std::fs::File::create(&prompts_file).expect("prompts file");
        for i in 0..128 {
            writeln!(f, "{}", serde_json::json!({ "prompt": prompt(i, vocab) })).expect("write");
        }
    }
    let daemon = source
        .as_ref()
        .map(|p| start_daemon(&dir.path().join("daemon"), Some(p)));
    // The device loop alone (scheduler, sampling, events; no HTTP), in this process.
    let loop_config = DaemonConfig {
        models: vec![accel_runtime::config::ModelSpec {
            name: "bench".into(),
            kv_blocks: 1024,
            max_sequences: 128,
            max_batch_tokens: 2048,
            ..accel_runtime::config::ModelSpec::default_model()
        }],
        ..DaemonConfig::default()
    };
    let no_gpu = accel_runtime::devices::DeviceReport {
        devices: Vec::new(),
        cuda_driver: false,
        reason: Some("the load bench runs on the CPU".into()),
    };
    let handles = accel_runtime::runner::start_models(&loop_config, &no_gpu, None, None, None);
    let handle = handles.first().expect("the device loop");
    let mut rows = Vec::new();
    let mut health = None;
    let mut group = c.benchmark_group("load");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(5));
    for clients in CLIENTS {
        let prompts: Vec<Vec<u32>> = (0..clients).map(|i| prompt(i, vocab)).collect();
        let (mut direct, mut device_loop, mut api) = (Vec::new(), Vec::new(), Vec::new());
        let mut client_cpu = Vec::new();
        group.bench_function(format!("engine_direct_{clients}"), |b| {
            b.iter_custom(|iters| {
                accel_benches::timed_iterations(iters, &mut direct, || {
                    accel_benches::greedy_streams(&mut engine, &prompts, OUTPUT)
                })
            })
        });
        group.bench_function(format!("device_loop_{clients}"), |b| {
            b.iter_custom(|iters| {
                accel_benches::timed_iterations(iters, &mut device_loop, || {
                    let requests = (0..clients)
                        .map(|i| accel_benches::greedy_request("bench", prompt(i, vocab), OUTPUT))
                        .collect();
                    accel_benches::serve(handle, requests).0
                })
            })
        });
        if let Some(daemon) = &daemon {
            group.bench_function(format!("through_api_{clients}"), |b| {
                b.iter_custom(|iters| {
                    accel_benches::timed_iterations(iters, &mut api, || {
                        let report = bench_run(daemon, &prompts_file, clients, false);
                        assert_eq!(report["total"]["errors"], 0, "{report}");
                        client_cpu.push(report["client_cpu_seconds"].as_f64().unwrap_or(f64::NAN));
                        report["seconds"].as_f64().unwrap_or(f64::NAN)
                    })
                })
            });
            if clients == 128 {
                health = Some(bench_run(daemon, &prompts_file, clients, true));
            }
        }
        rows.push((
            clients,
            accel_benches::median(&mut direct),
            accel_benches::median(&mut device_loop),
            accel_benches::median(&mut api),
            accel_benches::median(&mut client_cpu),
        ));
    }
    group.finish();

    // The journal.
    let jobs_dir = dir.path().join("jobs");
    let jobs = accel_runtime::jobs::Jobs::open(
        &jobs_dir,
        JobsConfig {
            max_lines: LINES,
            max_active_per_tenant: 1_000_000,
            max_stored_per_tenant: 1_000_000,
            max_file_size: accel_runtime::units::ByteSize(1 << 30),
            ..JobsConfig::default()
        },
    )
    .expect("jobs");
    let file: Vec<u8> = (0..LINES)
        .map(|i| {
            serde_json::json!({"custom_id": format!("line-{i}"), "method": "POST", "url": "/v1/chat/completions",
                "body": {"model": "bench", "messages": [{"role": "user", "content": "What is the capital of France? Answer in one word."}], "max_tokens": 32}})
                .to_string()
                + "\n"
        })
        .collect::<String>()
        .into_bytes();
    let plain = dir.path().join("plain");
    let (mut submit, mut bare_file) = (Vec::new(), Vec::new());
    let mut group = c.benchmark_group("journal");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(5));
    group.bench_function("submit_10000_lines", |b| {
        b.iter_custom(|iters| {
            accel_benches::timed_iterations(iters, &mut submit, || {
                let t = Instant::now();
                jobs.submit("bench", "bench", None, &file).expect("submit");
                t.elapsed().as_secs_f64()
            })
        })
    });
    group.bench_function("bound_write_and_fsync_same_bytes", |b| {
        b.iter_custom(|iters| {
            accel_benches::timed_iterations(iters, &mut bare_file, || {
                let t = Instant::now();
                let mut f = std::fs::File::create(&plain).expect("plain");
                f.write_all(&file).expect("write");
                f.sync_all().expect("fsync");
                t.elapsed().as_secs_f64()
            })
        })
    });
    // One answer per iteration, a realistic chat answer's size.
    let answer = serde_json::json!({"id": "job-1", "custom_id": "line-1", "response": {"status_code": 200, "request_id": "chatcmpl-1",
        "body": {"id": "chatcmpl-1", "object": "chat.completion", "model": "bench", "choices": [{"index": 0, "message": {"role": "assistant", "content": "The capital of France is Paris. It has been the capital since the tenth century."}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 40, "completion_tokens": 18, "total_tokens": 58}}}, "error": null}).to_string().into_bytes();
    let (mut journaled, mut bare_append) = (Vec::new(), Vec::new());
    let mut target = jobs.submit("bench", "bench", None, &file).expect("submit");
    let mut next_line = 0u32;
    group.bench_function("answer_journaled", |b| {
        b.iter_custom(|iters| {
            accel_benches::timed_iterations(iters, &mut journaled, || {
                if next_line as usize == LINES {
                    // Every line answered: on to a fresh job (not timed).
                    target = jobs.submit("bench", "bench", None, &file).expect("submit");
                    next_line = 0;
                }
                let output = answer.clone();
                let t = Instant::now();
                assert!(target.answer(next_line, false, output).expect("answer"));
                next_line += 1;
                t.elapsed().as_secs_f64()
            })
        })
    });
    let mut log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.path().join("bare.log"))
        .expect("bare log");
    group.bench_function("bound_append_and_fdatasync", |b| {
        b.iter_custom(|iters| {
            accel_benches::timed_iterations(iters, &mut bare_append, || {
                let t = Instant::now();
                log.write_all(&answer).expect("append");
                log.sync_data().expect("fdatasync");
                t.elapsed().as_secs_f64()
            })
        })
    });
    group.finish();

    println!("\n| clients | engine direct | device loop (cost) | through the API | API cost | load generator's CPU |");
    println!("|---|---|---|---|---|---|");
    for (clients, direct, device_loop, api, cpu) in &rows {
        let tokens = (clients * OUTPUT) as f64;
        let rate =
            |s: &Option<f64>| s.map_or("-".to_owned(), |s| format!("{:.0} tok/s", tokens / s));
        let cost = |x: &Option<f64>| match (direct, x) {
            (Some(d), Some(a)) => format!("{:+.1}%", (a / d - 1.0) * 100.0),
            _ => "-".into(),
        };
        let cpu = match (cpu, api) {
            (Some(c), Some(a)) => format!("{:.0}% of a core", c / a * 100.0),
            _ => "-".into(),
        };
        println!(
            "| {clients} | {} | {} ({}) | {} | {} | {cpu} |",
            rate(direct),
            rate(device_loop),
            cost(device_loop),
            rate(api),
            cost(api)
        );
    }
    if let Some(report) = health {
        let h = &report["health_ms"];
        println!(
            "\n/healthz over the socket during 128 streams: p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms (target p99 <= 1 ms; probe at {} priority)",
            h["p50"].as_f64().unwrap_or(f64::NAN),
            h["p90"].as_f64().unwrap_or(f64::NAN),
            h["p99"].as_f64().unwrap_or(f64::NAN),
            report["health_probe"].as_str().unwrap_or("unknown")
        );
    }
    if let (Some(s), Some(b)) = (
        accel_benches::median(&mut submit),
        accel_benches::median(&mut bare_file),
    ) {
        println!(
            "\njob submission: {:.0} lines/s accepted ({} lines, {:.1} MB, fsync'd), {:.2}x the time of writing and fsyncing the same bytes",
            LINES as f64 / s,
            LINES,
            file.len() as f64 / 1e6,
            s / b
        );
    }
    if let (Some(j), Some(b)) = (
        accel_benches::median(&mut journaled),
        accel_benches::median(&mut bare_append),
    ) {
        println!(
            "journaling an answer ({} bytes): {:.0} µs, {:.2}x a bare append + fdatasync ({:.0} µs)",
            answer.len(),
            j * 1e6,
            j / b,
            b * 1e6
        );
    }
}
