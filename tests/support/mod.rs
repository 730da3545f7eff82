//! Helpers for end-to-end tests: start the real `acceld` on a temporary socket and state
//! directory, run the real `accelctl` (as root or as another uid), speak raw HTTP to the socket.
//!
//! The binaries are the ones cargo built for this workspace (`cargo build --workspace --bins`,
//! which the test command runs first); `ACCEL_BIN_DIR` points elsewhere if needed.

pub mod reference;

use std::os::unix::fs::PermissionsExt as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Path of a workspace binary.
pub fn bin(name: &str) -> PathBuf {
    let dir = match std::env::var_os("ACCEL_BIN_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => {
            // target/<profile>/deps/<test-binary> -> target/<profile>
            let exe = std::env::current_exe().expect("current_exe");
            exe.parent()
                .and_then(Path::parent)
                .expect("target dir")
                .to_owned()
        }
    };
    let path = dir.join(name);
    assert!(
        path.is_file(),
        "{} not found: run `cargo build --workspace --bins` first (the README's test command does)",
        path.display()
    );
    path
}

/// Whether we may switch uids, change socket owners and so on.
pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Skips a root-only test with a printed reason (CI runs as root, so it runs there).
#[macro_export]
macro_rules! require_root {
    () => {
        if !$crate::is_root() {
            eprintln!("skipped: this test needs root (it switches uids); CI runs it as root");
            return;
        }
    };
}

/// A world-traversable temporary directory, so callers running as other uids can reach the socket.
pub fn shared_tempdir() -> tempfile::TempDir {
    let dir = tempfile::Builder::new()
        .prefix("accel-test-")
        .tempdir()
        .expect("tempdir");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
        .expect("chmod tempdir");
    dir
}

/// A running `acceld` with its own socket, state dir and policy.
#[derive(Debug)]
pub struct Daemon {
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
    pub config: PathBuf,
    pub policy: PathBuf,
    pub log: PathBuf,
    env: Vec<(String, String)>,
    child: Option<Child>,
}

/// Options for [`Daemon::start_with`].
#[derive(Debug, Default)]
pub struct DaemonOptions<'a> {
    /// Base policy text; `None` uses the embedded default.
    pub policy: Option<&'a str>,
    /// Extra config lines (YAML).
    pub extra_config: &'a str,
    /// Use this state dir instead of a fresh one.
    pub state_dir: Option<&'a Path>,
    /// Extra environment for the daemon process (e.g. `NOTIFY_SOCKET`).
    pub env: &'a [(&'a str, &'a str)],
}

impl Daemon {
    /// Starts acceld with `policy` as its base policy and an open (0666) socket.
    pub fn start(policy: Option<&str>) -> Daemon {
        Self::start_with(DaemonOptions {
            policy,
            ..Default::default()
        })
    }

    pub fn start_with(options: DaemonOptions<'_>) -> Daemon {
        let mut daemon = Self::prepare(options);
        daemon.spawn();
        daemon.wait_ready();
        daemon
    }

    /// Writes config and policy but does not start the daemon.
    pub fn prepare(options: DaemonOptions<'_>) -> Daemon {
        let dir = shared_tempdir();
        let socket = dir.path().join("run/acceld.sock");
        let state = options
            .state_dir
            .map_or_else(|| dir.path().join("state"), Path::to_owned);
        let policy = dir.path().join("policy.yaml");
        let policy_line = match options.policy {
            Some(text) => {
                std::fs::write(&policy, text).expect("write policy");
                format!("policy_file: {}\n", policy.display())
            }
            None => "policy_file: null\n".to_owned(),
        };
        let config = dir.path().join("acceld.yaml");
        std::fs::write(
            &config,
            format!(
                "socket: {}\nsocket_mode: \"0666\"\nsocket_group: null\nstate_dir: {}\n{policy_line}policy_dir: {}\n{}{}{}",
                socket.display(),
                state.display(),
                dir.path().join("policies.d").display(),
                if options.extra_config.contains("drain_timeout:") { "" } else { "drain_timeout: 5s\n" },
                // Tests that do not ask for models get none: loading one costs time.
                if options.extra_config.contains("models:") { "" } else { "models: []\n" },
                options.extra_config
            ),
        )
        .expect("write config");
        let log = dir.path().join("acceld.log");
        Daemon {
            dir,
            socket,
            config,
            policy,
            log,
            env: options
                .env
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            child: None,
        }
    }

    /// Starts the process (use after [`Daemon::prepare`]).
    pub fn spawn(&mut self) {
        let log = std::fs::File::create(&self.log).expect("create log");
        let child = Command::new(bin("acceld"))
            .arg("--config")
            .arg(&self.config)
            .env("RUST_LOG", "info")
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn acceld");
        self.child = Some(child);
    }

    /// Waits until `/healthz` answers; panics with the daemon's log if it exits or stalls.
    pub fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().expect("try_wait"))
            {
                panic!(
                    "acceld exited early with {status}; log:\n{}",
                    self.log_text()
                );
            }
            if let Ok((200, _)) = self.try_request("GET", "/healthz", None) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "acceld not ready after 20s; log:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn pid(&self) -> i32 {
        self.child
            .as_ref()
            .map(|c| c.id() as i32)
            .expect("daemon running")
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends a signal to the daemon.
    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid()), signal).expect("kill");
    }

    /// The exit code if the process has exited (`Some(None)` for death by signal).
    pub fn stop_if_exited(&mut self) -> Option<Option<i32>> {
        let status = self.child.as_mut()?.try_wait().expect("try_wait")?;
        self.child = None;
        Some(status.code())
    }

    /// Waits for a daemon that should exit by itself; panics with its log if it does not.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(code) = self.stop_if_exited() {
                return code;
            }
            assert!(
                Instant::now() < deadline,
                "acceld did not exit within {timeout:?}; log:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Sends SIGTERM and waits for the exit status code.
    pub fn stop(&mut self) -> Option<i32> {
        let mut child = self.child.take()?;
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = child.try_wait().expect("try_wait") {
                return status.code();
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!(
                    "acceld did not stop within 20s of SIGTERM; log:\n{}",
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Runs accelctl as the current user against this daemon.
    pub fn ctl(&self, args: &[&str]) -> Output {
        Command::new(bin("accelctl"))
            .args(args)
            .env("ACCEL_SOCKET", &self.socket)
            .output()
            .expect("run accelctl")
    }

    /// Runs accelctl as another uid and gid (root only): a copy of the binary in our
    /// world-readable temp dir, since the build tree may not be reachable by that uid.
    pub fn ctl_as(&self, uid: u32, gid: u32, args: &[&str]) -> Output {
        let copy = self.dir.path().join("accelctl");
        if !copy.exists() {
            std::fs::copy(bin("accelctl"), &copy).expect("copy accelctl");
            std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o755))
                .expect("chmod accelctl");
        }
        Command::new(&copy)
            .args(args)
            .env("ACCEL_SOCKET", &self.socket)
            .env_remove("HOME")
            .current_dir("/")
            .uid(uid)
            .gid(gid)
            .output()
            .expect("run accelctl as another uid")
    }

    /// Runs accelctl as `uid` with primary group `gid` and supplementary `groups` (root only).
    pub fn ctl_with_groups(&self, uid: u32, gid: u32, groups: &[u32], args: &[&str]) -> Output {
        let copy = self.accelctl_copy();
        let groups: Vec<nix::libc::gid_t> = groups.to_vec();
        let mut command = Command::new(&copy);
        command
            .args(args)
            .env("ACCEL_SOCKET", &self.socket)
            .env_remove("HOME")
            .current_dir("/");
        // SAFETY: the closure runs in the forked child before exec and makes only the three
        // async-signal-safe system calls below on memory prepared before the fork. Groups and
        // gid must be set while still root, so std's uid()/gid() (which run first and drop the
        // supplementary groups) are not used.
        unsafe {
            command.pre_exec(move || {
                if nix::libc::setgroups(groups.len(), groups.as_ptr()) != 0
                    || nix::libc::setgid(gid) != 0
                    || nix::libc::setuid(uid) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        command.output().expect("run accelctl with groups")
    }

    fn accelctl_copy(&self) -> PathBuf {
        let copy = self.dir.path().join("accelctl");
        if !copy.exists() {
            std::fs::copy(bin("accelctl"), &copy).expect("copy accelctl");
            std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o755))
                .expect("chmod accelctl");
        }
        copy
    }

    /// One HTTP/1.1 request over the socket; returns status and body.
    pub fn request(&self, method: &str, path: &str, body: Option<&[u8]>) -> (u16, String) {
        self.try_request(method, path, body)
            .expect("HTTP request to acceld")
    }

    pub fn try_request(
        &self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
    ) -> std::io::Result<(u16, String)> {
        let stream = std::os::unix::net::UnixStream::connect(&self.socket)?;
        http_exchange(stream, method, path, body, &[])
    }
}

impl Drop for Daemon {
    /// Stops the daemon as an operator would (SIGTERM), so it removes what it made on the
    /// host (worker cgroups, pinned device gates); one that does not stop in 3 s is killed.
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(child.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let deadline = Instant::now() + Duration::from_secs(3);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Writes one request with `Connection: close` and reads the whole answer.
pub fn http_exchange<S: std::io::Read + std::io::Write>(
    stream: S,
    method: &str,
    path: &str,
    body: Option<&[u8]>,
    headers: &[(&str, &str)],
) -> std::io::Result<(u16, String)> {
    http_exchange_with_head(stream, method, path, body, headers).map(|(s, _, b)| (s, b))
}

/// As [`http_exchange`], also returning the response head (status line and headers).
pub fn http_exchange_with_head<S: std::io::Read + std::io::Write>(
    mut stream: S,
    method: &str,
    path: &str,
    body: Option<&[u8]>,
    headers: &[(&str, &str)],
) -> std::io::Result<(u16, String, String)> {
    let body = body.unwrap_or_default();
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Length: {}\r\n", body.len());
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes())?;
    // The daemon may answer 413 before reading a large body; a broken pipe then is expected.
    if let Err(e) = stream.write_all(body) {
        if e.kind() != std::io::ErrorKind::BrokenPipe
            && e.kind() != std::io::ErrorKind::ConnectionReset
        {
            return Err(e);
        }
    }
    let mut answer = Vec::new();
    if let Err(e) = stream.read_to_end(&mut answer) {
        if answer.is_empty() {
            return Err(e);
        }
    }
    let text = String::from_utf8_lossy(&answer).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("not an HTTP answer: {text:?}")))?;
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((text.as_str(), ""));
    Ok((status, head.to_owned(), body.to_owned()))
}

/// Parses accelctl's stdout as JSON, with its stderr in the panic message.
pub fn json_of(output: &Output) -> serde_json::Value {
    assert!(
        output.status.success(),
        "accelctl failed ({}): {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
        panic!(
            "accelctl printed invalid JSON ({e}): {}",
            String::from_utf8_lossy(&output.stdout)
        )
    })
}

/// A TCP port free right now on 127.0.0.1.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// Polls `check` until it returns true or `timeout` passes.
pub fn eventually(timeout: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if check() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    check()
}

/// SmolLM2-135M-Instruct's GGUF file where the README's commands put it (`ACCEL_SMOLLM2_GGUF`
/// overrides). Missing: a failure in CI (the test command downloads it), a printed skip elsewhere.
pub fn smollm2_gguf() -> Option<PathBuf> {
    let path = match std::env::var_os("ACCEL_SMOLLM2_GGUF") {
        Some(p) => PathBuf::from(p),
        None => PathBuf::from(
            std::env::var("ACCEL_MODEL_CACHE").unwrap_or_else(|_| "/var/cache/accel/models".into()),
        )
        .join(accel_runtime::config::DEFAULT_MODEL_FILE),
    };
    if path.is_file() {
        return Some(path);
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "{} is missing in CI: the test command downloads it (.ci/deps.sh)",
        path.display()
    );
    eprintln!(
        "skipped: {} not found (run `make model` to download SmolLM2)",
        path.display()
    );
    None
}

/// A daemon serving SmolLM2 as `smollm2-135m-instruct` with `kv_blocks` and `extra` lines of
/// its model entry (each starting with four spaces); `None` where [`smollm2_gguf`] skips.
pub fn smollm2_daemon(kv_blocks: usize, extra: &str) -> Option<Daemon> {
    let path = smollm2_gguf()?;
    let config = format!(
        "models:\n  - name: smollm2-135m-instruct\n    path: {}\n    kv_blocks: {kv_blocks}\n{extra}",
        path.display()
    );
    Some(Daemon::start_with(DaemonOptions {
        extra_config: &config,
        ..Default::default()
    }))
}

/// The JSON chunks of a server-sent event stream, which must end with `data: [DONE]`.
pub fn sse_chunks(text: &str) -> Vec<serde_json::Value> {
    let data: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .collect();
    assert_eq!(data.last(), Some(&"[DONE]"), "{text}");
    data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).unwrap_or_else(|e| panic!("{e}: {d}")))
        .collect()
}

/// A chat request answered whole: its status and body.
pub fn chat_whole(daemon: &Daemon, body: &serde_json::Value) -> (u16, serde_json::Value) {
    let (status, text) = daemon.request(
        "POST",
        "/v1/chat/completions",
        Some(body.to_string().as_bytes()),
    );
    let value =
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{status}: not JSON ({e}): {text}"));
    (status, value)
}

/// The same chat request streamed: its chunks (the status must be 200).
pub fn chat_streamed(daemon: &Daemon, body: &serde_json::Value) -> Vec<serde_json::Value> {
    let mut streaming = body.clone();
    streaming["stream"] = serde_json::json!(true);
    let (status, text) = daemon.request(
        "POST",
        "/v1/chat/completions",
        Some(streaming.to_string().as_bytes()),
    );
    assert_eq!(status, 200, "{text}");
    sse_chunks(&text)
}

/// The text a streamed chat answer's chunks carry, put together.
pub fn streamed_chat_text(chunks: &[serde_json::Value]) -> String {
    chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect()
}

/// SHA-256 of `text` in hex, from coreutils' sha256sum (independent of the daemon's hashing).
pub fn sha256_hex(text: &str) -> String {
    use std::io::Write as _;
    let mut child = std::process::Command::new("sha256sum")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("sha256sum");
    child
        .stdin
        .take()
        .expect("sha256sum's stdin")
        .write_all(text.as_bytes())
        .expect("write to sha256sum");
    let out = child.wait_with_output().expect("sha256sum output");
    String::from_utf8(out.stdout).expect("sha256sum prints ASCII")[..64].to_owned()
}

/// Where the test command installs the SDK (`.ci/deps.sh`); `None` (a printed skip) when it
/// is missing outside CI.
pub fn python_deps() -> Option<PathBuf> {
    let dir = PathBuf::from(
        std::env::var("ACCEL_PYTHON_DEPS").unwrap_or_else(|_| "/var/cache/accel/python".into()),
    );
    if dir.join("openai").is_dir() {
        return Some(dir);
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "the openai SDK is missing from {} in CI: the test command installs it (.ci/deps.sh)",
        dir.display()
    );
    eprintln!(
        "skipped: the openai SDK is not in {} (run .ci/deps.sh)",
        dir.display()
    );
    None
}

/// The small Llama fixture model (random weights, transformers' reference outputs beside it).
pub fn fixture_model() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/llama-gqa-f32")
}

impl Daemon {
    /// `accelctl --json models load NAME PATH --kv-blocks N`, followed to its end; panics
    /// unless it loaded, and returns the load's final status.
    pub fn load_model(&self, name: &str, path: &Path, kv_blocks: usize) -> serde_json::Value {
        let kv_blocks = kv_blocks.to_string();
        let out = self.ctl(&[
            "--json",
            "models",
            "load",
            name,
            path.to_str().expect("a UTF-8 path"),
            "--kv-blocks",
            &kv_blocks,
        ]);
        assert!(
            out.status.success(),
            "loading {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        json_of(&out)
    }
}

/// Sends a streaming completion (for `tenant`, acting as an operator, when given) and returns
/// the connection once its first event arrived, with what was read so far.
pub fn open_stream(
    socket: &Path,
    tenant: Option<&str>,
    body: &serde_json::Value,
) -> (std::os::unix::net::UnixStream, String) {
    use std::io::{Read as _, Write as _};
    let mut stream = std::os::unix::net::UnixStream::connect(socket).expect("connect");
    let body = body.to_string();
    let acting = tenant.map_or_else(String::new, |t| format!("X-Accel-Tenant: {t}\r\n"));
    write!(
        stream,
        "POST /v1/completions HTTP/1.1\r\nHost: x\r\n{acting}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .expect("send");
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&seen).contains("data: ") {
        let n = stream.read(&mut buf).expect("read");
        assert!(
            n > 0,
            "closed before the first event: {}",
            String::from_utf8_lossy(&seen)
        );
        seen.extend_from_slice(&buf[..n]);
    }
    (stream, String::from_utf8_lossy(&seen).into_owned())
}

/// Reads an open stream (from [`open_stream`]) to its end; returns its events' data, in order
/// (`[DONE]` last when it ended well).
pub fn finish_stream(mut open: std::os::unix::net::UnixStream, head: String) -> Vec<String> {
    use std::io::Read as _;
    let mut rest = String::new();
    open.read_to_string(&mut rest).expect("read the stream");
    (head + &rest)
        .lines()
        .filter_map(|l| l.strip_prefix("data: ").map(str::to_owned))
        .collect()
}

/// The text a completion stream's events carry, joined.
pub fn streamed_text(events: &[String]) -> String {
    events
        .iter()
        .filter_map(|d| serde_json::from_str::<serde_json::Value>(d).ok())
        .filter_map(|c| c["choices"][0]["text"].as_str().map(str::to_owned))
        .collect()
}
