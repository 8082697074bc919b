//! `usernsguard`: node agent, controller and operator CLI.
//!
//! One binary, one subcommand per role (DESIGN.md fixes the names). This file only parses the
//! command line and dispatches to `usernsguard_agent::cmd`.
//!
//! `main` is synchronous on purpose: the hidden probe-payload subcommand runs inside probe
//! containers and must not start threads, and `selftest` needs none. Subcommands that talk
//! to Kubernetes get a tokio runtime here.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use usernsguard_agent::cmd;
use usernsguard_agent::payload::PROBE_PAYLOAD_COMMAND;

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
    Agent(cmd::agent::AgentArgs),
    /// Cluster controller (Deployment, leader-elected): SelfTest and RuntimeProfile status,
    /// RuntimeClasses, uninstall finalizers; `--uninstall-all` for the chart's pre-delete hook.
    Controller(cmd::controller::ControllerArgs),
    /// Check this node's OCI runtimes for user-namespace compatibility (no cluster needed).
    Selftest(cmd::selftest::SelftestArgs),
    /// Print the CustomResourceDefinitions as YAML (or write one file per kind).
    Crds(cmd::crds::CrdsArgs),
    /// Install an OCI runtime and register it as a handler with containerd or CRI-O.
    Install(cmd::install::InstallArgs),
    /// Take a handler `install` registered back out, restoring the host's files exactly.
    Uninstall(cmd::install::UninstallArgs),
    /// Read pod failure messages from stdin, one per line, and print one reason code per line.
    Classify(cmd::classify::ClassifyArgs),
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
        Command::Agent(args) => report(tokio_main(cmd::agent::main(args))),
        Command::Controller(args) => report(tokio_main(cmd::controller::main(args))),
        Command::Selftest(args) => cmd::selftest::run(args),
        Command::Classify(args) => report(cmd::classify::run(&args)),
        Command::Install(args) => cmd::install::install(args),
        Command::Uninstall(args) => cmd::install::uninstall(args),
        Command::Crds(args) => report(cmd::crds::run(&args, &mut std::io::stdout().lock())),
    }
}

/// Runs a Kubernetes-facing subcommand on a multi-threaded tokio runtime.
fn tokio_main(fut: impl std::future::Future<Output = anyhow::Result<()>>) -> anyhow::Result<()> {
    tokio::runtime::Runtime::new()?.block_on(fut)
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
