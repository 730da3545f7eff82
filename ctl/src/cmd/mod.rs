//! One module per `accelctl` subcommand.

pub mod bench;
pub mod devices;
pub mod drain;
pub mod generate;
pub mod jobs;
pub mod memory;
pub mod metrics;
pub mod models;
pub mod policy;
pub mod queue;
pub mod requests;
pub mod status;
pub mod tenants;
pub mod tokens;
pub mod top;
pub mod whoami;
pub mod workers;
