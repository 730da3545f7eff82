//! `acceld`: parses arguments, sets up logging, loads the config and runs the daemon library.
//! Exit codes are decided here and only here.

use std::path::PathBuf;
use std::process::ExitCode;

use accel_runtime::config::{DaemonConfig, LogFormat};
use accel_runtime::daemon::{self, DaemonError};
use clap::Parser;

/// The accel node daemon: serves tenants' inference on this node's accelerators.
#[derive(Debug, Parser)]
#[command(name = "acceld", version)]
struct Args {
    /// Daemon config file (YAML). Without it, /etc/accel/acceld.yaml is used if present, else the built-in defaults.
    #[arg(long, short = 'c', env = "ACCELD_CONFIG")]
    config: Option<PathBuf>,
    /// Validate the config and the tenant policy it points to, print every problem, and exit.
    #[arg(long)]
    check_config: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// A model's worker process; started by acceld itself, with its socket at descriptor 3.
    #[command(hide = true)]
    Worker,
    /// A chat-template renderer; started by acceld itself, with its socket at descriptor 3.
    #[command(hide = true)]
    Render,
}

/// Exit codes, after sysexits(3), so systemd and scripts can tell failures apart.
mod exit {
    pub const OK: u8 = 0;
    /// Something failed at run time (I/O, a listener).
    pub const SOFTWARE: u8 = 70;
    /// Another daemon holds the state dir or the socket.
    pub const UNAVAILABLE: u8 = 69;
    /// An operating-system call failed (permissions, missing directories).
    pub const OSERR: u8 = 71;
    /// The config or policy is invalid.
    pub const CONFIG: u8 = 78;
}

fn init_logging(config: &DaemonConfig) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&config.log.level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match config.log.format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Human => builder.init(),
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    if let Some(Command::Render) = args.command {
        return match accel_runtime::worker::render::main() {
            Ok(()) => ExitCode::from(exit::OK),
            Err(e) => {
                eprintln!("acceld render: {e}");
                ExitCode::from(exit::SOFTWARE)
            }
        };
    }
    if let Some(Command::Worker) = args.command {
        tracing_subscriber::fmt()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_default_env()
                    .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
            )
            .with_writer(std::io::stderr)
            .init();
        return match accel_runtime::worker::main() {
            Ok(()) => ExitCode::from(exit::OK),
            Err(e) => {
                eprintln!("acceld worker: {e}");
                ExitCode::from(exit::SOFTWARE)
            }
        };
    }
    let config = match DaemonConfig::load(args.config.as_deref()) {
        Ok(config) => config,
        Err(problems) => {
            eprintln!("acceld: invalid config: {problems}");
            return ExitCode::from(exit::CONFIG);
        }
    };

    if args.check_config {
        return match config.policy_paths().load() {
            Ok(policy) => {
                println!(
                    "config ok; policy ok: {} tenant(s) from {}",
                    policy.tenants.len(),
                    policy.sources.join(", ")
                );
                ExitCode::from(exit::OK)
            }
            Err(problems) => {
                eprintln!("acceld: invalid policy: {problems}");
                ExitCode::from(exit::CONFIG)
            }
        };
    }

    init_logging(&config);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("acceld: cannot start the async runtime: {e}");
            return ExitCode::from(exit::OSERR);
        }
    };
    match runtime.block_on(daemon::run(config)) {
        Ok(()) => ExitCode::from(exit::OK),
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("acceld: {e}");
            ExitCode::from(match e {
                DaemonError::Policy(_) => exit::CONFIG,
                DaemonError::AlreadyRunning(_) => exit::UNAVAILABLE,
                DaemonError::Sys(_)
                | DaemonError::Signal(..)
                | DaemonError::Front(_)
                | DaemonError::Isolation(_) => exit::OSERR,
                DaemonError::Listen { .. }
                | DaemonError::Metrics(_)
                | DaemonError::ListenerFailed => exit::SOFTWARE,
            })
        }
    }
}
