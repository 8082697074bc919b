//! `usernsguard selftest`: the self-test engine from the command line, for an operator on a
//! node or a plain containerd host. Exit codes: 0 every handler passed, 1 a handler did not
//! pass, 2 bad usage or nothing could be probed.

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, ValueEnum};
use usernsguard_runtime::cri_config;
use usernsguard_runtime::discover::RuntimeHandler;
use usernsguard_runtime::host::{HostRoot, SERVICE_PATH};
use usernsguard_runtime::selftest::{self, CriSetup, SelfTestConfig};
use usernsguard_runtime::{Check, CheckOutcome, SelfTestReport, SelinuxFacts, Verdict};

use crate::payload::image_command;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Table,
    Json,
}

#[derive(Debug, Args)]
pub struct SelftestArgs {
    /// Runtime handler to test, as NAME=PATH (repeatable; PATH on the host). Default: the
    /// handlers --cri-config registers, else runc and crun found on the host's PATH.
    #[arg(long = "runtime", value_name = "NAME=PATH", value_parser = parse_handler)]
    runtimes: Vec<RuntimeHandler>,
    /// The containerd or CRI-O configuration file (a path on the host) whose runtime handlers
    /// to test, exactly as the agent finds them; enables the CRI checks against its socket.
    #[arg(long, value_name = "FILE", conflicts_with = "runtimes")]
    cri_config: Option<PathBuf>,
    /// The CRI runtime's socket (a path on the host), for the cri-advertised and cri-pod
    /// checks. Default: the one --cri-config names, or its CRI runtime's default.
    #[arg(long, value_name = "SOCK")]
    cri_socket: Option<PathBuf>,
    /// Where this process sees the host's root filesystem (in a container: the hostPath
    /// mount of /); every host path (runtimes, configs, work dir, sockets) is under it.
    #[arg(long, default_value = "/", value_name = "DIR")]
    host_root: PathBuf,
    /// An image already on the node holding this binary at /usr/local/bin/usernsguard, for
    /// the cri-pod check (the agent passes its own image). Without it cri-pod is skipped.
    #[arg(long, value_name = "REF")]
    probe_image: Option<String>,
    /// Check to run (repeatable). Default: all of userns-created, userns-joined, idmap-mount,
    /// features, cri-advertised, cri-pod.
    #[arg(long = "check", value_name = "CHECK", value_parser = parse_check)]
    checks: Vec<Check>,
    /// Per-probe timeout (e.g. 10s, 1500ms, 1m); a runtime that hangs is killed after it.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    timeout: Duration,
    /// Output format.
    #[arg(long, short, value_enum, default_value_t = Output::Table)]
    output: Output,
    /// Directory for probe bundles and runtime state (a path on the host); emptied after
    /// every run.
    #[arg(long, default_value = "/run/usernsguard", value_name = "DIR")]
    work_dir: PathBuf,
    /// First host uid/gid of the 65536 ids the probes map.
    #[arg(long, default_value_t = 0x7000_0000, value_name = "ID")]
    id_base: u32,
    /// Treat SELinux as enforcing with this container mount label instead of detecting it
    /// (for nodes whose container-selinux policy uses a non-standard label).
    #[arg(long, value_name = "LABEL")]
    selinux_mount_label: Option<String>,
    /// Keep running: serve /metrics, /healthz and /readyz on ADDR (default 0.0.0.0:9464) and
    /// repeat the self-test every --interval, so a host without Kubernetes is monitored too.
    #[arg(long, value_name = "ADDR", num_args = 0..=1, default_missing_value = crate::http::DEFAULT_ADDR)]
    serve: Option<SocketAddr>,
    /// Time between self-test runs with --serve.
    #[arg(long, default_value = "5m", value_parser = parse_duration)]
    interval: Duration,
}

fn parse_handler(s: &str) -> Result<RuntimeHandler, String> {
    RuntimeHandler::parse(s).map_err(|e| e.to_string())
}

fn parse_check(s: &str) -> Result<Check, String> {
    s.parse::<Check>().map_err(|e| e.to_string())
}

/// Durations as Kubernetes and operators write them: `10s`, `1m30s`, `500ms`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s)
        .map_err(|e| format!("invalid duration {s:?}: {e} (expected e.g. 10s, 1m30s, 500ms)"))?;
    if d.is_zero() {
        return Err(format!("invalid duration {s:?}: must be greater than zero"));
    }
    Ok(d)
}

impl SelftestArgs {
    /// The handlers to test, the CRI runtime the CRI checks use, and why there is none.
    fn handlers(&self, host: &HostRoot) -> Result<(Vec<RuntimeHandler>, Option<CriSetup>, String), String> {
        if let Some(file) = &self.cri_config {
            let config = cri_config::read_file(host, file).map_err(|e| e.to_string())?;
            let handlers = config.resolve(host);
            let socket = self.cri_socket.clone().unwrap_or_else(|| config.socket());
            let setup = self.cri_setup(socket, Some(config));
            return Ok((handlers, Some(setup), String::new()));
        }
        let setup = self.cri_socket.clone().map(|s| self.cri_setup(s, None));
        let no_cri = match usernsguard_runtime::cri::detect_socket(host) {
            Some(found) => format!(
                "the handlers were not read from a CRI configuration; pass --cri-config to check what the kubelet gets (a CRI socket is at {})",
                found.display()
            ),
            None => "no CRI runtime given (--cri-config or --cri-socket) or found on this host".into(),
        };
        if !self.runtimes.is_empty() {
            return Ok((self.runtimes.clone(), setup, no_cri));
        }
        let found: Vec<_> = ["runc", "crun"]
            .into_iter()
            .filter_map(|name| {
                host.find_on_path(name, SERVICE_PATH)
                    .map(|p| RuntimeHandler::new(name, p))
            })
            .collect();
        if found.is_empty() {
            return Err(
                "no runtime to test: neither runc nor crun is on PATH; pass --runtime NAME=PATH or --cri-config FILE"
                    .into(),
            );
        }
        Ok((found, setup, no_cri))
    }

    fn cri_setup(&self, socket: PathBuf, config: Option<cri_config::CriConfig>) -> CriSetup {
        CriSetup {
            socket,
            config,
            probe_image: self.probe_image.clone(),
            image_command: image_command(),
        }
    }

    pub fn config(&self) -> Result<SelfTestConfig, String> {
        if self.checks == [Check::Features] {
            return Err(
                "the features check compares the runtime's claims with the probes' observations: select at least one of userns-created, userns-joined, idmap-mount with it".into(),
            );
        }
        let host = if self.host_root == Path::new("/") {
            HostRoot::own()
        } else {
            HostRoot::at(&self.host_root).map_err(|e| e.to_string())?
        };
        let payload = crate::payload::own_payload()
            .map_err(|e| format!("cannot locate the usernsguard binary: {e}"))?;
        let (handlers, cri, no_cri) = self.handlers(&host)?;
        let mut config = SelfTestConfig::new(handlers, payload);
        config.checks = self.checks.clone();
        config.timeout = self.timeout;
        config.work_dir = self.work_dir.clone();
        config.id_base = self.id_base;
        config.selinux = self.selinux_mount_label.clone().map(SelinuxFacts::enforcing);
        config.host = host;
        config.cri = cri;
        config.no_cri = no_cri;
        Ok(config)
    }
}

pub fn run(args: SelftestArgs) -> ExitCode {
    if let Some(addr) = args.serve {
        return serve(&args, addr);
    }
    let report = match args
        .config()
        .and_then(|c| selftest::run(&c).map_err(|e| e.to_string()))
    {
        Ok(report) => report,
        Err(message) => {
            eprintln!("usernsguard selftest: {message}");
            return ExitCode::from(2);
        }
    };
    let text = match args.output {
        Output::Json => serde_json::to_string_pretty(&report).expect("report serializes") + "\n",
        Output::Table => render_table(&report),
    };
    let mut stdout = std::io::stdout().lock();
    if stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
        .is_err()
    {
        return ExitCode::from(2);
    }
    exit_code(&report)
}

/// `selftest --serve`: the same engine, re-run every `--interval`, published as metrics.
fn serve(args: &SelftestArgs, addr: SocketAddr) -> ExitCode {
    let config = match args.config() {
        Ok(c) => c,
        Err(message) => {
            eprintln!("usernsguard selftest: {message}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("usernsguard selftest: cannot start the async runtime: {e}");
            return ExitCode::from(2);
        }
    };
    let run = move || selftest::run(&config);
    match runtime.block_on(crate::http::run_selftest_server(addr, args.interval, run)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("usernsguard selftest: {e:#}");
            ExitCode::from(2)
        }
    }
}

pub fn exit_code(report: &SelfTestReport) -> ExitCode {
    if report.all_pass() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

/// The at-a-glance view: node facts, the CRI runtime, one row per handler and check, then
/// each handler's verdict with the fix for every failure, error and warning.
pub fn render_table(report: &SelfTestReport) -> String {
    let node = &report.node;
    let mut out = format!(
        "node: kernel {}, SELinux {}{}, cgroup {}, user.max_user_namespaces {}\n",
        node.kernel,
        node.selinux.mode.as_str(),
        node.selinux
            .mount_label
            .as_deref()
            .map(|l| format!(" (mount label {l})"))
            .unwrap_or_default(),
        node.cgroup.as_str(),
        node.max_user_namespaces
            .map_or("unknown".into(), |n| n.to_string()),
    );
    for fs in &node.idmap_filesystems {
        out.push_str(&format!("idmap: {} on {}: {}\n", fs.path, fs.fs_type, fs.note));
    }
    if let Some(cri) = &report.cri {
        out.push_str(&format!(
            "cri: {} {} at {}{}, SELinux labels {}\n",
            cri.runtime,
            cri.version,
            cri.socket,
            cri.config
                .as_deref()
                .map(|c| format!(" (config {c})"))
                .unwrap_or_default(),
            if cri.selinux_labels { "on" } else { "off" }
        ));
    }
    if let Some(problem) = &report.problem {
        out.push_str(&format!("problem: {problem}\n"));
    }
    out.push('\n');
    let mut rows = vec![[
        "HANDLER".to_owned(),
        "RUNTIME".into(),
        "CHECK".into(),
        "RESULT".into(),
        "REASON".into(),
        "TIME".into(),
        "MESSAGE".into(),
    ]];
    for h in &report.handlers {
        let runtime = if h.runtime.is_empty() {
            "?".to_owned()
        } else {
            format!("{} {}", h.runtime, h.version)
        };
        for c in &h.checks {
            rows.push([
                h.handler.clone(),
                runtime.clone(),
                c.check.to_string(),
                c.result.as_str().to_owned(),
                c.reason.map_or("-".into(), |r| r.to_string()),
                format!("{:.2}s", c.duration_seconds),
                one_line(&c.message, 100),
            ]);
        }
    }
    let widths: Vec<usize> = (0..6)
        .map(|i| rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0))
        .collect();
    for r in &rows {
        for (i, w) in widths.iter().enumerate() {
            out.push_str(&format!("{:<w$}  ", r[i], w = *w));
        }
        out.push_str(&r[6]);
        out.push('\n');
    }
    out.push('\n');
    for h in &report.handlers {
        let warnings = h.checks.iter().filter(|c| c.result == CheckOutcome::Warn).count();
        out.push_str(&format!("{}: {}", h.handler, h.verdict.as_str().to_uppercase()));
        if warnings > 0 {
            out.push_str(&format!(
                " ({warnings} warning{})",
                if warnings == 1 { "" } else { "s" }
            ));
        }
        out.push('\n');
        for c in h.checks.iter().filter(|c| {
            matches!(c.result, CheckOutcome::Warn)
                || (h.verdict != Verdict::Pass
                    && matches!(c.result, CheckOutcome::Fail | CheckOutcome::Error))
        }) {
            let fix = c.remediation.as_deref().unwrap_or("see the message");
            out.push_str(&format!(
                "  {} {}: {}\n    fix: {fix}\n",
                c.check,
                c.result.as_str(),
                c.message
            ));
        }
    }
    out
}

fn one_line(s: &str, max: usize) -> String {
    let flat: String = s.split_whitespace().collect::<Vec<_>>().join(" ");
    if flat.chars().count() <= max {
        flat
    } else {
        flat.chars().take(max - 1).collect::<String>() + "…"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use usernsguard_runtime::facts::{CgroupMode, NodeFacts};
    use usernsguard_runtime::report::{ClaimedFeatures, HandlerReport};
    use usernsguard_runtime::{CheckResult, Reason};

    fn report(verdicts: &[(&str, Vec<CheckResult>)]) -> SelfTestReport {
        SelfTestReport {
            started_at: "2026-11-29T00:00:00Z".into(),
            duration_seconds: 1.0,
            node: NodeFacts {
                kernel: "6.1.0".into(),
                selinux: SelinuxFacts::enforcing("system_u:object_r:container_file_t:s0"),
                lsms: vec![],
                max_user_namespaces: Some(100),
                cgroup: CgroupMode::V2,
                idmap_filesystems: vec![],
            },
            cri: None,
            problem: None,
            handlers: verdicts
                .iter()
                .map(|(name, checks)| HandlerReport {
                    handler: (*name).into(),
                    binary: format!("/usr/bin/{name}"),
                    runtime: (*name).into(),
                    version: "1.0".into(),
                    features: ClaimedFeatures::default(),
                    verdict: Verdict::of(checks),
                    checks: checks.clone(),
                })
                .collect(),
        }
    }

    #[test]
    fn table_shows_every_check_and_the_remediation_of_failures() {
        let r = report(&[
            (
                "runc",
                vec![CheckResult::fail(
                    Check::UsernsJoined,
                    Reason::MqueueSetxattr,
                    "setxattr failed",
                )],
            ),
            ("crun", vec![CheckResult::pass(Check::UsernsJoined, "ok")]),
        ]);
        let t = render_table(&r);
        assert!(
            t.contains("SELinux enforcing (mount label system_u:object_r:container_file_t:s0)"),
            "{t}"
        );
        assert!(t
            .lines()
            .any(|l| l.starts_with("runc") && l.contains("userns-joined") && l.contains("mqueue_setxattr")));
        assert!(t.contains("runc: FAIL"));
        assert!(t.contains("fix: upgrade runc to 1.2.1 or later"), "{t}");
        assert!(t.contains("crun: PASS"));
        assert_eq!(exit_code(&r), ExitCode::from(1));
        assert_eq!(
            exit_code(&report(&[(
                "crun",
                vec![CheckResult::pass(Check::UsernsJoined, "ok")]
            )])),
            ExitCode::SUCCESS
        );
    }

    #[test]
    fn durations_parse_like_kubernetes_and_reject_garbage() {
        assert_eq!(parse_duration("10s").unwrap(), Duration::from_secs(10));
        assert_eq!(parse_duration("1m30s").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert!(parse_duration("0s").unwrap_err().contains("greater than zero"));
        assert!(parse_duration("ten").unwrap_err().contains("\"ten\""));
    }

    #[test]
    fn long_messages_are_flattened_for_the_table() {
        assert_eq!(one_line("a\n  b", 10), "a b");
        assert_eq!(one_line(&"x".repeat(20), 5).chars().count(), 5);
    }
}
