//! One module per `accelctl` subcommand.

pub mod metrics;
pub mod policy;
pub mod status;
pub mod tenants;
pub mod whoami;
