//! The installer's errors, one enum the agent matches on. Every variant falls in one of
//! three classes ([`InstallError::class`]): bad input (nothing on the host was changed),
//! failed and rolled back (the host is as before, the CRI runtime restarted again if it had
//! been restarted), or a rollback that failed too (a human has to look).

use std::io;
use std::path::PathBuf;

use super::edit::EditError;
use super::systemd::{RestartOutcome, SystemdError};

/// What kind of failure, for exit codes, NodeReport states and metric labels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// Refused before changing anything.
    BadInput,
    /// Failed while changing the host; every change was undone.
    RolledBack,
    /// Failed, and undoing it failed too: the host may be half-changed.
    RollbackFailed,
}

/// Why a run that had started changing the host failed.
#[derive(Debug, thiserror::Error)]
pub enum Failure {
    #[error("writing {path}: {source}")]
    Write { path: PathBuf, source: io::Error },
    #[error("recording the install in {path}: {source}")]
    State { path: PathBuf, source: io::Error },
    #[error("{unit} did not come back after the restart: {outcome}")]
    RestartFailed {
        unit: String,
        outcome: Box<RestartOutcome>,
    },
    #[error("restarting {unit}: {source}")]
    Restart { unit: String, source: SystemdError },
    #[error("the CRI runtime did not answer on {socket} after the restart: {detail}")]
    CriDown { socket: PathBuf, detail: String },
    #[error(
        "the CRI runtime on {socket} is up but does not list the handler {handler} (it lists: {listed})"
    )]
    HandlerMissing {
        socket: PathBuf,
        handler: String,
        listed: String,
    },
    #[error("the CRI runtime on {socket} still lists the handler {handler} after the uninstall")]
    HandlerStillThere { socket: PathBuf, handler: String },
}

/// Everything that can go wrong installing or uninstalling a handler.
#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    /// A request that cannot be valid (a handler name Kubernetes would reject, a relative
    /// host path, a malformed sha256).
    #[error("{0}")]
    BadRequest(String),
    #[error("reading {path}: {source}")]
    ConfigRead { path: PathBuf, source: io::Error },
    /// A config file that cannot be edited (unparseable, unknown schema version).
    #[error(transparent)]
    Edit(#[from] EditError),
    #[error("{path} is neither a containerd configuration (no `version`/`plugins`) nor a CRI-O one (no `[crio]` table)")]
    UnknownConfig { path: PathBuf },
    /// The handler is registered already, by a file usernsguard does not own, with another
    /// binary: changing it would take it from its owner.
    #[error(
        "{file} already registers the runtime handler {handler} (binary {binary}): usernsguard does not \
         change a handler it did not install; pick another handler name or remove it there"
    )]
    HandlerConflict {
        handler: String,
        file: PathBuf,
        binary: String,
    },
    #[error("the runtime binary {path} cannot be read: {source}")]
    BinaryMissing { path: PathBuf, source: io::Error },
    #[error("{path} does not have the sha256 given ({expected}); it has {actual}")]
    Sha256Mismatch {
        path: PathBuf,
        expected: String,
        actual: String,
    },
    #[error("the runtime binary {path} cannot run on this host: {detail}")]
    BinaryNotRunnable { path: PathBuf, detail: String },
    /// A different file is at the install path and usernsguard did not put it there.
    #[error(
        "{path} exists and was not placed by usernsguard (sha256 {actual}, wanted {wanted}); it is left \
         alone: choose another --install-path or remove it"
    )]
    ForeignBinary {
        path: PathBuf,
        actual: String,
        wanted: String,
    },
    #[error("{path} is not writable ({source}), so nothing was changed")]
    NotWritable { path: PathBuf, source: io::Error },
    #[error("no unit of {candidates} is known to systemd; pass --unit")]
    UnitNotFound { candidates: String },
    #[error("cannot ask systemd about {unit} before changing anything: {source}")]
    Systemd { unit: String, source: SystemdError },
    /// Restart mode systemd without a service manager to do it.
    #[error("restart mode systemd needs a service manager")]
    NoServiceManager,
    #[error("{path} changed while the install was being planned; nothing was changed, run it again")]
    ConcurrentChange { path: PathBuf },
    /// Another run (the CLI, or the agent of an overlapping pod) holds the config directory.
    #[error("another usernsguard install or uninstall is changing {dir} (waited {waited:?}); nothing was changed, run it again")]
    Busy {
        dir: PathBuf,
        waited: std::time::Duration,
    },
    #[error("{0}")]
    State(String),
    /// The run failed after changing the host, and every change was undone.
    #[error("{cause}; rolled back: {}", rollback_summary(restart.as_deref()))]
    RolledBack {
        cause: Failure,
        /// The restart that brought the CRI runtime back on the old config, if one was needed.
        restart: Option<Box<RestartOutcome>>,
    },
    /// The run failed, and undoing it failed too.
    #[error("{cause}; ROLLBACK FAILED, the host needs attention: {}", problems.join("; "))]
    RollbackFailed { cause: Failure, problems: Vec<String> },
}

fn rollback_summary(restart: Option<&RestartOutcome>) -> String {
    match restart {
        Some(o) => format!("every file restored, {o}"),
        None => "every file restored, no restart was needed".into(),
    }
}

impl InstallError {
    pub fn class(&self) -> ErrorClass {
        match self {
            InstallError::RolledBack { .. } => ErrorClass::RolledBack,
            InstallError::RollbackFailed { .. } => ErrorClass::RollbackFailed,
            _ => ErrorClass::BadInput,
        }
    }

    /// A short, bounded label for metrics and NodeReport reasons.
    pub fn label(&self) -> &'static str {
        match self {
            InstallError::BadRequest(_) => "bad_request",
            InstallError::ConfigRead { .. } | InstallError::UnknownConfig { .. } => "config_unreadable",
            InstallError::Edit(EditError::Parse { .. }) => "config_unparseable",
            InstallError::Edit(EditError::NoVersion { .. } | EditError::UnsupportedVersion { .. }) => {
                "config_version_unsupported"
            }
            InstallError::Edit(EditError::Shape { .. }) => "config_unparseable",
            InstallError::HandlerConflict { .. } => "handler_conflict",
            InstallError::BinaryMissing { .. } => "binary_missing",
            InstallError::Sha256Mismatch { .. } => "sha256_mismatch",
            InstallError::BinaryNotRunnable { .. } => "binary_not_runnable",
            InstallError::ForeignBinary { .. } => "binary_foreign",
            InstallError::NotWritable { .. } => "not_writable",
            InstallError::UnitNotFound { .. }
            | InstallError::Systemd { .. }
            | InstallError::NoServiceManager => "service_manager",
            InstallError::ConcurrentChange { .. } => "concurrent_change",
            InstallError::Busy { .. } => "busy",
            InstallError::State(_) => "state_unreadable",
            InstallError::RolledBack { cause, .. } | InstallError::RollbackFailed { cause, .. } => {
                match cause {
                    Failure::Write { .. } | Failure::State { .. } => "write_failed",
                    Failure::RestartFailed { .. } | Failure::Restart { .. } => "restart_failed",
                    Failure::CriDown { .. } => "cri_down",
                    Failure::HandlerMissing { .. } | Failure::HandlerStillThere { .. } => "handler_not_live",
                }
            }
        }
    }
}
