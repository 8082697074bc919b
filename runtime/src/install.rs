//! Installing and registering OCI runtimes on the host: everything that changes the node.
//!
//! This tree is the only place in the crate that writes host files or restarts services,
//! and the self-test path never calls into it, so `usernsguard selftest` cannot change the
//! host it checks. Host locations and the service manager are parameters, so the logic is
//! tested against temp dirs and fakes.
//!
//! The agent and the CLI use [`Installer`]: [`Installer::plan_install`] /
//! [`Installer::plan_uninstall`] say what would change (the `--dry-run` diff) without
//! changing anything, [`Installer::install`] / [`Installer::uninstall`] do it. Errors are
//! one enum, [`InstallError`], whose [`InstallError::class`] says whether the host was left
//! untouched (bad input), restored (rolled back) or needs a human.
//!
//! - [`edit`]: the config edits, pure functions over text (golden-tested);
//! - [`containerd`]: which files to change for containerd, k3s/rke2 and CRI-O;
//! - [`binary`]: placing, verifying and trying the runtime binary;
//! - [`files`]: atomic writes, with the step hook the crash tests kill at;
//! - [`manifest`]: what was changed, recorded on the host for uninstall and rollback;
//! - [`plan`], [`apply`]: the two halves of a run; [`verify`]: the CRI check;
//! - [`systemd`]: restarting the CRI runtime through PID 1's private socket;
//! - [`download`]: fetching a `Url` runtime binary onto the node (the agent's).

pub mod apply;
pub mod binary;
pub mod containerd;
pub mod download;
pub mod edit;
pub mod error;
pub mod files;
pub mod manifest;
pub mod plan;
pub mod systemd;
pub mod verify;

use std::path::{Path, PathBuf};

pub use apply::{Outcome, RestartReport, Timeouts};
pub use binary::BinarySource;
pub use error::{ErrorClass, Failure, InstallError};
pub use files::{Step, StepHook};
pub use plan::{InstallRequest, Operation, Plan, RestartMode, UninstallRequest};
pub use systemd::ServiceManager;
pub use verify::HandlerLive;

use crate::host::HostRoot;
use files::HostFs;
use manifest::Store;

/// Installs and uninstalls runtime handlers on one host.
pub struct Installer<'a> {
    fs: HostFs<'a>,
    store: Store,
    services: Option<&'a mut dyn ServiceManager>,
    timeouts: Timeouts,
}

impl std::fmt::Debug for Installer<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Installer")
            .field("fs", &self.fs)
            .field("store", &self.store)
            .field("services", &self.services.is_some())
            .field("timeouts", &self.timeouts)
            .finish()
    }
}

impl<'a> Installer<'a> {
    /// An installer for the host at `host`, keeping its records in
    /// `/var/lib/usernsguard/install` there.
    pub fn new(host: HostRoot) -> Self {
        Installer {
            fs: HostFs::new(host, None),
            store: Store {
                dir: PathBuf::from(manifest::STATE_DIR),
            },
            services: None,
            timeouts: Timeouts::default(),
        }
    }

    /// The service manager that restarts the CRI runtime (restart mode systemd):
    /// [`systemd::SystemdBus`] in production.
    pub fn with_service_manager(mut self, services: &'a mut dyn ServiceManager) -> Self {
        self.services = Some(services);
        self
    }

    pub fn with_timeouts(mut self, timeouts: Timeouts) -> Self {
        self.timeouts = timeouts;
        self
    }

    /// Calls `hook` before every step that changes the disk (tests: fault injection and
    /// crash points).
    pub fn with_step_hook(mut self, hook: StepHook<'a>) -> Self {
        self.fs = HostFs::new(self.fs.host().clone(), Some(hook));
        self
    }

    pub fn host(&self) -> &HostRoot {
        self.fs.host()
    }

    /// What an install would change; changes nothing.
    pub fn plan_install(&self, req: &InstallRequest) -> Result<Plan, InstallError> {
        plan::install(&self.fs, &self.store, req)
    }

    /// What an uninstall would change; changes nothing.
    pub fn plan_uninstall(&self, req: &UninstallRequest) -> Result<Plan, InstallError> {
        plan::uninstall(&self.fs, &self.store, req)
    }

    /// Installs: plans, and applies the plan unless the host is already as asked (then it
    /// touches no file and restarts nothing).
    pub fn install(&mut self, req: &InstallRequest) -> Result<Outcome, InstallError> {
        let _lock = self.lock(&req.cri_config)?;
        let plan = self.plan_install(req)?;
        if plan.is_noop() {
            self.tidy(&req.handler, plan.manifest_before.is_some());
            return self.apply(plan, false);
        }
        let recovered = self.recover(&req.handler, &plan)?;
        let plan = if recovered.is_some() {
            self.plan_install(req)?
        } else {
            plan
        };
        self.apply(plan, recovered == Some(true))
    }

    /// Uninstalls what [`Installer::install`] did for the handler.
    pub fn uninstall(&mut self, req: &UninstallRequest) -> Result<Outcome, InstallError> {
        let _lock = self.lock(&req.cri_config)?;
        let plan = self.plan_uninstall(req)?;
        if plan.is_noop() {
            self.tidy(&req.handler, plan.manifest_before.is_some());
            return self.apply(plan, false);
        }
        let recovered = self.recover(&req.handler, &plan)?;
        let plan = if recovered.is_some() {
            self.plan_uninstall(req)?
        } else {
            plan
        };
        self.apply(plan, recovered == Some(true))
    }

    /// One run at a time per CRI config: `usernsguard install` by hand while the agent
    /// reconciles, or two agent pods overlapping in a rollout, would otherwise both plan
    /// against the same file and the later write would drop the earlier one's change. The
    /// lock is on the config's directory, from plan to the end of the restart and rollback.
    fn lock(&self, cri_config: &Path) -> Result<Option<std::fs::File>, InstallError> {
        let dir = cri_config.parent().unwrap_or(Path::new("/"));
        if !self.fs.local(dir).is_dir() {
            // Nothing to lock: the plan names the missing config.
            return Ok(None);
        }
        let waited = self.timeouts.lock;
        match self.fs.lock_dir(dir, waited) {
            Ok(Some(f)) => Ok(Some(f)),
            Ok(None) => Err(InstallError::Busy {
                dir: dir.to_path_buf(),
                waited,
            }),
            Err(source) => Err(InstallError::ConfigRead {
                path: dir.to_path_buf(),
                source,
            }),
        }
    }

    /// Carries out a plan made by this installer.
    pub fn apply(&mut self, plan: Plan, force_restart: bool) -> Result<Outcome, InstallError> {
        apply::apply(
            &mut self.fs,
            &self.store,
            self.services.as_deref_mut(),
            self.timeouts,
            plan,
            force_restart,
        )
    }

    /// Removes what a run killed after its commit point left: journal backups (and, with no
    /// manifest, the handler's whole state directory). Costs one `stat` when there is none.
    fn tidy(&mut self, handler: &str, installed: bool) {
        let dir = self.store.handler_dir(handler);
        let leftover = if installed {
            dir.join("journal")
        } else {
            dir.clone()
        };
        if !installed && !self.fs.local(&leftover).exists() {
            // A killed uninstall may have removed the manifest but not the empty state
            // directories above it (ours: /var/lib/usernsguard/install and up, while empty).
            let mut d = Some(self.store.dir.clone());
            while let Some(p) = d.filter(|p| p.parent().is_some()) {
                if self.fs.local(&p).exists() && !matches!(self.fs.remove_dir_if_empty(&p), Ok(true)) {
                    break;
                }
                d = p.parent().map(Path::to_path_buf);
            }
            return;
        }
        if !self.fs.local(&leftover).exists() {
            return;
        }
        let mut dirs = vec![leftover.clone()];
        if !installed {
            dirs = vec![dir.join("journal"), dir.join("original"), dir.clone()];
        }
        for d in &dirs {
            if let Ok(entries) = std::fs::read_dir(self.fs.local(d)) {
                for e in entries.flatten() {
                    if e.file_type().is_ok_and(|t| t.is_file()) {
                        let _ = self.fs.remove(&d.join(e.file_name()));
                    }
                }
            }
            let _ = self.fs.remove_dir_if_empty(d);
        }
        if !installed {
            let _ = self.fs.remove_dir_if_empty(&self.store.dir);
            if let Some(parent) = self.store.dir.parent() {
                let _ = self.fs.remove_dir_if_empty(parent);
            }
        }
    }

    /// Rolls back the journal of an interrupted run, if `plan` found one; `Some(true)` when
    /// that run had restarted the CRI runtime (so it must be restarted again).
    fn recover(&mut self, handler: &str, plan: &Plan) -> Result<Option<bool>, InstallError> {
        if !plan.interrupted {
            return Ok(None);
        }
        let manifest = self
            .store
            .load(|p| self.fs.local(p), handler)
            .map_err(InstallError::State)?;
        let Some(pending) = manifest.and_then(|m| m.pending) else {
            return Ok(None);
        };
        if pending.phase == manifest::Phase::Committed {
            // A finished uninstall killed while tidying up: finish it.
            let installed = pending.previous.as_deref().cloned().ok_or_else(|| {
                InstallError::State(format!("{}: a committed uninstall without its manifest", handler))
            })?;
            apply::finish_uninstall(&mut self.fs, &self.store, &installed, &pending);
            return Ok(Some(false));
        }
        tracing::warn!(handler, phase = ?pending.phase, "rolling back an interrupted run");
        let restarted = pending.phase >= manifest::Phase::Restarting;
        apply::roll_back(
            &mut self.fs,
            &self.store,
            None,
            self.timeouts,
            handler,
            &self.store.manifest_path(handler),
            &pending,
            None,
            &plan.target.socket,
        )
        .map_err(|problems| InstallError::RollbackFailed {
            cause: Failure::State {
                path: self.store.manifest_path(handler),
                source: std::io::Error::other("an interrupted run could not be rolled back"),
            },
            problems,
        })?;
        Ok(Some(restarted))
    }
}
