//! Pod-failure classification: maps one failure message (a kubelet event message, a
//! container status message, or a runtime's stderr as containerd, CRI-O, runc, crun and
//! the kubelet write them) to a [`Reason`].
//!
//! It exists so that the agent's failure counter, the `classify` subcommand and the
//! probes all agree on what a message means. It is a pure function of the text: no I/O,
//! no state, so every decision is pinned by the tables in `tests/fixtures/` (real
//! messages with their sources; `classify_heldout.tsv` was set aside before the rules
//! were written and measures how they do on messages they were not tuned to).
//!
//! # What decides: the failing operation, its object and its errno
//!
//! A message counts as a user-namespace failure only when the operation that failed is
//! about user namespaces or id mapping: a write to `uid_map`/`gid_map` or `newuidmap`,
//! `setgroups`/`chown`/`setuid` returning EINVAL (an id the mapping lacks), a mount of
//! sysfs, procfs or mqueue refused with EPERM, `mount_setattr`/`MOUNT_ATTR_IDMAP`,
//! `unshare`/`clone` with `CLONE_NEWUSER`, the kubelet refusing `hostUsers: false`,
//! subordinate ids running out, an AVC on `tclass=user_namespace`/`cap_userns`, ...
//!
//! Words are not operations. `userns`, `idmap`, `mqueue`, `uid_map`, `subuid`,
//! `newuidmap` inside a name, an id, an image reference or a path never decide:
//! `Failed to pull image "x/userns-demo"`, a CNI error naming pod `userns-test`, the
//! probes' bundle path `/run/usernsguard/h0/idmap-mount/...` and container id
//! `usernsguard-4242-7-0-userns-created`, Samba's `idmap range not specified`. The
//! scanner treats a vocabulary word as an *object* when it touches an identifier
//! character (`/ - _ . : @ =`, letters, digits) or a quote, i.e. when it is part of a
//! path, a hyphen/underscore/dot-joined id or a quoted name; only a free-standing word
//! in the prose (`user namespaces are not enabled`, `--userns`) is a statement. The
//! few paths that *are* the failing object (`/proc/<pid>/uid_map`, `/dev/mqueue` as a
//! setxattr target, `fork/exec /proc/self/exe`) are matched as whole paths, so
//! `/var/lib/uid_map/uid_map` stays an ordinary file.
//!
//! # Decisions the text alone cannot settle, and how they are settled
//!
//! * **Bare EACCES is not a user-namespace failure.** The agent only classifies pods
//!   with `hostUsers: false`, and a mapped root that cannot reach a host path gets
//!   EACCES (`create mountpoint ... mkdirat ...: permission denied`, `preparing rootfs
//!   caused: permission denied`, a hook that cannot be executed). But EACCES is also what
//!   every DAC, SELinux, AppArmor or `noexec` refusal of an ordinary pod says, with the
//!   very same text (runc#2651, podman#17419, AppArmor's `write /proc/self/attr/exec`).
//!   Counting it would turn every policy misconfiguration of a `hostUsers: false` pod
//!   into a user-namespace alert, so `usernsguard_pod_userns_failures_total` would stop
//!   meaning anything. Such messages are `unrelated`; the node's self-test probes are
//!   what find a node where user-namespace pods cannot start. The same holds for an
//!   EPERM that names no operation (`[8] System error: operation not permitted`,
//!   `setgid: Operation not permitted`, `open /dev/kmsg`), for `setgroups` EPERM (a pod
//!   without `CAP_SETGID` gets it too), for runc's nsexec dying without saying why
//!   (`running exec setns process for init caused "exit status 40"`, `can't get final
//!   child's PID from pipe: EOF`, also seen for memory limits and missing netns paths)
//!   and for `unshare failed` without the namespace type.
//! * **EPERM from a runtime's rootfs mounts is.** The kernel answers EPERM, not EACCES,
//!   when a mount or remount is refused for lack of privilege over the mount's user
//!   namespace (locked mount flags, a procfs/sysfs/mqueue whose pid/net/ipc namespace
//!   the container's user namespace does not own); runc and crun run as real root
//!   during setup, so outside a user namespace (or a nested, confined runtime) these
//!   mounts do not normally get EPERM. `mounting
//!   X to rootfs ...: operation not permitted` and `setting rootfs as readonly caused
//!   "operation not permitted"` are `other_userns` (sysfs, procfs and mqueue have their
//!   own reasons), unless the failing step is not the mount itself (the `mkdir` of the
//!   mountpoint, an `open` or `stat` on the way: EPERM from those is not about mounts).
//! * **Creating a user namespace refused is `userns_unsupported`, whatever the errno.**
//!   `Error during unshare(CLONE_NEWUSER): Operation not permitted` (seccomp, a kernel
//!   or sysctl that forbids it) and `... Permission denied` (an SELinux or AppArmor
//!   denial of `user_namespace create`) are the same failure, the node cannot give the
//!   pod a user namespace, so they get the same label; the AVC record, when present, is
//!   `selinux_denied`. `fork/exec /proc/self/exe` with ENOSPC/EACCES/EINVAL/EPERM is Go's
//!   namespace-creating re-exec failing in `clone` (the binary itself is always
//!   executable). containerd 2.x's own helper (`failed to start noop process for
//!   unshare`) is the exception: there EPERM/EINVAL come from its `uid_map` write (a
//!   mapping the parent namespace cannot grant, e.g. inside rootless Kubernetes), so
//!   they are `other_userns`, and only ENOSPC (`max_user_namespaces`) is unsupported.
//! * **A runtime too old for containerd 2.x is not a user-namespace failure.** crun 1.8.1
//!   under containerd 2.x (or a new CRI-O) fails *every* pod with `OCI runtime create
//!   failed: unknown version specified`: the runtime-spec version is too new for it, with
//!   or without `hostUsers`. That is `unrelated`. Debian's runc 1.1.5 under containerd
//!   2.x starts ordinary pods but fails `hostUsers: false` ones with `failed to validate
//!   OCI runtime features: idmap mounts not supported: missing mountExtensions.idmap
//!   entry in features command`: containerd refused the idmapped mounts the pod needs,
//!   which is `idmap_unsupported`.
//! * **Relabelling refused with EPERM is `selinux_denied`.** Root only gets EPERM from
//!   `setxattr("security.selinux")` when the file's owner is not mapped into its user
//!   namespace (the same owner check as the mqueue bug, for other objects); a relabel
//!   that fails with `operation not supported` or `permission denied` is the volume's
//!   filesystem or policy, `unrelated`. An AVC counts only on the user-namespace classes.
//! * **Ids that do not fit the mapping.** `Container ID N cannot be mapped to a host ID`
//!   while registering or extracting a layer, `lchown ... invalid argument` under a
//!   layer, and every `newuidmap`/subordinate-id wording are `subid_unavailable`;
//!   containerd's chown fallback (`mount callback failed ... cannot be mapped`) only runs
//!   because the snapshotter could not idmap the rootfs, so it is `idmap_unsupported`.
//!
//! The tables record a thread's root cause beside the label (`[cause: X]`) wherever these
//! decisions make the two differ, so the table test can report both.
//!
//! # How it works, and why
//!
//! 1. The message is normalised once: ASCII lower-cased, quoting removed (`"`, `'`, `` ` ``
//!    and `\`), whitespace runs collapsed to one space. The same error reaches us quoted
//!    zero to three levels deep (runc → containerd → kubelet → JSON), with `"proc"`,
//!    `\"proc\"` or `` `proc` ``; after normalisation they are all `proc`. A bit set beside
//!    the text remembers where a quote was removed, which is what marks a quoted name as
//!    an object. Typical messages are normalised into stack buffers.
//! 2. One Aho-Corasick automaton scans the normalised bytes once for every phrase of the
//!    table below. Each phrase carries the boundary it needs (anywhere, whole word, free
//!    word, whole path, procfs path), checked in O(1) at the match, so the scan stays
//!    linear in the input: multi-megabyte lines cost what their length costs, and
//!    non-UTF-8 bytes are just bytes that match nothing.
//! 3. A fixed, ordered list of rules over the resulting [`Fact`] set picks the reason,
//!    most specific first (the runc mqueue bug before a generic mqueue mount error,
//!    idmapped mounts before subordinate ids before "user namespaces not supported").
//!
//! The classifier never returns [`Reason::Timeout`] or [`Reason::FeaturesMismatch`], nor
//! any reason that needs the node's state (a runtime's `features`, the CRI status, a
//! probe's deadline): a message alone cannot prove those.

use std::sync::LazyLock;

use aho_corasick::{AhoCorasick, AhoCorasickKind, MatchKind};

use crate::reason::Reason;

/// Something a failure message states; a message is reduced to the set of these.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum Fact {
    Eperm,
    Eacces,
    Einval,
    Enospc,
    Ebusy,
    /// "not supported", "does not support", "is disabled", "does not allow", ...
    Unsupported,

    /// "user namespace(s)" in prose, a free-standing `userns` or `--userns`.
    UsernsProse,
    /// A statement that creating a user namespace failed (bwrap, enroot, runc's nsexec,
    /// lxc, Chrome, the AppArmor restriction hint).
    UsernsCreate,
    /// The kubelet refusing `spec.hostUsers: false`.
    HostUsersRefused,
    /// The kubelet's handler lookup for user namespaces: "the handler ... is not known".
    HandlerWord,
    NotKnown,
    /// `fork/exec /proc/self/exe`: Go re-executing itself into new namespaces.
    ForkExecSelf,
    /// containerd 2.x creating the pod's user namespace through a helper process.
    NoopUnshare,
    UnshareOp,
    CloneOp,
    /// The `CLONE_NEWUSER` flag.
    CloneNewuser,

    /// A mount of the mqueue filesystem.
    MountMqueue,
    /// The mqueue mount point as an operation's object (`/dev/mqueue`, a free `mqueue`).
    MqueueObj,
    /// The probes' wording: "/dev/mqueue is owned by ...".
    MqueueOwned,
    /// The overflow uid (65534 / nobody) as an owner.
    Overflow,
    Setxattr,
    /// An SELinux relabel (podman's `relabel failed`, `lsetxattr(label=...)`).
    Relabel,

    SysfsMount,
    /// crun's fallback for a sysfs it may not mount: `mount_setattr` on `/sys`.
    MountSetattrSys,
    ProcMount,
    /// A runtime mounting into the container's rootfs (runc's `... to rootfs`).
    RootfsMount,
    /// The failing step of a mount request is not the mount: creating the mountpoint,
    /// opening or stat-ing a path on the way.
    NotTheMount,

    /// An idmapped mount: `MOUNT_ATTR_IDMAP`, "idmap mounts", CRI-O's "mapped mount", ...
    Idmap,
    /// `mount_setattr(2)`: idmapped mounts, unless it sets recursive read-only.
    MountSetattr,
    /// Recursive read-only mounts, the other user of `mount_setattr(2)`.
    RecursiveRo,
    /// The runtime went on without doing what was asked.
    Ignored,
    /// "Container ID N cannot be mapped to a host ID".
    CannotBeMapped,
    /// containerd's chown fallback for a rootfs it could not idmap.
    MountCallback,
    /// containers/storage copying a layer with chown (podman `--uidmap`), not a mount.
    IdMappedCopy,

    /// Subordinate ids, `newuidmap`, or the kubelet's pool of per-pod id ranges.
    Subid,
    /// Registering, applying or extracting an image layer.
    LayerOp,
    /// chown, setuid, setgid, setgroups and their relatives.
    ChownOp,
    /// A process's id map or user namespace file: `/proc/<pid>/uid_map`, `write to
    /// uid_map`, `/proc/<pid>/ns/user`, ...
    IdMapFile,
    /// "uidmapping", "gid mapping": a user-namespace setting in prose.
    IdMappingWord,

    /// An AVC on a user-namespace class, or setroubleshoot naming one.
    SelinuxUserns,
    /// A process's SELinux label file (`/proc/<pid>/attr/exec`, `keycreate`, ...): writing
    /// it is how a runtime sets the container's process and key labels, and the policy
    /// refusing that write is an SELinux denial.
    SelinuxAttr,
    /// AppArmor, which writes the same `/proc/<pid>/attr/exec` file.
    Apparmor,
}

impl Fact {
    const fn bit(self) -> u64 {
        1 << (self as u8)
    }
}

/// What must surround a phrase for it to count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Edge {
    /// Anything: the phrase carries its own context ("operation not permitted").
    Any,
    /// Not inside a word: no ASCII letter, digit or `_` on that side.
    Word,
    /// A free-standing word, not part of an object: no identifier character and no
    /// removed quote on that side (a path, an id, a quoted name is an object). A
    /// command-line flag (`--userns`) counts as free.
    Free,
    /// A constant in a flag list: free, or joined by `=` or `|` (`flags=CLONE_NEWUSER|...`).
    Flag,
    /// Left only: the path before the phrase is `/proc/<pid>`, `/proc/self` or
    /// `/proc/thread-self`.
    Procfs,
    /// Right only: the path ends here (`/dev/mqueue`, not `/dev/mqueue/x`).
    PathEnd,
}

/// One phrase of the table, in normalised form (lower case, no quotes).
#[derive(Debug)]
struct Phrase {
    text: &'static str,
    fact: Fact,
    left: Edge,
    right: Edge,
}

const fn ph(text: &'static str, fact: Fact, left: Edge, right: Edge) -> Phrase {
    Phrase {
        text,
        fact,
        left,
        right,
    }
}

/// Matches anywhere.
const fn p(text: &'static str, fact: Fact) -> Phrase {
    ph(text, fact, Edge::Any, Edge::Any)
}

/// Matches as a whole word.
const fn w(text: &'static str, fact: Fact) -> Phrase {
    ph(text, fact, Edge::Word, Edge::Word)
}

/// Matches only as a free-standing word of the prose, never inside an object.
const fn f(text: &'static str, fact: Fact) -> Phrase {
    ph(text, fact, Edge::Free, Edge::Free)
}

use Edge::{Any, Flag, Free, PathEnd, Procfs, Word};
use Fact::*;

/// Every phrase the classifier looks for. Adding a row here and a fixture row in
/// `tests/fixtures/classify.tsv` is how a new wording is taught.
const PHRASES: &[Phrase] = &[
    // errno, as strerror(3) and Go print them
    p("operation not permitted", Eperm),
    w("eperm", Eperm),
    p("permission denied", Eacces),
    w("eacces", Eacces),
    p("invalid argument", Einval),
    w("einval", Einval),
    p("no space left on device", Enospc),
    w("enospc", Enospc),
    p("device or resource busy", Ebusy),
    w("ebusy", Ebusy),
    p("not supported", Unsupported),
    p("unsupported", Unsupported),
    p("does not support", Unsupported),
    p("doesnt support", Unsupported),
    p("do not support", Unsupported),
    p("dont support", Unsupported),
    p("not enabled", Unsupported),
    p("arent enabled", Unsupported),
    p("isnt enabled", Unsupported),
    p("is disabled", Unsupported),
    p("are disabled", Unsupported),
    p("no support", Unsupported),
    p("does not allow", Unsupported),
    // user namespaces themselves
    ph("user namespace", UsernsProse, Word, Any),
    f("userns", UsernsProse),
    w("user ns", UsernsProse),
    p("failed to create user namespace", UsernsCreate),
    ph("unshare user ns", UsernsCreate, Word, Word),
    p("unshare user namespace", UsernsCreate),
    // runc's nsexec before 1.1 unshared every namespace, the user one included, at once
    p("failed to unshare namespaces", UsernsCreate),
    // bwrap: "Creating new namespace failed", "No permissions to creating new namespace"
    p("creating new namespace", UsernsCreate),
    p("non-privileged user namespaces", UsernsCreate),
    // lxc_spawn
    p("clone a new set of namespaces", UsernsCreate),
    // Chrome's zygote: MoveToNewUserNS
    p("failed to move to new namespace", UsernsCreate),
    // rootlesskit's hint for Ubuntu's AppArmor restriction
    p("apparmor_restrict_unprivileged_userns is set to 1", UsernsCreate),
    p("cant set spec.hostusers", HostUsersRefused),
    p("the handler ", HandlerWord),
    w("is not known", NotKnown),
    ph("fork/exec /proc/self/exe", ForkExecSelf, Word, PathEnd),
    p("noop process for unshare", NoopUnshare),
    f("unshare", UnshareOp),
    ph("clone(", CloneOp, Free, Any),
    ph("clone_newuser", CloneNewuser, Flag, Flag),
    // mqueue
    ph("mounting mqueue", MountMqueue, Word, Word),
    ph("mount mqueue", MountMqueue, Word, Word),
    ph("mount -t mqueue", MountMqueue, Word, Word),
    ph("mounting /dev/mqueue", MountMqueue, Word, PathEnd),
    f("mqueue", MqueueObj),
    ph("/dev/mqueue", MqueueObj, Any, PathEnd),
    p("dev/mqueue is owned by", MqueueOwned),
    w("65534", Overflow),
    p("overflow uid", Overflow),
    p("overflowuid", Overflow),
    p("owned by nobody", Overflow),
    f("setxattr", Setxattr),
    f("lsetxattr", Setxattr),
    f("fsetxattr", Setxattr),
    p("relabel failed", Relabel),
    p("lsetxattr(label=", Relabel),
    p("set file label", Relabel),
    // sysfs and procfs mounts
    ph("mounting sysfs", SysfsMount, Word, Word),
    ph("mount sysfs", SysfsMount, Word, Word),
    ph("mount src=sysfs", SysfsMount, Word, Word),
    ph("mount -t sysfs", SysfsMount, Word, Word),
    ph("mount_setattr /sys", MountSetattrSys, Word, PathEnd),
    ph("mounting proc", ProcMount, Word, Word),
    ph("mount proc", ProcMount, Word, Word),
    ph("mount -t proc", ProcMount, Word, Word),
    ph("mount /proc to", ProcMount, Word, Word),
    ph("mount /proc failed", ProcMount, Word, Word),
    p("to rootfs", RootfsMount),
    p("rootfs as readonly", RootfsMount),
    w("setuprootfs", RootfsMount),
    w("mkdir", NotTheMount),
    w("mkdirat", NotTheMount),
    p("create mountpoint", NotTheMount),
    w("open", NotTheMount),
    w("openat", NotTheMount),
    w("stat", NotTheMount),
    w("lstat", NotTheMount),
    // idmapped mounts
    f("mount_attr_idmap", Idmap),
    p("create mapped mount", Idmap),
    ph("idmap mount", Idmap, Word, Any),
    ph("idmapped mount", Idmap, Word, Any),
    ph("idmapped layer", Idmap, Word, Any),
    ph("id-mapped mount", Idmap, Word, Any),
    ph("id mapped mount", Idmap, Word, Any),
    ph("mount idmapped", Idmap, Word, Any),
    ph("x-mount.idmap", Idmap, Free, Any),
    p("attach idmapping", Idmap),
    p("set id-mapping", Idmap),
    p("change mount attributes", Idmap),
    f("mount_setattr", MountSetattr),
    p("mount_attr_rdonly", RecursiveRo),
    w("rro", RecursiveRo),
    p("recursive read-only", RecursiveRo),
    p("ignored", Ignored),
    p("ignoring", Ignored),
    p("silently", Ignored),
    p("not applied", Ignored),
    p("cannot be mapped to a host id", CannotBeMapped),
    p("mount callback failed", MountCallback),
    p("id-mapped copy", IdMappedCopy),
    // subordinate ids and the kubelet's id pool
    p("subuid range", Subid),
    p("subgid range", Subid),
    p("subordinate id", Subid),
    p("subordinate uid", Subid),
    p("subordinate gid", Subid),
    p("single mapping into the namespace", Subid),
    p("not enough unused ids", Subid),
    p("enough available ids", Subid),
    p("enough ids available", Subid),
    p("insufficient uids or gids", Subid),
    p("slot to allocate a user namespace", Subid),
    p("assigned ids are not enough", Subid),
    p("cant create id mappings", Subid),
    p("cannot find mappings for user", Subid),
    p("cannot set up namespace using", Subid),
    p("cannot setup namespace using", Subid),
    p("create user namespace manager", Subid),
    f("newuidmap", Subid),
    f("newgidmap", Subid),
    ph("running /usr/bin/newuidmap", Subid, Word, Word),
    ph("running /usr/bin/newgidmap", Subid, Word, Word),
    p("register layer", LayerOp),
    p("applying layer", LayerOp),
    p("applylayer", LayerOp),
    p("extract layer", LayerOp),
    p("adding layer", LayerOp),
    p("error processing tar file", LayerOp),
    f("chown", ChownOp),
    f("lchown", ChownOp),
    f("fchownat", ChownOp),
    p("changing ownership", ChownOp),
    f("setuid", ChownOp),
    f("setgid", ChownOp),
    f("setresuid", ChownOp),
    f("setresgid", ChownOp),
    f("setgroups", ChownOp),
    ph("/attr/exec", SelinuxAttr, Procfs, PathEnd),
    ph("/attr/keycreate", SelinuxAttr, Procfs, PathEnd),
    ph("/attr/fscreate", SelinuxAttr, Procfs, PathEnd),
    ph("/attr/sockcreate", SelinuxAttr, Procfs, PathEnd),
    ph("/attr/current", SelinuxAttr, Procfs, PathEnd),
    w("apparmor", Apparmor),
    ph("/uid_map", IdMapFile, Procfs, PathEnd),
    ph("/gid_map", IdMapFile, Procfs, PathEnd),
    ph("/setgroups", IdMapFile, Procfs, PathEnd),
    ph("/ns/user", IdMapFile, Procfs, PathEnd),
    p("write to uid_map", IdMapFile),
    p("write to gid_map", IdMapFile),
    p("open of uid_map", IdMapFile),
    p("open of gid_map", IdMapFile),
    p("reading id mappings", IdMapFile),
    f("uidmapping", IdMappingWord),
    f("gidmapping", IdMappingWord),
    w("uid mapping", IdMappingWord),
    w("gid mapping", IdMappingWord),
    // SELinux
    ph("tclass=user_namespace", SelinuxUserns, Any, Word),
    ph("tclass=cap_userns", SelinuxUserns, Any, Word),
    ph("tclass=cap2_userns", SelinuxUserns, Any, Word),
    ph("on the user_namespace", SelinuxUserns, Any, Word),
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
/// [`Reason::ALL`], and never one of the probe-only or node-state reasons.
pub fn classify(message: &str) -> Reason {
    classify_bytes(message.as_bytes())
}

/// Classifies one failure message given as raw bytes, for input that need not be UTF-8
/// (a runtime's stderr, a line of `kubectl` output cut mid-character).
pub fn classify_bytes(line: &[u8]) -> Reason {
    // Typical messages are a few hundred bytes: normalise them on the stack so the hot
    // path does no allocation; only long lines pay for heap buffers.
    let mut stack = [0u8; STACK_BUF];
    let mut stack_quotes = [0u64; quote_words(STACK_BUF)];
    let mut heap = Vec::new();
    let mut heap_quotes = Vec::new();
    let (buf, quotes): (&mut [u8], &mut [u64]) = if line.len() <= STACK_BUF {
        (&mut stack[..line.len()], &mut stack_quotes[..])
    } else {
        heap.resize(line.len(), 0);
        heap_quotes.resize(quote_words(line.len()), 0);
        (&mut heap, &mut heap_quotes)
    };
    let len = normalise_into(line, buf, quotes);
    let text = Text {
        bytes: &buf[..len],
        quotes,
    };
    decide(facts(&text))
}

const STACK_BUF: usize = 2048;

/// Words of the quote bit set for a line of `len` bytes: one bit per normalised byte,
/// plus one for "a quote was removed at the very end".
const fn quote_words(len: usize) -> usize {
    len / 64 + 1
}

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

/// The quote characters whose removal marks the next kept byte as following a quote.
static QUOTE: [bool; 256] = {
    let mut table = [false; 256];
    table[b'"' as usize] = true;
    table[b'\'' as usize] = true;
    table[b'`' as usize] = true;
    table
};

/// Writes the normalised form of `line` into `out` (at least as long as `line`) and
/// returns its length. `quotes` (at least [`quote_words`]`(line.len())` zeroed words)
/// gets bit `i` set when a quote was removed right before normalised byte `i` (bit `len`:
/// at the end). Branch-free per byte: every byte is stored, and the write cursor only
/// advances past bytes that are kept, so runs of whitespace collapse to one space.
fn normalise_into(line: &[u8], out: &mut [u8], quotes: &mut [u64]) -> usize {
    debug_assert!(out.len() >= line.len());
    debug_assert!(quotes.len() >= quote_words(line.len()));
    let mut len = 0usize;
    let mut prev = b' ';
    let mut pending = false;
    for &byte in line {
        let mapped = NORM[byte as usize];
        pending |= QUOTE[byte as usize];
        // In bounds: `len` never exceeds the number of bytes read so far.
        out[len] = mapped;
        let keep = (mapped != 0) & !((mapped == b' ') & (prev == b' '));
        quotes[len / 64] |= u64::from(pending & keep) << (len % 64);
        pending &= !keep;
        len += usize::from(keep);
        if keep {
            prev = mapped;
        }
    }
    quotes[len / 64] |= u64::from(pending) << (len % 64);
    len
}

/// Normalised text and where quotes were removed from it.
struct Text<'a> {
    bytes: &'a [u8],
    quotes: &'a [u64],
}

impl Text<'_> {
    /// Whether a quote was removed right before normalised position `i`.
    fn quoted_at(&self, i: usize) -> bool {
        self.quotes[i / 64] & (1 << (i % 64)) != 0
    }

    fn before(&self, i: usize) -> Option<u8> {
        i.checked_sub(1).map(|j| self.bytes[j])
    }

    /// Whether the token continues at position `i` (the byte after a match): an
    /// identifier byte, or `.`/`:` followed by one (`userns.io`, `userns:latest`; a
    /// sentence's `userns.` or `userns: ...` ends the word).
    fn continues_at(&self, i: usize) -> bool {
        match self.bytes.get(i) {
            None => false,
            Some(b'.' | b':') => self.bytes.get(i + 1).is_some_and(|&n| is_ident(n)),
            Some(&c) => is_ident(c),
        }
    }

    fn left_ok(&self, edge: Edge, start: usize) -> bool {
        match edge {
            Edge::Any | Edge::PathEnd => true,
            Edge::Word => self.before(start).is_none_or(|c| !is_word(c)),
            Edge::Free => {
                if self.quoted_at(start) {
                    return false;
                }
                match self.before(start) {
                    None => true,
                    // `--userns`: a command-line flag names a setting; it is not an object.
                    Some(b'-') => {
                        start >= 2
                            && self.bytes[start - 2] == b'-'
                            && !self.quoted_at(start - 1)
                            && self.before(start - 2).is_none_or(|c| c == b' ')
                    }
                    Some(c) => !is_ident(c),
                }
            }
            Edge::Flag => matches!(self.before(start), Some(b'=' | b'|')) || self.left_ok(Edge::Free, start),
            Edge::Procfs => procfs_path_before(&self.bytes[..start]),
        }
    }

    fn right_ok(&self, edge: Edge, end: usize) -> bool {
        match edge {
            Edge::Any | Edge::Procfs => true,
            Edge::Word => self.bytes.get(end).is_none_or(|&c| !is_word(c)),
            Edge::Free | Edge::Flag => !self.quoted_at(end) && !self.continues_at(end),
            Edge::PathEnd => !self.continues_at(end),
        }
    }
}

/// Letters, digits and `_`: what makes `mount` in `remount` or `mount_setattr` not the
/// word `mount`.
fn is_word(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'_'
}

/// Bytes that join words into one object: paths, ids, image references, `key=value`,
/// and any non-ASCII byte (a letter of another script, a typographic quote).
fn is_ident(c: u8) -> bool {
    is_word(c)
        || matches!(
            c,
            b'/' | b'-' | b'.' | b':' | b'@' | b'=' | b'~' | b'#' | b'+' | b'%' | b'$' | b'*'
        )
        || c >= 0x80
}

/// Whether `before` ends with `/proc/<digits>`, `/proc/self` or `/proc/thread-self`:
/// a process's own user-namespace files, not any file that happens to share the name.
fn procfs_path_before(before: &[u8]) -> bool {
    if before.ends_with(b"/proc/self") || before.ends_with(b"/proc/thread-self") {
        return true;
    }
    // Bounded: pids have at most 10 digits, so a line of digits costs nothing extra.
    let digits = before
        .iter()
        .rev()
        .take(11)
        .take_while(|c| c.is_ascii_digit())
        .count();
    (1..=10).contains(&digits) && before[..before.len() - digits].ends_with(b"/proc/")
}

fn facts(text: &Text<'_>) -> u64 {
    let mut set = 0u64;
    for m in MATCHER.find_overlapping_iter(text.bytes) {
        let phrase = &PHRASES[m.pattern().as_usize()];
        let bit = phrase.fact.bit();
        if set & bit == 0 && text.left_ok(phrase.left, m.start()) && text.right_ok(phrase.right, m.end()) {
            set |= bit;
        }
    }
    set
}

/// The rules, most specific first. Each line is one documented failure mode.
fn decide(set: u64) -> Reason {
    let has = |f: Fact| set & f.bit() != 0;
    let eperm = has(Eperm);
    let refused = eperm || has(Eacces);
    let failed = refused || has(Einval) || has(Enospc);
    let idmap = has(Idmap)
        || (has(MountSetattr) && !has(RecursiveRo) && !has(MountSetattrSys))
        || (has(CannotBeMapped) && has(MountCallback));

    // runc 1.2.0 labelling an mqueue superblock owned by unmapped host root (runc #4466):
    // `error mounting "mqueue" ...: setxattr <rootfs>/dev/mqueue` or `/proc/thread-self/fd/N`.
    if (has(MountMqueue) || has(MqueueObj)) && has(Setxattr) && refused {
        return Reason::MqueueSetxattr;
    }
    if has(MqueueOwned) && has(Overflow) {
        return Reason::MqueueOwnerUnmapped;
    }
    if idmap && has(Ignored) {
        return Reason::IdmapIgnored;
    }
    if idmap {
        return Reason::IdmapUnsupported;
    }
    // The kubelet's id pool, /etc/subuid behind newuidmap, or an image id outside the
    // mapped range (an EINVAL chown while a layer is unpacked).
    if has(Subid)
        || (has(CannotBeMapped) && !has(IdMappedCopy))
        || (has(ChownOp) && has(Einval) && has(LayerOp))
    {
        return Reason::SubidUnavailable;
    }
    // The node cannot give the pod a user namespace at all.
    if has(HostUsersRefused)
        || (has(HandlerWord) && has(NotKnown))
        || has(UsernsCreate)
        || (has(UsernsProse) && has(Unsupported))
        || (has(CloneNewuser) && (has(UnshareOp) || has(CloneOp)) && failed)
        || (has(ForkExecSelf) && (has(Enospc) || (failed && !has(NoopUnshare))))
        || (has(NoopUnshare) && has(Enospc))
    {
        return Reason::UsernsUnsupported;
    }
    if has(MountSetattrSys) || (has(SysfsMount) && eperm) {
        return Reason::SysfsMountEperm;
    }
    if has(ProcMount) && eperm {
        return Reason::ProcMountEperm;
    }
    // The policy refusing a label the runtime sets (the process's exec or key label, a
    // relabel of the rootfs or a volume) fails the pod before it starts; EPERM on a relabel
    // is the kernel's owner check on an unmapped owner, EACCES the policy itself.
    if has(SelinuxUserns) || (has(Relabel) && refused) || (has(SelinuxAttr) && refused && !has(Apparmor)) {
        return Reason::SelinuxDenied;
    }
    // A fresh mqueue mount fails when the IPC namespace is not owned by the container's
    // user namespace (EPERM) or on kernels with the xenial mqueue bug (EBUSY); any
    // mount into the rootfs refused with EPERM is the mount's user namespace at work.
    let mount_refused =
        (has(MountMqueue) && (eperm || has(Ebusy))) || (has(RootfsMount) && eperm && !has(NotTheMount));
    let unmapped_id = has(ChownOp) && has(Einval);
    if mount_refused
        || unmapped_id
        || has(IdMapFile)
        || has(NoopUnshare)
        || has(CannotBeMapped)
        || has(IdMappingWord)
        || has(CloneNewuser)
        || has(UsernsProse)
    {
        return Reason::OtherUserns;
    }
    Reason::Unrelated
}

#[cfg(test)]
mod tests {
    use super::*;

    fn normalise(line: &[u8]) -> Vec<u8> {
        let mut out = vec![0; line.len()];
        let mut quotes = vec![0; quote_words(line.len())];
        let len = normalise_into(line, &mut out, &mut quotes);
        out.truncate(len);
        out
    }

    #[test]
    fn every_fact_fits_the_bit_set() {
        for phrase in PHRASES {
            assert!((phrase.fact as u8) < 64, "{}", phrase.text);
        }
        assert!((SelinuxUserns as u8) < 64);
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
    fn edges_are_used_on_the_side_they_are_defined_for() {
        for phrase in PHRASES {
            assert_ne!(phrase.left, Edge::PathEnd, "{}", phrase.text);
            assert_ne!(phrase.right, Edge::Procfs, "{}", phrase.text);
        }
    }

    #[test]
    fn quote_bits_mark_quoted_words() {
        let line = br#"pod "userns" and \"x\" userns"#;
        let mut out = vec![0; line.len()];
        let mut quotes = vec![0; quote_words(line.len())];
        let len = normalise_into(line, &mut out, &mut quotes);
        let text = Text {
            bytes: &out[..len],
            quotes: &quotes,
        };
        assert_eq!(text.bytes, b"pod userns and x userns");
        assert!(text.quoted_at(4) && text.quoted_at(10));
        assert!(text.quoted_at(15) && text.quoted_at(16) && !text.quoted_at(17));
        assert!(!text.left_ok(Edge::Free, 4) && !text.right_ok(Edge::Free, 10));
        assert!(text.left_ok(Edge::Free, 17) && text.right_ok(Edge::Free, 23));
    }

    #[test]
    fn a_quote_at_the_very_end_is_recorded() {
        let line = b"image \"userns\"";
        let mut out = vec![0; line.len()];
        let mut quotes = vec![0; quote_words(line.len())];
        let len = normalise_into(line, &mut out, &mut quotes);
        let text = Text {
            bytes: &out[..len],
            quotes: &quotes,
        };
        assert!(text.quoted_at(len));
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

    /// runc names its mount helper "mount through procfs" for every mount type, so the
    /// `proc` in it is not a procfs mount. The devpts mount itself was refused with EPERM
    /// while runc set up the rootfs, which is a user-namespace failure (the expectation
    /// was `unrelated` before mounts into the rootfs refused with EPERM were counted).
    #[test]
    fn runc_mounting_through_procfs_is_not_a_procfs_mount() {
        let devpts = r#"mounting "devpts" to rootfs at "/dev/pts" caused: mount through procfs: operation not permitted"#;
        assert_eq!(classify(devpts), Reason::OtherUserns);
        let eacces =
            r#"mounting "devpts" to rootfs at "/dev/pts" caused: mount through procfs: permission denied"#;
        assert_eq!(classify(eacces), Reason::Unrelated);
    }

    /// EPERM from the `open` or `mkdir` on the way to a mount is not the mount refused.
    #[test]
    fn a_mount_request_that_fails_before_the_mount_is_not_counted() {
        let open = r#"error mounting "/x/resolv.conf" to rootfs at "/etc/resolv.conf": open /run/x/rootfs/etc/resolv.conf: operation not permitted"#;
        assert_eq!(classify(open), Reason::Unrelated);
        let mkdir = r#"error mounting "tmpfs" to rootfs at "/sys/fs/selinux": create mountpoint for /sys/fs/selinux mount: mkdirat /x/merged/sys/fs/selinux: operation not permitted"#;
        assert_eq!(classify(mkdir), Reason::Unrelated);
        let mount =
            r#"error mounting "/tmp/foo" to rootfs at "/x/merged/mnt" caused: operation not permitted"#;
        assert_eq!(classify(mount), Reason::OtherUserns);
    }

    #[test]
    fn recursive_read_only_mount_setattr_is_not_an_idmap_failure() {
        let rro = "failed to set MOUNT_ATTR_RDONLY with mount_setattr: invalid argument";
        assert_eq!(classify(rro), Reason::Unrelated);
    }

    #[test]
    fn crun_sysfs_fallback_is_not_an_idmap_failure() {
        let msg = "Error: OCI runtime error: crun: mount_setattr `/sys`: Function not implemented";
        assert_eq!(classify(msg), Reason::SysfsMountEperm);
        let volume = "Error: crun: mount_setattr `/sysdata`: Operation not permitted";
        assert_eq!(classify(volume), Reason::IdmapUnsupported);
    }

    #[test]
    fn selinux_denials_count_only_with_a_user_namespace_context() {
        let keyring = "type=AVC msg=audit(1555611120.741:866): avc:  denied  { create } for  pid=10790 comm=\"runc:[2:INIT]\" tclass=key permissive=0";
        assert_eq!(classify(keyring), Reason::Unrelated);
        let userns = "type=AVC msg=audit(1.2:3): avc:  denied  { create } for  pid=1 comm=\"exe\" tclass=user_namespace permissive=0";
        assert_eq!(classify(userns), Reason::SelinuxDenied);
        let file = "avc:  denied  { create } for  pid=1 name=\".#i4026533243.usernsfe5b\" tclass=file";
        assert_eq!(classify(file), Reason::Unrelated);
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

    #[test]
    fn unshare_clone_newuser_is_unsupported_whatever_the_errno() {
        for errno in ["Operation not permitted", "Permission denied", "Invalid argument"] {
            let msg = format!("Error during unshare(CLONE_NEWUSER): {errno}");
            assert_eq!(classify(&msg), Reason::UsernsUnsupported, "{msg}");
        }
        // Joining an existing user namespace is not creating one.
        assert_eq!(
            classify("Error: crun: setns(pid=87793, CLONE_NEWUSER): Operation not permitted"),
            Reason::OtherUserns
        );
    }

    #[test]
    fn procfs_id_map_files_only_under_proc() {
        assert_eq!(
            classify("write /proc/12/uid_map: operation not permitted"),
            Reason::OtherUserns
        );
        assert_eq!(
            classify("write /proc/thread-self/gid_map: invalid argument"),
            Reason::OtherUserns
        );
        assert_eq!(
            classify("open /var/lib/proc/uid_map: no such file or directory"),
            Reason::Unrelated
        );
        assert_eq!(
            classify("open /proc/12/uid_map.bak: no such file or directory"),
            Reason::Unrelated
        );
    }

    #[test]
    fn a_flag_is_a_statement_but_an_option_value_is_not() {
        assert_eq!(
            classify("Error: --userns and --pod cannot be set together"),
            Reason::OtherUserns
        );
        assert_eq!(
            classify("Error: invalid value for --userns-remap=default: not found"),
            Reason::Unrelated
        );
    }

    /// Issue 9: the policy refusing a label the runtime sets is an SELinux denial;
    /// AppArmor writing the same procfs file is not, nor is a look-alike path elsewhere.
    #[test]
    fn selinux_label_refusals_count_and_apparmor_does_not() {
        let keycreate = r#"container init caused \"write /proc/self/attr/keycreate: permission denied\""#;
        assert_eq!(classify(keycreate), Reason::SelinuxDenied);
        let exec = "write /proc/thread-self/attr/exec: operation not permitted";
        assert_eq!(classify(exec), Reason::SelinuxDenied);
        let apparmor = "apply apparmor profile: apparmor failed to apply profile: write /proc/self/attr/exec: permission denied";
        assert_eq!(classify(apparmor), Reason::Unrelated);
        assert_eq!(
            classify("open /srv/attr/keycreate: permission denied"),
            Reason::Unrelated
        );
        assert_eq!(
            classify("write /proc/self/attr/keycreate: no such file or directory"),
            Reason::Unrelated,
            "a kernel without SELinux refuses nothing"
        );
    }
}
