//! The daemon's lifecycle: take the state-dir lock, load the policy, bind the listeners, tell
//! systemd we are ready, reload on SIGHUP, drain and stop on SIGTERM/SIGINT.
//!
//! Order matters and is deliberate: the lock is taken before the socket is touched, so a second
//! daemon can never remove the socket of a live one; the policy is validated before anything is
//! bound, so a bad policy fails the start loudly; READY=1 is sent only once every listener
//! accepts connections.

use std::sync::Arc;

use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::watch;

use crate::api::{self, server, ListenerKind};
use crate::config::DaemonConfig;
use crate::metrics::{Metrics, MetricsError};
use crate::state::DaemonState;
use crate::sys::{self, StateLock, SysError, SystemUserDb};
use crate::yaml::Problems;

/// Why the daemon could not start or stopped abnormally.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("the policy is invalid, fix it and start again: {0}")]
    Policy(Problems),
    #[error(transparent)]
    AlreadyRunning(SysError),
    #[error(transparent)]
    Sys(SysError),
    #[error("failed to listen on {what} {address}: {source}")]
    Listen {
        what: &'static str,
        address: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Metrics(#[from] MetricsError),
    #[error("a listener stopped unexpectedly; see the log above")]
    ListenerFailed,
    #[error("cannot isolate workers: {0}; fix that, or set `isolation: off` in the config to run models unisolated inside acceld")]
    Isolation(String),
    #[error("failed to install the {0} signal handler: {1}")]
    Signal(&'static str, #[source] std::io::Error),
    #[error("cannot start the API front thread: {0}")]
    Front(#[source] std::io::Error),
}

impl From<SysError> for DaemonError {
    fn from(e: SysError) -> Self {
        match e {
            SysError::Locked { .. } | SysError::SocketInUse { .. } => {
                DaemonError::AlreadyRunning(e)
            }
            other => DaemonError::Sys(other),
        }
    }
}

/// Runs the daemon until SIGTERM or SIGINT, then drains in-flight requests.
pub async fn run(config: DaemonConfig) -> Result<(), DaemonError> {
    // Everything we create (state, lock, the socket before its chmod) starts private.
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
    let _lock = StateLock::acquire(&config.state_dir)?;
    tracing::info!(state_dir = %config.state_dir.display(), "state directory locked");
    // A crashed run's disk tier files are never valid again (their keys and block tables
    // died with it); the lock above says no other daemon is using them.
    match crate::kv::disk::remove_stale_tiers(&config.kv_disk_root()) {
        Ok(0) => {}
        Ok(removed) => {
            tracing::info!(removed, dir = %config.kv_disk_root().display(), "removed a previous run's KV disk tier files")
        }
        Err(e) => {
            tracing::warn!(error = %e, dir = %config.kv_disk_root().display(), "cleaning the KV disk tier")
        }
    }

    let policy = config.policy_paths().load().map_err(DaemonError::Policy)?;
    tracing::info!(tenants = policy.tenants.len(), sources = ?policy.sources, "policy loaded");
    let devices = crate::devices::discover();
    match &devices.reason {
        Some(reason) => tracing::info!(%reason, "no GPU in use"),
        None => {
            tracing::info!(gpus = devices.devices.len(), names = ?devices.devices.iter().map(|d| &d.name).collect::<Vec<_>>(), "GPUs found")
        }
    }
    let metrics = Metrics::new()?;
    // The compute pool's threads run below the control plane's priority, so the API (health
    // checks, status, new requests) is answered promptly while every core computes.
    if let Err(e) = rayon::ThreadPoolBuilder::new()
        .thread_name(|i| format!("compute-{i}"))
        .start_handler(|_| {
            let _ = sys::lower_thread_priority(sys::COMPUTE_NICE);
        })
        .build_global()
    {
        tracing::warn!(error = %e, "the compute pool was already built; its threads keep the daemon's priority");
    }
    let sandbox = match config.isolation {
        crate::config::Isolation::Off => {
            tracing::warn!("isolation: off: models' engines run inside acceld, as root, with no cgroup or device gate; set isolation: shared to run them in isolated worker processes");
            None
        }
        crate::config::Isolation::Shared => Some(Arc::new(
            crate::worker::Sandbox::prepare(
                &config.state_dir,
                devices.devices.len(),
                &config.shared_pool,
            )
            .map_err(DaemonError::Isolation)?,
        )),
    };
    let (fleet, models) = crate::runner::Fleet::start(
        &config,
        &devices,
        Some(&metrics.sched),
        sandbox.clone(),
        Some(&policy),
    );
    if models.is_empty() {
        tracing::warn!(
            "no model could be loaded; inference requests will get 404 until one is configured"
        );
    }
    let jobs = crate::jobs::Jobs::open(&config.state_dir.join("jobs"), config.jobs.clone())
        .map_err(|e| {
            DaemonError::Sys(SysError::Io {
                action: "open the batch jobs directory",
                path: config.state_dir.join("jobs"),
                source: e,
            })
        })?;
    let state = Arc::new(
        DaemonState::new(
            config.clone(),
            policy,
            metrics,
            Box::new(SystemUserDb),
            models,
            devices,
        )
        .with_fleet(fleet)
        .with_jobs(jobs)
        .with_tokens(crate::tokens::TokenStore::open(
            &config.state_dir.join("tokens.json"),
        )),
    );
    // Unfinished jobs go on where their journals stopped; finished ones expire on a timer.
    for job in state.jobs.all() {
        crate::jobs::run::spawn(state.clone(), job);
    }
    {
        let jobs = state.jobs.clone();
        tokio::spawn(async move {
            let mut every = tokio::time::interval(crate::jobs::EXPIRY_INTERVAL);
            every.tick().await;
            loop {
                every.tick().await;
                let jobs = jobs.clone();
                let _ = tokio::task::spawn_blocking(move || jobs.expire()).await;
            }
        });
    }

    let (stop_tx, stop_rx) = watch::channel(false);
    let drain = config.drain_timeout;
    let mut servers = tokio::task::JoinSet::new();
    // Every listener's connections are served from here; their handlers stay on this runtime.
    let front = api::front::Front::start().map_err(DaemonError::Front)?;

    sys::clear_stale_socket(&config.socket)?;
    let unix =
        tokio::net::UnixListener::bind(&config.socket).map_err(|source| DaemonError::Listen {
            what: "socket",
            address: config.socket.display().to_string(),
            source,
        })?;
    let gid = match &config.socket_group {
        None => None,
        Some(group) => match sys::group_gid(group) {
            Ok(gid) => Some(gid),
            Err(e) => {
                tracing::warn!(error = %e, "socket keeps the daemon's group; only root and that group can connect");
                None
            }
        },
    };
    let mode = config.socket_mode_bits().unwrap_or(0o660);
    sys::set_socket_access(&config.socket, gid, mode)?;
    let limits = config.connection_limits();
    // Operators are told apart at accept, so the connections kept for them stay theirs.
    // Remembered per uid and gids for each policy generation, so a flood of refused
    // connections does not become a flood of user-database look-ups on the accept loop.
    let operators = state.clone();
    type Seen = std::collections::HashMap<(u32, u32, Vec<u32>), (u64, bool)>;
    let known: std::sync::Mutex<Seen> = std::sync::Mutex::default();
    let is_operator: server::IsOperator<api::PeerCred> = Arc::new(move |peer: &api::PeerCred| {
        if peer.uid == 0 {
            return true;
        }
        let generation = operators.policy().generation;
        let key = (peer.uid, peer.gid, peer.groups.to_vec());
        let mut known = known
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(&(seen, answer)) = known.get(&key) {
            if seen == generation {
                return answer;
            }
        }
        let answer = operators.is_operator(peer);
        if known.len() > 4096 {
            known.clear();
        }
        known.insert(key, (generation, answer));
        answer
    });
    let unix_served = front
        .serve(
            unix,
            api::router(state.clone(), ListenerKind::Unix),
            stop_rx.clone(),
            drain,
            limits,
            is_operator,
        )
        .map_err(DaemonError::Front)?;
    servers.spawn(async move { unix_served.await.unwrap_or(false) });
    tracing::info!(socket = %config.socket.display(), mode = format!("{mode:04o}"), "control API listening");

    for (what, address) in [
        ("tcp_listen", config.tcp_listen),
        ("metrics_listen", config.metrics_listen),
    ] {
        let Some(address) = address else { continue };
        let listener = tokio::net::TcpListener::bind(address)
            .await
            .map_err(|source| DaemonError::Listen {
                what,
                address: address.to_string(),
                source,
            })?;
        let router = if what == "tcp_listen" {
            if !address.ip().is_loopback() {
                tracing::warn!(%address, "the TCP API listens beyond loopback over plain HTTP: bearer tokens cross the network in clear; put a TLS proxy in front");
            }
            api::router(state.clone(), ListenerKind::Tcp)
        } else {
            api::metrics_router(state.clone())
        };
        // Bearer tokens are read per request: no TCP peer counts as an operator at accept.
        let served = front
            .serve(
                listener,
                router,
                stop_rx.clone(),
                drain,
                limits,
                Arc::new(|_: &server::TcpPeer| false),
            )
            .map_err(DaemonError::Front)?;
        servers.spawn(async move { served.await.unwrap_or(false) });
        tracing::info!(%address, listener = what, "TCP listener up");
    }

    let mut hangup = signal(SignalKind::hangup()).map_err(|e| DaemonError::Signal("SIGHUP", e))?;
    let mut terminate =
        signal(SignalKind::terminate()).map_err(|e| DaemonError::Signal("SIGTERM", e))?;
    let mut interrupt =
        signal(SignalKind::interrupt()).map_err(|e| DaemonError::Signal("SIGINT", e))?;

    sys::notify_systemd(&[
        sd_notify::NotifyState::Ready,
        sd_notify::NotifyState::Status("serving"),
    ]);
    tracing::info!(
        pid = std::process::id(),
        version = env!("CARGO_PKG_VERSION"),
        "acceld ready"
    );

    let (reason, failed) = loop {
        tokio::select! {
            _ = hangup.recv() => {
                tracing::info!("SIGHUP: reloading policy");
                sys::notify_systemd(&[sd_notify::NotifyState::Reloading]);
                // A rejected policy is logged by reload_policy; the old one stays in force.
                let _ = state.reload_policy(false).await;
                sys::notify_systemd(&[sd_notify::NotifyState::Ready]);
            }
            _ = terminate.recv() => break ("SIGTERM", false),
            _ = interrupt.recv() => break ("SIGINT", false),
            Some(result) = servers.join_next() => {
                // A listener's accept loop ended without being asked to: stop everything.
                tracing::error!(?result, "a listener stopped unexpectedly; shutting down");
                break ("listener failure", true);
            }
        }
    };

    tracing::info!(reason, in_flight = state.metrics.api_in_flight.get(), drain_timeout = ?drain, "stopping: no new connections, draining in-flight requests");
    sys::notify_systemd(&[sd_notify::NotifyState::Stopping]);
    state.start_draining();
    let _ = stop_tx.send(true);
    let mut drained = true;
    while let Some(result) = servers.join_next().await {
        drained &= result.unwrap_or(false);
    }
    if !drained {
        tracing::warn!(
            in_flight = state.metrics.api_in_flight.get(),
            "drain timeout reached; closed the remaining connections"
        );
    }
    if let Some(sandbox) = &sandbox {
        sandbox.close();
    }
    if let Err(e) = std::fs::remove_file(&config.socket) {
        tracing::warn!(socket = %config.socket.display(), error = %e, "could not remove socket on exit");
    }
    tracing::info!("acceld stopped");
    if failed {
        return Err(DaemonError::ListenerFailed);
    }
    Ok(())
}
