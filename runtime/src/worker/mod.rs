//! Worker processes: a model's engine out of the supervisor, in a process of its own
//! (`acceld worker`, the same binary) that runs as an unprivileged user with no capabilities,
//! `no_new_privs`, and dies with its parent.
//!
//! The supervisor keeps the API, the policy, the scheduler, sampling and the metrics; it
//! drives the worker's engine step by step over a socket ([`proto`]), through
//! [`RemoteEngine`], which stands where an in-process engine stands in the device loop. A
//! worker that crashes, is killed or stops answering is replaced on the next call; the device
//! loop recomputes the sequences it held, so their outputs are what they would have been.

pub mod proto;
mod remote;
pub mod render;
mod respawn;
pub mod sandbox;
pub mod uids;

use std::io::{Read, Write};
use std::os::fd::FromRawFd as _;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

pub use self::remote::{RemoteEngine, WorkerIdentity, WorkerStatus};
pub use self::sandbox::Sandbox;

use self::proto::{tag, ProtoError};
use crate::backend::Backend;
use crate::config::ModelSpec;
use crate::engine::{Engine, EngineError, SeqId, StepInput};

/// The descriptor a worker finds its socket on.
pub const SOCKET_FD: i32 = 3;

/// What a worker is to serve, sent once after `Hello`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WorkerInit {
    /// The model's name, for logs.
    pub model: String,
    /// The model file or folder; `None` for the generated test model.
    pub path: Option<PathBuf>,
    pub spec: ModelSpec,
    /// `cpu` or `cuda:N`.
    pub device: String,
    pub kernel_cache: Option<PathBuf>,
    /// The model's files, passed as descriptors right after this message in this order (the
    /// worker cannot open them itself), and the directories among the paths it will look at.
    pub files: Vec<PathBuf>,
    pub dirs: Vec<PathBuf>,
    /// The directory of its own its KV disk tier keeps files in (made by the supervisor for
    /// the worker's uid, mode 0700); `None`: no disk tier.
    pub disk_dir: Option<PathBuf>,
}

/// A model's worker as operators see it (`GET /v1/workers`, `accelctl workers`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WorkerReport {
    pub model: String,
    /// Its cgroup, `<pool>/<model>-<device>`; the pool is `_shared` or the tenant it is
    /// dedicated to.
    pub worker: String,
    /// The tenant it serves alone, if it is dedicated.
    pub tenant: Option<String>,
    pub device: String,
    pub user: String,
    /// `None` while it is being replaced.
    pub pid: Option<u32>,
    pub restarts: u64,
    /// From its cgroup and device gate; absent where they could not be read.
    pub memory_bytes: Option<u64>,
    pub memory_peak_bytes: Option<u64>,
    pub cpu_seconds: Option<f64>,
    pub oom_kills: Option<u64>,
    pub device_denials: Option<u64>,
}

/// Every worker, and how engines are isolated (`GET /v1/workers`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WorkersStatus {
    /// `off` (engines run inside acceld) or `shared`.
    pub isolation: String,
    pub workers: Vec<WorkerReport>,
}

impl WorkerStatus {
    /// This worker's report, for the model `model`.
    pub fn report(&self, model: &str) -> WorkerReport {
        let usage = self.usage();
        WorkerReport {
            model: model.to_owned(),
            worker: format!("{}/{}", self.pool, self.name),
            tenant: self.tenant().map(str::to_owned),
            device: self.device.clone(),
            user: self.user.clone(),
            pid: self.pid(),
            restarts: self.restarts(),
            memory_bytes: usage.map(|(u, _)| u.memory_bytes),
            memory_peak_bytes: usage.and_then(|(u, _)| u.memory_peak_bytes),
            cpu_seconds: usage.map(|(u, _)| u.cpu_usec as f64 / 1e6),
            oom_kills: usage.map(|(u, _)| u.oom_kills),
            device_denials: usage.map(|(_, d)| d),
        }
    }
}

/// What the worker reports once its engine is up.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct WorkerReady {
    pub kv_block_bytes: u64,
    /// The scheduler's `swap_min_tokens` from the worker's own measurement (`u64::MAX`: never
    /// swap).
    pub swap_min_tokens: u64,
    /// The scheduler's `disk_swap_min_tokens`, likewise (`u64::MAX`: no disk tier, or it
    /// never pays).
    pub disk_swap_min_tokens: u64,
}

impl WorkerReady {
    /// The scheduler's `swap_min_tokens` (`usize::MAX`: never swap).
    pub fn swap_min_tokens(&self) -> usize {
        usize::try_from(self.swap_min_tokens).unwrap_or(usize::MAX)
    }

    /// The scheduler's `disk_swap_min_tokens` (`usize::MAX`: never to disk).
    pub fn disk_swap_min_tokens(&self) -> usize {
        usize::try_from(self.disk_swap_min_tokens).unwrap_or(usize::MAX)
    }
}

/// `acceld worker`: serves one engine on the socket at [`SOCKET_FD`] until the supervisor
/// says stop or goes away.
pub fn main() -> Result<(), String> {
    // SAFETY: the supervisor placed our end of its socket pair at this descriptor and nothing
    // else in this fresh process owns it.
    let stream = unsafe { UnixStream::from_raw_fd(SOCKET_FD) };
    serve(stream)
}

fn serve(mut stream: UnixStream) -> Result<(), String> {
    // Not dumpable: another worker of the same user can neither ptrace this one nor read its
    // memory or take its descriptors (its tenants' prompts, its GPU).
    // SAFETY: a plain prctl on this process.
    unsafe { nix::libc::prctl(nix::libc::PR_SET_DUMPABLE, 0, 0, 0, 0) };
    // Computing yields to the supervisor's API on a busy host; every thread started from here
    // on inherits it.
    let _ = crate::sys::lower_thread_priority(crate::sys::COMPUTE_NICE);
    let fail = |e: ProtoError| e.to_string();
    proto::write_frame(
        &mut stream,
        tag::HELLO,
        &proto::encode_hello(std::process::id()),
    )
    .map_err(fail)?;
    let init = proto::read_frame(&mut stream)
        .and_then(|f| f.expect(tag::INIT))
        .map_err(fail)?;
    let init: WorkerInit =
        serde_json::from_slice(&init).map_err(|e| format!("malformed init: {e}"))?;
    let fds = proto::recv_fds(&stream, init.files.len()).map_err(fail)?;
    crate::model::files::install(crate::model::files::Passed {
        files: init
            .files
            .iter()
            .cloned()
            .zip(fds.into_iter().map(std::fs::File::from))
            .collect(),
        dirs: init.dirs.iter().cloned().collect(),
    })?;
    let loaded = match &init.path {
        Some(path) => crate::model::load(path).map_err(|e| e.to_string()),
        None => crate::model::generated::tiny_random().map_err(|e| e.to_string()),
    };
    let started = loaded.and_then(|model| match init.device.as_str() {
        "cpu" => run(
            &init,
            &model,
            crate::backend::cpu::CpuBackend::default(),
            &mut stream,
        ),
        device => {
            let ordinal = device
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .ok_or_else(|| format!("unknown device {device:?}"))?;
            let options = crate::backend::cuda::CudaOptions {
                kernel_cache: init.kernel_cache.clone(),
                memory_budget: None,
            };
            let backend = crate::backend::cuda::CudaBackend::new(ordinal, &options)
                .map_err(|e| e.to_string())?;
            run(&init, &model, backend, &mut stream)
        }
    });
    if let Err(message) = &started {
        // Tell the supervisor why before going; it may not be listening any more.
        let _ = proto::write_frame(&mut stream, tag::ERROR, message.as_bytes());
    }
    started
}

/// Builds the engine, reports ready, then answers requests until told to stop.
fn run<B: Backend>(
    init: &WorkerInit,
    model: &crate::model::LoadedModel,
    backend: B,
    stream: &mut UnixStream,
) -> Result<(), String> {
    let block_size = crate::kv::DEFAULT_BLOCK_SIZE;
    let mut engine = Engine::new(
        backend,
        model.config.clone(),
        &model.weights,
        init.spec.kv_blocks,
        block_size,
    )
    .map_err(|e| e.to_string())?;
    let swap_min_tokens = crate::runner::arbiter::preemption_crossover(
        &mut engine,
        &init.spec,
        block_size,
        model.config.vocab_size,
        model.config.max_position_embeddings,
    );
    let disk_swap_min_tokens = match &init.disk_dir {
        Some(dir) => {
            let mut spec = init.spec.clone();
            spec.disk_dir = Some(dir.clone());
            crate::runner::tiers::enable_disk_tier(
                &mut engine,
                &spec,
                block_size,
                model.config.vocab_size,
                model.config.max_position_embeddings,
            )
        }
        None => usize::MAX,
    };
    let ready = WorkerReady {
        kv_block_bytes: engine.kv_block_bytes() as u64,
        swap_min_tokens: swap_min_tokens as u64,
        disk_swap_min_tokens: disk_swap_min_tokens as u64,
    };
    let ready = serde_json::to_vec(&ready).map_err(|e| e.to_string())?;
    proto::write_frame(stream, tag::READY, &ready).map_err(|e| e.to_string())?;
    loop {
        let frame = match proto::read_frame(stream) {
            Ok(frame) => frame,
            // The supervisor closed its end: it is gone or done with us.
            Err(ProtoError::Io(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                return Ok(())
            }
            Err(e) => return Err(e.to_string()),
        };
        if frame.tag == tag::SHUTDOWN {
            return Ok(());
        }
        let (reply_tag, reply) = answer(&mut engine, frame);
        proto::write_frame(stream, reply_tag, &reply).map_err(|e| e.to_string())?;
    }
}

/// One request against the engine, and its reply.
fn answer<B: Backend>(engine: &mut Engine<B>, frame: proto::Frame) -> (u8, Vec<u8>) {
    let error = |e: String| (tag::ERROR, e.into_bytes());
    let seq = |payload: &[u8]| proto::decode_u64(frame.tag, payload).map(SeqId);
    let done = |r: Result<(), EngineError>| match r {
        Ok(()) => (tag::OK, Vec::new()),
        Err(e) => error(e.to_string()),
    };
    match frame.tag {
        tag::ADD_SEQUENCE => (tag::SEQUENCE, proto::encode_u64(engine.add_sequence().0)),
        tag::ADD_CACHED => match proto::decode_add_cached(&frame.payload) {
            Ok((scope, tokens)) => {
                let (id, held) = engine.add_sequence_cached(&scope, &tokens);
                (
                    tag::CACHED_SEQUENCE,
                    proto::encode_cached_sequence(id.0, held as u64),
                )
            }
            Err(e) => error(e.to_string()),
        },
        tag::REMOVE_SEQUENCE => match seq(&frame.payload) {
            Ok(id) => {
                engine.remove_sequence(id);
                (tag::OK, Vec::new())
            }
            Err(e) => error(e.to_string()),
        },
        tag::SWAP_OUT => match seq(&frame.payload) {
            Ok(id) => done(engine.swap_out(id)),
            Err(e) => error(e.to_string()),
        },
        tag::SWAP_OUT_DISK => match proto::decode_swap_out_disk(&frame.payload) {
            Ok((id, encrypt, scope)) => done(engine.swap_out_to_disk(SeqId(id), &scope, encrypt)),
            Err(e) => error(e.to_string()),
        },
        tag::RESIDENT => match proto::decode_scoped_tokens(tag::RESIDENT, &frame.payload) {
            Ok((scope, tokens)) => (
                tag::RESIDENT_TOKENS,
                proto::encode_u64(engine.resident_prefix(&scope, &tokens) as u64),
            ),
            Err(e) => error(e.to_string()),
        },
        tag::SHARING => {
            let shares: Vec<(u64, u32, u32)> = engine
                .sharing()
                .into_iter()
                .map(|(id, borrowed, sharing)| {
                    let narrow = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
                    (id.0, narrow(borrowed), narrow(sharing))
                })
                .collect();
            (tag::SHARED, proto::encode_shared(&shares))
        }
        tag::COUNTERS => {
            let counted = crate::engine::ops::EngineOps::counters(engine);
            match serde_json::to_vec(&counted) {
                Ok(json) => (tag::COUNTED, json),
                Err(e) => error(e.to_string()),
            }
        }
        tag::SWAP_IN => match seq(&frame.payload) {
            Ok(id) => done(engine.swap_in(id)),
            Err(e) => error(e.to_string()),
        },
        tag::STEP => match proto::decode_step(&frame.payload) {
            Ok(items) => {
                let inputs: Vec<StepInput<'_>> = items
                    .iter()
                    .map(|i| StepInput {
                        seq: i.seq,
                        tokens: &i.tokens,
                        logits: i.logits,
                    })
                    .collect();
                match engine.step(&inputs) {
                    Ok(outputs) => (tag::STEPPED, proto::encode_stepped(&outputs)),
                    Err(e) => error(e.to_string()),
                }
            }
            Err(e) => error(e.to_string()),
        },
        other => error(format!("unknown request {other:#04x}")),
    }
}

/// Reads a worker's `Hello` and checks its version.
pub(crate) fn hello(stream: &mut (impl Read + Write)) -> Result<u32, String> {
    let payload = proto::read_frame(stream)
        .and_then(|f| f.expect(tag::HELLO))
        .map_err(|e| format!("no hello from the worker: {e}"))?;
    let (version, pid) = proto::decode_hello(&payload).map_err(|e| e.to_string())?;
    if version != proto::VERSION {
        return Err(format!(
            "the worker speaks protocol {version}, this supervisor {}; the binary was replaced under a running daemon? restart it",
            proto::VERSION
        ));
    }
    Ok(pid)
}
