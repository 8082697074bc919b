use super::*;

const CONTAINERD_V2: &str = r#"
version = 2
[plugins."io.containerd.grpc.v1.cri"]
  enable_selinux = true
[plugins."io.containerd.grpc.v1.cri".containerd]
  default_runtime_name = "runc"
[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
  runtime_type = "io.containerd.runc.v2"
[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
  SystemdCgroup = true
[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.crun]
  runtime_type = "io.containerd.runc.v2"
[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.crun.options]
  BinaryName = "/usr/local/bin/crun"
[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.kata]
  runtime_type = "io.containerd.kata.v2"
"#;

const CONTAINERD_V3: &str = r#"
version = 3
imports = ["conf.d/*.toml", "/etc/containerd/extra.toml"]
[grpc]
  address = "/run/custom/containerd.sock"
[plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc]
  runtime_type = 'io.containerd.runc.v2'
[plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc.options]
  BinaryName = '/usr/bin/runc'
"#;

/// A host root with the given files (host paths) and executables.
fn host(files: &[(&str, &str)], executables: &[&str]) -> (tempfile::TempDir, HostRoot) {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    for (path, text) in files {
        let p = dir.path().join(path.trim_start_matches('/'));
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, text).unwrap();
    }
    for exe in executables {
        let p = dir.path().join(exe.trim_start_matches('/'));
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let root = HostRoot::at(dir.path()).unwrap();
    (dir, root)
}

fn names(c: &CriConfig) -> Vec<(&str, Option<&str>)> {
    c.handlers
        .iter()
        .map(|h| (h.name.as_str(), h.binary.as_deref().and_then(Path::to_str)))
        .collect()
}

#[test]
fn containerd_v2_lists_runc_compatible_handlers_and_its_selinux_setting() {
    let (_d, h) = host(&[("/etc/containerd/config.toml", CONTAINERD_V2)], &[]);
    let c = read_containerd(&h, Path::new("/etc/containerd/config.toml")).unwrap();
    assert_eq!(c.kind, CriKind::Containerd);
    assert_eq!(
        names(&c),
        vec![("runc", None), ("crun", Some("/usr/local/bin/crun"))]
    );
    assert!(c.selinux);
    assert_eq!(c.socket(), PathBuf::from("/run/containerd/containerd.sock"));
}

#[test]
fn containerd_imports_are_globbed_relative_recursive_once_and_override_in_order() {
    let (_d, h) = host(
        &[
            ("/etc/containerd/config.toml", CONTAINERD_V3),
            (
                "/etc/containerd/conf.d/10-crun.toml",
                "version = 3\nimports = [\"../config.toml\", \"more/*.toml\"]\n[plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.crun]\n",
            ),
            (
                "/etc/containerd/conf.d/20-runc.toml",
                "version = 3\n[plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc.options]\nBinaryName = '/opt/runc'\n",
            ),
            ("/etc/containerd/conf.d/README", "not toml {"),
            (
                "/etc/containerd/conf.d/more/30.toml",
                "version = 3\n[plugins.'io.containerd.cri.v1.runtime']\nenable_selinux = true\n",
            ),
        ],
        &[],
    );
    let c = read_containerd(&h, Path::new("/etc/containerd/config.toml")).unwrap();
    assert_eq!(
        c.files,
        [
            "/etc/containerd/config.toml",
            "/etc/containerd/conf.d/10-crun.toml",
            "/etc/containerd/conf.d/20-runc.toml",
            "/etc/containerd/conf.d/more/30.toml"
        ]
        .map(PathBuf::from),
        "the missing /etc/containerd/extra.toml is skipped; the README is not a *.toml"
    );
    assert_eq!(names(&c), vec![("runc", Some("/opt/runc")), ("crun", None)]);
    assert!(c.selinux, "an imported file turned labels on");
    assert_eq!(c.socket(), PathBuf::from("/run/custom/containerd.sock"));
}

#[test]
fn binaries_resolve_the_way_each_cri_runtime_resolves_them() {
    let (_d, h) = host(
        &[(
            "/etc/containerd/config.toml",
            "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.crun]\n",
        )],
        &["/usr/local/sbin/runc", "/usr/bin/crun"],
    );
    let c = read_containerd(&h, Path::new("/etc/containerd/config.toml")).unwrap();
    assert_eq!(
        c.resolve(&h),
        vec![RuntimeHandler::new("crun", "/usr/local/sbin/runc")],
        "containerd runs `runc` for a handler without BinaryName, whatever its name"
    );
    let crio = CriConfig {
        kind: CriKind::Crio,
        files: vec![],
        handlers: vec![
            DeclaredHandler {
                name: "crun".into(),
                binary: None,
            },
            DeclaredHandler {
                name: "runc".into(),
                binary: Some("/opt/missing/runc".into()),
            },
        ],
        selinux: false,
        socket: None,
        default_handler: "crun".into(),
    };
    assert_eq!(
        crio.resolve(&h),
        vec![
            RuntimeHandler::new("crun", "/usr/bin/crun"),
            RuntimeHandler::new("runc", "/opt/missing/runc")
        ],
        "CRI-O looks up the handler's name; a missing binary keeps its path for the probes to report"
    );
}

#[test]
fn crio_reads_every_drop_in_in_lexical_order_and_skips_vm_runtimes() {
    let base = r#"
[crio.api]
listen = "/var/run/crio/crio.sock"
[crio.runtime]
default_runtime = "crun"
selinux = true
[crio.runtime.runtimes.crun]
runtime_path = ""
[crio.runtime.runtimes.runc]
runtime_path = "/usr/libexec/crio/runc"
[crio.runtime.runtimes.kata]
runtime_path = "/usr/bin/kata-runtime"
runtime_type = "vm"
"#;
    let (_d, h) = host(
        &[
            ("/etc/crio/crio.conf", base),
            (
                "/etc/crio/crio.conf.d/10-runc.conf",
                "[crio.runtime.runtimes.runc]\nruntime_path = \"/opt/runc/bin/runc\"\n",
            ),
            (
                "/etc/crio/crio.conf.d/20-off",
                "[crio.runtime]\nselinux = false\n",
            ),
        ],
        &[],
    );
    let c = read_file(&h, Path::new("/etc/crio/crio.conf")).unwrap();
    assert_eq!(c.kind, CriKind::Crio);
    assert_eq!(
        names(&c),
        vec![("crun", None), ("runc", Some("/opt/runc/bin/runc"))]
    );
    assert!(!c.selinux, "20-off (no .conf extension) is read too, last");
    assert_eq!(c.socket(), PathBuf::from("/var/run/crio/crio.sock"));
}

#[test]
fn discovery_prefers_a_config_whose_socket_exists_and_knows_k3s() {
    let (d, h) = host(
        &[
            ("/etc/containerd/config.toml", CONTAINERD_V2),
            (
                "/var/lib/rancher/k3s/agent/etc/containerd/config.toml",
                "version = 3\n[plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc.options]\nBinaryName = '/var/lib/rancher/k3s/data/current/bin/runc'\n",
            ),
        ],
        &[],
    );
    let c = discover(&h).unwrap().unwrap();
    assert_eq!(
        c.files,
        [PathBuf::from("/etc/containerd/config.toml")],
        "no socket anywhere: first config"
    );
    std::fs::create_dir_all(d.path().join("run/k3s/containerd")).unwrap();
    std::fs::write(d.path().join("run/k3s/containerd/containerd.sock"), "").unwrap();
    let c = discover(&h).unwrap().unwrap();
    assert_eq!(
        c.files,
        [PathBuf::from(
            "/var/lib/rancher/k3s/agent/etc/containerd/config.toml"
        )]
    );
    assert_eq!(c.socket(), PathBuf::from("/run/k3s/containerd/containerd.sock"));
    let (_e, empty) = host(&[], &[]);
    assert_eq!(discover(&empty).unwrap(), None);
}

#[test]
fn containerd_without_handlers_has_its_builtin_runc() {
    let (_d, h) = host(&[("/etc/containerd/config.toml", "version = 2\n")], &[]);
    let c = read_file(&h, Path::new("/etc/containerd/config.toml")).unwrap();
    assert_eq!(names(&c), vec![("runc", None)]);
}

#[test]
fn bad_files_are_named() {
    let (_d, h) = host(
        &[
            ("/etc/containerd/config.toml", "[plugins\n"),
            ("/etc/other.toml", "a = 1\n"),
        ],
        &[],
    );
    let err = read_file(&h, Path::new("/etc/containerd/config.toml")).unwrap_err();
    assert!(
        err.to_string()
            .starts_with("/etc/containerd/config.toml is not valid TOML"),
        "{err}"
    );
    let err = read_file(&h, Path::new("/etc/other.toml")).unwrap_err();
    assert!(
        err.to_string().contains("neither a containerd configuration"),
        "{err}"
    );
    let err = read_file(&h, Path::new("/etc/missing.toml")).unwrap_err();
    assert!(err.to_string().starts_with("reading /etc/missing.toml"), "{err}");
}

#[test]
fn wildcards_match_like_filepath_match() {
    assert!(wildcard("*.toml", "10-a.toml"));
    assert!(!wildcard("*.toml", "10-a.toml.bak"));
    assert!(wildcard("?0-*", "10-x"));
    assert!(!wildcard("?0-*", "110-x"));
}

#[test]
fn default_handler_is_the_configured_one_else_the_runtimes_builtin() {
    let v2_crun = CONTAINERD_V2.replace(
        "default_runtime_name = \"runc\"",
        "default_runtime_name = \"crun\"",
    );
    let (_d, h) = host(
        &[
            ("/etc/containerd/config.toml", &v2_crun),
            ("/etc/containerd/plain.toml", "version = 2\n"),
            (
                "/etc/containerd/v3.toml",
                "version = 3\nimports = [\"v3.d/*.toml\"]\n[plugins.'io.containerd.cri.v1.runtime'.containerd]\ndefault_runtime_name = 'crun'\n",
            ),
            (
                "/etc/containerd/v3.d/50-kata.toml",
                "version = 3\n[plugins.'io.containerd.cri.v1.runtime'.containerd]\ndefault_runtime_name = 'runc-fips'\n",
            ),
        ],
        &[],
    );
    let read = |p: &str| read_containerd(&h, Path::new(p)).unwrap().default_handler;
    assert_eq!(read("/etc/containerd/config.toml"), "crun", "config v2");
    assert_eq!(
        read("/etc/containerd/plain.toml"),
        "runc",
        "containerd's built-in"
    );
    assert_eq!(
        read("/etc/containerd/v3.toml"),
        "runc-fips",
        "config v3, an import overrides"
    );

    let (_d, h) = host(
        &[
            (
                "/etc/crio/crio.conf",
                "[crio.runtime]\ndefault_runtime = \"runc\"\n",
            ),
            (
                "/etc/crio/crio.conf.d/99-crun.conf",
                "[crio.runtime]\ndefault_runtime = \"crun-wasm\"\n",
            ),
        ],
        &[],
    );
    let c = read_crio(&h, Path::new(CRIO_CONFIG), Path::new(CRIO_DROP_INS)).unwrap();
    assert_eq!(c.default_handler, "crun-wasm", "the last drop-in wins");
    let (_d, h) = host(
        &[("/etc/crio/crio.conf", "[crio.runtime]\nselinux = true\n")],
        &[],
    );
    let c = read_crio(&h, Path::new(CRIO_CONFIG), Path::new(CRIO_DROP_INS)).unwrap();
    assert_eq!(c.default_handler, "crun", "CRI-O's built-in since 1.31");
}
