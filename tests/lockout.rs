//! No local user or tenant can lock others out of the daemon: connection caps per client,
//! connections kept for operators, a deadline for request bodies, refused callers closed at
//! once, and in-flight limits counted from the moment a request is read. Tests that open
//! connections as another uid need root (CI runs as root).

#![allow(clippy::unwrap_used)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt as _;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use accel_tests::{free_port, require_root, sha256_hex, Daemon, DaemonOptions};

const NOBODY: u32 = 65534;

/// A client in another process, as `uid`, that opens `count` connections to `socket`, sends
/// each the head of a request whose body never comes, prints how many were answered 503 at
/// once and how many stayed open, then holds them until killed.
fn crowd(socket: &std::path::Path, uid: u32, count: usize) -> std::process::Child {
    let script = r#"
import resource, socket, sys, time
path, count = sys.argv[1], int(sys.argv[2])
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
want = min(hard, count + 64) if hard != resource.RLIM_INFINITY else count + 64
resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
count = min(count, want - 32)
held, refused = [], 0
for i in range(count):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)
    try:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n{")
    except (BrokenPipeError, ConnectionResetError):
        pass  # refused and closed before the head was sent
    held.append(s)
time.sleep(1.0)
open_ = 0
for s in held:
    s.setblocking(False)
    try:
        data = s.recv(4096)
        # Answered 503, or closed: refused. Anything else is a connection still served.
        if b" 503 " in data or not data:
            refused += 1
        else:
            open_ += 1
    except (BrokenPipeError, ConnectionResetError):
        refused += 1
    except BlockingIOError:
        open_ += 1
print(f"{count} {refused} {open_}", flush=True)
time.sleep(3600)
"#;
    Command::new("python3")
        .args(["-c", script])
        .arg(socket)
        .arg(count.to_string())
        .uid(uid)
        .gid(uid)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .current_dir("/")
        .spawn()
        .expect("python3")
}

fn healthz_over_socket(socket: &std::path::Path) -> Duration {
    let started = Instant::now();
    let mut s = UnixStream::connect(socket).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).expect("answer");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    started.elapsed()
}

#[test]
fn a_uid_holding_ten_thousand_idle_connections_locks_out_neither_root_nor_other_tenants() {
    require_root!();
    let port = free_port();
    let policy = format!(
        "tenants:\n  - name: crowd\n    match:\n      uids: [{NOBODY}]\n  - name: other\n    match:\n      tokens_sha256: [\"{}\"]\n",
        sha256_hex("other-token")
    );
    let extra = format!(
        "tcp_listen: 127.0.0.1:{port}\nmax_connections: 256\nmax_connections_per_client: 16\noperator_connections: 8\n"
    );
    let daemon = Daemon::start_with(DaemonOptions {
        policy: Some(&policy),
        extra_config: &extra,
        ..Default::default()
    });
    let mut child = crowd(&daemon.socket, NOBODY, 10_000);
    let mut line = String::new();
    {
        use std::io::BufRead as _;
        let mut out = std::io::BufReader::new(child.stdout.take().expect("stdout"));
        out.read_line(&mut line).expect("crowd report");
    }
    let numbers: Vec<usize> = line
        .split_whitespace()
        .map(|n| n.parse().expect("number"))
        .collect();
    let (opened, refused, held) = (numbers[0], numbers[1], numbers[2]);
    eprintln!("crowd: {opened} connections, {refused} refused with 503, {held} held open");
    assert!(
        opened >= 5000,
        "the crowd could open only {opened} connections"
    );
    assert_eq!(held, 16, "one uid holds at most max_connections_per_client");
    assert_eq!(refused, opened - 16);

    // Root reaches the socket at once while the crowd holds its connections.
    let mut times: Vec<Duration> = (0..50)
        .map(|_| healthz_over_socket(&daemon.socket))
        .collect();
    times.sort();
    eprintln!(
        "root /healthz under the crowd: median {:?}, p99 {:?}",
        times[25], times[49]
    );
    assert!(times[49] < Duration::from_secs(1), "{times:?}");
    // Another tenant is served over TCP.
    let mut tcp = TcpStream::connect(("127.0.0.1", port)).unwrap();
    tcp.write_all(b"GET /v1/whoami HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: Bearer other-token\r\n\r\n").unwrap();
    let mut answer = String::new();
    tcp.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("\"tenant\":\"other\""), "{answer}");
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn a_body_that_never_arrives_gets_408_and_the_connection_closes() {
    let daemon = Daemon::start_with(DaemonOptions {
        extra_config: "request_timeout: 1s\n",
        ..Default::default()
    });
    let mut s = UnixStream::connect(&daemon.socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let started = Instant::now();
    s.write_all(b"POST /v1/policy/reload HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"dry")
        .unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer)
        .expect("answer, then end of stream");
    let waited = started.elapsed();
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("request_timeout"), "{answer}");
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(5),
        "{waited:?}"
    );
}

#[test]
fn a_refused_caller_is_answered_and_closed_without_its_body_being_read() {
    require_root!();
    // No default tenant: nobody is refused.
    let daemon = Daemon::start(Some(
        "tenants:\n  - name: someone\n    match:\n      uids: [4242]\n",
    ));
    let script = r#"
import socket, sys, time
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.settimeout(10)
s.connect(sys.argv[1])
start = time.monotonic()
s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n")
data = b""
while True:
    chunk = s.recv(65536)
    if not chunk:
        break
    data += chunk
print(f"{time.monotonic() - start:.3f}")
print(data.split(b"\r\n")[0].decode())
"#;
    let out = Command::new("python3")
        .args(["-c", script])
        .arg(&daemon.socket)
        .uid(NOBODY)
        .gid(NOBODY)
        .current_dir("/")
        .output()
        .expect("python3");
    let text = String::from_utf8_lossy(&out.stdout);
    let mut lines = text.lines();
    let seconds: f64 = lines.next().and_then(|l| l.parse().ok()).unwrap_or(99.0);
    let status = lines.next().unwrap_or_default();
    assert_eq!(
        status,
        "HTTP/1.1 403 Forbidden",
        "{text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        seconds < 2.0,
        "the refused connection stayed open {seconds}s"
    );
}

#[test]
fn requests_still_sending_their_bodies_count_against_the_in_flight_limit() {
    let port = free_port();
    let policy = format!(
        "tenants:\n  - name: capped\n    limits:\n      max_concurrent_requests: 1\n    match:\n      tokens_sha256: [\"{}\"]\n",
        sha256_hex("capped-token")
    );
    let extra = format!("tcp_listen: 127.0.0.1:{port}\n");
    let _daemon = Daemon::start_with(DaemonOptions {
        policy: Some(&policy),
        extra_config: &extra,
        ..Default::default()
    });
    let request = |body_len: usize, body: &str| {
        format!("POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer capped-token\r\nContent-Type: application/json\r\nContent-Length: {body_len}\r\n\r\n{body}")
    };
    // The first sends its headers and part of its body.
    let mut slow = TcpStream::connect(("127.0.0.1", port)).unwrap();
    slow.write_all(request(200, "{\"model\":").as_bytes())
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    // The second, whole, finds the tenant's one slot taken.
    let body = r#"{"model":"none","prompt":"hi","max_tokens":1}"#;
    let mut quick = TcpStream::connect(("127.0.0.1", port)).unwrap();
    quick
        .write_all(
            request(body.len(), body)
                .replace("Host: x\r\n", "Host: x\r\nConnection: close\r\n")
                .as_bytes(),
        )
        .unwrap();
    let mut answer = String::new();
    quick.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 429"), "{answer}");
    assert!(answer.contains("max_concurrent_requests"), "{answer}");
    drop(slow);
}

/// A TCP connection to 127.0.0.1:`port` from the loopback address `from`.
fn tcp_from(from: std::net::Ipv4Addr, port: u16) -> TcpStream {
    use nix::sys::socket::{bind, connect, socket, AddressFamily, SockFlag, SockType, SockaddrIn};
    let fd = socket(
        AddressFamily::Inet,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .unwrap();
    let [a, b, c, d] = from.octets();
    bind(
        std::os::fd::AsRawFd::as_raw_fd(&fd),
        &SockaddrIn::new(a, b, c, d, 0),
    )
    .unwrap();
    connect(
        std::os::fd::AsRawFd::as_raw_fd(&fd),
        &SockaddrIn::new(127, 0, 0, 1, port),
    )
    .unwrap();
    TcpStream::from(fd)
}

#[test]
fn a_host_cannot_multiply_its_tcp_share_by_taking_more_loopback_addresses() {
    let port = free_port();
    let extra = format!(
        "tcp_listen: 127.0.0.1:{port}\nmax_connections_per_client: 2\nrequest_timeout: 20s\n"
    );
    let _daemon = Daemon::start_with(DaemonOptions {
        extra_config: &extra,
        ..Default::default()
    });
    // Two idle connections from two loopback addresses hold this host's share...
    let _held: Vec<TcpStream> = [[127, 0, 0, 1], [127, 0, 0, 2]]
        .into_iter()
        .map(|o| tcp_from(o.into(), port))
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    // ...so a third, from yet another, is refused at once.
    let mut third = tcp_from([127, 0, 0, 3].into(), port);
    third
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut answer = String::new();
    third
        .read_to_string(&mut answer)
        .expect("an answer, then the end of the stream");
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(answer.contains("too_many_connections"), "{answer}");
}
