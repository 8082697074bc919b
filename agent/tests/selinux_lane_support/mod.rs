//! What the SELinux lane must show, as a pure function over two self-test reports: the one
//! `usernsguard selftest` printed inside the SELinux-enforcing qemu guest, and the one it
//! printed on the host (no SELinux) with the same runc and crun binaries.
//!
//! Shared by `selinux_lane.rs` (runs against the lane's real output) and
//! `selinux_lane_rules.rs` (feeds it doctored reports, so each rule is known to bite).

use std::collections::BTreeSet;

use usernsguard_runtime::facts::idmap_support;
use usernsguard_runtime::{Check, CheckOutcome, Reason, SelfTestReport, SelinuxMode};

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
