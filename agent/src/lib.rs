//! Library half of the `usernsguard` binary: the pieces the subcommands wire together,
//! kept in a library so integration tests and benchmarks use them as `main.rs` does.

pub mod health;
pub mod metrics;
pub mod server;
pub mod watch;

#[cfg(test)]
mod fixtures;
