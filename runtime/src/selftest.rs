//! The self-test matrix: every selected check for every runtime handler, with node facts,
//! timings and verdicts. This is what `usernsguard selftest` prints and what the agent
//! publishes; both call [`run`].

use std::fs;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::bundle::{self, Payload};
use crate::discover::{self, DiscoverError, RuntimeHandler};
use crate::facts::{HostPaths, NodeFacts, SelinuxFacts};
use crate::probe::{self, runner::RuntimeCommand, ProbeEnv};
use crate::process::ProcessError;
use crate::reason::Reason;
use crate::report::{Check, CheckResult, ClaimedFeatures, HandlerReport, SelfTestReport, Verdict};
use crate::userns::IdMapping;

static RUN_SEQ: AtomicU64 = AtomicU64::new(0);

/// Everything a self-test run needs. Host specifics are injectable for tests.
#[derive(Debug, Clone)]
pub struct SelfTestConfig {
    pub handlers: Vec<RuntimeHandler>,
    /// Empty means all four.
    pub checks: Vec<Check>,
    /// Per runtime invocation (each probe container, `--version`, `features`).
    pub timeout: Duration,
    pub payload: Payload,
    /// Parent of the run's temporary directory; must allow exec-free bind mounts, so a
    /// local filesystem such as /run.
    pub work_dir: PathBuf,
    /// First host uid/gid of the probes' 65536-id range.
    pub id_base: u32,
    pub host: HostPaths,
    /// Replaces the detected SELinux facts (tests, and operators whose policy needs a
    /// specific mount label).
    pub selinux: Option<SelinuxFacts>,
}

impl SelfTestConfig {
    /// Defaults for `payload`, the probes' host id range and work dir.
    pub fn new(handlers: Vec<RuntimeHandler>, payload: Payload) -> Self {
        SelfTestConfig {
            handlers,
            checks: Vec::new(),
            timeout: Duration::from_secs(10),
            payload,
            work_dir: PathBuf::from("/run/usernsguard"),
            // Far above the ranges the kubelet hands to pods (65536 * n for small n) and
            // below the 32-bit overflow ids.
            id_base: 0x7000_0000,
            host: HostPaths::default(),
            selinux: None,
        }
    }

    fn selected_checks(&self) -> Vec<Check> {
        Check::ALL
            .into_iter()
            .filter(|c| self.checks.is_empty() || self.checks.contains(c))
            .collect()
    }
}

/// Why no self-test could run at all (as opposed to a check failing).
#[derive(Debug, thiserror::Error)]
pub enum SelfTestError {
    #[error("the self-test must run as root: it creates user namespaces and runs containers (effective uid is {0})")]
    NotRoot(u32),
    #[error("no runtime handlers to test")]
    NoHandlers,
    #[error("cannot use work directory {path}: {source}")]
    WorkDir { path: PathBuf, source: std::io::Error },
}

/// Runs the self-test. Blocking; a run takes a few container starts per handler.
pub fn run(config: &SelfTestConfig) -> Result<SelfTestReport, SelfTestError> {
    let euid = nix::unistd::geteuid().as_raw();
    if euid != 0 {
        return Err(SelfTestError::NotRoot(euid));
    }
    if config.handlers.is_empty() {
        return Err(SelfTestError::NoHandlers);
    }
    let started_at = jiff::Timestamp::now();
    let started = Instant::now();
    let mut node = NodeFacts::gather(&config.host);
    if let Some(selinux) = &config.selinux {
        node.selinux = selinux.clone();
    }
    let work_err = |source| SelfTestError::WorkDir {
        path: config.work_dir.clone(),
        source,
    };
    fs::create_dir_all(&config.work_dir).map_err(work_err)?;
    let run_dir = tempfile::Builder::new()
        .prefix("run-")
        .tempdir_in(&config.work_dir)
        .map_err(work_err)?;

    let handlers = config
        .handlers
        .iter()
        .enumerate()
        .map(|(i, h)| {
            let dir = run_dir.path().join(format!("h{i}"));
            test_handler(config, &node, h, &dir, i)
        })
        .collect();
    // Dropping the TempDir removes bundles, state roots and idmap dirs.
    drop(run_dir);
    Ok(SelfTestReport {
        started_at: started_at.to_string(),
        duration_seconds: started.elapsed().as_secs_f64(),
        node,
        handlers,
    })
}

fn test_handler(
    config: &SelfTestConfig,
    node: &NodeFacts,
    handler: &RuntimeHandler,
    dir: &std::path::Path,
    index: usize,
) -> HandlerReport {
    let checks = config.selected_checks();
    let mut report = HandlerReport {
        handler: handler.name.clone(),
        binary: handler.binary.display().to_string(),
        runtime: String::new(),
        version: String::new(),
        features: ClaimedFeatures::default(),
        verdict: Verdict::Unknown,
        checks: Vec::new(),
    };

    let version = match discover::version(&handler.binary, config.timeout) {
        Ok(v) => v,
        Err(e) => {
            let reason =
                matches!(e, DiscoverError::Process(ProcessError::Timeout { .. })).then_some(Reason::Timeout);
            let message = format!("runtime handler {:?}: {e}", handler.name);
            report.checks = checks
                .iter()
                .map(|c| CheckResult::error(*c, reason, message.clone()))
                .collect();
            return report;
        }
    };
    report.runtime = version.name.clone();
    report.version = version.version.clone();

    if let Err(e) = fs::create_dir_all(dir) {
        let message = format!("creating {}: {e}", dir.display());
        report.checks = checks
            .iter()
            .map(|c| CheckResult::error(*c, None, message.clone()))
            .collect();
        return report;
    }
    let runtime = RuntimeCommand {
        binary: handler.binary.clone(),
        kind: version.kind,
        cgroup: node.cgroup,
    };
    let mirror = bundle::host_mirror(std::path::Path::new("/"));
    let mount_label = node
        .selinux
        .mode
        .enabled()
        .then_some(node.selinux.mount_label.as_deref())
        .flatten();
    // Unique per process, run and handler: runc derives cgroup paths from container ids, so
    // concurrent runs (the agent and a test, two tests) must never share one.
    let id_prefix = format!(
        "usernsguard-{}-{}-{index}",
        std::process::id(),
        RUN_SEQ.fetch_add(1, Ordering::Relaxed)
    );
    let env = ProbeEnv {
        runtime: &runtime,
        payload: &config.payload,
        mirror: &mirror,
        uid: IdMapping::pod(config.id_base),
        gid: IdMapping::pod(config.id_base),
        mount_label,
        timeout: config.timeout,
        work_dir: dir,
        id_prefix: &id_prefix,
    };
    let label = format!("{} {}", version.name, version.version);
    // The checks are independent containers with their own bundles, state roots and ids, so
    // they run concurrently: a self-test then costs about one container start, not four,
    // and a hanging runtime costs one timeout per handler, not one per check.
    let (mut results, claims) = std::thread::scope(|s| {
        let probes: Vec<_> = checks
            .iter()
            .filter(|c| **c != Check::Features)
            .map(|&check| {
                let (env, label) = (&env, &label);
                s.spawn(move || {
                    let started = Instant::now();
                    let outcome = probe::run_probe(check, env);
                    let mut result = probe::evaluate(check, &outcome, env.uid, label);
                    result.duration_seconds = started.elapsed().as_secs_f64();
                    result
                })
            })
            .collect();
        let claims = checks.contains(&Check::Features).then(|| {
            let started = Instant::now();
            (
                discover::features(&handler.binary, config.timeout),
                started.elapsed(),
            )
        });
        let results: Vec<CheckResult> = probes
            .into_iter()
            .map(|p| p.join().expect("probe threads do not panic"))
            .collect();
        (results, claims)
    });
    if let Some((claims, elapsed)) = claims {
        let mut result = match claims {
            Ok(claims) => {
                report.features = claims;
                probe::evaluate_features(&report.features, &results, &label)
            }
            Err(e) => {
                let reason = matches!(e, DiscoverError::Process(ProcessError::Timeout { .. }))
                    .then_some(Reason::Timeout);
                CheckResult::error(Check::Features, reason, e.to_string())
            }
        };
        result.duration_seconds = elapsed.as_secs_f64();
        results.push(result);
    }
    if node.selinux.mode.enabled() && mount_label.is_none() {
        for r in results.iter_mut().filter(|r| r.check == Check::UsernsJoined) {
            r.message.push_str(
                " (SELinux is enabled but no container mount label could be derived; the probe ran without linux.mountLabel)",
            );
        }
    }
    report.checks = results;
    report.verdict = Verdict::of(&report.checks);
    report
}
