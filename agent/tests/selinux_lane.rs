//! Checks the output of the SELinux lane (`tests/selinux-lane/run.sh`): a real
//! SELinux-enforcing Debian guest under qemu ran `usernsguard selftest --output json`
//! against real runc and crun, and the host ran the same binary beside it; then the guest
//! ran `usernsguard selftest --cri-config` against containerd 2.1 with
//! `enable_selinux = true` and the runc 1.2.0 and 1.2.1 releases (guest-cri.json).
//!
//! Not part of plain `cargo test` (`test = false` in Cargo.toml): it needs the lane's
//! output, and without it it fails rather than passing vacuously. Run it with
//!
//!     bash tests/selinux-lane/run.sh target/release/usernsguard target/selinux-lane/guest.json
//!     USERNSGUARD_SELINUX_LANE_JSON=target/selinux-lane/guest.json \
//!         cargo test -p usernsguard-agent --test selinux_lane

mod selinux_lane_support;

use std::path::{Path, PathBuf};

use usernsguard_runtime::SelfTestReport;

const HOW: &str = "run the SELinux lane first: `bash tests/selinux-lane/run.sh \
target/release/usernsguard target/selinux-lane/guest.json`, then \
`USERNSGUARD_SELINUX_LANE_JSON=target/selinux-lane/guest.json cargo test -p usernsguard-agent --test selinux_lane`";

/// cargo runs tests in the package directory, but the lane's paths are written from the
/// workspace root (where `cargo test -p` is typed), so relative paths start there.
fn from_workspace(p: std::ffi::OsString) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(p)
}

fn load(path: &Path, what: &str) -> SelfTestReport {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("cannot read the {what} report {}: {e}; {HOW}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| {
        panic!(
            "the {what} report {} is not a usernsguard selftest JSON document: {e}",
            path.display()
        )
    })
}

#[test]
fn selinux_guest_detects_the_mqueue_setxattr_failure_and_agrees_with_the_host() {
    let guest_path = std::env::var_os("USERNSGUARD_SELINUX_LANE_JSON")
        .map(from_workspace)
        .unwrap_or_else(|| panic!("USERNSGUARD_SELINUX_LANE_JSON is not set; {HOW}"));
    // run.sh writes the host's report beside the guest's.
    let host_path = std::env::var_os("USERNSGUARD_SELINUX_LANE_HOST_JSON")
        .map(from_workspace)
        .unwrap_or_else(|| guest_path.with_file_name("host.json"));
    let guest = load(&guest_path, "guest");
    let host = load(&host_path, "host");

    let violations = selinux_lane_support::lane_violations(&guest, &host);
    assert!(
        violations.is_empty(),
        "the SELinux lane's reports ({} vs {}) break {} claim(s):\n  - {}",
        guest_path.display(),
        host_path.display(),
        violations.len(),
        violations.join("\n  - ")
    );
}

#[test]
fn selinux_guest_containerd_pod_fails_with_runc_1_2_0_and_starts_with_runc_1_2_1() {
    let guest_path = std::env::var_os("USERNSGUARD_SELINUX_LANE_JSON")
        .map(from_workspace)
        .unwrap_or_else(|| panic!("USERNSGUARD_SELINUX_LANE_JSON is not set; {HOW}"));
    // run.sh writes the CRI run's report beside the guest's.
    let cri_path = std::env::var_os("USERNSGUARD_SELINUX_LANE_CRI_JSON")
        .map(from_workspace)
        .unwrap_or_else(|| guest_path.with_file_name("guest-cri.json"));
    let cri = load(&cri_path, "guest CRI");

    let violations = selinux_lane_support::cri_violations(&cri);
    assert!(
        violations.is_empty(),
        "the SELinux lane's CRI report ({}) breaks {} claim(s):\n  - {}",
        cri_path.display(),
        violations.len(),
        violations.join("\n  - ")
    );
}
