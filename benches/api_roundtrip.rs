//! Control-API request latency over the Unix socket, against a bare socket round trip.
//!
//! The bound is a thread answering the same bytes on a Unix socket with no HTTP stack at all:
//! the floor for one request/response over a local socket on this host. The API figures are
//! the daemon's real router (authentication, metrics, JSON) served in-process on a socket from
//! the daemon's front thread (handlers on the main runtime), with the same keep-alive client. A ratio near 1 means the API adds little over the socket itself.

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use accel_benches::Ledger;
use accel_runtime::api::{self, ListenerKind};
use accel_runtime::config::DaemonConfig;
use accel_runtime::metrics::Metrics;
use accel_runtime::policy::{Policy, PolicySource, EMBEDDED_DEFAULT, EMBEDDED_NAME};
use accel_runtime::state::DaemonState;
use accel_runtime::sys::SystemUserDb;
use criterion::{criterion_group, Criterion};

const BOUND: &str = "bare_socket_roundtrip";

fn ledger() -> &'static Ledger {
    static LEDGER: OnceLock<Ledger> = OnceLock::new();
    LEDGER.get_or_init(Ledger::default)
}

/// Sends `GET path` on a keep-alive connection and reads one response (Content-Length framed).
fn roundtrip(reader: &mut BufReader<UnixStream>, path: &str) {
    let request = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n");
    reader
        .get_mut()
        .write_all(request.as_bytes())
        .expect("write request");
    let mut length = 0usize;
    let mut line = String::new();
    loop {
        line.clear();
        reader.read_line(&mut line).expect("read header");
        if line == "\r\n" || line.is_empty() {
            break;
        }
        if let Some(value) = line.to_ascii_lowercase().strip_prefix("content-length:") {
            length = value.trim().parse().expect("content-length");
        }
    }
    let mut body = vec![0u8; length];
    reader.read_exact(&mut body).expect("read body");
}

/// A server with no HTTP stack: reads until the blank line, answers fixed bytes.
fn bare_server(path: &Path) {
    let listener = std::os::unix::net::UnixListener::bind(path).expect("bind bare socket");
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { return };
            std::thread::spawn(move || {
                let answer = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 15\r\n\r\n{\"status\":\"ok\"}";
                let mut reader = BufReader::new(stream);
                let mut line = String::new();
                loop {
                    line.clear();
                    match reader.read_line(&mut line) {
                        Ok(0) | Err(_) => return,
                        Ok(_) if line == "\r\n" => {
                            if reader.get_mut().write_all(answer).is_err() {
                                return;
                            }
                        }
                        Ok(_) => {}
                    }
                }
            });
        }
    });
}

/// The daemon's real router on a Unix socket, served by a runtime of its own.
fn api_server(path: &Path) {
    let policy = Policy::from_sources(&[PolicySource {
        name: EMBEDDED_NAME.into(),
        text: EMBEDDED_DEFAULT.into(),
    }])
    .expect("default policy");
    let state = Arc::new(DaemonState::new(
        DaemonConfig::default(),
        policy,
        Metrics::new().expect("metrics"),
        Box::new(SystemUserDb),
        Vec::new(),
        accel_runtime::devices::DeviceReport {
            devices: Vec::new(),
            cuda_driver: false,
            reason: Some("not used by this benchmark".into()),
        },
    ));
    let path = path.to_owned();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        runtime.block_on(async move {
            let listener = tokio::net::UnixListener::bind(&path).expect("bind api socket");
            let _ = ready_tx.send(());
            // The daemon's front thread, accept loop and router, handlers on this runtime; the
            // stop signal never comes during a bench.
            let (_stop_tx, stop_rx) = tokio::sync::watch::channel(false);
            let front = api::front::Front::start().expect("front thread");
            let served = front
                .serve(
                    listener,
                    api::router(state, ListenerKind::Unix),
                    stop_rx,
                    std::time::Duration::from_secs(1),
                    api::server::ConnectionLimits::default(),
                    std::sync::Arc::new(|p: &api::PeerCred| p.uid == 0),
                )
                .expect("serve");
            let _ = served.await;
        });
    });
    ready_rx.recv().expect("api server started");
}

fn bench(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("tempdir");
    let bare = dir.path().join("bare.sock");
    let api_socket = dir.path().join("api.sock");
    bare_server(&bare);
    api_server(&api_socket);

    let mut group = c.benchmark_group("unix_socket");
    for (name, socket, path) in [
        (BOUND, &bare, "/healthz"),
        ("api_healthz", &api_socket, "/healthz"),
        ("api_whoami", &api_socket, "/v1/whoami"),
        ("api_tenants", &api_socket, "/v1/tenants"),
    ] {
        let mut reader = BufReader::new(UnixStream::connect(socket).expect("connect"));
        group.bench_function(name, |b| {
            b.iter_custom(|iterations| {
                let start = Instant::now();
                for _ in 0..iterations {
                    roundtrip(&mut reader, path);
                }
                let elapsed = start.elapsed();
                ledger().record(name, elapsed, iterations);
                elapsed
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench);

fn main() {
    benches();
    Criterion::default().configure_from_args().final_summary();
    println!(
        "\nper request, and as a multiple of the bare socket round trip measured in this run:"
    );
    print!("{}", ledger().ratio_table(BOUND));
}
