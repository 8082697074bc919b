//! `usernsguard install` / `uninstall` through the binary: the dry-run diff, exit codes 0
//! (done, nothing to do), 2 (bad input, nothing changed). Needs root (the binary is tried
//! inside the host root).

use std::path::Path;
use std::process::Command;

fn usernsguard(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_usernsguard"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn tree(root: &Path) -> Vec<(String, Vec<u8>)> {
    let out = Command::new("find")
        .arg(root)
        .arg("-type")
        .arg("f")
        .output()
        .unwrap();
    let mut v: Vec<(String, Vec<u8>)> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|p| (p.to_owned(), std::fs::read(p).unwrap()))
        .collect();
    v.sort();
    v
}

#[test]
fn dry_run_install_again_uninstall_and_bad_input() {
    assert_eq!(nix::unistd::geteuid().as_raw(), 0, "needs root");
    let host = tempfile::tempdir().unwrap();
    let etc = host.path().join("etc/containerd");
    std::fs::create_dir_all(&etc).unwrap();
    std::fs::create_dir_all(host.path().join("proc")).unwrap();
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join(
        "../runtime/tests/fixtures/install/containerd-v2-comments-runtimes-imports/input/etc/containerd",
    );
    for f in ["config.toml", "nvidia.toml"] {
        std::fs::copy(fixture.join(f), etc.join(f)).unwrap();
    }
    let root = host.path().to_str().unwrap();
    let base = [
        "--handler",
        "runc-1-4-3",
        "--cri-config",
        "/etc/containerd/config.toml",
        "--host-root",
        root,
        "--restart",
        "none",
    ];
    let bin = "/work/shared/runtimes/runc-1.4.3";
    let bin = if Path::new(bin).exists() {
        bin
    } else {
        "/usr/sbin/runc"
    };
    let pristine = tree(host.path());

    let (code, out, _) =
        usernsguard(&[&["install", "--runtime-binary", bin, "--dry-run"][..], &base].concat());
    assert_eq!(code, 0);
    // A version 2 config gets the handler in place (containerd 1.x would let a drop-in's
    // CRI section replace the root's).
    assert!(out.contains("+++ b/etc/containerd/config.toml"), "{out}");
    assert!(
        out.contains("+[plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.runc-1-4-3]"),
        "{out}"
    );
    assert!(!out.contains("conf.d"), "{out}");
    assert!(
        out.contains("note: /etc/containerd/nvidia.toml has a plugins.\"io.containerd.grpc.v1.cri\" section"),
        "{out}"
    );
    assert!(out.contains("would restart needed: containerd.service"), "{out}");
    assert_eq!(tree(host.path()), pristine, "dry-run changed something");

    let (code, out, err) = usernsguard(&[&["install", "--runtime-binary", bin][..], &base].concat());
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("runc-1-4-3 installed"), "{out}");
    let (code, out, _) = usernsguard(&[&["install", "--runtime-binary", bin][..], &base].concat());
    assert_eq!(code, 0);
    assert!(out.contains("nothing to do"), "{out}");

    // Bad input: exit 2, nothing changed.
    let installed = tree(host.path());
    let (code, _, err) = usernsguard(
        &[
            &["install", "--runtime-binary", bin, "--sha256", &"0".repeat(64)][..],
            &base,
        ]
        .concat(),
    );
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("nothing was changed"), "{err}");
    let (code, _, err) =
        usernsguard(&[&["install", "--runtime-binary", "/nonexistent/runc"][..], &base].concat());
    assert_eq!(code, 2, "{err}");
    assert_eq!(tree(host.path()), installed);

    let (code, out, err) = usernsguard(&[&["uninstall"][..], &base].concat());
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(
        tree(host.path()),
        pristine,
        "uninstall did not restore every file"
    );
    std::fs::write(etc.join("config.toml"), "version = 2\n[plugins\n").unwrap();
    let (code, _, err) = usernsguard(&[&["install", "--runtime-binary", bin][..], &base].concat());
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("/etc/containerd/config.toml is not valid TOML"),
        "{err}"
    );
}
