//! Writing host files so that a crash at any instant leaves each file either as it was or
//! as it should become, never half-written: a temp file, fsync, rename over the target,
//! fsync of the directory. Removing is one `unlink` plus the directory's fsync.
//!
//! Every step that changes the disk is announced first to an optional [`StepHook`]. The
//! tests use it to fail a step (rollback tests) or to SIGKILL the installing process at
//! step N (crash tests); production code never sets one.
//!
//! Temp files are named `.<name>.usernsguard-tmp`. A drop-in directory is read whole by its
//! CRI runtime (CRI-O reads every file in `crio.conf.d`, whatever its name; a containerd
//! `imports` glob like `conf.d/*` matches dotfiles too), so a temp file left there by a
//! crash would be loaded: files in such directories get their temp file in the parent
//! directory instead (same file system in practice; a cross-device rename falls back to a
//! temp file beside the target).

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::host::HostRoot;

/// One host file the installer wants to change: its content now and afterwards (`None`:
/// absent), with what the manifest needs to undo it later.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileChange {
    /// Host path (symlinks resolved: the file that is really written).
    pub path: PathBuf,
    pub before: Option<Vec<u8>>,
    pub after: Option<Vec<u8>>,
    /// The file sits in a drop-in directory (see the module docs).
    pub temp_in_parent: bool,
    /// How to take usernsguard's part back out if someone else edits the file later.
    pub undo: super::manifest::Undo,
}

impl FileChange {
    pub fn changes(&self) -> bool {
        self.before != self.after
    }
}

/// One change to the disk, announced before it is made. Paths are host paths.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Creating `temp` and writing the new content of `target` into it.
    WriteTemp { target: PathBuf, temp: PathBuf },
    /// fsync of the temp file.
    Fsync { target: PathBuf },
    /// Renaming the temp file over `target`.
    Rename { target: PathBuf },
    /// fsync of a directory after a rename, unlink or mkdir in it.
    FsyncDir { dir: PathBuf },
    /// Unlinking `target`.
    Remove { target: PathBuf },
    /// Creating the directory `dir`.
    MakeDir { dir: PathBuf },
    /// Removing the empty directory `dir`.
    RemoveDir { dir: PathBuf },
    /// Hard-linking `target` to `backup` (a runtime binary about to be replaced).
    Link { target: PathBuf, backup: PathBuf },
}

/// Called before each [`Step`]; an error makes the step fail as an I/O error would.
pub type StepHook<'a> = Box<dyn FnMut(&Step) -> io::Result<()> + 'a>;

/// The host's files, written through the hook.
pub struct HostFs<'a> {
    host: HostRoot,
    hook: Option<StepHook<'a>>,
}

impl std::fmt::Debug for HostFs<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostFs")
            .field("host", &self.host)
            .field("hook", &self.hook.is_some())
            .finish()
    }
}

/// What a file looks like before it is replaced, to give its replacement the same mode and
/// owner.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileMeta {
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
}

/// The name of the temp file for `target`.
pub fn temp_name(target: &Path) -> String {
    format!(
        ".{}.usernsguard-tmp",
        target.file_name().unwrap_or_default().to_string_lossy()
    )
}

/// Whether `name` is a temp file of ours.
pub fn is_temp_name(name: &str) -> bool {
    name.starts_with('.') && name.ends_with(".usernsguard-tmp")
}

/// sha256 of a byte string, lower-case hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

/// A sha256 as this project writes it everywhere (flags, the CRD, file names): 64
/// lower-case hex digits.
pub fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// sha256 of a file, streamed.
pub fn sha256_file(path: &Path) -> io::Result<String> {
    let mut f = File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex(&h.finalize()))
}

fn fsync_dir(path: &Path) -> io::Result<()> {
    File::open(path)?.sync_all()
}

impl<'a> HostFs<'a> {
    pub fn new(host: HostRoot, hook: Option<StepHook<'a>>) -> Self {
        HostFs { host, hook }
    }

    pub fn host(&self) -> &HostRoot {
        &self.host
    }

    /// The path this process opens for a host path.
    pub fn local(&self, host_path: &Path) -> PathBuf {
        self.host.path(host_path)
    }

    fn step(&mut self, step: Step) -> io::Result<()> {
        match &mut self.hook {
            Some(hook) => hook(&step),
            None => Ok(()),
        }
    }

    /// The file's content, `None` when it does not exist.
    pub fn read(&self, host_path: &Path) -> io::Result<Option<Vec<u8>>> {
        match std::fs::read(self.local(host_path)) {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    pub fn meta(&self, host_path: &Path) -> Option<FileMeta> {
        std::fs::metadata(self.local(host_path)).ok().map(|m| FileMeta {
            mode: m.mode() & 0o7777,
            uid: m.uid(),
            gid: m.gid(),
        })
    }

    /// An exclusive `flock` on the host directory `dir`, held until the returned file is
    /// dropped; `Ok(None)` when another process still holds it after `wait`. A directory, not
    /// a file: the config files in it are replaced by rename (a lock on one would stay with
    /// the old inode), and locking leaves nothing behind on the host.
    pub fn lock_dir(&self, dir: &Path, wait: std::time::Duration) -> io::Result<Option<File>> {
        use std::os::fd::AsRawFd;
        let f = File::open(self.local(dir))?;
        let deadline = std::time::Instant::now() + wait;
        loop {
            // SAFETY: flock on a descriptor this function owns.
            if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
                return Ok(Some(f));
            }
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EWOULDBLOCK) {
                return Err(e);
            }
            if std::time::Instant::now() >= deadline {
                return Ok(None);
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }

    /// Creates `dir` and its missing parents, outermost first, adding each one made to
    /// `created` as soon as it exists (so a failure half-way still says what to remove).
    pub fn make_dirs(&mut self, dir: &Path, created: &mut Vec<PathBuf>) -> io::Result<()> {
        let mut missing = Vec::new();
        let mut d = Some(dir);
        while let Some(p) = d {
            if self.local(p).exists() {
                break;
            }
            missing.push(p.to_path_buf());
            d = p.parent();
        }
        missing.reverse();
        for p in missing {
            self.step(Step::MakeDir { dir: p.clone() })?;
            std::fs::create_dir(self.local(&p))?;
            created.push(p.clone());
            std::fs::set_permissions(self.local(&p), std::fs::Permissions::from_mode(0o755))?;
            if let Some(parent) = p.parent() {
                self.step(Step::FsyncDir {
                    dir: parent.to_path_buf(),
                })?;
                fsync_dir(&self.local(parent))?;
            }
        }
        Ok(())
    }

    /// Removes `dir` if it is empty; `Ok(false)` when it is not (or is gone).
    pub fn remove_dir_if_empty(&mut self, dir: &Path) -> io::Result<bool> {
        let local = self.local(dir);
        match std::fs::read_dir(&local) {
            Ok(mut entries) => {
                if entries.next().is_some() {
                    return Ok(false);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(e),
        }
        self.step(Step::RemoveDir {
            dir: dir.to_path_buf(),
        })?;
        std::fs::remove_dir(&local)?;
        if let Some(parent) = dir.parent() {
            self.step(Step::FsyncDir {
                dir: parent.to_path_buf(),
            })?;
            fsync_dir(&self.local(parent))?;
        }
        Ok(true)
    }

    /// Where the temp file for `target` goes.
    fn temp_for(&self, target: &Path, temp_in_parent: bool) -> PathBuf {
        let dir = target.parent().unwrap_or(Path::new("/"));
        let dir = if temp_in_parent {
            dir.parent().unwrap_or(dir)
        } else {
            dir
        };
        dir.join(temp_name(target))
    }

    /// Writes `bytes` to `target` atomically. `meta`: mode and owner for the file (an
    /// existing file's are kept when `None`; a new file gets 0644).
    pub fn write_atomic(
        &mut self,
        target: &Path,
        bytes: &[u8],
        meta: Option<FileMeta>,
        temp_in_parent: bool,
    ) -> io::Result<()> {
        let meta = meta.or_else(|| self.meta(target));
        let mut temp = self.temp_for(target, temp_in_parent);
        let result = self.write_via(target, &temp, bytes, meta);
        let result = match result {
            Err(e) if e.raw_os_error() == Some(libc::EXDEV) && temp_in_parent => {
                let _ = std::fs::remove_file(self.local(&temp));
                temp = self.temp_for(target, false);
                self.write_via(target, &temp, bytes, meta)
            }
            other => other,
        };
        if result.is_err() {
            let _ = std::fs::remove_file(self.local(&temp));
        }
        result
    }

    fn write_via(
        &mut self,
        target: &Path,
        temp: &Path,
        bytes: &[u8],
        meta: Option<FileMeta>,
    ) -> io::Result<()> {
        let mut f = self.create_temp(target, temp, meta.map_or(0o644, |m| m.mode))?;
        f.write_all(bytes)?;
        self.finish_temp(target, temp, f, meta)
    }

    /// Announces the fsync of `target`'s temp file (written by the caller).
    pub fn step_fsync(&mut self, target: &Path) -> io::Result<()> {
        self.step(Step::Fsync {
            target: target.to_path_buf(),
        })
    }

    /// Creates the temp file for `target` (a stale one from a crash is replaced).
    pub fn create_temp(&mut self, target: &Path, temp: &Path, mode: u32) -> io::Result<File> {
        self.step(Step::WriteTemp {
            target: target.to_path_buf(),
            temp: temp.to_path_buf(),
        })?;
        let local = self.local(temp);
        match std::fs::remove_file(&local) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&local)
    }

    /// fsync, owner and mode, rename over `target`, fsync of the directories.
    pub fn finish_temp(
        &mut self,
        target: &Path,
        temp: &Path,
        f: File,
        meta: Option<FileMeta>,
    ) -> io::Result<()> {
        if let Some(m) = meta {
            f.set_permissions(std::fs::Permissions::from_mode(m.mode))?;
            if nix::unistd::geteuid().is_root() {
                std::os::unix::fs::fchown(&f, Some(m.uid), Some(m.gid))?;
            }
        }
        self.step(Step::Fsync {
            target: target.to_path_buf(),
        })?;
        f.sync_all()?;
        drop(f);
        self.step(Step::Rename {
            target: target.to_path_buf(),
        })?;
        std::fs::rename(self.local(temp), self.local(target))?;
        let dir = target.parent().unwrap_or(Path::new("/")).to_path_buf();
        self.step(Step::FsyncDir { dir: dir.clone() })?;
        fsync_dir(&self.local(&dir))?;
        let temp_dir = temp.parent().unwrap_or(Path::new("/"));
        if temp_dir != dir {
            fsync_dir(&self.local(temp_dir))?;
        }
        Ok(())
    }

    /// Removes `target`; `Ok(false)` if it did not exist.
    pub fn remove(&mut self, target: &Path) -> io::Result<bool> {
        let local = self.local(target);
        if std::fs::symlink_metadata(&local).is_err() {
            return Ok(false);
        }
        self.step(Step::Remove {
            target: target.to_path_buf(),
        })?;
        match std::fs::remove_file(&local) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(e),
        }
        let dir = target.parent().unwrap_or(Path::new("/")).to_path_buf();
        self.step(Step::FsyncDir { dir: dir.clone() })?;
        fsync_dir(&self.local(&dir))?;
        Ok(true)
    }

    /// Hard-links `target` to `backup` (same directory), replacing a stale backup.
    pub fn link(&mut self, target: &Path, backup: &Path) -> io::Result<()> {
        self.step(Step::Link {
            target: target.to_path_buf(),
            backup: backup.to_path_buf(),
        })?;
        let _ = std::fs::remove_file(self.local(backup));
        std::fs::hard_link(self.local(target), self.local(backup))?;
        let dir = target.parent().unwrap_or(Path::new("/")).to_path_buf();
        self.step(Step::FsyncDir { dir: dir.clone() })?;
        fsync_dir(&self.local(&dir))
    }

    /// Renames `from` over `to` (same directory) and syncs the directory.
    pub fn rename(&mut self, from: &Path, to: &Path) -> io::Result<()> {
        self.step(Step::Rename {
            target: to.to_path_buf(),
        })?;
        std::fs::rename(self.local(from), self.local(to))?;
        let dir = to.parent().unwrap_or(Path::new("/")).to_path_buf();
        self.step(Step::FsyncDir { dir: dir.clone() })?;
        fsync_dir(&self.local(&dir))
    }

    /// Removes temp files a killed run left in `dir` (a host path).
    pub fn remove_stale_temps(&mut self, dir: &Path) -> io::Result<()> {
        let Ok(entries) = std::fs::read_dir(self.local(dir)) else {
            return Ok(());
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if is_temp_name(&name) {
                self.remove(&dir.join(name))?;
            }
        }
        Ok(())
    }

    /// Whether this process may create files in `dir` (the nearest existing ancestor, for
    /// a directory still to be made): catches read-only mounts and immutable directories
    /// before anything is changed.
    pub fn check_writable(&self, dir: &Path) -> Result<(), (PathBuf, io::Error)> {
        let mut d = dir;
        while !self.local(d).exists() {
            match d.parent() {
                Some(p) => d = p,
                None => break,
            }
        }
        nix::unistd::access(&self.local(d), nix::unistd::AccessFlags::W_OK)
            .map_err(|e| (d.to_path_buf(), io::Error::from_raw_os_error(e as i32)))
    }
}
