//! `usernsguard`: node agent, controller and operator CLI.
//!
//! One binary, one subcommand per role (DESIGN.md fixes the names). Each subcommand lives
//! in its own module; this file only parses the command line and dispatches.

mod classify_cmd;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "usernsguard",
    version,
    about = "User-namespace compatibility guard for Kubernetes nodes"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Read pod failure messages from stdin, one per line, and print one reason code per line.
    Classify(classify_cmd::ClassifyArgs),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Classify(args) => classify_cmd::run(&args),
    }
}
