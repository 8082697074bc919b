//! `usernsguard`: node agent, controller and operator CLI.

use clap::{Parser, Subcommand};

mod agent;
#[cfg(test)]
mod api_fixtures;
mod controller;
mod crd;
mod crdgen;
mod leader;

#[derive(Debug, Parser)]
#[command(name = "usernsguard", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print the CustomResourceDefinitions as YAML (or write one file per kind).
    Crds(crdgen::CrdsArgs),
    /// Node agent (DaemonSet): runs the self-tests for its node and publishes the results.
    Agent(agent::AgentArgs),
    /// Cluster controller (Deployment, leader-elected): SelfTest status and RuntimeClasses.
    Controller(controller::ControllerArgs),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Crds(args) => crdgen::run(&args, &mut std::io::stdout().lock()),
        Command::Agent(args) => tokio::runtime::Runtime::new()?.block_on(agent::main(args)),
        Command::Controller(args) => tokio::runtime::Runtime::new()?.block_on(controller::main(args)),
    }
}

/// Logs to stderr, filtered by `RUST_LOG` (default `info`).
fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}
