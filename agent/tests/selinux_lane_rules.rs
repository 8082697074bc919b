//! The SELinux lane's claims (`selinux_lane_support::lane_violations`) checked against
//! doctored reports, so that every rule is known to reject what it should. The lane
//! itself (`selinux_lane.rs`) applies the same rules to real guest and host output.

mod selinux_lane_support;

use selinux_lane_support::lane_violations;
use serde_json::{json, Value};
use usernsguard_runtime::SelfTestReport;

fn check(name: &str, result: &str, reason: Option<&str>, message: &str) -> Value {
    let mut c = json!({"check": name, "result": result, "message": message, "durationSeconds": 0.5});
    if let Some(r) = reason {
        c["reason"] = json!(r);
    }
    c
}

const SETXATTR: &str = "runc create failed: error mounting \"mqueue\" to rootfs at \"/dev/mqueue\": \
setxattr /run/usernsguard/x/rootfs/dev/mqueue: operation not permitted";

fn report(selinux: Value, runc_joined: Value) -> Value {
    json!({
        "startedAt": "2026-11-29T04:00:00Z",
        "durationSeconds": 3.0,
        "node": {"kernel": "6.1.0-50-amd64", "selinux": selinux, "lsms": [],
                 "cgroup": "v2", "idmapFilesystems": []},
        "handlers": [
            {"handler": "runc", "binary": "/usr/sbin/runc", "runtime": "runc", "version": "1.1.5",
             "features": {"available": true}, "verdict": "fail",
             "checks": [check("userns-created", "Pass", None, "ok"), runc_joined,
                        check("idmap-mount", "Fail", Some("idmap_ignored"), "not idmapped"),
                        check("features", "Pass", None, "agrees")]},
            {"handler": "crun", "binary": "/usr/bin/crun", "runtime": "crun", "version": "1.8.1",
             "features": {"available": false}, "verdict": "pass",
             "checks": [check("userns-created", "Pass", None, "ok"),
                        check("userns-joined", "Pass", None, "owner 0"),
                        check("idmap-mount", "Pass", None, "mapped"),
                        check("features", "Skip", None, "no features subcommand")]}
        ]
    })
}

fn good_guest() -> Value {
    report(
        json!({"mode": "enforcing", "mountLabel": "system_u:object_r:tmpfs_t:s0",
               "mountLabelSource": "security.selinux of /dev/mqueue"}),
        check("userns-joined", "Fail", Some("mqueue_setxattr"), SETXATTR),
    )
}

fn good_host() -> Value {
    // Without SELinux labels the unmapped owner is latent: Warn (DESIGN.md).
    report(
        json!({"mode": "disabled"}),
        check(
            "userns-joined",
            "Warn",
            Some("mqueue_owner_unmapped"),
            "/dev/mqueue owned by 65534",
        ),
    )
}

fn violations(guest: Value, host: Value) -> Vec<String> {
    let parse = |v: Value| -> SelfTestReport { serde_json::from_value(v).expect("fixture parses") };
    lane_violations(&parse(guest), &parse(host))
}

/// Asserts exactly one violation, mentioning `needle`.
fn rejects(guest: Value, host: Value, needle: &str) {
    let v = violations(guest, host);
    assert!(
        v.len() == 1 && v[0].contains(needle),
        "expected one violation about {needle:?}, got {v:#?}"
    );
}

#[test]
fn accepts_the_expected_guest_and_host_pair() {
    assert_eq!(violations(good_guest(), good_host()), Vec::<String>::new());
}

#[test]
fn accepts_the_hosts_precondition_as_warn_or_as_fail() {
    // Warn where the host sets no SELinux labels; Fail on a host whose CRI runtime would.
    let mut h = good_host();
    h["handlers"][0]["checks"][1]["result"] = json!("Fail");
    assert_eq!(violations(good_guest(), h), Vec::<String>::new());
}

#[test]
fn rejects_a_guest_that_is_not_enforcing() {
    let mut g = good_guest();
    g["node"]["selinux"]["mode"] = json!("permissive");
    rejects(g, good_host(), "expected enforcing");
}

#[test]
fn rejects_a_missing_malformed_or_injected_mount_label() {
    let mut g = good_guest();
    g["node"]["selinux"].as_object_mut().unwrap().remove("mountLabel");
    rejects(g, good_host(), "no node.selinux.mountLabel");

    let mut g = good_guest();
    g["node"]["selinux"]["mountLabel"] = json!("tmpfs_t");
    rejects(g, good_host(), "not an SELinux context");

    let mut g = good_guest();
    g["node"]["selinux"]["mountLabelSource"] = json!("injected");
    rejects(g, good_host(), "injected");
}

#[test]
fn rejects_runc_joined_without_the_setxattr_failure() {
    let mut g = good_guest();
    g["handlers"][0]["checks"][1] = check("userns-joined", "Pass", None, "owner 0");
    let v = violations(g, good_host());
    assert!(
        v.iter().any(|m| m.contains("expected Fail/mqueue_setxattr")),
        "{v:#?}"
    );
    assert!(
        v.iter().any(|m| m.contains("must fail with mqueue_setxattr")),
        "{v:#?}"
    );

    let mut g = good_guest();
    g["handlers"][0]["checks"][1] = check(
        "userns-joined",
        "Fail",
        Some("mqueue_owner_unmapped"),
        "owned by 65534",
    );
    let v = violations(g, good_host());
    assert!(
        v.iter().any(|m| m.contains("expected Fail/mqueue_setxattr")),
        "{v:#?}"
    );
}

#[test]
fn rejects_a_setxattr_verdict_without_the_runtimes_error_text() {
    // usernsguard's own explanation names the error but is not the runtime's output.
    let explained = "/dev/mqueue is owned by 65534:65534: on an SELinux node labelling the mount \
fails with setxattr: operation not permitted (runc issue 4466)";
    for message in ["mqueue could not be labelled", explained] {
        let mut g = good_guest();
        g["handlers"][0]["checks"][1] = check("userns-joined", "Fail", Some("mqueue_setxattr"), message);
        rejects(g, good_host(), "lacks the runtime's error text");
    }
}

#[test]
fn recognises_the_runtimes_setxattr_error_in_both_runc_spellings() {
    use selinux_lane_support::has_runtime_setxattr_error as quoted;
    assert!(quoted(SETXATTR));
    assert!(quoted(
        "runc run failed: setxattr /proc/thread-self/fd/7: operation not permitted"
    ));
    assert!(!quoted("setxattr /dev/mqueue: permission denied"));
    assert!(!quoted("setxattr: operation not permitted"));
    assert!(!quoted("setxattr /dev/mqueue"));
}

#[test]
fn rejects_crun_failing_in_the_guest() {
    let mut g = good_guest();
    g["handlers"][1]["checks"][1] = check("userns-joined", "Fail", Some("mqueue_setxattr"), SETXATTR);
    let v = violations(g, good_host());
    assert!(v.iter().any(|m| m.contains("guest crun userns-joined")), "{v:#?}");
    assert!(
        v.iter().any(|m| m.contains("crun userns-joined: guest Fail")),
        "{v:#?}"
    );
}

#[test]
fn rejects_any_other_check_that_differs_from_the_host() {
    let mut g = good_guest();
    g["handlers"][1]["checks"][2] = check(
        "idmap-mount",
        "Fail",
        Some("idmap_unsupported"),
        "tmpfs needs 6.3",
    );
    rejects(g, good_host(), "crun idmap-mount: guest Fail");

    let mut h = good_host();
    h["handlers"][0]["checks"][3] = check("features", "Fail", Some("features_mismatch"), "claims idmap");
    rejects(good_guest(), h, "runc features: guest Pass");

    // A host that saw no precondition at all disagrees with the guest's failure.
    let mut h = good_host();
    h["handlers"][0]["checks"][1] = check("userns-joined", "Pass", None, "owner 0");
    rejects(good_guest(), h, "runc userns-joined: guest Fail");
}

#[test]
fn accepts_idmap_mount_failing_on_tmpfs_only_where_the_guest_kernel_lacks_idmapped_tmpfs() {
    let tmpfs_fail = check(
        "idmap-mount",
        "Fail",
        Some("idmap_unsupported"),
        "/run/usernsguard/x (ext4): mapped; tmpfs: crun 1.8.1 failed: mount_setattr: Invalid argument",
    );
    // Guest on 6.1, host on 6.18 (tmpfs idmaps since 6.3): the one accepted difference.
    let mut g = good_guest();
    g["handlers"][1]["checks"][2] = tmpfs_fail.clone();
    let mut h = good_host();
    h["node"]["kernel"] = json!("6.18.44");
    assert_eq!(violations(g.clone(), h.clone()), Vec::<String>::new());

    // Both on 6.1: nothing explains the difference.
    rejects(g.clone(), good_host(), "crun idmap-mount: guest Fail");

    // Another reason, or a failure that is not about tmpfs, is not explained either.
    let mut g2 = g.clone();
    g2["handlers"][1]["checks"][2] = check(
        "idmap-mount",
        "Fail",
        Some("idmap_ignored"),
        "tmpfs: not idmapped",
    );
    rejects(g2, h.clone(), "crun idmap-mount: guest Fail");
    let mut g3 = g;
    g3["handlers"][1]["checks"][2] = check("idmap-mount", "Fail", Some("idmap_unsupported"), "ext4: EINVAL");
    rejects(g3, h, "crun idmap-mount: guest Fail");
}

#[test]
fn rejects_missing_handlers_and_different_binaries() {
    let mut g = good_guest();
    g["handlers"].as_array_mut().unwrap().remove(1);
    let v = violations(g, good_host());
    assert!(
        v.iter().any(|m| m.contains("guest report has no crun handler")),
        "{v:#?}"
    );
    assert!(v.iter().any(|m| m.contains("only one of")), "{v:#?}");

    let mut h = good_host();
    h["handlers"][0]["version"] = json!("1.2.1");
    rejects(good_guest(), h, "not the same binary");
}

#[test]
fn rejects_a_guest_whose_runtime_made_userns_does_not_work() {
    let mut g = good_guest();
    g["handlers"][1]["checks"][0] = check("userns-created", "Fail", Some("userns_unsupported"), "no userns");
    let v = violations(g, good_host());
    assert!(
        v.iter().any(|m| m.contains("guest crun userns-created")),
        "{v:#?}"
    );
}

// --- the guest's CRI run (containerd 2.1, enable_selinux = true) ---------------------------

const CRI_SETXATTR: &str = "RunPodSandbox through containerd 2.1.9 handler runc-1-2-0 failed: \
failed to create containerd task: failed to create shim task: OCI runtime create failed: runc \
create failed: unable to start container process: error during container init: error mounting \
\"mqueue\" to rootfs at \"/dev/mqueue\": setxattr /proc/thread-self/fd/7: operation not permitted: unknown";

const JOINED_SETXATTR: &str = "runc 1.2.0 failed: error mounting \"mqueue\" to rootfs at \
\"/dev/mqueue\": setxattr /proc/thread-self/fd/7: operation not permitted";

fn cri_handler(name: &str, version: &str, joined: Value, pod: Value) -> Value {
    let verdict = if pod["result"] == "Pass" { "pass" } else { "fail" };
    json!({"handler": name, "binary": format!("/opt/runtimes/runc-{version}"), "runtime": "runc",
           "version": version, "features": {"available": true}, "verdict": verdict,
           "checks": [check("userns-created", "Pass", None, "ok"), joined,
                      check("idmap-mount", "Fail", Some("idmap_unsupported"), "tmpfs needs 6.3"),
                      check("features", "Pass", None, "agrees"),
                      check("cri-advertised", "Pass", None, "userNamespaces: true"), pod]})
}

fn good_cri() -> Value {
    json!({
        "startedAt": "2026-11-29T04:00:00Z",
        "durationSeconds": 30.0,
        "node": {"kernel": "6.1.0-50-amd64",
                 "selinux": {"mode": "enforcing", "policy": "default",
                             "mountLabel": "system_u:object_r:container_file_t:s0",
                             "mountLabelSource": "/etc/selinux/default/contexts/lxc_contexts"},
                 "lsms": [], "cgroup": "v2", "idmapFilesystems": []},
        "cri": {"runtime": "containerd", "version": "2.1.9", "socket": "/run/containerd/containerd.sock",
                "config": "/etc/containerd/config.toml", "selinuxLabels": true},
        "handlers": [
            cri_handler("runc-1-2-0", "1.2.0",
                        check("userns-joined", "Fail", Some("mqueue_setxattr"), JOINED_SETXATTR),
                        check("cri-pod", "Fail", Some("mqueue_setxattr"), CRI_SETXATTR)),
            cri_handler("runc-1-2-1", "1.2.1",
                        check("userns-joined", "Pass", None, "owner 0"),
                        check("cri-pod", "Pass", None, "owner 0, joined the pod's namespaces")),
        ]
    })
}

fn cri_violations(report: Value) -> Vec<String> {
    let r: SelfTestReport = serde_json::from_value(report).expect("fixture parses");
    selinux_lane_support::cri_violations(&r)
}

fn cri_rejects(report: Value, needle: &str) {
    let v = cri_violations(report);
    assert!(
        v.len() == 1 && v[0].contains(needle),
        "expected one violation about {needle:?}, got {v:#?}"
    );
}

#[test]
fn cri_run_accepts_the_expected_report() {
    assert_eq!(cri_violations(good_cri()), Vec::<String>::new());
}

#[test]
fn cri_run_rejects_containerd_without_selinux_labels_or_without_an_answer() {
    let mut r = good_cri();
    r["cri"]["selinuxLabels"] = json!(false);
    cri_rejects(r, "selinuxLabels is false");

    let mut r = good_cri();
    r.as_object_mut().unwrap().remove("cri");
    cri_rejects(r, "no cri section");

    let mut r = good_cri();
    r["cri"]["version"] = json!("1.6.20");
    cri_rejects(r, "expected containerd 2.1");

    let mut r = good_cri();
    r["node"]["selinux"]["mode"] = json!("permissive");
    cri_rejects(r, "expected enforcing");

    let mut r = good_cri();
    r["node"]["kernel"] = json!("6.18.44");
    cri_rejects(r, "expected Debian's 6.1");
}

#[test]
fn cri_run_rejects_a_mount_label_that_is_not_containerds() {
    // The fallback label of /dev/mqueue is not what containerd gives pods.
    let mut r = good_cri();
    r["node"]["selinux"]["mountLabel"] = json!("system_u:object_r:tmpfs_t:s0");
    r["node"]["selinux"]["mountLabelSource"] = json!("security.selinux of /dev/mqueue");
    let v = cri_violations(r);
    assert_eq!(v.len(), 2, "{v:#?}");
    assert!(
        v[0].contains("container_file_t") && v[1].contains("lxc_contexts"),
        "{v:#?}"
    );
}

#[test]
fn cri_run_rejects_runc_1_2_0_pods_that_do_not_fail_with_runcs_setxattr_error() {
    let mut r = good_cri();
    r["handlers"][0]["checks"][5] = check("cri-pod", "Pass", None, "owner 0");
    let v = cri_violations(r);
    assert!(
        v.iter()
            .any(|m| m.contains("runc-1-2-0 cri-pod is Pass/None, expected Fail/mqueue_setxattr")),
        "{v:#?}"
    );

    // Any other pod failure is not the one the lane is about.
    let mut r = good_cri();
    r["handlers"][0]["checks"][5] = check(
        "cri-pod",
        "Fail",
        Some("pod_start_failed"),
        "RunPodSandbox failed: failed to setup network for sandbox",
    );
    let v = cri_violations(r);
    assert!(
        v.iter().any(|m| m.contains("expected Fail/mqueue_setxattr")),
        "{v:#?}"
    );

    // The right reason from usernsguard's own reading of an unmapped owner, without runc's
    // error: the pod started, so the failure was not observed through the CRI.
    let mut r = good_cri();
    r["handlers"][0]["checks"][5] = check(
        "cri-pod",
        "Fail",
        Some("mqueue_setxattr"),
        "/dev/mqueue is owned by 65534: labelling it fails with setxattr: operation not permitted",
    );
    cri_rejects(r, "runc-1-2-0 cri-pod message lacks runc's error text");
}

#[test]
fn cri_run_rejects_a_direct_joined_probe_of_runc_1_2_0_without_the_failure() {
    let mut r = good_cri();
    r["handlers"][0]["checks"][1] = check(
        "userns-joined",
        "Fail",
        Some("mqueue_owner_unmapped"),
        "/dev/mqueue owned by 65534",
    );
    let v = cri_violations(r);
    assert!(
        v.iter()
            .any(|m| m.contains("runc-1-2-0 userns-joined is Fail/Some(MqueueOwnerUnmapped)")),
        "{v:#?}"
    );
}

#[test]
fn cri_run_rejects_runc_1_2_1_pods_that_do_not_pass() {
    let mut r = good_cri();
    r["handlers"][1]["checks"][5] = check("cri-pod", "Fail", Some("mqueue_setxattr"), CRI_SETXATTR);
    cri_rejects(r, "runc-1-2-1 cri-pod is Fail");

    let mut r = good_cri();
    r["handlers"][1]["checks"][5] = check("cri-pod", "Error", Some("timeout"), "did not finish");
    cri_rejects(r, "runc-1-2-1 cri-pod is Error");

    let mut r = good_cri();
    r["handlers"][1]["checks"][1] = check("userns-joined", "Fail", Some("mqueue_setxattr"), JOINED_SETXATTR);
    cri_rejects(r, "runc-1-2-1 userns-joined is Fail");
}

#[test]
fn cri_run_rejects_handlers_that_are_missing_mislabelled_or_not_advertised() {
    let mut r = good_cri();
    r["handlers"].as_array_mut().unwrap().remove(1);
    cri_rejects(r, "no runc-1-2-1 handler");

    let mut r = good_cri();
    r["handlers"][0]["version"] = json!("1.2.1");
    cri_rejects(r, "expected runc 1.2.0");

    // Without userNamespaces advertised the kubelet would never send such a pod.
    let mut r = good_cri();
    r["handlers"][0]["checks"][4] = check(
        "cri-advertised",
        "Fail",
        Some("userns_not_advertised"),
        "userNamespaces: false",
    );
    cri_rejects(r, "runc-1-2-0 cri-advertised is Fail");

    let mut r = good_cri();
    r["handlers"][1]["checks"].as_array_mut().unwrap().remove(5);
    cri_rejects(r, "runc-1-2-1 has no cri-pod result");
}
