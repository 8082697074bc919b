//! Pod-failure classification: maps one failure message (a kubelet event message, a
//! container status message, or a runtime's stderr as containerd, CRI-O, runc, crun and
//! the kubelet write them) to a [`Reason`].
//!
//! It exists so that the agent's failure counter, the `classify` subcommand and the
//! probes all agree on what a message means. It is a pure function of the text: no I/O,
//! no state, so every decision is pinned by the table in `tests/fixtures/classify.tsv`.
//!
//! How it works, and why:
//!
//! 1. The message is normalised once: ASCII lower-cased, quoting removed (`"`, `'`, `` ` ``
//!    and `\`), whitespace runs collapsed to one space. The same error reaches us quoted
//!    zero to three levels deep (runc → containerd → kubelet → JSON), with `"proc"`,
//!    `\"proc\"` or `` `proc` ``; after normalisation they are all `proc`.
//! 2. One Aho-Corasick automaton scans the normalised bytes once for every phrase of the
//!    table below, recording which [`Fact`]s the message states. The scan is linear in
//!    the input (no backtracking), so multi-megabyte lines cost what their length costs,
//!    and non-UTF-8 bytes are just bytes that match nothing.
//! 3. A fixed, ordered list of rules over the fact set picks the reason: most specific
//!    first (the runc mqueue bug before a generic mqueue mount error, idmap before the
//!    generic "user namespaces not supported").
//!
//! The classifier never returns [`Reason::Timeout`] or [`Reason::FeaturesMismatch`]:
//! those are verdicts of the probes, which know the deadline and the `features` output;
//! a message that merely says "deadline exceeded" is an ordinary failure.

use std::sync::LazyLock;

use aho_corasick::{AhoCorasick, AhoCorasickKind, MatchKind};

use crate::reason::Reason;

/// Something a failure message states; a message is reduced to the set of these.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum Fact {
    /// The POSIX message queue filesystem or its mount point.
    Mqueue,
    /// `setxattr`/`lsetxattr`: runc labelling a mount for SELinux.
    Setxattr,
    Eperm,
    Eacces,
    Einval,
    Enosys,
    Ebusy,
    Enospc,
    /// "not supported", "does not support", "is disabled", ...
    Unsupported,
    Mount,
    Sysfs,
    /// A procfs mount (not merely a `/proc/...` path, which every runc error contains).
    ProcMount,
    /// An idmapped mount: `MOUNT_ATTR_IDMAP`, "idmapped", CRI-O's "mapped mount".
    Idmap,
    /// `mount_setattr(2)`: idmapped mounts, unless it sets recursive read-only.
    MountSetattr,
    /// Recursive read-only mounts, the other user of `mount_setattr(2)`.
    RecursiveRo,
    /// The runtime went on without doing what was asked.
    Ignored,
    /// Any mention of user namespaces or their id maps.
    Userns,
    /// Subordinate ids or the pool of per-pod id ranges.
    Subid,
    /// A statement that ids ran out.
    IdsExhausted,
    /// "is out of range": about ids only next to a user-namespace mention.
    OutOfRange,
    /// An SELinux AVC denial record.
    Avc,
    Selinux,
    /// The overflow uid (65534 / nobody) as an owner.
    OverflowOwner,
    /// containerd 2.x creating the pod's user namespace through a helper process.
    NoopUnshare,
}

impl Fact {
    const fn bit(self) -> u64 {
        1 << (self as u8)
    }
}

/// One phrase of the table, in normalised form (lower case, no quotes).
struct Phrase {
    text: &'static str,
    fact: Fact,
    /// Only counts at the start of a word: keeps `idmap` from matching inside `newuidmap`
    /// or `uidmappings`, which are about user namespaces, not idmapped mounts.
    word_start: bool,
}

const fn p(text: &'static str, fact: Fact) -> Phrase {
    Phrase {
        text,
        fact,
        word_start: false,
    }
}

const fn w(text: &'static str, fact: Fact) -> Phrase {
    Phrase {
        text,
        fact,
        word_start: true,
    }
}

/// Every phrase the classifier looks for. Adding a row here and a fixture row in
/// `tests/fixtures/classify.tsv` is how a new wording is taught.
const PHRASES: &[Phrase] = &[
    p("mqueue", Fact::Mqueue),
    p("setxattr", Fact::Setxattr),
    p("operation not permitted", Fact::Eperm),
    w("eperm", Fact::Eperm),
    p("permission denied", Fact::Eacces),
    w("eacces", Fact::Eacces),
    p("invalid argument", Fact::Einval),
    w("einval", Fact::Einval),
    p("function not implemented", Fact::Enosys),
    w("enosys", Fact::Enosys),
    p("device or resource busy", Fact::Ebusy),
    w("ebusy", Fact::Ebusy),
    p("no space left on device", Fact::Enospc),
    w("enospc", Fact::Enospc),
    p("not supported", Fact::Unsupported),
    p("unsupported", Fact::Unsupported),
    p("does not support", Fact::Unsupported),
    p("doesnt support", Fact::Unsupported),
    p("do not support", Fact::Unsupported),
    p("dont support", Fact::Unsupported),
    p("not enabled", Fact::Unsupported),
    p("arent enabled", Fact::Unsupported),
    p("isnt enabled", Fact::Unsupported),
    p("is disabled", Fact::Unsupported),
    p("are disabled", Fact::Unsupported),
    p("no support", Fact::Unsupported),
    w("mount", Fact::Mount),
    p("sysfs", Fact::Sysfs),
    p("mounting proc ", Fact::ProcMount),
    p("mount proc", Fact::ProcMount),
    p("mount -t proc", Fact::ProcMount),
    p("proc to /proc", Fact::ProcMount),
    w("idmap", Fact::Idmap),
    p("id-mapped", Fact::Idmap),
    p("id mapped", Fact::Idmap),
    p("mount_attr_idmap", Fact::Idmap),
    p("create mapped mount", Fact::Idmap),
    p("cannot be mapped to a host id", Fact::Idmap),
    p("mount_setattr", Fact::MountSetattr),
    p("mount_attr_rdonly", Fact::RecursiveRo),
    w("rro", Fact::RecursiveRo),
    p("recursive read-only", Fact::RecursiveRo),
    p("ignored", Fact::Ignored),
    p("ignoring", Fact::Ignored),
    p("silently", Fact::Ignored),
    p("not applied", Fact::Ignored),
    p("user namespace", Fact::Userns),
    p("usernamespace", Fact::Userns),
    p("user_namespace", Fact::Userns),
    w("userns", Fact::Userns),
    p("clone_newuser", Fact::Userns),
    p("uid_map", Fact::Userns),
    p("gid_map", Fact::Userns),
    w("uid map", Fact::Userns),
    w("gid map", Fact::Userns),
    w("uidmapping", Fact::Userns),
    w("gidmapping", Fact::Userns),
    w("uid mapping", Fact::Userns),
    w("gid mapping", Fact::Userns),
    p("hostusers", Fact::Userns),
    p("setgroups: invalid argument", Fact::Userns),
    p("subuid", Fact::Subid),
    p("subgid", Fact::Subid),
    p("subordinate", Fact::Subid),
    p("getsubids", Fact::Subid),
    p("newuidmap", Fact::Subid),
    p("newgidmap", Fact::Subid),
    p("unused ids", Fact::Subid),
    p("enough available ids", Fact::Subid),
    p("slot to allocate a user namespace", Fact::IdsExhausted),
    p("assigned ids are not enough", Fact::IdsExhausted),
    p("is out of range", Fact::OutOfRange),
    p("avc: denied", Fact::Avc),
    p("avc:denied", Fact::Avc),
    p("type=avc", Fact::Avc),
    p("selinux is preventing", Fact::Avc),
    p("selinux", Fact::Selinux),
    w("65534", Fact::OverflowOwner),
    p("overflow uid", Fact::OverflowOwner),
    p("overflowuid", Fact::OverflowOwner),
    p("owned by nobody", Fact::OverflowOwner),
    p("noop process for unshare", Fact::NoopUnshare),
];

/// The automaton over [`PHRASES`], built once per process.
static MATCHER: LazyLock<AhoCorasick> = LazyLock::new(|| {
    AhoCorasick::builder()
        .match_kind(MatchKind::Standard)
        .kind(Some(AhoCorasickKind::DFA))
        .build(PHRASES.iter().map(|p| p.text))
        .expect("the phrase table is a fixed, small set of literals")
});

/// Classifies one failure message. Never panics; always returns a member of
/// [`Reason::ALL`].
pub fn classify(message: &str) -> Reason {
    classify_bytes(message.as_bytes())
}

/// Classifies one failure message given as raw bytes, for input that need not be UTF-8
/// (a runtime's stderr, a line of `kubectl` output cut mid-character).
pub fn classify_bytes(line: &[u8]) -> Reason {
    // Typical messages are a few hundred bytes: normalise them on the stack so the hot
    // path does no allocation; only long lines pay for a heap buffer.
    let mut stack = [0u8; STACK_BUF];
    let mut heap = Vec::new();
    let buf: &mut [u8] = if line.len() <= STACK_BUF {
        &mut stack[..line.len()]
    } else {
        heap.resize(line.len(), 0);
        &mut heap
    };
    let len = normalise_into(line, buf);
    decide(facts(&buf[..len]))
}

const STACK_BUF: usize = 2048;

/// What each input byte becomes in the normalised text: 0 drops it (quoting, and NUL,
/// which no phrase contains), whitespace becomes a space, ASCII letters lose their case.
static NORM: [u8; 256] = {
    let mut table = [0u8; 256];
    let mut b = 0usize;
    while b < 256 {
        let byte = b as u8;
        table[b] = match byte {
            b'"' | b'\'' | b'`' | b'\\' | 0 => 0,
            b' ' | b'\t' | b'\n' | b'\r' | 0x0b | 0x0c => b' ',
            _ => byte.to_ascii_lowercase(),
        };
        b += 1;
    }
    table
};

/// Writes the normalised form of `line` into `out` (at least as long as `line`) and
/// returns its length. Branch-free per byte: every byte is stored, and the write cursor
/// only advances past bytes that are kept, so runs of whitespace collapse to one space.
fn normalise_into(line: &[u8], out: &mut [u8]) -> usize {
    debug_assert!(out.len() >= line.len());
    let mut len = 0usize;
    let mut prev = b' ';
    for &byte in line {
        let mapped = NORM[byte as usize];
        // In bounds: `len` never exceeds the number of bytes read so far.
        out[len] = mapped;
        let keep = (mapped != 0) & !((mapped == b' ') & (prev == b' '));
        len += usize::from(keep);
        if keep {
            prev = mapped;
        }
    }
    len
}

fn facts(text: &[u8]) -> u64 {
    let mut set = 0u64;
    for m in MATCHER.find_overlapping_iter(text) {
        let phrase = &PHRASES[m.pattern().as_usize()];
        if phrase.word_start && m.start() > 0 && text[m.start() - 1].is_ascii_alphanumeric() {
            continue;
        }
        set |= phrase.fact.bit();
    }
    set
}

/// The rules, most specific first. Each line is one documented failure mode.
fn decide(set: u64) -> Reason {
    let has = |f: Fact| set & f.bit() != 0;
    let eperm = has(Fact::Eperm);
    let denied = eperm || has(Fact::Eacces);
    let idmap = has(Fact::Idmap) || (has(Fact::MountSetattr) && !has(Fact::RecursiveRo));

    // runc 1.2.0 labelling an mqueue superblock owned by unmapped host root (runc #4466);
    // both the rootfs path and the /proc/thread-self/fd/N form name "mqueue" earlier.
    if has(Fact::Mqueue) && has(Fact::Setxattr) && denied {
        return Reason::MqueueSetxattr;
    }
    if has(Fact::Mqueue) && has(Fact::OverflowOwner) {
        return Reason::MqueueOwnerUnmapped;
    }
    if idmap && has(Fact::Ignored) {
        return Reason::IdmapIgnored;
    }
    if idmap {
        return Reason::IdmapUnsupported;
    }
    // The kubelet's id pool (or /etc/subuid behind it) cannot give the pod a range.
    if has(Fact::Subid) || has(Fact::IdsExhausted) || (has(Fact::Userns) && has(Fact::OutOfRange)) {
        return Reason::SubidUnavailable;
    }
    if has(Fact::Userns) && has(Fact::Unsupported) {
        return Reason::UsernsUnsupported;
    }
    // max_user_namespaces = 0: the kernel refuses to create any more user namespaces.
    if (has(Fact::Userns) || has(Fact::NoopUnshare)) && has(Fact::Enospc) {
        return Reason::UsernsUnsupported;
    }
    if has(Fact::Sysfs) && has(Fact::Mount) && eperm {
        return Reason::SysfsMountEperm;
    }
    if has(Fact::ProcMount) && eperm {
        return Reason::ProcMountEperm;
    }
    // An SELinux denial counts only when the text ties it to user namespaces (AVCs on
    // tclass=user_namespace / cap_userns, or naming mqueue or idmapped mounts); any other
    // AVC is an ordinary policy problem of the pod, like a plain "permission denied".
    let userns_context = has(Fact::Userns) || has(Fact::Mqueue) || idmap;
    if (has(Fact::Avc) || (has(Fact::Selinux) && denied)) && userns_context {
        return Reason::SelinuxDenied;
    }
    // A fresh mqueue mount fails when the IPC namespace is not owned by the container's
    // user namespace (EPERM) or on kernels with the xenial mqueue bug (EBUSY).
    if has(Fact::Mqueue) && has(Fact::Mount) && (denied || has(Fact::Ebusy)) {
        return Reason::OtherUserns;
    }
    if has(Fact::Userns) || has(Fact::NoopUnshare) {
        return Reason::OtherUserns;
    }
    Reason::Unrelated
}

#[cfg(test)]
mod tests {
    use super::*;

    fn normalise(line: &[u8]) -> Vec<u8> {
        let mut out = vec![0; line.len()];
        let len = normalise_into(line, &mut out);
        out.truncate(len);
        out
    }

    #[test]
    fn every_fact_fits_the_bit_set() {
        for phrase in PHRASES {
            assert!((phrase.fact as u8) < 64, "{}", phrase.text);
        }
    }

    #[test]
    fn phrases_are_in_normalised_form_so_they_can_match() {
        for phrase in PHRASES {
            let normalised = normalise(phrase.text.as_bytes());
            assert_eq!(
                normalised,
                phrase.text.as_bytes(),
                "phrase {:?} can never match",
                phrase.text
            );
        }
    }

    #[test]
    fn quoting_depth_and_case_do_not_change_the_verdict() {
        let plain = r#"error mounting "proc" to rootfs at "/proc": operation not permitted"#;
        let escaped = r#"error mounting \\\"proc\\\" to rootfs at \\\"/proc\\\": Operation Not Permitted"#;
        let crun = "mount `proc` to `/proc`: Operation not permitted";
        for msg in [plain, escaped, crun] {
            assert_eq!(classify(msg), Reason::ProcMountEperm, "{msg}");
        }
    }

    #[test]
    fn idmap_inside_newuidmap_is_not_an_idmapped_mount() {
        assert_eq!(
            classify("newuidmap: write to uid_map failed: Operation not permitted"),
            Reason::SubidUnavailable
        );
        assert_eq!(
            classify("failed to mount idmapped: invalid argument"),
            Reason::IdmapUnsupported
        );
    }

    #[test]
    fn proc_self_fd_path_alone_is_not_a_procfs_mount() {
        let msg = r#"error mounting "sysfs" to rootfs at "/sys": mount sysfs:/sys (via /proc/self/fd/7), flags: 0xf: operation not permitted"#;
        assert_eq!(classify(msg), Reason::SysfsMountEperm);
    }

    #[test]
    fn both_runc_forms_of_the_mqueue_setxattr_error() {
        let rootfs = r#"error mounting "mqueue" to rootfs at "/dev/mqueue": setxattr /run/containerd/io.containerd.runtime.v2.task/k8s.io/abc/rootfs/dev/mqueue: operation not permitted"#;
        let thread_self = r#"error mounting "mqueue" to rootfs at "/dev/mqueue": setxattr /proc/thread-self/fd/7: operation not permitted"#;
        assert_eq!(classify(rootfs), Reason::MqueueSetxattr);
        assert_eq!(classify(thread_self), Reason::MqueueSetxattr);
    }

    #[test]
    fn runc_mounting_through_procfs_is_not_a_procfs_mount() {
        // runc names its mount helper "mount through procfs" for every mount type.
        let devpts = r#"mounting "devpts" to rootfs at "/dev/pts" caused: mount through procfs: operation not permitted"#;
        assert_eq!(classify(devpts), Reason::Unrelated);
    }

    #[test]
    fn recursive_read_only_mount_setattr_is_not_an_idmap_failure() {
        let rro = "failed to set MOUNT_ATTR_RDONLY with mount_setattr: invalid argument";
        assert_eq!(classify(rro), Reason::Unrelated);
    }

    #[test]
    fn selinux_denials_count_only_with_a_user_namespace_context() {
        let keyring = "type=AVC msg=audit(1555611120.741:866): avc:  denied  { create } for  pid=10790 comm=\"runc:[2:INIT]\" tclass=key permissive=0";
        assert_eq!(classify(keyring), Reason::Unrelated);
        let userns = "type=AVC msg=audit(1.2:3): avc:  denied  { create } for  pid=1 comm=\"exe\" tclass=user_namespace permissive=0";
        assert_eq!(classify(userns), Reason::SelinuxDenied);
    }

    /// Neither reason has a runtime error message of its own (the runtime succeeds and the
    /// container is wrong), so they come from probe observations worded like these.
    #[test]
    fn probe_observations_of_silent_failures() {
        assert_eq!(
            classify("/dev/mqueue is owned by uid 65534 (the overflow uid), expected 0"),
            Reason::MqueueOwnerUnmapped
        );
        assert_eq!(
            classify("idmap mount option silently ignored: /mnt/probe shows host owner 1000"),
            Reason::IdmapIgnored
        );
        // The overflow uid on its own is not about mqueue.
        assert_eq!(
            classify("chown 65534:65534 /data: operation not permitted"),
            Reason::Unrelated
        );
    }

    #[test]
    fn plain_permission_denied_is_unrelated() {
        assert_eq!(classify("open /data/x: permission denied"), Reason::Unrelated);
        assert_eq!(classify(""), Reason::Unrelated);
    }
}
