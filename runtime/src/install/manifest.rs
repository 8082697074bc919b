//! What the installer did on this host, recorded on the host itself
//! (`/var/lib/usernsguard/install/<handler>.json`, written atomically like every host file),
//! so that uninstall restores the state from before the first install exactly and so that
//! a binary is only ever replaced or removed by its owner.
//!
//! While an install or uninstall is under way the manifest also carries a journal
//! ([`Pending`]): the content each file had before this run (copied into
//! `<handler>/journal/`), the binary it placed, and whether it got as far as restarting the
//! CRI runtime. A run killed half-way is rolled back from the journal by the next run.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::edit::SchemaVersion;

/// Where the manifests live on the host.
pub const STATE_DIR: &str = "/var/lib/usernsguard/install";

/// A file's identity and size: when a file still has the fingerprint recorded with its
/// sha256, the hash is still its hash, and the cheap path need not read it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fingerprint {
    pub dev: u64,
    pub ino: u64,
    pub size: u64,
    pub mtime_ns: i128,
}

impl Fingerprint {
    pub fn of(local: &Path) -> Option<Fingerprint> {
        let m = std::fs::metadata(local).ok()?;
        Some(Fingerprint {
            dev: m.dev(),
            ino: m.ino(),
            size: m.size(),
            mtime_ns: i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
        })
    }
}

/// Which CRI runtime setup a config belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CriFlavor {
    /// containerd with its own config (drop-in + `imports`).
    Containerd,
    /// k3s's embedded containerd (template next to the rendered config).
    K3s,
    /// rke2's embedded containerd (template next to the rendered config).
    Rke2,
    /// CRI-O (`crio.conf.d` drop-in).
    Crio,
}

impl CriFlavor {
    pub const fn as_str(self) -> &'static str {
        match self {
            CriFlavor::Containerd => "containerd",
            CriFlavor::K3s => "k3s",
            CriFlavor::Rke2 => "rke2",
            CriFlavor::Crio => "cri-o",
        }
    }

    /// The systemd units that run this CRI runtime, in the order they are tried.
    pub fn units(self) -> &'static [&'static str] {
        match self {
            CriFlavor::Containerd => &["containerd.service"],
            CriFlavor::K3s => &["k3s.service", "k3s-agent.service"],
            CriFlavor::Rke2 => &["rke2-server.service", "rke2-agent.service"],
            CriFlavor::Crio => &["crio.service"],
        }
    }
}

/// A file's content before the installer first changed it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Original {
    /// The file did not exist.
    Absent,
    /// Its bytes are in the state directory under `backup`.
    Saved { backup: String, sha256: String },
}

/// How to take usernsguard's change back out of a file that someone else changed after the
/// install (when it is unchanged, the original bytes are restored instead).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Undo {
    /// The file is ours (a drop-in): remove it.
    Remove,
    /// Remove `entry` from the root config's `imports`.
    RemoveImport { entry: String },
    /// Remove our marked block from a k3s/rke2 template.
    RemoveTemplateBlock,
    /// Remove the handler's tables from a containerd config version 2 root config, which
    /// gets them in place (see `edit::add_runtime`), and those of the runtimes in `also`
    /// (containerd's default runtime, declared with it).
    RemoveRuntime {
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        also: Vec<String>,
    },
}

/// A host file the installer wrote.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileRecord {
    pub path: PathBuf,
    pub original: Original,
    /// sha256 of what the installer last wrote.
    pub written_sha256: String,
    pub undo: Undo,
    /// Write its temp file in the parent directory (the file is in a drop-in directory).
    #[serde(default)]
    pub temp_in_parent: bool,
}

/// The runtime binary a handler runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BinaryRecord {
    pub path: PathBuf,
    pub sha256: String,
    /// Placed by usernsguard (removed at uninstall) or found in place (left alone).
    pub owned: bool,
    pub fingerprint: Option<Fingerprint>,
    /// The file it was copied from (this process's view) and its fingerprint then, so an
    /// unchanged source need not be hashed again.
    #[serde(default)]
    pub source: Option<(PathBuf, Fingerprint)>,
}

/// How far an interrupted run got.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Writing files; the CRI runtime has not been restarted.
    Writing,
    /// The CRI runtime is being restarted with the new files.
    Restarting,
    /// An uninstall is done and only tidying up remains (never rolled back).
    Committed,
}

/// A file as it was before the current run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JournalFile {
    pub path: PathBuf,
    pub previous: Original,
    #[serde(default)]
    pub temp_in_parent: bool,
}

/// What the current run did to the binary.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum JournalBinary {
    /// Placed a new binary where there was none.
    Created { path: PathBuf },
    /// Replaced our own older binary, which was hard-linked to `backup` first.
    Replaced { path: PathBuf, backup: PathBuf },
    /// Is removing our binary, hard-linked to `backup` first.
    Removed { path: PathBuf, backup: PathBuf },
}

/// The journal of a run under way.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pending {
    pub phase: Phase,
    /// The unit being restarted (systemd mode).
    pub unit: Option<String>,
    pub files: Vec<JournalFile>,
    pub binary: Option<JournalBinary>,
    /// Directories this run created.
    pub dirs: Vec<PathBuf>,
    /// The manifest before this run (`None`: there was none).
    pub previous: Option<Box<Manifest>>,
}

/// Everything usernsguard changed on the host for one handler.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub handler: String,
    pub flavor: CriFlavor,
    /// The CRI config named at install (host path).
    pub cri_config: PathBuf,
    pub schema: Option<SchemaVersion>,
    pub binary: Option<BinaryRecord>,
    /// In the order they were written; undone in reverse.
    pub files: Vec<FileRecord>,
    /// Directories the installer created, outermost first.
    pub dirs: Vec<PathBuf>,
    #[serde(default)]
    pub pending: Option<Pending>,
}

/// The manifests of one host.
#[derive(Debug, Clone)]
pub struct Store {
    /// Host path of the state directory.
    pub dir: PathBuf,
}

impl Store {
    pub fn manifest_path(&self, handler: &str) -> PathBuf {
        self.dir.join(format!("{handler}.json"))
    }

    /// The directory of a handler's backups.
    pub fn handler_dir(&self, handler: &str) -> PathBuf {
        self.dir.join(handler)
    }

    /// A backup file name for `path`, unique per path.
    pub fn backup_name(kind: &str, path: &Path) -> String {
        use sha2::Digest;
        let digest = sha2::Sha256::digest(path.as_os_str().as_encoded_bytes());
        let short: String = digest[..6].iter().map(|b| format!("{b:02x}")).collect();
        format!(
            "{kind}/{short}-{}",
            path.file_name().unwrap_or_default().to_string_lossy()
        )
    }

    /// Reads the manifest of `handler` (through `local`, this process's view of host paths).
    pub fn load(&self, local: impl Fn(&Path) -> PathBuf, handler: &str) -> Result<Option<Manifest>, String> {
        let path = self.manifest_path(handler);
        match std::fs::read(local(&path)) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| format!("{} is not a usernsguard install manifest: {e}", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(format!("reading {}: {e}", path.display())),
        }
    }

    /// Every manifest on the host except `except`'s.
    pub fn others(&self, local: impl Fn(&Path) -> PathBuf, except: &str) -> Vec<Manifest> {
        let Ok(entries) = std::fs::read_dir(local(&self.dir)) else {
            return Vec::new();
        };
        entries
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                let handler = name.strip_suffix(".json")?.to_owned();
                (handler != except && !name.starts_with('.')).then_some(handler)
            })
            .filter_map(|h| self.load(&local, &h).ok().flatten())
            .collect()
    }
}

impl Manifest {
    pub fn to_json(&self) -> Vec<u8> {
        let mut v = serde_json::to_vec_pretty(self).expect("manifest serializes");
        v.push(b'\n');
        v
    }

    /// The record of `path`, if the installer wrote it.
    pub fn file(&self, path: &Path) -> Option<&FileRecord> {
        self.files.iter().find(|f| f.path == path)
    }
}
