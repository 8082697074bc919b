//! The self-test matrix: every selected check for every runtime handler, with node facts,
//! timings and verdicts. This is what `usernsguard selftest` prints and what the agent
//! publishes; both call [`run`].
//!
//! A handler's checks run concurrently (they are independent containers with their own
//! bundles, state roots and ids), so a self-test costs about one container start per
//! handler, and a hanging runtime one timeout, not one per check.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::bundle::{self, Payload};
use crate::cri::checks::{self as cri_checks, PodProbe};
use crate::cri::client::{CriClient, HandlerFeatures};
use crate::cri_config::CriConfig;
use crate::discover::{self, RuntimeHandler};
use crate::facts::{self, HostPaths, NodeFacts, SelinuxFacts};
use crate::host::{HostDir, HostRoot};
use crate::probe::{self, runner::RuntimeCommand, FeaturesAnswer, IdmapPlace, Judge, ProbeEnv, TmpfsMount};
use crate::reason::Reason;
use crate::report::{
    Check, CheckResult, ClaimedFeatures, CriSummary, HandlerReport, SelfTestReport, Verdict,
};
use crate::userns::IdMapping;

static RUN_SEQ: AtomicU64 = AtomicU64::new(0);

/// Where the kubelet keeps pods' volumes: the `idmap-mount` probe maps a directory there.
pub const KUBELET_DIR: &str = "/var/lib/kubelet";

/// Everything a self-test run needs. Host specifics are injectable for tests.
#[derive(Debug, Clone)]
pub struct SelfTestConfig {
    /// Handlers to test; their binaries are host paths.
    pub handlers: Vec<RuntimeHandler>,
    /// Empty means all.
    pub checks: Vec<Check>,
    /// Per runtime invocation (each probe container, `--version`, `features`, each CRI call).
    pub timeout: Duration,
    /// This process's payload (a path this process opens); copied onto the host when the
    /// host is not our own root.
    pub payload: Payload,
    /// Parent of the run's temporary directory, as a host path; must allow exec-free bind
    /// mounts, so a local filesystem such as /run.
    pub work_dir: PathBuf,
    /// First host uid/gid of the probes' 65536-id range (the CRI pod uses the next range).
    pub id_base: u32,
    pub host: HostRoot,
    /// Replaces the detected SELinux facts (tests, and operators whose policy needs a
    /// specific mount label).
    pub selinux: Option<SelinuxFacts>,
    /// The node's CRI runtime; `None` skips the CRI checks with [`SelfTestConfig::no_cri`]
    /// as the reason.
    pub cri: Option<CriSetup>,
    pub no_cri: String,
}

/// The CRI runtime the CRI checks talk to.
#[derive(Debug, Clone)]
pub struct CriSetup {
    /// The CRI socket, as a host path.
    pub socket: PathBuf,
    /// The configuration the handlers came from, when they came from one (its SELinux
    /// setting decides whether probes get a mount label).
    pub config: Option<CriConfig>,
    /// An image on the node holding the payload, for `cri-pod`; `None` skips it.
    pub probe_image: Option<String>,
    /// The payload's command in that image.
    pub image_command: Vec<String>,
}

impl SelfTestConfig {
    /// Defaults for the probes' host id range, work dir and host; no CRI runtime.
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
            host: HostRoot::own(),
            selinux: None,
            cri: None,
            no_cri: "no CRI runtime was given or found".into(),
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
    #[error("cannot copy the probe payload {from} to the host at {to}: {source}")]
    Payload {
        from: PathBuf,
        to: PathBuf,
        source: std::io::Error,
    },
}

/// What the CRI runtime said once per run, shared by every handler's CRI checks.
#[derive(Debug, Clone)]
enum CriState {
    /// Not asked: no CRI check selected.
    Unused,
    Skipped(String),
    Unreachable(String),
    Ready {
        /// `containerd 2.1.9`
        label: String,
        handlers: Vec<HandlerFeatures>,
    },
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
    let mut node = NodeFacts::gather(&HostPaths::of(&config.host));
    if let Some(selinux) = &config.selinux {
        node.selinux = selinux.clone();
    }
    let work = config.host.dir(&config.work_dir);
    let work_err = |source| SelfTestError::WorkDir {
        path: config.work_dir.clone(),
        source,
    };
    fs::create_dir_all(&work.local).map_err(work_err)?;
    let payload = stage_payload(&config.host, &work, &config.payload)?;
    let run_tmp = tempfile::Builder::new()
        .prefix("run-")
        .tempdir_in(&work.local)
        .map_err(work_err)?;
    let run_dir = work.join(run_tmp.path().file_name().expect("tempdir has a name"));

    // Without a CRI configuration there is nothing telling whether containers get SELinux
    // labels; assume they do wherever SELinux is on, as every CRI runtime does by default
    // on such distributions.
    let labels_on = config
        .cri
        .as_ref()
        .and_then(|c| c.config.as_ref())
        .is_none_or(|c| c.selinux);
    let selinux_labels = node.selinux.mode.enabled() && labels_on;
    let checks = config.selected_checks();
    let cri = cri_state(config, &checks);
    let cri_summary = match (&config.cri, &cri) {
        (Some(setup), CriState::Ready { label, .. }) => Some(CriSummary {
            runtime: setup.config.as_ref().map_or_else(
                || label.split(' ').next().unwrap_or("").to_owned(),
                |c| c.kind.as_str().to_owned(),
            ),
            version: label.split_once(' ').map_or("", |(_, v)| v).to_owned(),
            socket: setup.socket.display().to_string(),
            config: setup
                .config
                .as_ref()
                .and_then(|c| c.files.first())
                .map(|f| f.display().to_string()),
            selinux_labels,
        }),
        _ => None,
    };
    // Places pods' volumes live: the kubelet's directory (or, on a host without one, the
    // work directory's filesystem) and a tmpfs.
    let tmpfs = checks
        .contains(&Check::IdmapMount)
        .then(|| TmpfsMount::mount(run_dir.join("tmpfs")));
    let mut places = Vec::new();
    if checks.contains(&Check::IdmapMount) {
        let kubelet = config.host.dir(KUBELET_DIR);
        let disk = if kubelet.local.is_dir() {
            kubelet
        } else {
            run_dir.clone()
        };
        places.push(IdmapPlace {
            description: format!("{} ({})", disk.host.display(), facts::fs_type(&disk.local)),
            parent: disk,
        });
    }
    let tmpfs_problem = match &tmpfs {
        Some(Ok(t)) => {
            places.push(IdmapPlace {
                description: "tmpfs".into(),
                parent: t.dir().clone(),
            });
            None
        }
        Some(Err(e)) => Some(e.clone()),
        None => None,
    };

    let ctx = RunContext {
        config,
        node: &node,
        payload: &payload,
        mirror: bundle::host_mirror(config.host.root()),
        selinux_labels,
        checks: &checks,
        cri: &cri,
        places: &places,
        tmpfs_problem: tmpfs_problem.as_deref(),
    };
    let handlers = config
        .handlers
        .iter()
        .enumerate()
        .map(|(i, h)| test_handler(&ctx, h, &run_dir.join(format!("h{i}")), i))
        .collect();
    drop(tmpfs);
    // Dropping the TempDir removes bundles, state roots and idmap dirs.
    drop(run_tmp);
    Ok(SelfTestReport {
        started_at: started_at.to_string(),
        duration_seconds: started.elapsed().as_secs_f64(),
        node,
        cri: cri_summary,
        handlers,
        problem: None,
    })
}

/// The payload as a host path: this process's binary when the host is our own root, else a
/// copy on the host, kept under the work dir by identity (size and mtime) so a run copies
/// it once.
fn stage_payload(host: &HostRoot, work: &HostDir, payload: &Payload) -> Result<Payload, SelfTestError> {
    if host.is_own() {
        return Ok(payload.clone());
    }
    use std::os::unix::fs::MetadataExt;
    let err = |to: &Path, source| SelfTestError::Payload {
        from: payload.host_path.clone(),
        to: to.to_path_buf(),
        source,
    };
    let meta = fs::metadata(&payload.host_path).map_err(|e| err(&work.host, e))?;
    let dir = work.join("payload");
    let name = format!("probe-{:x}-{:x}", meta.len(), meta.mtime());
    let target = dir.join(&name);
    if !target.local.exists() {
        fs::create_dir_all(&dir.local).map_err(|e| err(&dir.host, e))?;
        let tmp = dir.join(format!(".{name}.tmp"));
        fs::copy(&payload.host_path, &tmp.local).map_err(|e| err(&tmp.host, e))?;
        fs::rename(&tmp.local, &target.local).map_err(|e| err(&target.host, e))?;
    }
    Ok(Payload {
        host_path: target.host,
        args: payload.args.clone(),
    })
}

fn cri_state(config: &SelfTestConfig, checks: &[Check]) -> CriState {
    if !checks.iter().any(|c| c.is_cri()) {
        return CriState::Unused;
    }
    let Some(setup) = &config.cri else {
        return CriState::Skipped(config.no_cri.clone());
    };
    let local = config.host.path(&setup.socket);
    if !local.exists() {
        return CriState::Skipped(format!(
            "no CRI socket at {} (a host without Kubernetes?)",
            setup.socket.display()
        ));
    }
    let mut client = match CriClient::connect(&local, config.timeout) {
        Ok(c) => c,
        Err(e) => return CriState::Unreachable(e.to_string()),
    };
    let version = match client.version() {
        Ok(v) => v,
        Err(e) => return CriState::Unreachable(e.to_string()),
    };
    let handlers = match client.runtime_handlers() {
        Ok(h) => h,
        Err(e) => return CriState::Unreachable(e.to_string()),
    };
    // Pods a killed earlier run left behind; younger ones may be another run's.
    let older_than = config.timeout * 6 + Duration::from_secs(60);
    match cri_checks::remove_leftovers(&mut client, older_than) {
        Ok(0) => {}
        Ok(n) => tracing::info!(removed = n, "removed probe pods left by an earlier run"),
        Err(e) => tracing::warn!(error = %e, "cannot list leftover probe pods"),
    }
    CriState::Ready {
        label: format!("{} {}", version.name, version.version),
        handlers,
    }
}

/// What every handler's test shares within one run.
struct RunContext<'a> {
    config: &'a SelfTestConfig,
    node: &'a NodeFacts,
    payload: &'a Payload,
    mirror: Vec<bundle::MirrorEntry>,
    selinux_labels: bool,
    checks: &'a [Check],
    cri: &'a CriState,
    places: &'a [IdmapPlace],
    tmpfs_problem: Option<&'a str>,
}

fn test_handler(
    ctx: &RunContext<'_>,
    handler: &RuntimeHandler,
    dir: &HostDir,
    index: usize,
) -> HandlerReport {
    let config = ctx.config;
    let checks = ctx.checks;
    let mut report = HandlerReport {
        handler: handler.name.clone(),
        binary: handler.binary.display().to_string(),
        runtime: String::new(),
        version: String::new(),
        features: ClaimedFeatures::default(),
        verdict: Verdict::Unknown,
        checks: Vec::new(),
    };
    let unprobed = |report: &mut HandlerReport, reason: Option<Reason>, message: String| {
        report.checks = checks
            .iter()
            .map(|c| CheckResult::error(*c, reason, message.clone()))
            .collect();
    };
    let version = match discover::version(&config.host, &handler.binary, config.timeout) {
        Ok(v) => v,
        Err(e) => {
            let reason = e.is_timeout().then_some(Reason::Timeout);
            unprobed(
                &mut report,
                reason,
                format!("runtime handler {:?}: {e}", handler.name),
            );
            return report;
        }
    };
    report.runtime = version.name.clone();
    report.version = version.version.clone();
    if let Err(e) = fs::create_dir_all(&dir.local) {
        unprobed(&mut report, None, format!("creating {}: {e}", dir.host.display()));
        return report;
    }
    let runtime = RuntimeCommand {
        binary: handler.binary.clone(),
        kind: version.kind,
        cgroup: ctx.node.cgroup,
        host: config.host.clone(),
    };
    let mount_label = if ctx.selinux_labels {
        ctx.node.selinux.mount_label.as_deref()
    } else {
        None
    };
    // Unique per process, run and handler: runc derives cgroup paths from container ids, so
    // concurrent runs (the agent and a test, two tests) must never share one.
    let id_prefix = format!(
        "ug-{}-{}-{index}",
        std::process::id(),
        RUN_SEQ.fetch_add(1, Ordering::Relaxed)
    );
    let env = ProbeEnv {
        runtime: &runtime,
        payload: ctx.payload,
        mirror: &ctx.mirror,
        uid: IdMapping::pod(config.id_base),
        gid: IdMapping::pod(config.id_base),
        mount_label,
        timeout: config.timeout,
        work: dir,
        id_prefix: &id_prefix,
    };
    let label = format!("{} {}", version.name, version.version);
    let judge = Judge {
        uid: env.uid,
        runtime: &label,
        selinux_labels: ctx.selinux_labels,
    };
    let timed = |f: &dyn Fn() -> CheckResult| {
        let started = Instant::now();
        let mut r = f();
        r.duration_seconds = started.elapsed().as_secs_f64();
        r
    };
    let (mut results, claims) = std::thread::scope(|s| {
        let mut runs = Vec::new();
        for &check in checks {
            let (env, judge) = (&env, &judge);
            let job: Option<Box<dyn Fn() -> CheckResult + Send + Sync + '_>> = match check {
                Check::UsernsCreated | Check::UsernsJoined => Some(Box::new(move || {
                    probe::evaluate(check, &probe::run_probe(check, env), judge)
                })),
                Check::IdmapMount => Some(Box::new(move || {
                    let mut r = probe::evaluate_idmap(&probe::run_idmap(env, ctx.places), judge);
                    if let Some(p) = ctx.tmpfs_problem {
                        r.message.push_str(&format!(" (tmpfs not probed: {p})"));
                    }
                    r
                })),
                Check::CriAdvertised => Some(Box::new(move || cri_advertised(ctx, &handler.name))),
                Check::CriPod => Some(Box::new(move || cri_pod(ctx, handler, dir, index))),
                Check::Features => None,
            };
            if let Some(job) = job {
                runs.push(s.spawn(move || timed(&*job)));
            }
        }
        let claims = checks.contains(&Check::Features).then(|| {
            let started = Instant::now();
            let answer = match discover::features(&config.host, &handler.binary, config.timeout) {
                Ok(claims) => FeaturesAnswer::Claims(claims),
                Err(e) => FeaturesAnswer::Failed {
                    message: e.to_string(),
                    timed_out: e.is_timeout(),
                },
            };
            (answer, started.elapsed())
        });
        let results: Vec<CheckResult> = runs
            .into_iter()
            .map(|r| r.join().expect("check threads do not panic"))
            .collect();
        (results, claims)
    });
    if let Some((answer, elapsed)) = claims {
        if let FeaturesAnswer::Claims(c) = &answer {
            report.features = c.clone();
        }
        let mut result = probe::evaluate_features(&answer, &results, &label);
        result.duration_seconds = elapsed.as_secs_f64();
        results.push(result);
    }
    if ctx.selinux_labels && mount_label.is_none() {
        for r in results.iter_mut().filter(|r| r.check == Check::UsernsJoined) {
            r.message.push_str(
                " (SELinux is enabled but no container mount label could be derived; the probe ran without linux.mountLabel)",
            );
        }
    }
    results.sort_by_key(|r| Check::ALL.iter().position(|c| *c == r.check));
    report.checks = results;
    report.verdict = Verdict::of(&report.checks);
    report
}

fn cri_advertised(ctx: &RunContext<'_>, handler: &str) -> CheckResult {
    match ctx.cri {
        CriState::Ready { label, handlers } => cri_checks::advertised(handlers, handler, label),
        other => cri_not_ready(Check::CriAdvertised, other),
    }
}

fn cri_pod(ctx: &RunContext<'_>, handler: &RuntimeHandler, dir: &HostDir, index: usize) -> CheckResult {
    let check = Check::CriPod;
    let label = match ctx.cri {
        CriState::Ready { label, .. } => label,
        other => return cri_not_ready(check, other),
    };
    let setup = ctx.config.cri.as_ref().expect("a ready CRI state has a setup");
    let Some(image) = &setup.probe_image else {
        return CheckResult::skip(
            check,
            "no probe image: give the image holding usernsguard that is on the node (the agent passes its own)",
        );
    };
    let config = ctx.config;
    let mut client = match CriClient::connect(&config.host.path(&setup.socket), config.timeout) {
        Ok(c) => c,
        Err(e) => return CheckResult::error(check, None, e.to_string()),
    };
    // A range of its own, next to the direct probes'.
    let ids = IdMapping::pod(
        config
            .id_base
            .wrapping_add(IdMapping::POD_SIZE * (1 + index as u32)),
    );
    let probe = PodProbe {
        image: image.clone(),
        command: setup.image_command.clone(),
        log_dir: dir.join("pod-log"),
        uid: ids,
        gid: ids,
        timeout: config.timeout,
    };
    let via = format!("{label} handler {}", handler.name);
    let outcome = cri_checks::run_pod(&mut client, &config.host, &handler.name, &probe);
    let judge = Judge {
        uid: ids,
        runtime: &via,
        selinux_labels: ctx.selinux_labels,
    };
    cri_checks::judge_pod(&outcome, &judge)
}

fn cri_not_ready(check: Check, state: &CriState) -> CheckResult {
    match state {
        CriState::Skipped(why) => CheckResult::skip(check, why.clone()),
        CriState::Unreachable(why) => {
            CheckResult::error(check, None, format!("the CRI runtime did not answer: {why}"))
        }
        CriState::Unused | CriState::Ready { .. } => {
            CheckResult::error(check, None, "internal: CRI state not prepared")
        }
    }
}
