//! `usernsguard`: node agent, controller and operator CLI.

use clap::{Parser, Subcommand};

#[allow(dead_code)] // wired into `usernsguard agent` by a later commit
mod agent;
#[allow(dead_code)] // wired into `usernsguard controller` by a later commit
mod controller;
mod crd;
mod crdgen;
#[cfg(test)]
mod fixtures;
#[allow(dead_code)] // wired into `usernsguard controller` by a later commit
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
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Crds(args) => crdgen::run(&args, &mut std::io::stdout().lock()),
    }
}
