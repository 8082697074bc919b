//! What the SELinux lane must show, as pure functions over self-test reports: the one
//! `usernsguard selftest` printed inside the SELinux-enforcing qemu guest, the one it
//! printed on the host (no SELinux) with the same runc and crun binaries
//! ([`lane_violations`]), and the one `usernsguard selftest --cri-config` printed in the
//! guest against containerd 2.1 with `enable_selinux = true` ([`cri_violations`]).
//!
//! Shared by `selinux_lane.rs` (runs against the lane's real output) and
//! `selinux_lane_rules.rs` (feeds it doctored reports, so each rule is known to bite).

use std::collections::BTreeSet;

use usernsguard_runtime::facts::idmap_support;
use usernsguard_runtime::{Check, CheckOutcome, HandlerReport, Reason, SelfTestReport, SelinuxMode};

/// Every way `guest` and `host` fail the lane's claims; empty when they hold.
pub fn lane_violations(guest: &SelfTestReport, host: &SelfTestReport) -> Vec<String> {
    let mut v = Vec::new();
    let se = &guest.node.selinux;
    if se.mode != SelinuxMode::Enforcing {
        v.push(format!("guest SELinux mode is {:?}, expected enforcing", se.mode));
    }
    match se.mount_label.as_deref() {
        None => v.push("guest report has no node.selinux.mountLabel".into()),
        // user:role:type:level, where the MLS level may itself hold colons.
        Some(l) if l.split(':').count() < 4 || l.split(':').any(str::is_empty) => {
            v.push(format!("guest mountLabel {l:?} is not an SELinux context"))
        }
        Some(_) => {}
    }
    match se.mount_label_source.as_deref() {
        None => v.push("guest report does not say where the mount label came from".into()),
        Some("injected") => v.push("guest mount label was injected, not derived from the guest".into()),
        Some(_) => {}
    }

    for name in ["runc", "crun"] {
        for (side, r) in [("guest", guest), ("host", host)] {
            if r.handler(name).is_none() {
                v.push(format!("{side} report has no {name} handler"));
            }
        }
    }
    // Without a working runtime-made userns the joined result would say nothing.
    for name in ["runc", "crun"] {
        if let Some(c) = guest.handler(name).and_then(|h| h.check(Check::UsernsCreated)) {
            if c.result != CheckOutcome::Pass {
                v.push(format!(
                    "guest {name} userns-created is {:?}/{:?}, expected Pass: {}",
                    c.result, c.reason, c.message
                ));
            }
        }
    }
    if let Some(c) = guest.handler("runc").and_then(|h| h.check(Check::UsernsJoined)) {
        if c.result != CheckOutcome::Fail || c.reason != Some(Reason::MqueueSetxattr) {
            v.push(format!(
                "guest runc userns-joined is {:?}/{:?}, expected Fail/mqueue_setxattr: {}",
                c.result, c.reason, c.message
            ));
        }
        if !has_runtime_setxattr_error(&c.message) {
            v.push(format!(
                "guest runc userns-joined message lacks the runtime's error text \"setxattr <path>: operation not permitted\": {}",
                c.message
            ));
        }
    } else if guest.handler("runc").is_some() {
        v.push("guest runc has no userns-joined result".into());
    }
    if let Some(c) = guest.handler("crun").and_then(|h| h.check(Check::UsernsJoined)) {
        if c.result != CheckOutcome::Pass {
            v.push(format!(
                "guest crun userns-joined is {:?}/{:?}, expected Pass: {}",
                c.result, c.reason, c.message
            ));
        }
    } else if guest.handler("crun").is_some() {
        v.push("guest crun has no userns-joined result".into());
    }

    // Everything else must agree with the host. The expected differences: where the host
    // (no SELinux) sees only the precondition, an unmapped /dev/mqueue owner, the enforcing
    // guest must hit the failure itself; and where only the host's kernel has idmapped
    // tmpfs (Linux 6.3+, the guest runs Debian's 6.1), an idmap-mount that passes on the
    // host fails in the guest with idmap_unsupported on tmpfs.
    let tmpfs_idmap_only_on_host = idmap_support("tmpfs", &guest.node.kernel).0 == Some(false)
        && idmap_support("tmpfs", &host.node.kernel).0 == Some(true);
    let names: BTreeSet<&str> = guest
        .handlers
        .iter()
        .chain(&host.handlers)
        .map(|h| h.handler.as_str())
        .collect();
    for name in names {
        let (Some(g), Some(h)) = (guest.handler(name), host.handler(name)) else {
            v.push(format!(
                "handler {name} is in only one of the guest and host reports"
            ));
            continue;
        };
        if (g.runtime.as_str(), g.version.as_str()) != (h.runtime.as_str(), h.version.as_str()) {
            v.push(format!(
                "{name}: guest ran {} {}, host {} {}: not the same binary",
                g.runtime, g.version, h.runtime, h.version
            ));
        }
        for check in Check::ALL {
            let (gc, hc) = (g.check(check), h.check(check));
            let (Some(gc), Some(hc)) = (gc, hc) else {
                if gc.is_some() != hc.is_some() {
                    v.push(format!("{name} {check}: present in only one of guest and host"));
                }
                continue;
            };
            // Warn on a host without SELinux labels (DESIGN.md: latent), Fail where labels are set.
            let precondition_on_host = check == Check::UsernsJoined
                && matches!(hc.result, CheckOutcome::Warn | CheckOutcome::Fail)
                && hc.reason == Some(Reason::MqueueOwnerUnmapped);
            if precondition_on_host {
                if gc.reason != Some(Reason::MqueueSetxattr) {
                    v.push(format!(
                        "{name} userns-joined: host saw mqueue_owner_unmapped, so the SELinux guest must fail with mqueue_setxattr, got {:?}/{:?}",
                        gc.result, gc.reason
                    ));
                }
                continue;
            }
            if check == Check::IdmapMount
                && tmpfs_idmap_only_on_host
                && hc.result == CheckOutcome::Pass
                && gc.result == CheckOutcome::Fail
                && gc.reason == Some(Reason::IdmapUnsupported)
                && gc.message.contains("tmpfs")
            {
                continue;
            }
            if (gc.result, gc.reason) != (hc.result, hc.reason) {
                v.push(format!(
                    "{name} {check}: guest {:?}/{:?} ({}) but host {:?}/{:?} ({})",
                    gc.result, gc.reason, gc.message, hc.result, hc.reason, hc.message
                ));
            }
        }
    }
    v
}

/// Whether `message` quotes the runtime's own failure, `setxattr <path>: operation not
/// permitted` (runc 1.1 names the mqueue path, later releases `/proc/thread-self/fd/N`),
/// rather than merely explaining the failure in usernsguard's words.
pub fn has_runtime_setxattr_error(message: &str) -> bool {
    message.match_indices("setxattr /").any(|(i, _)| {
        let rest = &message[i + "setxattr ".len()..];
        let path_end = rest.find(char::is_whitespace).unwrap_or(rest.len());
        rest[..path_end].ends_with(':') && rest[path_end..].starts_with(" operation not permitted")
    })
}

/// The guest's containerd handlers the CRI run must have, with the runc release each runs.
pub const CRI_BROKEN: (&str, &str) = ("runc-1-2-0", "1.2.0");
pub const CRI_FIXED: (&str, &str) = ("runc-1-2-1", "1.2.1");

/// Every way the guest's CRI run fails the lane's claims; empty when they hold. The claims:
/// containerd 2.1 set SELinux labels (`enable_selinux = true` on an enforcing kernel, the
/// label from the policy's `lxc_contexts`); through it, runc 1.2.0's user-namespace pod fails
/// with `mqueue_setxattr` and runc's own setxattr text, as does the direct joined probe with
/// the same label, while runc 1.2.1's pod starts and passes.
pub fn cri_violations(cri: &SelfTestReport) -> Vec<String> {
    let mut v = Vec::new();
    let se = &cri.node.selinux;
    if se.mode != SelinuxMode::Enforcing {
        v.push(format!(
            "CRI run: SELinux mode is {:?}, expected enforcing",
            se.mode
        ));
    }
    if !cri.node.kernel.starts_with("6.1.") {
        v.push(format!(
            "CRI run: guest kernel is {:?}, expected Debian's 6.1",
            cri.node.kernel
        ));
    }
    // The label containerd gives pods' mounts is the `file` entry of lxc_contexts (plus MCS
    // categories); the direct probes must carry that one, not a fallback.
    match se.mount_label.as_deref() {
        Some(l) if l.contains(":container_file_t:") => {}
        other => v.push(format!(
            "CRI run: mountLabel is {other:?}, expected the container_file_t label of lxc_contexts"
        )),
    }
    if !se
        .mount_label_source
        .as_deref()
        .is_some_and(|s| s.ends_with("/contexts/lxc_contexts"))
    {
        v.push(format!(
            "CRI run: mount label came from {:?}, expected the policy's lxc_contexts",
            se.mount_label_source
        ));
    }
    match &cri.cri {
        None => v.push("CRI run: the report has no cri section (containerd did not answer)".into()),
        Some(c) => {
            if c.runtime != "containerd" || !c.version.starts_with("2.1") {
                v.push(format!(
                    "CRI run: the CRI runtime is {} {:?}, expected containerd 2.1",
                    c.runtime, c.version
                ));
            }
            if !c.selinux_labels {
                v.push("CRI run: cri.selinuxLabels is false, expected true (enable_selinux = true on an enforcing guest)".into());
            }
        }
    }

    let (broken, broken_version) = CRI_BROKEN;
    let (fixed, _) = CRI_FIXED;
    for (name, version) in [CRI_BROKEN, CRI_FIXED] {
        match cri.handler(name) {
            None => v.push(format!("CRI run: no {name} handler")),
            Some(h) => {
                if h.version != version {
                    v.push(format!(
                        "CRI run: {name} runs {} {}, expected runc {version}",
                        h.runtime, h.version
                    ));
                }
                // Both must be judged on evidence: containerd advertises user namespaces for
                // them, and the runtime-made user namespace works.
                for (check, want) in [
                    (Check::UsernsCreated, CheckOutcome::Pass),
                    (Check::CriAdvertised, CheckOutcome::Pass),
                ] {
                    expect_result(&mut v, name, h, check, want);
                }
            }
        }
    }
    if let Some(h) = cri.handler(broken) {
        for check in [Check::CriPod, Check::UsernsJoined] {
            match h.check(check) {
                None => v.push(format!(
                    "CRI run: {broken} ({broken_version}) has no {check} result"
                )),
                Some(c) => {
                    if c.result != CheckOutcome::Fail || c.reason != Some(Reason::MqueueSetxattr) {
                        v.push(format!(
                            "CRI run: {broken} {check} is {:?}/{:?}, expected Fail/mqueue_setxattr: {}",
                            c.result, c.reason, c.message
                        ));
                    }
                    if !has_runtime_setxattr_error(&c.message) {
                        v.push(format!(
                            "CRI run: {broken} {check} message lacks runc's error text \"setxattr <path>: operation not permitted\": {}",
                            c.message
                        ));
                    }
                }
            }
        }
    }
    if let Some(h) = cri.handler(fixed) {
        for check in [Check::CriPod, Check::UsernsJoined] {
            expect_result(&mut v, fixed, h, check, CheckOutcome::Pass);
        }
    }
    v
}

fn expect_result(v: &mut Vec<String>, name: &str, h: &HandlerReport, check: Check, want: CheckOutcome) {
    match h.check(check) {
        None => v.push(format!("CRI run: {name} has no {check} result")),
        Some(c) if c.result != want => v.push(format!(
            "CRI run: {name} {check} is {:?}/{:?}, expected {want:?}: {}",
            c.result, c.reason, c.message
        )),
        Some(_) => {}
    }
}
