//! `usernsguard install` and `usernsguard uninstall`: register an OCI runtime with the
//! node's CRI runtime (containerd, k3s/rke2, CRI-O), or take it out again, on any host.
//!
//! Exit codes: 0 done or nothing to do, 1 failed and rolled back (2 never follows a
//! change), 2 bad usage or bad input, nothing changed. A rollback that fails too also exits
//! 1 and says so on stderr.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, ValueEnum};
use usernsguard_runtime::host::HostRoot;
use usernsguard_runtime::install::systemd::SystemdBus;
use usernsguard_runtime::install::{
    BinarySource, ErrorClass, InstallError, InstallRequest, Installer, Outcome, Plan, RestartMode,
    RestartReport, Timeouts, UninstallRequest,
};

use super::selftest::parse_duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Restart {
    /// Restart the CRI runtime's unit through systemd's private socket, then check the handler.
    Systemd,
    /// Do not restart; the operator restarts the CRI runtime.
    None,
}

/// How the CRI runtime is reached and restarted (both subcommands).
#[derive(Debug, Args)]
pub struct CriArgs {
    /// The CRI runtime's config (a host path): containerd's config.toml (k3s/rke2: the
    /// rendered config.toml under /var/lib/rancher/*/agent/etc/containerd) or crio.conf.
    #[arg(long, value_name = "FILE")]
    cri_config: PathBuf,
    /// How the CRI runtime is restarted when its config changed.
    #[arg(long, value_enum, default_value_t = Restart::Systemd)]
    restart: Restart,
    /// The systemd unit to restart. Default: containerd.service, k3s.service or
    /// k3s-agent.service, rke2-server.service or rke2-agent.service, crio.service.
    #[arg(long, value_name = "NAME")]
    unit: Option<String>,
    /// The CRI socket (a host path) checked after the restart. Default: the config's.
    #[arg(long, value_name = "SOCK")]
    cri_socket: Option<PathBuf>,
    /// Where this process sees the host's root filesystem; every path above is under it.
    #[arg(long, default_value = "/", value_name = "DIR")]
    host_root: PathBuf,
    /// How long the CRI runtime may take to list the handler after the restart.
    #[arg(long, default_value = "60s", value_parser = parse_duration, value_name = "DURATION")]
    cri_timeout: Duration,
}

#[derive(Debug, Args)]
pub struct InstallArgs {
    /// The runtime handler name RuntimeClasses will use.
    #[arg(long, value_name = "H")]
    handler: String,
    /// The runtime binary, a file this process reads (e.g. shipped in the agent's image).
    /// If it already is the file at --install-path on the host, it is registered in place.
    #[arg(long, value_name = "PATH")]
    runtime_binary: PathBuf,
    /// Where the binary goes on the host. Default: /usr/local/lib/usernsguard/H/<its file name>.
    #[arg(long, value_name = "PATH")]
    install_path: Option<PathBuf>,
    /// The binary's expected sha256 (64 hex digits); without it, its hash is recorded.
    #[arg(long, value_name = "HEX")]
    sha256: Option<String>,
    #[command(flatten)]
    cri: CriArgs,
    /// Print a unified diff of every host file it would change and whether it would
    /// restart; change nothing.
    #[arg(long)]
    dry_run: bool,
}

#[derive(Debug, Args)]
pub struct UninstallArgs {
    /// The runtime handler `usernsguard install` registered.
    #[arg(long, value_name = "H")]
    handler: String,
    #[command(flatten)]
    cri: CriArgs,
    /// Print what it would change; change nothing.
    #[arg(long)]
    dry_run: bool,
}

impl CriArgs {
    fn host(&self) -> Result<HostRoot, String> {
        if self.host_root == Path::new("/") {
            Ok(HostRoot::own())
        } else {
            HostRoot::at(&self.host_root).map_err(|e| e.to_string())
        }
    }

    fn restart_mode(&self) -> RestartMode {
        match self.restart {
            Restart::Systemd => RestartMode::Systemd {
                unit: self.unit.clone(),
            },
            Restart::None => RestartMode::None,
        }
    }
}

/// The binary source: in place when the file given is the host's file at the install path.
fn source(host: &HostRoot, args: &InstallArgs) -> BinarySource {
    if let Some(target) = &args.install_path {
        let same = |a: &Path, b: &Path| match (std::fs::metadata(a), std::fs::metadata(b)) {
            (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
            _ => false,
        };
        if same(&args.runtime_binary, &host.path(target)) {
            return BinarySource::Host(target.clone());
        }
    }
    BinarySource::Local(args.runtime_binary.clone())
}

fn fail(cmd: &str, e: &InstallError) -> ExitCode {
    match e.class() {
        ErrorClass::BadInput => {
            eprintln!("usernsguard {cmd}: {e}\nnothing was changed");
            ExitCode::from(2)
        }
        ErrorClass::RolledBack | ErrorClass::RollbackFailed => {
            eprintln!("usernsguard {cmd}: failed: {e}");
            ExitCode::from(1)
        }
    }
}

fn print_plan(plan: &Plan) {
    print!("{}", plan.diff());
    for n in &plan.notes {
        println!("note: {n}");
    }
    if plan.is_noop() {
        println!("nothing to do: the host is already as asked");
    } else {
        println!("would {}", plan.restart_summary());
    }
}

fn print_outcome(what: &str, o: &Outcome) {
    for n in &o.notes {
        println!("note: {n}");
    }
    if o.unchanged() {
        println!("nothing to do: {} is {what} as asked", o.handler);
        return;
    }
    if o.recovered {
        println!("rolled back an interrupted earlier run first");
    }
    if let Some(b) = &o.binary {
        match &o.binary_version {
            Some(v) => println!("{b} ({v})"),
            None => println!("{b}"),
        }
    }
    for f in &o.changed {
        println!("changed {}", f.display());
    }
    match &o.restart {
        RestartReport::NotNeeded => println!("no restart needed"),
        RestartReport::Operator { units } => println!(
            "restart mode none: restart {} for the change to take effect",
            units.join(" or ")
        ),
        RestartReport::Restarted(r) => println!(
            "{r} (ActiveEnterTimestamp {} µs)",
            r.after.active_enter_timestamp_us
        ),
    }
    if let Some(live) = &o.live {
        println!("{live}");
    }
    println!("{} {what}", o.handler);
}

fn run_with<T>(
    cmd: &str,
    cri: &CriArgs,
    f: impl FnOnce(&mut Installer<'_>) -> Result<T, InstallError>,
) -> Result<T, ExitCode> {
    let host = cri.host().map_err(|e| {
        eprintln!("usernsguard {cmd}: {e}");
        ExitCode::from(2)
    })?;
    let mut bus = SystemdBus::for_host_root(host.root());
    let timeouts = Timeouts {
        cri: cri.cri_timeout,
        ..Timeouts::default()
    };
    let mut installer = Installer::new(host).with_timeouts(timeouts);
    if cri.restart == Restart::Systemd {
        installer = installer.with_service_manager(&mut bus);
    }
    f(&mut installer).map_err(|e| fail(cmd, &e))
}

/// `usernsguard install`.
pub fn install(args: InstallArgs) -> ExitCode {
    let host = match args.cri.host() {
        Ok(h) => h,
        Err(e) => {
            eprintln!("usernsguard install: {e}");
            return ExitCode::from(2);
        }
    };
    let req = InstallRequest {
        handler: args.handler.clone(),
        binary: source(&host, &args),
        install_path: args.install_path.clone(),
        sha256: args.sha256.clone(),
        cri_config: args.cri.cri_config.clone(),
        restart: args.cri.restart_mode(),
        cri_socket: args.cri.cri_socket.clone(),
    };
    let dry = args.dry_run;
    match run_with("install", &args.cri, |i| {
        if dry {
            i.plan_install(&req).map(|p| print_plan(&p))
        } else {
            i.install(&req).map(|o| print_outcome("installed", &o))
        }
    }) {
        Ok(()) => ExitCode::SUCCESS,
        Err(code) => code,
    }
}

/// `usernsguard uninstall`.
pub fn uninstall(args: UninstallArgs) -> ExitCode {
    let req = UninstallRequest {
        handler: args.handler.clone(),
        cri_config: args.cri.cri_config.clone(),
        restart: args.cri.restart_mode(),
        cri_socket: args.cri.cri_socket.clone(),
    };
    let dry = args.dry_run;
    match run_with("uninstall", &args.cri, |i| {
        if dry {
            i.plan_uninstall(&req).map(|p| print_plan(&p))
        } else {
            i.uninstall(&req).map(|o| print_outcome("uninstalled", &o))
        }
    }) {
        Ok(()) => ExitCode::SUCCESS,
        Err(code) => code,
    }
}
