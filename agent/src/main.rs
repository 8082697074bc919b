//! `usernsguard`: node agent, controller and operator CLI.
//!
//! One binary, one subcommand per role (DESIGN.md fixes the names). Each subcommand lives
//! in its own module; this file only parses the command line and dispatches.
//!
//! `main` is synchronous on purpose: the hidden probe-payload subcommand runs inside probe
//! containers and must not start threads, and `selftest` needs none. Subcommands that talk
//! to Kubernetes build their own tokio runtime.

mod agent;
#[cfg(test)]
mod api_fixtures;
mod classify_cmd;
mod controller;
mod crd;
mod crdgen;
mod engine;
mod leader;
mod selftest_cmd;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Proves, by running real probe containers, whether `hostUsers: false` pods work on a node,
/// and publishes the verdict.
#[derive(Debug, Parser)]
#[command(name = "usernsguard", version, about, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Node agent (DaemonSet): runs the self-tests for its node and publishes the results.
    Agent(agent::AgentArgs),
    /// Cluster controller (Deployment, leader-elected): SelfTest status and RuntimeClasses.
    Controller(controller::ControllerArgs),
    /// Check this node's OCI runtimes for user-namespace compatibility (no cluster needed).
    Selftest(selftest_cmd::SelftestArgs),
    /// Print the CustomResourceDefinitions as YAML (or write one file per kind).
    Crds(crdgen::CrdsArgs),
    /// Read pod failure messages from stdin, one per line, and print one reason code per line.
    Classify(classify_cmd::ClassifyArgs),
    /// Runs inside a probe container and reports what it sees (internal).
    #[command(name = PROBE_PAYLOAD_COMMAND, hide = true)]
    ProbePayload {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::ProbePayload { args } => exit(usernsguard_runtime::probe::payload::main(&args)),
        Command::Agent(args) => report(tokio_main(agent::main(args))),
        Command::Controller(args) => report(tokio_main(controller::main(args))),
        Command::Selftest(args) => selftest_cmd::run(args),
        Command::Classify(args) => report(classify_cmd::run(&args)),
        Command::Crds(args) => report(crdgen::run(&args, &mut std::io::stdout().lock())),
    }
}

/// Runs a Kubernetes-facing subcommand on a multi-threaded tokio runtime.
fn tokio_main(fut: impl std::future::Future<Output = anyhow::Result<()>>) -> anyhow::Result<()> {
    tokio::runtime::Runtime::new()?.block_on(fut)
}

/// The hidden subcommand probe containers run: this binary is its own probe payload.
const PROBE_PAYLOAD_COMMAND: &str = "__probe-payload";

/// The payload for probe containers: the running binary, told to observe and report.
fn own_payload() -> std::io::Result<usernsguard_runtime::bundle::Payload> {
    Ok(usernsguard_runtime::bundle::Payload {
        host_path: std::env::current_exe()?,
        args: vec![PROBE_PAYLOAD_COMMAND.into()],
    })
}

fn exit(code: i32) -> ExitCode {
    ExitCode::from(u8::try_from(code).unwrap_or(1))
}

/// The binary's edge: an error is printed with its whole cause chain, and exits 1.
fn report(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("usernsguard: {e:#}");
            ExitCode::from(1)
        }
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
