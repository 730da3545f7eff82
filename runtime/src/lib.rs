//! accel's node daemon, `acceld`, as a library: the binary only parses arguments, sets up
//! logging and calls [`daemon::run`].
//!
//! Subsystems, one module each:
//! - [`config`]: the daemon's own settings (socket, state dir, listeners, logging);
//! - [`policy`]: tenants, caller-to-tenant mapping, limits; validated YAML;
//! - [`api`]: HTTP/JSON control API over the Unix socket (and TCP), authentication;
//! - [`metrics`]: Prometheus families and exposition;
//! - [`state`]: what a running daemon shares between listeners (the policy in force);
//! - [`daemon`]: lifecycle, signals, drain;
//! - [`jobs`]: batch jobs, their journals, and the runner that answers their lines;
//! - [`cgroup`]: tenant cgroups and the limits the kernel enforces on workers;
//! - [`gate`]: the eBPF device gate on each worker's cgroup;
//! - [`requests`]: generation requests in flight, for operators to see and cancel;
//! - [`tokens`]: bearer tokens created at run time for the TCP listener;
//! - [`served`]: the models served, and operators' loads and unloads while the daemon runs;
//! - [`sys`]: every raw host interface (locks, socket files, NSS, peer groups, systemd);
//! - [`model`]: model files (Hugging Face folders, GGUF) to a validated config and weights;
//! - [`tokenizer`], [`chat`]: tokenizers for both formats, chat templates;
//! - [`devices`]: the GPUs on this node (CUDA driver loaded at run time);
//! - [`backend`]: the op interface of the forward pass, and the CPU backend;
//! - [`kv`]: the paged KV cache's blocks and block tables (pure);
//! - [`sched`]: the per-device scheduler: step plans, policies, quotas, preemption (pure);
//! - [`engine`]: the batched forward pass over a backend, and sampling;
//! - [`worker`]: engines in worker processes, and the protocol that drives them;
//! - [`yaml`], [`units`]: file parsing with positions, sizes and durations.

pub mod api;
pub mod backend;
pub mod cgroup;
pub mod chat;
pub mod config;
pub mod daemon;
pub mod devices;
pub mod engine;
pub mod gate;
pub mod guide;
pub mod jobs;
pub mod kv;
pub mod metrics;
pub mod model;
pub mod policy;
pub mod requests;
pub mod runner;
pub mod sched;
pub mod served;
pub mod state;
pub mod sys;
pub mod tokenizer;
pub mod tokens;
pub mod units;
pub mod worker;
pub mod yaml;
