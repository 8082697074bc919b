//! `HostInstaller`, what `usernsguard agent` installs RuntimeProfiles with, on a host root
//! that is a directory: a `Bundled` runc from the image's runtimes directory is found, the
//! node's containerd config is discovered, the plan asks for a restart slot, the install
//! places and registers it, the next plan is a no-op, and uninstall leaves every host file
//! as it was. A runtime the image does not bundle and a profile for the other CRI runtime
//! are refused with the reasons the NodeReport shows. Needs root (the binary is tried
//! inside the host root, as the agent does).

use std::path::{Path, PathBuf};

use usernsguard_agent::crd::{BinarySource, BinarySourceKind, CriRuntime, OciRuntime};
use usernsguard_agent::node::installer::{HostInstaller, Installer, Planned};
use usernsguard_runtime::host::HostRoot;
use usernsguard_runtime::install::{InstallRequest, RestartMode, RestartReport, UninstallRequest};

/// Every file under `root` with its bytes, sorted.
fn tree(root: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    fn walk(dir: &Path, out: &mut Vec<(PathBuf, Vec<u8>)>) {
        for entry in std::fs::read_dir(dir).unwrap().flatten() {
            let path = entry.path();
            if entry.file_type().unwrap().is_dir() {
                walk(&path, out);
            } else {
                out.push((path.clone(), std::fs::read(&path).unwrap()));
            }
        }
    }
    let mut out = Vec::new();
    walk(root, &mut out);
    out.sort();
    out
}

/// The runc the image would bundle: runc 1.4.3 (static) when the shared runtimes are here,
/// else Debian's.
fn runc() -> PathBuf {
    let shared = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/runtimes/runc-1.4.3");
    if shared.exists() {
        shared
    } else {
        PathBuf::from("/usr/sbin/runc")
    }
}

#[test]
fn bundled_runc_is_installed_found_done_and_uninstalled_without_a_trace() {
    assert_eq!(nix::unistd::geteuid().as_raw(), 0, "needs root");
    let host = tempfile::tempdir().unwrap();
    let etc = host.path().join("etc/containerd");
    std::fs::create_dir_all(&etc).unwrap();
    std::fs::create_dir_all(host.path().join("proc")).unwrap();
    std::fs::write(
        etc.join("config.toml"),
        "# node config, kept byte for byte\nversion = 2\n\n[plugins.\"io.containerd.grpc.v1.cri\"]\n  \
         restrict_oom_score_adj = true\n",
    )
    .unwrap();
    let image = tempfile::tempdir().unwrap();
    let mut installer = HostInstaller::new(HostRoot::at(host.path()).unwrap());
    installer.bundled_dir = image.path().to_path_buf();
    let binary = BinarySource {
        source: BinarySourceKind::Bundled,
        url: None,
        sha256: None,
        path: "/usr/local/lib/usernsguard/runc-bundled/runc".into(),
    };

    // Nothing bundled yet: refused with the reason and what the image has.
    let err = installer.source(OciRuntime::Runc, &binary).unwrap_err();
    assert_eq!(err.reason, "bundled_runtime_missing");
    assert!(
        err.message.contains("bundles no runc (it has: none)"),
        "{}",
        err.message
    );
    std::fs::copy(runc(), image.path().join("runc")).unwrap();
    let err = installer.source(OciRuntime::Crun, &binary).unwrap_err();
    assert!(
        err.message.contains("bundles no crun (it has: runc)"),
        "{}",
        err.message
    );

    // The node runs containerd: a CRI-O profile is told so, a containerd one finds its config.
    let err = installer.find_cri_config(CriRuntime::Crio).unwrap_err();
    assert!(
        err.contains("registers with CRI-O but this node runs containerd (/etc/containerd/config.toml)"),
        "{err}"
    );
    let cri_config = installer.find_cri_config(CriRuntime::Containerd).unwrap();
    assert_eq!(cri_config, Path::new("/etc/containerd/config.toml"));

    let pristine = tree(host.path());
    let req = InstallRequest {
        handler: "runc-bundled".into(),
        binary: installer.source(OciRuntime::Runc, &binary).unwrap(),
        install_path: Some(PathBuf::from(&binary.path)),
        sha256: None,
        cri_config: cri_config.clone(),
        restart: RestartMode::None,
        cri_socket: None,
    };
    assert_eq!(
        installer.plan_install(&req).unwrap(),
        Planned {
            noop: false,
            restart_needed: true
        }
    );
    assert_eq!(tree(host.path()), pristine, "planning wrote something");

    let done = installer.install(&req).unwrap();
    assert!(
        matches!(&done.restart, RestartReport::Operator { units } if units == &["containerd.service"]),
        "{:?}",
        done.restart
    );
    let placed = host.path().join("usr/local/lib/usernsguard/runc-bundled/runc");
    assert_eq!(std::fs::read(&placed).unwrap(), std::fs::read(runc()).unwrap());
    let config = std::fs::read_to_string(etc.join("config.toml")).unwrap();
    assert!(
        config.starts_with("# node config, kept byte for byte\nversion = 2\n"),
        "{config}"
    );
    assert!(
        config.contains("BinaryName = \"/usr/local/lib/usernsguard/runc-bundled/runc\""),
        "{config}"
    );
    // Restart mode none: the agent asks whether it is live yet; no containerd answers here,
    // which the NodeReport shows as pending with this text.
    let live = installer.live(&req).unwrap_err();
    assert!(
        live.contains("cannot connect to the CRI socket") && live.contains("/run/containerd/containerd.sock"),
        "{live}"
    );

    let installed = tree(host.path());
    assert_eq!(
        installer.plan_install(&req).unwrap(),
        Planned {
            noop: true,
            restart_needed: false
        }
    );
    assert_eq!(tree(host.path()), installed);

    let un = UninstallRequest {
        handler: req.handler.clone(),
        cri_config,
        restart: RestartMode::None,
        cri_socket: None,
    };
    assert!(installer.plan_uninstall(&un).unwrap().restart_needed);
    installer.uninstall(&un).unwrap();
    assert_eq!(tree(host.path()), pristine, "uninstall left something behind");
    assert!(installer.plan_uninstall(&un).unwrap().noop);
}
