//! The runtime binary: where it goes, whether it is the one asked for (sha256), whose it
//! is, and whether it can run on this host at all.
//!
//! A binary is copied next to its final path (temp file in the target directory, fsync,
//! sha256 computed while copying), run there with `--version` inside the host root (its
//! loader and libraries are the host's), and only then renamed into place: a binary that
//! cannot run here is never placed. A file already at the target path is replaced only if
//! usernsguard put it there (a manifest says so and it still has the recorded hash);
//! a file with the wanted hash is registered in place and left alone at uninstall.

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::error::InstallError;
use super::files::sha256_file;
use super::manifest::{BinaryRecord, Fingerprint, Manifest};
use crate::host::HostRoot;
use crate::process::{self, ProcessError};

/// Where the binary comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BinarySource {
    /// A file this process reads (e.g. a runtime shipped in the agent's image), copied to
    /// the install path on the host.
    Local(PathBuf),
    /// A binary already on the host (host path), registered where it is.
    Host(PathBuf),
}

/// What to do with the binary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BinaryAction {
    /// Copy `source` (this process's path) to the target.
    Place {
        source: PathBuf,
        /// The target holds an older binary usernsguard placed, which is replaced.
        replaces_own: bool,
    },
    /// The target already is the binary: nothing to copy.
    InPlace,
}

/// The binary part of a plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BinaryPlan {
    /// Host path the handler will run.
    pub target: PathBuf,
    pub sha256: String,
    pub action: BinaryAction,
    /// What the manifest records once it is in place.
    pub record: BinaryRecord,
}

/// Default install path: `/usr/local/lib/usernsguard/<handler>/<file name of the source>`.
pub fn default_install_path(handler: &str, source: &Path) -> PathBuf {
    let name = source
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| handler.to_owned());
    Path::new("/usr/local/lib/usernsguard").join(handler).join(name)
}

/// The sha256 of `local`, reusing `known` when the file still has the fingerprint it had
/// when that hash was taken.
fn hash(
    local: &Path,
    host_path: &Path,
    known: Option<(&Fingerprint, &str)>,
) -> Result<(String, Fingerprint), InstallError> {
    let missing = |source| InstallError::BinaryMissing {
        path: host_path.to_owned(),
        source,
    };
    let meta = std::fs::metadata(local).map_err(missing)?;
    if !meta.is_file() {
        return Err(missing(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "not a regular file",
        )));
    }
    let fp = Fingerprint::of(local).ok_or_else(|| missing(std::io::ErrorKind::NotFound.into()))?;
    if let Some((known_fp, sha)) = known {
        if *known_fp == fp {
            return Ok((sha.to_owned(), fp));
        }
    }
    Ok((sha256_file(local).map_err(missing)?, fp))
}

/// Plans the binary: verifies what can be verified without changing anything.
pub fn plan(
    host: &HostRoot,
    handler: &str,
    source: &BinarySource,
    install_path: Option<&Path>,
    expected: Option<&str>,
    own: Option<&BinaryRecord>,
    others: &[Manifest],
) -> Result<BinaryPlan, InstallError> {
    match source {
        BinarySource::Host(path) => {
            let resolved = host.resolve(path).unwrap_or_else(|| path.clone());
            let known = own
                .filter(|r| r.path == resolved)
                .and_then(|r| r.fingerprint.as_ref().map(|f| (f, r.sha256.as_str())));
            let (sha, fp) = hash(&host.path(&resolved), path, known)?;
            if let Some(want) = expected {
                if want != sha {
                    return Err(InstallError::Sha256Mismatch {
                        path: path.clone(),
                        expected: want.to_owned(),
                        actual: sha,
                    });
                }
            }
            let owned = own.is_some_and(|r| r.path == resolved && r.owned);
            Ok(BinaryPlan {
                target: resolved.clone(),
                sha256: sha.clone(),
                action: BinaryAction::InPlace,
                record: BinaryRecord {
                    path: resolved,
                    sha256: sha,
                    owned,
                    fingerprint: Some(fp),
                    source: None,
                },
            })
        }
        BinarySource::Local(src) => {
            let target = install_path
                .map(Path::to_path_buf)
                .unwrap_or_else(|| default_install_path(handler, src));
            let own_here = own.filter(|r| r.path == target);
            // The source's hash: given, or remembered for an unchanged source, or computed.
            let known_src = own_here
                .and_then(|r| r.source.as_ref())
                .filter(|(p, _)| p == src)
                .map(|(_, fp)| (fp, own_here.expect("filtered").sha256.as_str()));
            let src_fp;
            let want = match expected {
                Some(w) => {
                    src_fp = Fingerprint::of(src);
                    if src_fp.is_none() {
                        return Err(InstallError::BinaryMissing {
                            path: src.clone(),
                            source: std::io::ErrorKind::NotFound.into(),
                        });
                    }
                    w.to_owned()
                }
                None => {
                    let (sha, fp) = hash(src, src, known_src)?;
                    src_fp = Some(fp);
                    sha
                }
            };
            let local_target = host.path(&target);
            let record = |owned: bool, fp: Option<Fingerprint>| BinaryRecord {
                path: target.clone(),
                sha256: want.clone(),
                owned,
                fingerprint: fp,
                source: src_fp.map(|fp| (src.clone(), fp)),
            };
            if std::fs::symlink_metadata(&local_target).is_err() {
                if expected.is_some() {
                    verify_source(src, &want)?;
                }
                return Ok(BinaryPlan {
                    target: target.clone(),
                    sha256: want.clone(),
                    action: BinaryAction::Place {
                        source: src.clone(),
                        replaces_own: false,
                    },
                    record: record(true, None),
                });
            }
            let known_target = own_here.and_then(|r| r.fingerprint.as_ref().map(|f| (f, r.sha256.as_str())));
            let (actual, fp) = hash(&local_target, &target, known_target)?;
            if actual == want {
                // Registered in place; ours only if we placed it.
                let owned = own_here.is_some_and(|r| r.owned);
                return Ok(BinaryPlan {
                    target: target.clone(),
                    sha256: want.clone(),
                    action: BinaryAction::InPlace,
                    record: record(owned, Some(fp)),
                });
            }
            let placed_by_us = own_here
                .into_iter()
                .chain(
                    others
                        .iter()
                        .filter_map(|m| m.binary.as_ref())
                        .filter(|r| r.path == target),
                )
                .any(|r| r.owned && r.sha256 == actual);
            if !placed_by_us {
                return Err(InstallError::ForeignBinary {
                    path: target,
                    actual,
                    wanted: want,
                });
            }
            if expected.is_some() {
                verify_source(src, &want)?;
            }
            Ok(BinaryPlan {
                target: target.clone(),
                sha256: want.clone(),
                action: BinaryAction::Place {
                    source: src.clone(),
                    replaces_own: true,
                },
                record: record(true, None),
            })
        }
    }
}

fn verify_source(src: &Path, want: &str) -> Result<(), InstallError> {
    let actual = sha256_file(src).map_err(|source| InstallError::BinaryMissing {
        path: src.to_owned(),
        source,
    })?;
    if actual != want {
        return Err(InstallError::Sha256Mismatch {
            path: src.to_owned(),
            expected: want.to_owned(),
            actual,
        });
    }
    Ok(())
}

/// Runs `<host_path> --version` with the host's root as `/` (its loader, its libraries);
/// returns the first line it printed, or why it cannot run here.
pub fn check_runnable(host: &HostRoot, host_path: &Path, timeout: Duration) -> Result<String, String> {
    let mut cmd = host.command(host_path);
    cmd.arg("--version")
        .env_clear()
        .env("PATH", crate::host::SERVICE_PATH);
    match process::run(cmd, timeout) {
        Ok(out) => Ok(out
            .stdout_lossy()
            .lines()
            .next()
            .unwrap_or_default()
            .trim()
            .to_owned()),
        Err(ProcessError::Spawn { source, .. }) => Err(spawn_failure(host, host_path, &source)),
        Err(e @ ProcessError::Timeout { .. }) => Err(e.to_string()),
        Err(ProcessError::Failed {
            status,
            stderr,
            stdout,
            ..
        }) => {
            let text = String::from_utf8_lossy(if stderr.is_empty() { &stdout } else { &stderr })
                .trim()
                .to_owned();
            Err(format!("`--version` exited with {status}: {text}"))
        }
        Err(e) => Err(e.to_string()),
    }
}

/// Explains an `execve` failure: ENOENT for a file that exists means its ELF interpreter
/// (dynamic loader) is missing on the host; ENOEXEC is a binary for another machine.
fn spawn_failure(host: &HostRoot, host_path: &Path, e: &std::io::Error) -> String {
    let local = host.path(host_path);
    // glibc's execvp runs a file the kernel refuses with ENOEXEC through /bin/sh, which a
    // host root may not have: ENOENT then, so look at the file itself.
    let head = std::fs::read(&local)
        .map(|b| b[..b.len().min(20)].to_vec())
        .unwrap_or_default();
    if local.exists() && !head.starts_with(b"\x7fELF") && !head.starts_with(b"#!") {
        return format!("exec format error: not a Linux executable (no ELF header): {e}");
    }
    if let Some(m) = head.get(18..20).map(|m| u16::from_le_bytes([m[0], m[1]])) {
        let ours: u16 = if cfg!(target_arch = "x86_64") {
            62
        } else if cfg!(target_arch = "aarch64") {
            183
        } else {
            m
        };
        if m != ours {
            return format!(
                "exec format error: an ELF binary for machine type {m}, not this host's ({ours}): {e}"
            );
        }
    }
    match e.raw_os_error() {
        Some(libc::ENOENT) if local.exists() => match elf_interpreter(&local) {
            Some(interp) if !host.path(&interp).exists() => format!(
                "its ELF interpreter {} does not exist on the host (a dynamically linked binary for \
                 another system; use a static build): {e}",
                interp.display()
            ),
            _ => format!("cannot execute it: {e}"),
        },
        Some(libc::ENOEXEC) => format!("exec format error: not a program for this machine ({e})"),
        _ => format!("cannot execute it: {e}"),
    }
}

/// `PT_INTERP` of a 64-bit little-endian ELF file.
pub fn elf_interpreter(path: &Path) -> Option<PathBuf> {
    let b = std::fs::read(path).ok()?;
    if b.get(..5)? != b"\x7fELF\x02" || *b.get(5)? != 1 {
        return None;
    }
    // Offsets come from the file: every sum is checked, so a crafted header is "not an
    // ELF we understand" rather than an overflow.
    let bytes = |o: usize, n: usize| b.get(o..o.checked_add(n)?);
    let u16_at = |o: usize| Some(u16::from_le_bytes(bytes(o, 2)?.try_into().ok()?));
    let u64_at = |o: usize| Some(u64::from_le_bytes(bytes(o, 8)?.try_into().ok()?));
    let phoff = usize::try_from(u64_at(0x20)?).ok()?;
    let phentsize = usize::from(u16_at(0x36)?);
    let phnum = usize::from(u16_at(0x38)?);
    for i in 0..phnum {
        let ph = phoff.checked_add(i.checked_mul(phentsize)?)?;
        if u32::from_le_bytes(bytes(ph, 4)?.try_into().ok()?) == 3 {
            let off = usize::try_from(u64_at(ph.checked_add(8)?)?).ok()?;
            let len = usize::try_from(u64_at(ph.checked_add(0x20)?)?).ok()?;
            let s = bytes(off, len)?;
            let s = s.split(|&c| c == 0).next()?;
            return Some(PathBuf::from(String::from_utf8_lossy(s).into_owned()));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 64-bit little-endian ELF header with one program header table entry at `phoff`.
    fn header(phoff: u64, phnum: u16) -> Vec<u8> {
        let mut b = vec![0u8; 64];
        b[..6].copy_from_slice(b"\x7fELF\x02\x01");
        b[0x20..0x28].copy_from_slice(&phoff.to_le_bytes());
        b[0x36..0x38].copy_from_slice(&56u16.to_le_bytes());
        b[0x38..0x3a].copy_from_slice(&phnum.to_le_bytes());
        b
    }

    #[test]
    fn the_interpreter_is_read_and_crafted_offsets_are_not_an_overflow() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bin");
        // PT_INTERP at 64, pointing at the string after it.
        let mut b = header(64, 1);
        let mut ph = vec![0u8; 56];
        ph[..4].copy_from_slice(&3u32.to_le_bytes());
        ph[8..16].copy_from_slice(&120u64.to_le_bytes());
        ph[0x20..0x28].copy_from_slice(&28u64.to_le_bytes());
        b.extend(ph);
        b.extend(b"/lib64/ld-linux-x86-64.so.2\0");
        std::fs::write(&path, &b).unwrap();
        assert_eq!(
            elf_interpreter(&path),
            Some(PathBuf::from("/lib64/ld-linux-x86-64.so.2"))
        );
        for crafted in [header(u64::MAX - 4, 1), header(64, u16::MAX)] {
            std::fs::write(&path, crafted).unwrap();
            assert_eq!(elf_interpreter(&path), None);
        }
        let mut huge_len = b.clone();
        huge_len[64 + 0x20..64 + 0x28].copy_from_slice(&u64::MAX.to_le_bytes());
        std::fs::write(&path, huge_len).unwrap();
        assert_eq!(elf_interpreter(&path), None);
    }
}
