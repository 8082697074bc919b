//! The installer killed with SIGKILL before every single disk step, for containerd 1.6
//! (config v2) and 2.1 (config v3), installing and uninstalling. After each kill every
//! host config file is its old or its new version, and the real containerd of that version
//! loads the result (`containerd --config ... config dump`, run in a private mount
//! namespace where the test's host tree is `/etc/containerd`). A run after the kill rolls
//! the journal back and ends exactly where an uninterrupted run ends.
//!
//! Custom harness: the binary is the test, or, re-executed with `CRASH_CHILD` set, the
//! installing child whose step hook SIGKILLs itself at step N (N = 0: count the steps).
//! Needs root.

mod install_support;

use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use install_support::*;
use usernsguard_runtime::host::HostRoot;
use usernsguard_runtime::install::{
    BinarySource, InstallRequest, Installer, RestartMode, Step, UninstallRequest,
};

const CHILD: &str = "CRASH_CHILD";
const CONFIG: &str = "/etc/containerd/config.toml";
const HANDLER: &str = "runc-1-4-3";

fn install_req(binary: &Path) -> InstallRequest {
    InstallRequest {
        handler: HANDLER.into(),
        binary: BinarySource::Local(binary.to_owned()),
        install_path: None,
        sha256: None,
        cri_config: PathBuf::from(CONFIG),
        restart: RestartMode::None,
        cri_socket: None,
    }
}

fn uninstall_req() -> UninstallRequest {
    UninstallRequest {
        handler: HANDLER.into(),
        cri_config: PathBuf::from(CONFIG),
        restart: RestartMode::None,
        cri_socket: None,
    }
}

/// The child: `CRASH_CHILD=<install|uninstall> <host> <binary> <N>`.
fn child(spec: &str) {
    let parts: Vec<&str> = spec.split(' ').collect();
    let (op, host, binary, kill_at): (&str, &str, &str, usize) =
        (parts[0], parts[1], parts[2], parts[3].parse().unwrap());
    let mut count = 0usize;
    let hook = Box::new(|_: &Step| {
        count += 1;
        if count == kill_at {
            nix::sys::signal::kill(nix::unistd::getpid(), nix::sys::signal::Signal::SIGKILL).unwrap();
        }
        Ok(())
    });
    let mut installer = Installer::new(HostRoot::at(host).unwrap()).with_step_hook(hook);
    let result = match op {
        "install" => installer.install(&install_req(Path::new(binary))).map(drop),
        _ => installer.uninstall(&uninstall_req()).map(drop),
    };
    drop(installer);
    result.unwrap();
    println!("STEPS {count}");
}

fn run_child(op: &str, host: &Path, binary: &Path, kill_at: usize) -> std::process::Output {
    Command::new(std::env::current_exe().unwrap())
        .env(
            CHILD,
            format!("{op} {} {} {kill_at}", host.display(), binary.display()),
        )
        .output()
        .unwrap()
}

/// `containerd config dump` of the host tree's config, by the real containerd.
fn containerd_loads(containerd: &Path, host: &Path) -> Result<String, String> {
    let out = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c"])
        .arg(format!(
            "mount --bind {} /etc/containerd && exec {} --config {CONFIG} config dump",
            host.join("etc/containerd").display(),
            containerd.display()
        ))
        .output()
        .unwrap();
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

fn containerd_21() -> PathBuf {
    let cache = PathBuf::from(std::env::var("HOME").unwrap()).join(".cache/usernsguard/containerd-2.1");
    let bin = cache.join("usr/bin/containerd");
    if !bin.exists() {
        let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        let tool = [
            repo.join("shared/tools/debian-unstable.sh"),
            PathBuf::from("/work/shared/tools/debian-unstable.sh"),
        ]
        .into_iter()
        .find(|p| p.exists())
        .expect("../shared/tools/debian-unstable.sh, to fetch containerd 2.1");
        let st = Command::new("bash")
            .arg(tool)
            .arg(&cache)
            .arg("containerd")
            .status()
            .unwrap();
        assert!(st.success() && bin.exists(), "could not fetch containerd 2.1");
    }
    bin
}

/// Files under `etc/`, by relative path.
fn etc(host: &Path) -> std::collections::BTreeMap<String, (Vec<u8>, u32)> {
    snapshot(&host.join("etc"))
}

/// A snapshot without the manifest, whose binary fingerprint (inode, mtime) differs from
/// host to host.
fn without_manifest(
    s: &std::collections::BTreeMap<String, (Vec<u8>, u32)>,
) -> std::collections::BTreeMap<String, (Vec<u8>, u32)> {
    s.iter()
        .filter(|(k, _)| !k.ends_with(".json"))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

fn temps_left(root: &Path) -> Vec<String> {
    snapshot(root)
        .into_keys()
        .filter(|k| k.contains(".usernsguard-tmp") || k.contains(".usernsguard-prev"))
        .collect()
}

fn scenario(case: &str, containerd: &Path, binary: &Path) -> (usize, usize) {
    let fixture = fixtures().join(case);
    // The reference: uninterrupted install.
    let reference = host_from(&fixture);
    let old = etc(reference.path());
    let counted = run_child("install", reference.path(), binary, 0);
    assert!(
        counted.status.success(),
        "{}",
        String::from_utf8_lossy(&counted.stderr)
    );
    let steps: usize = String::from_utf8_lossy(&counted.stdout)
        .trim()
        .strip_prefix("STEPS ")
        .unwrap()
        .parse()
        .unwrap();
    let new = etc(reference.path());
    assert_ne!(old, new);
    let new_dump = containerd_loads(containerd, reference.path()).expect("the installed config loads");
    assert!(new_dump.contains(HANDLER), "{new_dump}");
    // And keeps the root's CRI settings: containerd 1.x lets a drop-in's CRI section replace
    // the root's, default runtime and all (why a v2 root is edited in place).
    assert!(
        new_dump.contains("containerd.runtimes.runc]"),
        "{case}: the default runtime runc is gone from the merged config:\n{new_dump}"
    );
    let installed = snapshot(reference.path());

    let check = |host: &Path, what: &str| {
        let now = etc(host);
        for key in old.keys().chain(new.keys()) {
            let v = now.get(key);
            assert!(
                v == old.get(key) || v == new.get(key),
                "{case} {what}: {key} is neither the old nor the new version"
            );
        }
        // A temp file may be left; it is never in a directory the CRI runtime reads whole.
        let extra: Vec<_> = now
            .keys()
            .filter(|k| !old.contains_key(*k) && !new.contains_key(*k) && !k.ends_with(".usernsguard-tmp"))
            .collect();
        assert!(extra.is_empty(), "{case} {what}: unexpected {extra:?}");
        if let Err(e) = containerd_loads(containerd, host) {
            panic!("{case} {what}: containerd refuses the config: {e}");
        }
    };

    for n in 1..=steps {
        let host = host_from(&fixture);
        let out = run_child("install", host.path(), binary, n);
        assert_eq!(out.status.signal(), Some(9), "{case} install step {n}: {out:?}");
        check(host.path(), &format!("install killed at step {n}/{steps}"));
        // The next run rolls back and installs: the same end as without the kill.
        Installer::new(HostRoot::at(host.path()).unwrap())
            .install(&install_req(binary))
            .unwrap_or_else(|e| panic!("{case} after install step {n}: {e}"));
        assert_eq!(
            differences(
                &without_manifest(&installed),
                &without_manifest(&snapshot(host.path()))
            ),
            Vec::<String>::new(),
            "{case} after install step {n}"
        );
        let manifest =
            std::fs::read_to_string(host.path().join("var/lib/usernsguard/install/runc-1-4-3.json")).unwrap();
        assert!(manifest.contains("\"pending\": null"), "{manifest}");
        assert_eq!(
            temps_left(host.path()),
            Vec::<String>::new(),
            "{case} after install step {n}"
        );
    }

    // Uninstall, killed the same way.
    let counted = run_child("uninstall", reference.path(), binary, 0);
    assert!(
        counted.status.success(),
        "{}",
        String::from_utf8_lossy(&counted.stderr)
    );
    let un_steps: usize = String::from_utf8_lossy(&counted.stdout)
        .trim()
        .strip_prefix("STEPS ")
        .unwrap()
        .parse()
        .unwrap();
    let pristine = snapshot(host_from(&fixture).path());
    assert_eq!(
        differences(&pristine, &snapshot(reference.path())),
        Vec::<String>::new()
    );
    for n in 1..=un_steps {
        let host = host_from(&fixture);
        Installer::new(HostRoot::at(host.path()).unwrap())
            .install(&install_req(binary))
            .unwrap();
        let out = run_child("uninstall", host.path(), binary, n);
        assert_eq!(out.status.signal(), Some(9), "{case} uninstall step {n}: {out:?}");
        check(host.path(), &format!("uninstall killed at step {n}/{un_steps}"));
        Installer::new(HostRoot::at(host.path()).unwrap())
            .uninstall(&uninstall_req())
            .unwrap_or_else(|e| panic!("{case} after uninstall step {n}: {e}"));
        assert_eq!(
            differences(&pristine, &snapshot(host.path())),
            Vec::<String>::new(),
            "{case} after uninstall step {n}"
        );
        assert!(temps_left(host.path()).is_empty());
    }
    (steps, un_steps)
}

fn main() {
    if let Ok(spec) = std::env::var(CHILD) {
        child(&spec);
        return;
    }
    require_root();
    let src = tempfile::tempdir().unwrap();
    let binary = src.path().join("runc");
    write_exe(&binary, &tiny_elf("runc version 1.4.3 (tiny)"));
    let c16 = PathBuf::from("/usr/bin/containerd");
    assert!(
        c16.exists(),
        "containerd 1.6 is not installed: apt-get install containerd"
    );
    for (case, containerd) in [
        ("containerd-1.6-default", c16),
        ("containerd-2.1-default", containerd_21()),
    ] {
        let t = std::time::Instant::now();
        let (i, u) = scenario(case, &containerd, &binary);
        println!(
            "test crash_{case} ... ok (SIGKILL at each of {i} install and {u} uninstall steps; {} ms)",
            t.elapsed().as_millis()
        );
    }
    println!("test result: ok. 2 passed; 0 failed");
}
