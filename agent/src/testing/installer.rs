//! A fake host installer for the install reconciler's tests: it keeps "installed" handlers in
//! memory, says a restart is needed for every change (as a containerd drop-in does), and
//! fails on request with the runtime installer's own error values.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use usernsguard_runtime::install::systemd::{ActiveState, JobResult, RestartOutcome, UnitState};
use usernsguard_runtime::install::{
    BinarySource, HandlerLive, InstallError, InstallRequest, Operation, Outcome, RestartMode, RestartReport,
    UninstallRequest,
};

use crate::crd::{BinarySource as ProfileBinary, BinarySourceKind, CriRuntime, OciRuntime};
use crate::node::installer::{Installer, Planned, SourceError};

type ErrorFactory = Box<dyn Fn() -> InstallError + Send + Sync>;

/// What the fake holds and records.
#[derive(Default)]
pub struct FakeInstallerState {
    /// Handler → the request it was installed with.
    pub installed: BTreeMap<String, InstallRequest>,
    /// `install crun`, `uninstall crun`, `plan_install crun`, `live crun`, ...
    pub calls: Vec<String>,
    /// How many times the fake "restarted" the CRI runtime.
    pub restarts: u32,
    /// Whether the CRI runtime serves a handler configured with restart mode none (the
    /// operator restarted it).
    pub live: bool,
    /// Errors for the next installs, in order.
    pub install_errors: Vec<ErrorFactory>,
    /// Errors for the next uninstalls, in order.
    pub uninstall_errors: Vec<ErrorFactory>,
    /// Errors for the next install plans, in order.
    pub plan_errors: Vec<ErrorFactory>,
    pub source_error: Option<SourceError>,
    /// The CRI config found on the node.
    pub cri_config: Option<PathBuf>,
}

impl std::fmt::Debug for FakeInstallerState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FakeInstallerState")
            .field("installed", &self.installed.keys().collect::<Vec<_>>())
            .field("calls", &self.calls)
            .field("restarts", &self.restarts)
            .finish_non_exhaustive()
    }
}

/// [`Installer`] for tests.
#[derive(Default)]
pub struct FakeInstaller {
    pub state: Mutex<FakeInstallerState>,
}

impl std::fmt::Debug for FakeInstaller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = self.state.lock().unwrap();
        f.debug_struct("FakeInstaller")
            .field("installed", &s.installed.keys().collect::<Vec<_>>())
            .field("calls", &s.calls)
            .finish()
    }
}

impl FakeInstaller {
    pub fn new() -> Arc<Self> {
        let f = FakeInstaller::default();
        f.state.lock().unwrap().cri_config = Some(PathBuf::from("/etc/containerd/config.toml"));
        Arc::new(f)
    }

    /// The calls that change the host or restart something (`install h`, `uninstall h`).
    pub fn changes(&self) -> Vec<String> {
        self.state
            .lock()
            .unwrap()
            .calls
            .iter()
            .filter(|c| c.starts_with("install ") || c.starts_with("uninstall "))
            .cloned()
            .collect()
    }

    pub fn restarts(&self) -> u32 {
        self.state.lock().unwrap().restarts
    }

    pub fn fail_next_install(&self, e: impl Fn() -> InstallError + Send + Sync + 'static) {
        self.state.lock().unwrap().install_errors.push(Box::new(e));
    }

    pub fn fail_next_uninstall(&self, e: impl Fn() -> InstallError + Send + Sync + 'static) {
        self.state.lock().unwrap().uninstall_errors.push(Box::new(e));
    }

    pub fn fail_next_plan(&self, e: impl Fn() -> InstallError + Send + Sync + 'static) {
        self.state.lock().unwrap().plan_errors.push(Box::new(e));
    }

    fn outcome(op: Operation, req_handler: &str, restart: &RestartMode, restarted: bool) -> Outcome {
        Outcome {
            operation: op,
            handler: req_handler.to_owned(),
            changed: vec![PathBuf::from(format!(
                "/etc/containerd/conf.d/usernsguard-{req_handler}.toml"
            ))],
            binary: (op == Operation::Install).then(|| "placed /usr/local/bin/x".to_owned()),
            binary_version: (op == Operation::Install).then(|| "runc version 1.4.3".to_owned()),
            restart: match (restart, restarted) {
                (RestartMode::None, _) => RestartReport::Operator {
                    units: vec!["containerd.service".into()],
                },
                (_, false) => RestartReport::NotNeeded,
                (_, true) => RestartReport::Restarted(Box::new(restart_outcome())),
            },
            live: (op == Operation::Install && restarted).then(|| HandlerLive {
                handler: req_handler.to_owned(),
                listed: true,
                configured: true,
                user_namespaces: Some(true),
                runtime: "containerd 2.1.9".into(),
                waited: Duration::from_millis(300),
            }),
            recovered: false,
            notes: vec![],
        }
    }
}

/// What a successful `RestartUnit` of containerd.service reports.
pub fn restart_outcome() -> RestartOutcome {
    let unit = |active_since: u64| UnitState {
        unit: "containerd.service".into(),
        load_state: "loaded".into(),
        active_state: ActiveState::Active,
        sub_state: "running".into(),
        active_enter_timestamp_us: active_since,
        active_enter_timestamp_monotonic_us: active_since,
        invocation_id: format!("{active_since:x}"),
        main_pid: 100,
        result: "success".into(),
        n_restarts: 0,
        timeout_start_us: 90_000_000,
        timeout_stop_us: 90_000_000,
    };
    RestartOutcome {
        job: "/org/freedesktop/systemd1/job/42".into(),
        job_result: JobResult::Done,
        before: unit(1_000),
        after: unit(2_000),
        job_duration: Duration::from_millis(800),
        reconnects: 0,
    }
}

impl Installer for FakeInstaller {
    fn source(&self, runtime: OciRuntime, binary: &ProfileBinary) -> Result<BinarySource, SourceError> {
        if let Some(e) = self.state.lock().unwrap().source_error.clone() {
            return Err(e);
        }
        Ok(match binary.source {
            BinarySourceKind::Host => BinarySource::Host(PathBuf::from(&binary.path)),
            BinarySourceKind::Bundled => BinarySource::Local(PathBuf::from(format!(
                "/usr/local/lib/usernsguard/runtimes/{}",
                match runtime {
                    OciRuntime::Runc => "runc",
                    OciRuntime::Crun => "crun",
                }
            ))),
            BinarySourceKind::Url => BinarySource::Local(PathBuf::from(format!(
                "/var/lib/usernsguard/downloads/{}",
                binary.sha256.as_deref().unwrap_or_default()
            ))),
        })
    }

    fn find_cri_config(&self, runtime: CriRuntime) -> Result<PathBuf, String> {
        self.state
            .lock()
            .unwrap()
            .cri_config
            .clone()
            .ok_or_else(|| format!("no {runtime:?} configuration on this node"))
    }

    fn plan_install(&self, req: &InstallRequest) -> Result<Planned, InstallError> {
        let mut s = self.state.lock().unwrap();
        s.calls.push(format!("plan_install {}", req.handler));
        if !s.plan_errors.is_empty() {
            let e = s.plan_errors.remove(0);
            return Err(e());
        }
        let noop = s.installed.get(&req.handler) == Some(req);
        Ok(Planned {
            noop,
            restart_needed: !noop,
        })
    }

    fn install(&self, req: &InstallRequest) -> Result<Outcome, InstallError> {
        let mut s = self.state.lock().unwrap();
        s.calls.push(format!("install {}", req.handler));
        if !s.install_errors.is_empty() {
            let e = s.install_errors.remove(0);
            return Err(e());
        }
        if s.installed.get(&req.handler) == Some(req) {
            return Ok(Outcome {
                changed: vec![],
                binary: None,
                ..Self::outcome(Operation::Install, &req.handler, &req.restart, false)
            });
        }
        let restarted = matches!(req.restart, RestartMode::Systemd { .. });
        s.restarts += u32::from(restarted);
        s.installed.insert(req.handler.clone(), req.clone());
        Ok(Self::outcome(
            Operation::Install,
            &req.handler,
            &req.restart,
            restarted,
        ))
    }

    fn plan_uninstall(&self, req: &UninstallRequest) -> Result<Planned, InstallError> {
        let mut s = self.state.lock().unwrap();
        s.calls.push(format!("plan_uninstall {}", req.handler));
        let present = s.installed.contains_key(&req.handler);
        Ok(Planned {
            noop: !present,
            restart_needed: present,
        })
    }

    fn uninstall(&self, req: &UninstallRequest) -> Result<Outcome, InstallError> {
        let mut s = self.state.lock().unwrap();
        s.calls.push(format!("uninstall {}", req.handler));
        if !s.uninstall_errors.is_empty() {
            let e = s.uninstall_errors.remove(0);
            return Err(e());
        }
        let restarted =
            s.installed.remove(&req.handler).is_some() && matches!(req.restart, RestartMode::Systemd { .. });
        s.restarts += u32::from(restarted);
        Ok(Self::outcome(
            Operation::Uninstall,
            &req.handler,
            &req.restart,
            restarted,
        ))
    }

    fn live(&self, req: &InstallRequest) -> Result<bool, String> {
        let mut s = self.state.lock().unwrap();
        s.calls.push(format!("live {}", req.handler));
        Ok(s.live && s.installed.contains_key(&req.handler))
    }
}
