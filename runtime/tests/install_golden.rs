//! The installer's config edits over realistic files, one fixture per setup
//! (`tests/fixtures/install/<case>/`: `case.toml`, the host tree in `input/`, and in
//! `expected/` every host file an install creates or changes, byte for byte).
//!
//! For each case: the plan's files equal the golden ones and no other file changes; the
//! install (restart mode none) leaves exactly that tree plus the binary; a second install
//! plans nothing, changes no file (not even its times) and would restart nothing; the
//! uninstall leaves the tree byte-identical to the input, directories included.
//! Error cases name their file, change nothing, and fail the same way on install.
//!
//! `UPDATE_GOLDEN=1 cargo test --test install_golden` rewrites `expected/`; review the diff.

mod install_support;

use std::path::{Path, PathBuf};

use install_support::*;
use usernsguard_runtime::host::HostRoot;
use usernsguard_runtime::install::{
    BinarySource, ErrorClass, InstallRequest, Installer, RestartMode, RestartReport, UninstallRequest,
};

fn request(case: &Case, binary: &Path) -> InstallRequest {
    InstallRequest {
        handler: case.handler.clone(),
        binary: BinarySource::Local(binary.to_owned()),
        install_path: case.install_path.clone(),
        sha256: None,
        cri_config: case.cri_config.clone(),
        restart: RestartMode::None,
        cri_socket: None,
    }
}

fn rel(p: &Path) -> PathBuf {
    p.strip_prefix("/").unwrap().to_path_buf()
}

#[test]
fn golden_configs_install_reinstall_uninstall() {
    require_root();
    let update = std::env::var_os("UPDATE_GOLDEN").is_some();
    let src_dir = tempfile::tempdir().unwrap();
    let binary = src_dir.path().join("runc");
    write_exe(&binary, &tiny_elf("runc version 1.4.3 (tiny)"));
    let mut ran = 0;
    for case in cases() {
        let host_dir = host_from(&case.dir);
        let host = HostRoot::at(host_dir.path()).unwrap();
        let before = snapshot(host_dir.path());
        let req = request(&case, &binary);

        if let Some(label) = &case.error {
            let installer = Installer::new(host.clone());
            let err = installer.plan_install(&req).expect_err(&case.name);
            assert_eq!(err.label(), label, "{}: {err}", case.name);
            let msg = err.to_string();
            let want = case.message.as_deref().unwrap_or_default();
            assert!(msg.contains(want), "{}: {msg:?} lacks {want:?}", case.name);
            let err = Installer::new(host.clone()).install(&req).expect_err(&case.name);
            assert_eq!(err.class(), ErrorClass::BadInput, "{}", case.name);
            assert_eq!(
                differences(&before, &snapshot(host_dir.path())),
                Vec::<String>::new(),
                "{}",
                case.name
            );
            eprintln!("{}: refused: {msg}", case.name);
            ran += 1;
            continue;
        }

        // The plan against the golden files.
        let mut installer = Installer::new(host.clone());
        let plan = installer
            .plan_install(&req)
            .unwrap_or_else(|e| panic!("{}: {e}", case.name));
        let expected_dir = case.dir.join("expected");
        if update {
            let _ = std::fs::remove_dir_all(&expected_dir);
            for f in plan.changed_files() {
                let p = expected_dir.join(rel(&f.path));
                std::fs::create_dir_all(p.parent().unwrap()).unwrap();
                std::fs::write(&p, f.after.as_deref().expect("install writes")).unwrap();
            }
        }
        let golden = snapshot(&expected_dir);
        let mut planned: Vec<String> = Vec::new();
        for f in plan.changed_files() {
            let key = rel(&f.path).display().to_string();
            let want = golden
                .get(&key)
                .unwrap_or_else(|| panic!("{}: plan changes {key}, which has no golden file", case.name));
            assert_eq!(
                String::from_utf8_lossy(f.after.as_deref().unwrap()),
                String::from_utf8_lossy(&want.0),
                "{}: {key} differs from its golden file",
                case.name
            );
            planned.push(key);
        }
        for key in golden.keys().filter(|k| !k.ends_with('/')) {
            assert!(
                planned.contains(key),
                "{}: golden {key} is not planned",
                case.name
            );
        }
        assert!(plan.restart_needed, "{}", case.name);
        let diff = plan.diff();
        assert!(diff.contains("+++ b/"), "{}: {diff}", case.name);

        // The install leaves exactly the golden tree plus the binary and the records.
        let out = installer
            .install(&req)
            .unwrap_or_else(|e| panic!("{}: {e}", case.name));
        assert_eq!(
            out.restart,
            RestartReport::Operator {
                units: plan.target.flavor.units().iter().map(|s| s.to_string()).collect()
            }
        );
        assert_eq!(out.binary_version.as_deref(), Some("runc version 1.4.3 (tiny)"));
        let after = snapshot(host_dir.path());
        for (key, (bytes, _)) in golden.iter().filter(|(k, _)| !k.ends_with('/')) {
            assert_eq!(after.get(key).map(|v| &v.0), Some(bytes), "{}: {key}", case.name);
        }
        for (key, v) in &before {
            if !golden.contains_key(key) {
                assert_eq!(after.get(key), Some(v), "{}: {key} changed", case.name);
            }
        }
        let target = plan.binary.as_ref().unwrap().target.clone();
        let placed = after
            .get(&rel(&target).display().to_string())
            .expect("binary placed");
        assert_eq!(placed.0, std::fs::read(&binary).unwrap());
        assert_eq!(placed.1, 0o755);
        let unexpected: Vec<&String> = after
            .keys()
            .filter(|k| !before.contains_key(*k) && !golden.contains_key(*k))
            // The records, the binary and their parent directories.
            .filter(|k| !k.starts_with("var/") && !k.starts_with("usr/"))
            .filter(|k| !golden.keys().any(|g| g.starts_with(k.as_str())))
            .collect();
        assert!(
            unexpected.is_empty(),
            "{}: unexpected new entries {unexpected:?}",
            case.name
        );

        // Again: nothing to do, nothing touched, no restart.
        let stats = stat_snapshot(host_dir.path());
        let again = installer.plan_install(&req).unwrap();
        assert!(
            again.is_noop(),
            "{}: second plan changes {:?}",
            case.name,
            again.diff()
        );
        assert!(!again.restart_needed);
        let out = installer.install(&req).unwrap();
        assert!(out.unchanged(), "{}: {out:?}", case.name);
        assert_eq!(
            stats,
            stat_snapshot(host_dir.path()),
            "{}: a file was touched",
            case.name
        );

        // Uninstall: byte-identical to the input, directories included.
        let un = UninstallRequest {
            handler: case.handler.clone(),
            cri_config: case.cri_config.clone(),
            restart: RestartMode::None,
            cri_socket: None,
        };
        let out = installer
            .uninstall(&un)
            .unwrap_or_else(|e| panic!("{}: {e}", case.name));
        assert!(!out.changed.is_empty());
        assert_eq!(
            differences(&before, &snapshot(host_dir.path())),
            Vec::<String>::new(),
            "{}: uninstall did not restore the tree",
            case.name
        );
        // And once more: nothing to do.
        assert!(installer.plan_uninstall(&un).unwrap().is_noop());
        eprintln!("{}: ok ({} file(s) changed)", case.name, planned.len());
        ran += 1;
    }
    assert!(ran >= 15, "only {ran} cases");
}

/// Edits made to a config after an install are the operator's (or another handler's): a
/// later re-plan does not adopt them as usernsguard's, so each uninstall takes out only its
/// own handler and keeps them, and the default `runc` that the first install declared
/// stays while the second handler still needs it.
#[test]
fn later_edits_and_other_handlers_survive_rechecks_and_uninstalls() {
    let m = MiniHost::new("version = 2\n# site settings\n");
    let (host_dir, config, host) = (&m.host_dir, &m.config, &m.host);
    std::fs::set_permissions(config, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let (req, un) = (|h: &str| m.install(h), |h: &str| m.uninstall(h));
    let runtimes = || {
        let text = std::fs::read_to_string(config).unwrap();
        usernsguard_runtime::install::edit::containerd_runtimes(
            &text,
            Path::new("config.toml"),
            usernsguard_runtime::install::edit::SchemaVersion::V2,
        )
        .unwrap()
    };

    Installer::new(host.clone()).install(&req("h1")).unwrap();
    assert_eq!(runtimes(), ["runc", "h1"]);
    // The copy kept for the uninstall is as private as the config (it may hold credentials).
    let original = host_dir.path().join("var/lib/usernsguard/install/h1/original");
    let copies: Vec<_> = std::fs::read_dir(&original).unwrap().flatten().collect();
    assert_eq!(copies.len(), 1);
    for c in copies {
        let mode = std::os::unix::fs::PermissionsExt::mode(&c.metadata().unwrap().permissions());
        assert_eq!(mode & 0o777, 0o600, "{}", c.path().display());
    }
    // The operator edits the file; the agent's periodic re-plan finds nothing to do.
    let edited = std::fs::read_to_string(config).unwrap() + "\n# operator: keep this\n";
    std::fs::write(config, &edited).unwrap();
    assert!(Installer::new(host.clone())
        .plan_install(&req("h1"))
        .unwrap()
        .is_noop());
    Installer::new(host.clone()).install(&req("h1")).unwrap();
    Installer::new(host.clone()).install(&req("h2")).unwrap();
    assert_eq!(runtimes(), ["runc", "h1", "h2"]);

    Installer::new(host.clone()).uninstall(&un("h1")).unwrap();
    assert_eq!(runtimes(), ["runc", "h2"], "h2 still relies on the declared runc");
    assert!(std::fs::read_to_string(config)
        .unwrap()
        .contains("# operator: keep this"));
    Installer::new(host.clone()).uninstall(&un("h2")).unwrap();
    let text = std::fs::read_to_string(config).unwrap();
    assert!(text.contains("# operator: keep this"), "{text}");
    assert!(text.starts_with("version = 2\n# site settings\n"), "{text}");
    assert_eq!(runtimes(), Vec::<String>::new(), "{text}");
}

/// A saved original that no longer matches its recorded hash is never written back: the
/// uninstall takes out only usernsguard's part and says why.
#[test]
fn a_damaged_saved_original_is_not_restored() {
    let m = MiniHost::new("version = 2\n");
    Installer::new(m.host.clone()).install(&m.install("h1")).unwrap();
    let original = m.host_dir.path().join("var/lib/usernsguard/install/h1/original");
    for copy in std::fs::read_dir(&original).unwrap().flatten() {
        std::fs::write(copy.path(), "version = 2\n[plugins.damaged]\n").unwrap();
    }
    let plan = Installer::new(m.host.clone())
        .plan_uninstall(&m.uninstall("h1"))
        .unwrap();
    assert!(
        plan.notes
            .iter()
            .any(|n| n.contains("the saved original of /etc/containerd/config.toml is damaged")),
        "{:?}",
        plan.notes
    );
    let after = String::from_utf8(plan.files[0].after.clone().unwrap()).unwrap();
    assert!(
        !after.contains("damaged") && !after.contains("runtimes.h1"),
        "{after}"
    );
}

/// A host root holding only `/etc/containerd/config.toml` (and `/proc`), and a tiny runc to
/// install into it with restart mode none.
struct MiniHost {
    _src: tempfile::TempDir,
    binary: PathBuf,
    host_dir: tempfile::TempDir,
    config: PathBuf,
    host: HostRoot,
}

impl MiniHost {
    fn new(config_text: &str) -> Self {
        require_root();
        let src = tempfile::tempdir().unwrap();
        let binary = src.path().join("runc");
        write_exe(&binary, &tiny_elf("runc version 1.4.3 (tiny)"));
        let host_dir = tempfile::tempdir().unwrap();
        let config = host_dir.path().join("etc/containerd/config.toml");
        std::fs::create_dir_all(config.parent().unwrap()).unwrap();
        std::fs::create_dir_all(host_dir.path().join("proc")).unwrap();
        std::fs::write(&config, config_text).unwrap();
        let host = HostRoot::at(host_dir.path()).unwrap();
        MiniHost {
            _src: src,
            binary,
            host_dir,
            config,
            host,
        }
    }

    fn install(&self, handler: &str) -> InstallRequest {
        InstallRequest {
            handler: handler.into(),
            binary: BinarySource::Local(self.binary.clone()),
            install_path: None,
            sha256: None,
            cri_config: "/etc/containerd/config.toml".into(),
            restart: RestartMode::None,
            cri_socket: None,
        }
    }

    fn uninstall(&self, handler: &str) -> UninstallRequest {
        UninstallRequest {
            handler: handler.into(),
            cri_config: "/etc/containerd/config.toml".into(),
            restart: RestartMode::None,
            cri_socket: None,
        }
    }
}
