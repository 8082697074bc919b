//! The seam between the install reconciler ([`super::installs`]) and the host installer
//! (`usernsguard_runtime::install`, the same code `usernsguard install` runs): the trait the
//! reconciler calls, so its decisions and API traffic are tested with
//! `crate::testing::FakeInstaller`, and [`HostInstaller`], the real one acting on
//! `--host-root`. Every method blocks (files, systemd, the CRI socket, downloads); the
//! reconciler calls them through `spawn_blocking`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use usernsguard_runtime::cri_config::{self, CriKind};
use usernsguard_runtime::host::HostRoot;
use usernsguard_runtime::install::download::Downloader;
use usernsguard_runtime::install::systemd::SystemdBus;
use usernsguard_runtime::install::{
    self, InstallError, InstallRequest, Installer as RuntimeInstaller, Outcome, Timeouts, UninstallRequest,
};

use crate::crd::{BinarySource as ProfileBinary, BinarySourceKind, CriRuntime, OciRuntime};

/// What a plan says, as far as the reconciler cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Planned {
    /// The host is already as asked: nothing to write, nothing to restart.
    pub noop: bool,
    /// Applying it restarts the CRI runtime (a file it reads changes), so it needs a slot of
    /// the profile's restart budget first.
    pub restart_needed: bool,
}

/// Why the binary for a profile could not be made available (before the installer runs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceError {
    /// Short code for the NodeReport's `reason` (`bundled_runtime_missing`, the download's).
    pub reason: &'static str,
    pub message: String,
}

/// The host installer as the agent sees it.
pub trait Installer: Send + Sync + 'static {
    /// The binary a profile installs, as the host installer takes it: a `Bundled` runtime
    /// from the agent's image, a `Url` one downloaded onto the node (cached by sha256), a
    /// `Host` one where it is.
    fn source(
        &self,
        runtime: OciRuntime,
        binary: &ProfileBinary,
    ) -> Result<install::BinarySource, SourceError>;
    /// The CRI runtime's main config on this node (a host path) when the profile names none.
    fn find_cri_config(&self, runtime: CriRuntime) -> Result<PathBuf, String>;
    fn plan_install(&self, req: &InstallRequest) -> Result<Planned, InstallError>;
    fn install(&self, req: &InstallRequest) -> Result<Outcome, InstallError>;
    fn plan_uninstall(&self, req: &UninstallRequest) -> Result<Planned, InstallError>;
    fn uninstall(&self, req: &UninstallRequest) -> Result<Outcome, InstallError>;
    /// Whether the CRI runtime serves the handler now; restart mode `none` waits for the
    /// operator's restart this way.
    fn live(&self, req: &InstallRequest) -> Result<bool, String>;
}

/// [`Installer`] backed by `usernsguard_runtime::install` on the host at `host`.
#[derive(Debug)]
pub struct HostInstaller {
    pub host: HostRoot,
    /// Where the agent's image keeps its bundled runtimes, one file per runtime name
    /// (`/usr/local/lib/usernsguard/runtimes/runc`; see scripts/image.sh).
    pub bundled_dir: PathBuf,
    /// Where `Url` binaries are downloaded to, a host path.
    pub downloads: PathBuf,
    pub timeouts: Timeouts,
}

/// Where the image ships its runtimes.
pub const BUNDLED_DIR: &str = "/usr/local/lib/usernsguard/runtimes";
/// Download cache on the host; kept across agent restarts so a restart downloads nothing.
pub const DOWNLOAD_DIR: &str = "/var/lib/usernsguard/downloads";
/// How long the CRI runtime gets to answer a liveness question.
const LIVE_TIMEOUT: Duration = Duration::from_secs(3);

impl HostInstaller {
    pub fn new(host: HostRoot) -> Self {
        HostInstaller {
            host,
            bundled_dir: PathBuf::from(BUNDLED_DIR),
            downloads: PathBuf::from(DOWNLOAD_DIR),
            timeouts: Timeouts::default(),
        }
    }

    /// Runs `f` with an installer that restarts through PID 1's private socket on the host.
    fn with<T>(&self, f: impl FnOnce(&mut RuntimeInstaller<'_>) -> T) -> T {
        let mut bus = SystemdBus::for_host_root(self.host.root());
        let mut installer = RuntimeInstaller::new(self.host.clone())
            .with_timeouts(self.timeouts)
            .with_service_manager(&mut bus);
        f(&mut installer)
    }
}

impl Installer for HostInstaller {
    fn source(
        &self,
        runtime: OciRuntime,
        binary: &ProfileBinary,
    ) -> Result<install::BinarySource, SourceError> {
        match binary.source {
            BinarySourceKind::Host => Ok(install::BinarySource::Host(PathBuf::from(&binary.path))),
            BinarySourceKind::Bundled => {
                let name = match runtime {
                    OciRuntime::Runc => "runc",
                    OciRuntime::Crun => "crun",
                };
                let path = self.bundled_dir.join(name);
                if path.is_file() {
                    return Ok(install::BinarySource::Local(path));
                }
                let shipped: Vec<String> = std::fs::read_dir(&self.bundled_dir)
                    .map(|d| {
                        d.flatten()
                            .map(|e| e.file_name().to_string_lossy().into_owned())
                            .collect()
                    })
                    .unwrap_or_default();
                Err(SourceError {
                    reason: "bundled_runtime_missing",
                    message: format!(
                        "this agent image bundles no {name} (it has: {}); use source Url or Host",
                        if shipped.is_empty() {
                            "none".into()
                        } else {
                            shipped.join(", ")
                        }
                    ),
                })
            }
            BinarySourceKind::Url => {
                let (Some(url), Some(sha256)) = (&binary.url, &binary.sha256) else {
                    return Err(SourceError {
                        reason: "bad_request",
                        message: "source Url needs url and sha256".into(),
                    });
                };
                let fail = |e: install::download::DownloadError| SourceError {
                    reason: e.label(),
                    message: e.to_string(),
                };
                let downloader = Downloader::for_host(&self.host).map_err(fail)?;
                let dir = self.host.path(&self.downloads);
                let local = downloader.fetch(url, sha256, &dir).map_err(fail)?;
                Ok(install::BinarySource::Local(local))
            }
        }
    }

    fn find_cri_config(&self, runtime: CriRuntime) -> Result<PathBuf, String> {
        let want = match runtime {
            CriRuntime::Containerd => CriKind::Containerd,
            CriRuntime::Crio => CriKind::Crio,
        };
        let found = cri_config::discover(&self.host)
            .map_err(|e| format!("cannot read the node's CRI runtime configuration: {e}"))?
            .ok_or_else(|| {
                format!(
                    "no containerd or CRI-O configuration on this node (looked for {} and {}); \
                     set cri.configPath",
                    cri_config::CONTAINERD_CONFIGS.map(|(c, _)| c).join(", "),
                    cri_config::CRIO_CONFIG
                )
            })?;
        let main = found.files.first().cloned().unwrap_or_default();
        if found.kind != want {
            return Err(format!(
                "the profile registers with {} but this node runs {} ({}); set cri.runtime, or a \
                 nodeSelector that leaves this node out",
                kind_name(want),
                kind_name(found.kind),
                main.display()
            ));
        }
        Ok(main)
    }

    fn plan_install(&self, req: &InstallRequest) -> Result<Planned, InstallError> {
        let plan = RuntimeInstaller::new(self.host.clone()).plan_install(req)?;
        Ok(Planned {
            noop: plan.is_noop(),
            restart_needed: plan.restart_needed,
        })
    }

    fn install(&self, req: &InstallRequest) -> Result<Outcome, InstallError> {
        self.with(|i| i.install(req))
    }

    fn plan_uninstall(&self, req: &UninstallRequest) -> Result<Planned, InstallError> {
        let plan = RuntimeInstaller::new(self.host.clone()).plan_uninstall(req)?;
        Ok(Planned {
            noop: plan.is_noop(),
            restart_needed: plan.restart_needed,
        })
    }

    fn uninstall(&self, req: &UninstallRequest) -> Result<Outcome, InstallError> {
        self.with(|i| i.uninstall(req))
    }

    fn live(&self, req: &InstallRequest) -> Result<bool, String> {
        let plan = RuntimeInstaller::new(self.host.clone())
            .plan_install(req)
            .map_err(|e| e.to_string())?;
        let shown: &Path = req.cri_socket.as_deref().unwrap_or(&plan.target.socket);
        let local = self.host.path(shown);
        install::verify::wait_for_handler(&local, shown, &req.handler, true, LIVE_TIMEOUT)
            .map(|live| live.listed || live.configured)
            .or_else(|e| match e {
                install::Failure::HandlerMissing { .. } => Ok(false),
                other => Err(other.to_string()),
            })
    }
}

fn kind_name(k: CriKind) -> &'static str {
    match k {
        CriKind::Containerd => "containerd",
        CriKind::Crio => "CRI-O",
    }
}
