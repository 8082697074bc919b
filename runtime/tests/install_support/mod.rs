//! Shared setup of the installer's tests: host trees built from fixtures, snapshots to
//! prove files byte-identical or untouched, and a tiny static binary to install.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/install")
}

/// A static x86-64 Linux program of a few hundred bytes that prints `line` and exits 0,
/// whatever its arguments: a runtime binary that runs on any host root, libraries or not.
pub fn tiny_elf(line: &str) -> Vec<u8> {
    let msg = format!("{line}\n").into_bytes();
    let base: u64 = 0x400000;
    let code_off: u64 = 64 + 56;
    let mut code: Vec<u8> = Vec::new();
    code.extend([0xb8, 1, 0, 0, 0]); // mov eax, 1 (write)
    code.extend([0xbf, 1, 0, 0, 0]); // mov edi, 1
    let lea_at = code.len();
    code.extend([0x48, 0x8d, 0x35, 0, 0, 0, 0]); // lea rsi, [rip+msg]
    code.extend([0xba]);
    code.extend((msg.len() as u32).to_le_bytes()); // mov edx, len
    code.extend([0x0f, 0x05]); // syscall
    code.extend([0xb8, 60, 0, 0, 0]); // mov eax, 60 (exit)
    code.extend([0x31, 0xff]); // xor edi, edi
    code.extend([0x0f, 0x05]); // syscall
    let rel = (code.len() - (lea_at + 7)) as i32;
    code[lea_at + 3..lea_at + 7].copy_from_slice(&rel.to_le_bytes());
    code.extend(&msg);
    let total = code_off + code.len() as u64;
    let mut f = Vec::new();
    f.extend(b"\x7fELF");
    f.extend([2, 1, 1, 0]);
    f.extend([0u8; 8]);
    f.extend(2u16.to_le_bytes()); // ET_EXEC
    f.extend(0x3eu16.to_le_bytes()); // x86-64
    f.extend(1u32.to_le_bytes());
    f.extend((base + code_off).to_le_bytes()); // entry
    f.extend(64u64.to_le_bytes()); // phoff
    f.extend(0u64.to_le_bytes()); // shoff
    f.extend(0u32.to_le_bytes());
    f.extend(64u16.to_le_bytes());
    f.extend(56u16.to_le_bytes());
    f.extend(1u16.to_le_bytes());
    f.extend([0u8; 6]);
    // PT_LOAD, R+X, the whole file at `base`.
    f.extend(1u32.to_le_bytes());
    f.extend(5u32.to_le_bytes());
    f.extend(0u64.to_le_bytes());
    f.extend(base.to_le_bytes());
    f.extend(base.to_le_bytes());
    f.extend(total.to_le_bytes());
    f.extend(total.to_le_bytes());
    f.extend(0x1000u64.to_le_bytes());
    f.extend(code);
    f
}

/// Writes `bytes` as an executable at `path`.
pub fn write_exe(path: &Path, bytes: &[u8]) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, bytes).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

pub fn copy_tree(from: &Path, to: &Path) {
    for e in std::fs::read_dir(from).unwrap().flatten() {
        let dest = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            std::fs::create_dir_all(&dest).unwrap();
            copy_tree(&e.path(), &dest);
        } else {
            std::fs::create_dir_all(to).unwrap();
            std::fs::copy(e.path(), &dest).unwrap();
        }
    }
}

/// A host root in a temp dir: the fixture's `input/` plus an empty `/proc` (host programs
/// get a procfs mounted there).
pub fn host_from(case: &Path) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    if case.join("input").exists() {
        copy_tree(&case.join("input"), dir.path());
    }
    std::fs::create_dir_all(dir.path().join("proc")).unwrap();
    dir
}

/// Every file (content and mode) and directory under `root`, by relative path.
pub fn snapshot(root: &Path) -> BTreeMap<String, (Vec<u8>, u32)> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, (Vec<u8>, u32)>) {
        for e in std::fs::read_dir(dir).unwrap().flatten() {
            let path = e.path();
            let rel = path.strip_prefix(root).unwrap().display().to_string();
            let meta = std::fs::symlink_metadata(&path).unwrap();
            if meta.is_dir() {
                out.insert(format!("{rel}/"), (Vec::new(), meta.mode() & 0o7777));
                walk(root, &path, out);
            } else {
                out.insert(rel, (std::fs::read(&path).unwrap(), meta.mode() & 0o7777));
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

/// Identity and times of every entry under `root`: equal before and after means nothing
/// was written, renamed, created or removed.
pub fn stat_snapshot(root: &Path) -> BTreeMap<String, (u64, i64, i64, i64, i64)> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, (u64, i64, i64, i64, i64)>) {
        for e in std::fs::read_dir(dir).unwrap().flatten() {
            let path = e.path();
            let m = std::fs::symlink_metadata(&path).unwrap();
            out.insert(
                path.strip_prefix(root).unwrap().display().to_string(),
                (m.ino(), m.mtime(), m.mtime_nsec(), m.ctime(), m.ctime_nsec()),
            );
            if m.is_dir() {
                walk(root, &path, out);
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

/// The differences between two snapshots, described.
pub fn differences(
    a: &BTreeMap<String, (Vec<u8>, u32)>,
    b: &BTreeMap<String, (Vec<u8>, u32)>,
) -> Vec<String> {
    let mut out = Vec::new();
    for (k, v) in a {
        match b.get(k) {
            None => out.push(format!("{k}: gone")),
            Some(w) if w != v => out.push(format!("{k}: differs")),
            _ => {}
        }
    }
    for k in b.keys() {
        if !a.contains_key(k) {
            out.push(format!("{k}: new"));
        }
    }
    out
}

/// `case.toml` of a fixture.
#[derive(Debug, Clone)]
pub struct Case {
    pub name: String,
    pub dir: PathBuf,
    pub handler: String,
    pub cri_config: PathBuf,
    pub install_path: Option<PathBuf>,
    pub error: Option<String>,
    pub message: Option<String>,
}

pub fn cases() -> Vec<Case> {
    let mut out: Vec<Case> = std::fs::read_dir(fixtures())
        .unwrap()
        .flatten()
        .filter(|e| e.path().join("case.toml").exists())
        .map(|e| {
            let text = std::fs::read_to_string(e.path().join("case.toml")).unwrap();
            let doc: toml_edit::DocumentMut = text.parse().unwrap();
            let s = |k: &str| doc.get(k).and_then(|v| v.as_str()).map(str::to_owned);
            Case {
                name: e.file_name().to_string_lossy().into_owned(),
                dir: e.path(),
                handler: s("handler").unwrap(),
                cri_config: PathBuf::from(s("cri_config").unwrap()),
                install_path: s("install_path").map(PathBuf::from),
                error: s("error"),
                message: s("message"),
            }
        })
        .collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

pub fn require_root() {
    assert_eq!(
        nix::unistd::geteuid().as_raw(),
        0,
        "this test needs root: the installer runs the runtime binary inside the host root (pivot_root)"
    );
}
