//! Bad input and failed runs: each gives a clear error of the right class and leaves every
//! host file byte-for-byte as it was (bad input: never touched; failed: restored, the CRI
//! runtime restarted again). Needs root (binaries are tried inside the host root).

mod install_support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use install_support::*;
use usernsguard_runtime::host::HostRoot;
use usernsguard_runtime::install::systemd::{FakeServiceManager, RestartScript, ServiceCall};
use usernsguard_runtime::install::{
    BinarySource, ErrorClass, Failure, InstallError, InstallRequest, Installer, RestartMode, Step, Timeouts,
};

const CONFIG: &str = "/etc/containerd/config.toml";

fn fixture_host(case: &str) -> tempfile::TempDir {
    host_from(&fixtures().join(case))
}

fn request(binary: BinarySource) -> InstallRequest {
    InstallRequest {
        handler: "runc-1-4-3".into(),
        binary,
        install_path: None,
        sha256: None,
        cri_config: PathBuf::from(CONFIG),
        restart: RestartMode::None,
        cri_socket: None,
    }
}

fn tiny(dir: &Path) -> PathBuf {
    let p = dir.join("runc");
    write_exe(&p, &tiny_elf("runc version 1.4.3 (tiny)"));
    p
}

/// Runs `install` and checks the error's class and label, that the message contains
/// `want`, and that the host tree is unchanged.
fn refused(
    host_dir: &Path,
    installer: &mut Installer<'_>,
    req: &InstallRequest,
    label: &str,
    want: &str,
) -> InstallError {
    let before = snapshot(host_dir);
    let err = installer.install(req).expect_err(label);
    assert_eq!(err.label(), label, "{err}");
    assert_eq!(err.class(), ErrorClass::BadInput, "{err}");
    let msg = err.to_string();
    assert!(msg.contains(want), "{label}: {msg:?} lacks {want:?}");
    assert_eq!(
        differences(&before, &snapshot(host_dir)),
        Vec::<String>::new(),
        "{label}"
    );
    eprintln!("{label}: {msg}");
    err
}

#[test]
fn bad_input_is_named_and_changes_nothing() {
    require_root();
    let src = tempfile::tempdir().unwrap();
    let good = tiny(src.path());
    let h = fixture_host("containerd-1.6-default");
    let host = HostRoot::at(h.path()).unwrap();
    let mut i = Installer::new(host.clone());

    let missing = src.path().join("nope");
    refused(
        h.path(),
        &mut i,
        &request(BinarySource::Local(missing)),
        "binary_missing",
        "nope",
    );

    let mut r = request(BinarySource::Local(good.clone()));
    r.sha256 = Some("0".repeat(64));
    refused(
        h.path(),
        &mut i,
        &r,
        "sha256_mismatch",
        &format!("does not have the sha256 given ({})", "0".repeat(64)),
    );
    r.sha256 = Some("ABC".into());
    refused(h.path(), &mut i, &r, "bad_request", "64 lower-case hex digits");

    let mut r = request(BinarySource::Local(good.clone()));
    r.handler = "-bad".into();
    refused(h.path(), &mut i, &r, "bad_request", "invalid handler name");

    // Debian's dynamically linked crun in a host root without its loader and libraries.
    refused(
        h.path(),
        &mut i,
        &request(BinarySource::Local(PathBuf::from("/usr/bin/crun"))),
        "binary_not_runnable",
        "its ELF interpreter /lib64/ld-linux-x86-64.so.2 does not exist on the host",
    );
    // ... with the loader and libc but not its other libraries.
    let libs = fixture_host("containerd-1.6-default");
    for lib in ["/lib64/ld-linux-x86-64.so.2", "/lib/x86_64-linux-gnu/libc.so.6"] {
        let real = std::fs::canonicalize(lib).unwrap();
        let dest = libs.path().join(lib.trim_start_matches('/'));
        std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
        std::fs::copy(real, dest).unwrap();
    }
    let mut i2 = Installer::new(HostRoot::at(libs.path()).unwrap());
    refused(
        libs.path(),
        &mut i2,
        &request(BinarySource::Local(PathBuf::from("/usr/bin/crun"))),
        "binary_not_runnable",
        "error while loading shared libraries",
    );
    // Not a program at all.
    let junk = src.path().join("junk");
    write_exe(&junk, b"MZ\x90\x00 a Windows program, not one for Linux");
    refused(
        h.path(),
        &mut i,
        &request(BinarySource::Local(junk)),
        "binary_not_runnable",
        "exec format error",
    );

    // A file of someone else's at the install path.
    let mut r = request(BinarySource::Local(good.clone()));
    r.install_path = Some(PathBuf::from("/usr/sbin/runc"));
    write_exe(
        &h.path().join("usr/sbin/runc"),
        b"#!/bin/sh\necho someone else's runc\n",
    );
    refused(
        h.path(),
        &mut i,
        &r,
        "binary_foreign",
        "/usr/sbin/runc exists and was not placed by usernsguard",
    );
    std::fs::remove_dir_all(h.path().join("usr")).unwrap();

    // Restart mode systemd with a unit systemd does not know.
    let mut sm = FakeServiceManager::new().with_running_unit("crio.service");
    let mut i3 = Installer::new(host.clone()).with_service_manager(&mut sm);
    let mut r = request(BinarySource::Local(good.clone()));
    r.restart = RestartMode::Systemd { unit: None };
    refused(
        h.path(),
        &mut i3,
        &r,
        "service_manager",
        "no unit of containerd.service is known to systemd",
    );
    drop(i3);
    assert!(!sm
        .calls()
        .iter()
        .any(|c| matches!(c, ServiceCall::Restart { .. })));

    // A read-only config directory (a read-only bind mount, as on an immutable OS).
    let etc = h.path().join("etc/containerd");
    let _ro = ReadOnly::mount(&etc);
    refused(
        h.path(),
        &mut i,
        &request(BinarySource::Local(good)),
        "not_writable",
        "is not writable",
    );
}

/// A read-only bind mount of a directory onto itself, undone on drop.
struct ReadOnly(PathBuf);

impl ReadOnly {
    fn mount(dir: &Path) -> ReadOnly {
        let run = |args: &[&str]| {
            let st = std::process::Command::new("mount").args(args).status().unwrap();
            assert!(st.success(), "mount {args:?}");
        };
        let d = dir.to_str().unwrap();
        run(&["--bind", d, d]);
        let guard = ReadOnly(dir.to_owned());
        run(&["-o", "remount,bind,ro", d]);
        guard
    }
}

impl Drop for ReadOnly {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

fn systemd_request(bin: &Path, socket: &Path) -> InstallRequest {
    let mut r = request(BinarySource::Local(bin.to_owned()));
    r.restart = RestartMode::Systemd { unit: None };
    r.cri_socket = Some(socket.to_owned());
    r
}

#[test]
fn a_unit_that_fails_to_start_is_rolled_back_and_restarted_again() {
    require_root();
    let src = tempfile::tempdir().unwrap();
    let bin = tiny(src.path());
    let h = fixture_host("containerd-2.1-default");
    let before = snapshot(h.path());
    let mut sm = FakeServiceManager::new().with_running_unit("containerd.service");
    sm.then_restart(RestartScript::FailToStart);
    let err = Installer::new(HostRoot::at(h.path()).unwrap())
        .with_service_manager(&mut sm)
        .install(&systemd_request(
            &bin,
            Path::new("/run/containerd/containerd.sock"),
        ))
        .unwrap_err();
    eprintln!("{err}");
    assert_eq!(err.class(), ErrorClass::RolledBack, "{err}");
    assert_eq!(err.label(), "restart_failed");
    assert!(
        matches!(&err, InstallError::RolledBack { cause: Failure::RestartFailed { .. }, restart: Some(o) } if o.succeeded())
    );
    assert_eq!(
        sm.restarts_of("containerd.service"),
        2,
        "the restart and the rollback's"
    );
    assert_eq!(differences(&before, &snapshot(h.path())), Vec::<String>::new());
}

#[test]
fn a_cri_runtime_that_does_not_come_back_is_rolled_back() {
    require_root();
    let src = tempfile::tempdir().unwrap();
    let bin = tiny(src.path());
    let h = fixture_host("containerd-v2-comments-runtimes-imports");
    let before = snapshot(h.path());
    let mut sm = FakeServiceManager::new().with_running_unit("containerd.service");
    let timeouts = Timeouts {
        cri: Duration::from_millis(500),
        ..Timeouts::default()
    };
    let err = Installer::new(HostRoot::at(h.path()).unwrap())
        .with_service_manager(&mut sm)
        .with_timeouts(timeouts)
        .install(&systemd_request(&bin, Path::new("/run/nothing/containerd.sock")))
        .unwrap_err();
    eprintln!("{err}");
    assert_eq!(err.label(), "cri_down", "{err}");
    assert!(
        err.to_string()
            .contains("did not answer on /run/nothing/containerd.sock"),
        "{err}"
    );
    // Rolled back and restarted again (it did not answer before the install either, so
    // the rollback does not wait for it).
    assert_eq!(err.class(), ErrorClass::RolledBack, "{err}");
    assert_eq!(sm.restarts_of("containerd.service"), 2);
    assert_eq!(differences(&before, &snapshot(h.path())), Vec::<String>::new());
}

/// Every disk step of an install, failed one at a time: the run rolls back (or, before its
/// first change, refuses) and the tree is byte-identical to before.
#[test]
fn a_failure_at_any_step_leaves_the_host_as_it_was() {
    require_root();
    let src = tempfile::tempdir().unwrap();
    let bin = tiny(src.path());
    let req = request(BinarySource::Local(bin));
    let steps = {
        let h = fixture_host("containerd-1.6-default");
        let mut seen = Vec::new();
        Installer::new(HostRoot::at(h.path()).unwrap())
            .with_step_hook(Box::new(|s: &Step| {
                seen.push(s.clone());
                Ok(())
            }))
            .install(&req)
            .unwrap();
        seen
    };
    assert!(steps.len() > 20, "{steps:#?}");
    // The manifest's last rename commits the run; what follows is tidying up whose failure
    // is ignored.
    let commit = steps
        .iter()
        .rposition(
            |s| matches!(s, Step::Rename { target } if target.extension().is_some_and(|e| e == "json")),
        )
        .unwrap();
    let (mut refused, mut rolled_back) = (0, 0);
    for (n, step) in steps.iter().enumerate().take(commit + 1) {
        let h = fixture_host("containerd-1.6-default");
        let before = snapshot(h.path());
        let mut count = 0;
        let err = Installer::new(HostRoot::at(h.path()).unwrap())
            .with_step_hook(Box::new(|_: &Step| {
                count += 1;
                if count == n + 1 {
                    Err(std::io::Error::other("injected failure"))
                } else {
                    Ok(())
                }
            }))
            .install(&req)
            .expect_err(&format!("step {n}: {step:?}"));
        match err.class() {
            ErrorClass::BadInput => refused += 1,
            ErrorClass::RolledBack => rolled_back += 1,
            ErrorClass::RollbackFailed => panic!("step {n} {step:?}: {err}"),
        }
        assert_eq!(
            differences(&before, &snapshot(h.path())),
            Vec::<String>::new(),
            "step {n}: {step:?}: {err}"
        );
    }
    eprintln!(
        "{} steps, committed at step {commit}: a failure before the first change refused {refused} time(s), \
         later ones rolled back {rolled_back} time(s)",
        steps.len()
    );
    assert!(rolled_back > 10);
}

/// Another run holds the config directory (here: this test, as the CLI would while the
/// agent reconciles): the install waits, then says so and changes nothing; once it is
/// free the same install goes through.
#[test]
fn a_run_waits_for_another_on_the_same_config_and_gives_up_without_changing_anything() {
    require_root();
    let h = fixture_host("containerd-1.6-default");
    let src = tempfile::tempdir().unwrap();
    let req = request(BinarySource::Local(tiny(src.path())));
    let before = snapshot(h.path());
    let held = std::fs::File::open(h.path().join("etc/containerd")).unwrap();
    // SAFETY: flock on a descriptor this test owns.
    assert_eq!(
        unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&held), libc::LOCK_EX) },
        0
    );
    let timeouts = Timeouts {
        lock: Duration::from_millis(300),
        ..Timeouts::default()
    };
    let err = Installer::new(HostRoot::at(h.path()).unwrap())
        .with_timeouts(timeouts)
        .install(&req)
        .unwrap_err();
    assert!(matches!(err, InstallError::Busy { .. }), "{err}");
    assert_eq!(err.class(), ErrorClass::BadInput);
    assert_eq!(err.label(), "busy");
    assert!(
        err.to_string()
            .contains("another usernsguard install or uninstall is changing /etc/containerd"),
        "{err}"
    );
    assert_eq!(differences(&before, &snapshot(h.path())), Vec::<String>::new());
    drop(held);
    Installer::new(HostRoot::at(h.path()).unwrap())
        .with_timeouts(timeouts)
        .install(&req)
        .unwrap();
}
