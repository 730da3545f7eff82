//! `accelctl`: the admin command line of acceld. It only talks to the daemon (and validates
//! policy files locally); exit codes are decided here.

mod client;
mod cmd;
#[cfg(test)]
mod docgen;
mod output;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use hyper::StatusCode;

use crate::client::{Client, CtlError};
use crate::cmd::policy::PolicyCommand;
use crate::cmd::tenants::TenantsCommand;

/// Control and inspect the accel daemon (acceld).
#[derive(Debug, Parser)]
#[command(name = "accelctl", version)]
struct Cli {
    /// Path of the daemon's control socket.
    #[arg(
        long,
        global = true,
        env = "ACCEL_SOCKET",
        default_value = "/run/accel/acceld.sock"
    )]
    socket: PathBuf,
    /// Act for this tenant (operators only).
    #[arg(long, global = true, value_name = "NAME")]
    tenant: Option<String>,
    /// Print machine-readable JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Show the daemon's version, state, backend, policy and listeners.
    Status,
    /// Show how the daemon identifies you: operator or which tenant, and by which rule.
    Whoami,
    /// List or show tenants.
    #[command(subcommand)]
    Tenants(TenantsCommand),
    /// Check policy files or reload the daemon's policy.
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// Print the daemon's Prometheus metrics (operators only).
    Metrics,
    /// List the models you may use; load and unload models while the daemon runs (operators).
    Models {
        #[command(subcommand)]
        command: Option<cmd::models::ModelsCommand>,
    },
    /// List the GPUs the daemon found (name, UUID, memory, compute capability).
    Devices,
    /// Show each device's scheduler: per tenant, waiting, running, swapped, KV blocks, counter.
    Queue,
    /// Show each device's KV memory by tier (device, host, disk): per model used and free, per
    /// tenant the blocks it holds.
    Memory,
    /// Live view of each device's scheduler: per tenant share, tokens/s, queue, KV blocks.
    Top(cmd::top::TopArgs),
    /// List the models' worker processes: pid, user, restarts, memory, CPU, device denials (operators only).
    Workers,
    /// List the generation requests in flight (tenant, model, age, tokens so far), or cancel one.
    Requests {
        #[command(subcommand)]
        command: Option<cmd::requests::RequestsCommand>,
    },
    /// Stop taking new requests and jobs (503 with Retry-After) while in-flight ones finish (operators only).
    Drain {
        /// Wait up to this many seconds for in-flight requests to finish.
        #[arg(long, value_name = "SECONDS")]
        wait: Option<u64>,
    },
    /// Take new requests again after a drain (operators only).
    Undrain,
    /// Create, list and revoke bearer tokens for the TCP listener (operators only).
    #[command(subcommand)]
    Tokens(cmd::tokens::TokensCommand),
    /// Replay a workload against the daemon and report per tenant requests/s, tokens/s, time to first token and inter-token latency.
    Bench(cmd::bench::BenchArgs),
    /// Submit, follow, cancel and read batch jobs.
    #[command(subcommand)]
    Jobs(cmd::jobs::JobsCommand),
    /// Complete a prompt, streaming the text as it is generated.
    Generate {
        /// The prompt.
        prompt: String,
        #[command(flatten)]
        options: cmd::generate::GenerationArgs,
    },
    /// Send one chat message, streaming the answer as it is generated.
    Chat {
        /// Your message.
        message: String,
        /// A system prompt to put first.
        #[arg(long)]
        system: Option<String>,
        #[command(flatten)]
        options: cmd::generate::GenerationArgs,
    },
}

/// Exit codes: scripts can tell "daemon down" from "not allowed" from "bad input".
mod exit {
    /// The daemon answered with an error not covered below.
    pub const FAILURE: u8 = 1;
    /// The command line is wrong (clap uses the same code for parse errors).
    pub const USAGE: u8 = 2;
    /// The daemon is not running or not reachable.
    pub const UNREACHABLE: u8 = 3;
    /// Not allowed: socket permissions, unknown caller, operators-only command.
    pub const DENIED: u8 = 4;
    /// Invalid input: a bad policy, a malformed or oversized request.
    pub const INVALID: u8 = 5;
    /// No such tenant or endpoint.
    pub const NOT_FOUND: u8 = 6;
}

fn exit_code(error: &CtlError) -> u8 {
    match error {
        CtlError::NotRunning { .. } => exit::UNREACHABLE,
        CtlError::SocketDenied { .. } => exit::DENIED,
        CtlError::InvalidPolicy(_) => exit::INVALID,
        CtlError::Api { status, .. } => match *status {
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => exit::DENIED,
            StatusCode::CONFLICT => exit::INVALID,
            StatusCode::NOT_FOUND => exit::NOT_FOUND,
            StatusCode::BAD_REQUEST
            | StatusCode::PAYLOAD_TOO_LARGE
            | StatusCode::UNPROCESSABLE_ENTITY => exit::INVALID,
            _ => exit::FAILURE,
        },
        CtlError::Usage(_) => exit::USAGE,
        CtlError::Other(_) => exit::FAILURE,
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("accelctl: cannot start: {e}");
            return ExitCode::from(exit::FAILURE);
        }
    };
    let client = Client {
        socket: cli.socket.clone(),
        tenant: cli.tenant.clone(),
    };
    let json = cli.json;
    let result = runtime.block_on(async {
        match &cli.command {
            Command::Status => cmd::status::run(&client, json).await,
            Command::Whoami => cmd::whoami::run(&client, json).await,
            Command::Tenants(command) => cmd::tenants::run(&client, command, json).await,
            Command::Policy(command) => cmd::policy::run(&client, command, json).await,
            Command::Metrics => cmd::metrics::run(&client, json).await,
            Command::Models { command } => cmd::models::run(&client, command.as_ref(), json).await,
            Command::Devices => cmd::devices::run(&client, json).await,
            Command::Queue => cmd::queue::run(&client, json).await,
            Command::Memory => cmd::memory::run(&client, json).await,
            Command::Top(args) => cmd::top::run(&client, args, json).await,
            Command::Workers => cmd::workers::run(&client, json).await,
            Command::Requests { command } => {
                cmd::requests::run(&client, command.as_ref(), json).await
            }
            Command::Drain { wait } => {
                cmd::drain::run(
                    &client,
                    true,
                    wait.map(std::time::Duration::from_secs),
                    json,
                )
                .await
            }
            Command::Undrain => cmd::drain::run(&client, false, None, json).await,
            Command::Tokens(command) => cmd::tokens::run(&client, command, json).await,
            Command::Bench(args) => cmd::bench::run(&client, args, json).await,
            Command::Jobs(command) => cmd::jobs::run(&client, command, json).await,
            Command::Generate { prompt, options } => {
                cmd::generate::generate(&client, prompt, options, json).await
            }
            Command::Chat {
                message,
                system,
                options,
            } => cmd::generate::chat(&client, message, system.as_deref(), options, json).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("accelctl: {error}");
            ExitCode::from(exit_code(&error))
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory as _;

    #[test]
    fn cli_definition_is_consistent() {
        super::Cli::command().debug_assert();
    }
}
