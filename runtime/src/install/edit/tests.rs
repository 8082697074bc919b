use super::*;

const P: &str = "/etc/containerd/config.toml";

fn spec(handler: &str) -> HandlerSpec {
    HandlerSpec {
        handler: handler.into(),
        binary: PathBuf::from("/opt/rt/runc"),
        systemd_cgroup: Some(true),
    }
}

#[test]
fn schema_versions_and_their_errors_name_the_file() {
    let p = Path::new(P);
    assert_eq!(containerd_schema("version = 2\n", p), Ok(SchemaVersion::V2));
    assert_eq!(containerd_schema("version = 3\n", p), Ok(SchemaVersion::V3));
    for (text, want) in [
        ("[plugins.cri]\n", "has no `version` key"),
        ("version = 1\n", "has `version = 1`"),
        ("version = \"3\"\n", "has `version = \"3\"`"),
        ("version = 2\n[plugins\n", "is not valid TOML"),
    ] {
        let e = containerd_schema(text, p).unwrap_err().to_string();
        assert!(e.starts_with(P) && e.contains(want), "{text:?}: {e}");
    }
}

#[test]
fn drop_ins_quote_odd_handler_names_and_use_the_version_s_table() {
    let v2 = containerd_drop_in(SchemaVersion::V2, &spec("runc.1-4"));
    assert!(v2.contains("version = 2\n"), "{v2}");
    assert!(
        v2.contains("[plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.\"runc.1-4\"]"),
        "{v2}"
    );
    let v3 = containerd_drop_in(SchemaVersion::V3, &spec("runc"));
    assert!(
        v3.contains("[plugins.\"io.containerd.cri.v1.runtime\".containerd.runtimes.runc.options]"),
        "{v3}"
    );
    assert!(v3.contains("SystemdCgroup = true"), "{v3}");
    let parsed: DocumentMut = v3.parse().unwrap();
    assert_eq!(
        containerd_declared(&v3, Path::new("/d"), SchemaVersion::V3, "runc").unwrap(),
        Some(Declared {
            runtime_type: "io.containerd.runc.v2".into(),
            binary: Some("/opt/rt/runc".into())
        })
    );
    assert_eq!(parsed["version"].as_integer(), Some(3));
}

#[test]
fn imports_are_added_once_and_removed_again() {
    let p = Path::new(P);
    let root = "version = 2 # keep\n\n[grpc]\n  address = \"/run/x.sock\"\n";
    let added = add_import(root, p, "/etc/containerd/conf.d/a.toml").unwrap();
    assert_eq!(
        added,
        "version = 2 # keep\nimports = [\"/etc/containerd/conf.d/a.toml\"]\n\n[grpc]\n  address = \"/run/x.sock\"\n"
    );
    assert_eq!(
        add_import(&added, p, "/etc/containerd/conf.d/a.toml").unwrap(),
        added
    );
    let removed = remove_import(&added, p, "/etc/containerd/conf.d/a.toml").unwrap();
    assert!(!removed.contains("a.toml"), "{removed}");
    assert!(matches!(
        add_import("imports = \"x\"\n", p, "y"),
        Err(EditError::Shape { .. })
    ));
}

#[test]
fn import_globs_match_like_containerd() {
    let dir = Path::new("/etc/containerd");
    let f = Path::new("/etc/containerd/conf.d/usernsguard-x.toml");
    assert!(import_matches("conf.d/*.toml", dir, f));
    assert!(import_matches("/etc/containerd/conf.d/*", dir, f));
    assert!(import_matches("./conf.d/../conf.d/usernsguard-?.toml", dir, f));
    assert!(!import_matches("conf.d/*.conf", dir, f));
    assert!(!import_matches("/etc/containerd/*.toml", dir, f));
}

#[test]
fn template_blocks_are_appended_replaced_and_removed() {
    let user = "{{ template \"base\" . }}\n\n[plugins.x]\n  y = 1\n";
    let with = k3s_template(Some(user), SchemaVersion::V2, &spec("h"));
    assert!(with.starts_with(user), "{with}");
    assert!(has_template_block(&with, "h"));
    let mut other = spec("h");
    other.binary = PathBuf::from("/other");
    let replaced = k3s_template(Some(&with), SchemaVersion::V2, &other);
    assert_eq!(
        replaced.matches("# usernsguard: runtime handler").count(),
        1,
        "{replaced}"
    );
    assert!(replaced.contains("/other"));
    assert_eq!(remove_template_block(&with, "h"), user);
    let fresh = k3s_template(None, SchemaVersion::V3, &spec("h"));
    assert!(fresh.starts_with(BASE_TEMPLATE));
}

#[test]
fn default_runtime_cgroup_driver_follows_the_merge_order() {
    let p = Path::new(P);
    let mut s = containerd_cgroup_settings(
        "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.runc.options]\nSystemdCgroup = true\n",
        p,
        SchemaVersion::V2,
    )
    .unwrap();
    assert_eq!(s.for_default(), Some(true));
    s.merge(
        containerd_cgroup_settings(
            "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".containerd]\ndefault_runtime_name = \"crun\"\n",
            p,
            SchemaVersion::V2,
        )
        .unwrap(),
    );
    assert_eq!(s.for_default(), None);
}

#[test]
fn v2_roots_get_the_handler_in_place_and_lose_it_again() {
    let p = Path::new(P);
    // Debian 12's containerd config, indentation and all.
    let root = "version = 2\n\n[plugins]\n  [plugins.\"io.containerd.grpc.v1.cri\"]\n    [plugins.\"io.containerd.grpc.v1.cri\".cni]\n      bin_dir = \"/usr/lib/cni\"\n  [plugins.\"io.containerd.internal.v1.opt\"]\n    path = \"/var/lib/containerd/opt\"\n";
    let added = add_runtime(root, p, SchemaVersion::V2, &spec("runc.1-4"), None).unwrap();
    // Appended, marked; nothing else moved.
    assert_eq!(
        added,
        format!(
            "{root}\n# usernsguard: runtime handler \"runc.1-4\". Added by `usernsguard install`; `usernsguard uninstall` removes it.\n\
             [plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.\"runc.1-4\"]\nruntime_type = \"io.containerd.runc.v2\"\n\n\
             [plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.\"runc.1-4\".options]\nBinaryName = \"/opt/rt/runc\"\nSystemdCgroup = true\n"
        )
    );
    assert_eq!(
        containerd_declared(&added, p, SchemaVersion::V2, "runc.1-4").unwrap(),
        Some(Declared {
            runtime_type: "io.containerd.runc.v2".into(),
            binary: Some("/opt/rt/runc".into())
        })
    );
    // Again: unchanged. Another binary: the values change in place, the marker stays one.
    assert_eq!(
        add_runtime(&added, p, SchemaVersion::V2, &spec("runc.1-4"), None).unwrap(),
        added
    );
    let mut other = spec("runc.1-4");
    other.binary = PathBuf::from("/other/runc");
    other.systemd_cgroup = None;
    let moved = add_runtime(&added, p, SchemaVersion::V2, &other, None).unwrap();
    assert_eq!(
        moved.matches("# usernsguard: runtime handler").count(),
        1,
        "{moved}"
    );
    assert!(
        moved.contains("BinaryName = \"/other/runc\"") && !moved.contains("SystemdCgroup"),
        "{moved}"
    );
    // Taken out of a file someone edited after the install: only our tables go.
    let edited = added.replace("/usr/lib/cni", "/opt/cni/bin");
    let removed = remove_runtime(&edited, p, SchemaVersion::V2, "runc.1-4", &[]).unwrap();
    assert!(
        !removed.contains("runc.1-4") && removed.contains("/opt/cni/bin"),
        "{removed}"
    );
    assert_eq!(
        remove_runtime(&removed, p, SchemaVersion::V2, "runc.1-4", &[]).unwrap(),
        removed
    );
    // An empty root, and one whose runtimes are an inline table.
    let fresh = add_runtime("version = 2\n", p, SchemaVersion::V2, &spec("h"), None).unwrap();
    assert!(
        containerd_declared(&fresh, p, SchemaVersion::V2, "h")
            .unwrap()
            .is_some(),
        "{fresh}"
    );
    let inline = "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".containerd]\nruntimes = { runc = { runtime_type = \"io.containerd.runc.v2\" } }\n";
    let err = add_runtime(inline, p, SchemaVersion::V2, &spec("h"), None).unwrap_err();
    assert!(
        matches!(err, EditError::Shape { .. }) && err.to_string().starts_with(P),
        "{err}"
    );
}

#[test]
fn containerd_1_x_s_default_runtime_is_declared_with_the_handler_when_no_file_does() {
    let p = Path::new(P);
    let root = "version = 2\n\n[plugins.\"io.containerd.grpc.v1.cri\".cni]\n  bin_dir = \"/usr/lib/cni\"\n";
    let added = add_runtime(root, p, SchemaVersion::V2, &spec("h"), Some("runc")).unwrap();
    assert!(added.starts_with(root), "{added}");
    assert_eq!(
        containerd_declared(&added, p, SchemaVersion::V2, "runc").unwrap(),
        Some(Declared {
            runtime_type: "io.containerd.runc.v2".into(),
            binary: None
        }),
        "{added}"
    );
    assert_eq!(
        containerd_runtimes(&added, p, SchemaVersion::V2).unwrap(),
        ["runc", "h"]
    );
    let at = |name: &str| added.find(&format!("runtimes.{name}]")).unwrap();
    assert!(at("runc") < at("h"), "{added}");
    // Once there, it is declared: nothing more to add.
    assert_eq!(
        add_runtime(&added, p, SchemaVersion::V2, &spec("h"), Some("runc")).unwrap(),
        added
    );
    // A default runtime declared already (by the operator) is left alone.
    let has_runc = add_runtime(root, p, SchemaVersion::V2, &spec("runc"), None).unwrap();
    let both = add_runtime(&has_runc, p, SchemaVersion::V2, &spec("h"), Some("runc")).unwrap();
    assert_eq!(both.matches("runtimes.runc]").count(), 1, "{both}");
    // Taken out with the handler (someone else edited the file meanwhile).
    let edited = added.replace("/usr/lib/cni", "/opt/cni/bin");
    let removed = remove_runtime(&edited, p, SchemaVersion::V2, "h", &["runc".into()]).unwrap();
    assert_eq!(
        containerd_runtimes(&removed, p, SchemaVersion::V2).unwrap(),
        Vec::<String>::new()
    );
    assert!(removed.contains("/opt/cni/bin"), "{removed}");
    // A second handler installed after it relies on that runc: it stays.
    let two = add_runtime(&edited, p, SchemaVersion::V2, &spec("h2"), Some("runc")).unwrap();
    let one = remove_runtime(&two, p, SchemaVersion::V2, "h", &["runc".into()]).unwrap();
    assert_eq!(
        containerd_runtimes(&one, p, SchemaVersion::V2).unwrap(),
        ["runc", "h2"]
    );
}
