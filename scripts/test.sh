#!/usr/bin/env bash
# The whole test suite on a fresh machine of this kind (Debian 12, root): installs what it
# needs, then runs formatting, lints, every Rust test (the root-only ones included), the
# offline CRD validation and the benchmarks' figures.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"

if [ "$(id -u)" != 0 ]; then
  echo "scripts/test.sh must run as root: the integration tests run real containers with user namespaces" >&2
  exit 2
fi

step() { printf '\n=== %s\n' "$*"; }
# Where cargo puts its builds (CARGO_TARGET_DIR when set).
target=${CARGO_TARGET_DIR:-target}

step "system packages"
scripts/install-deps.sh all

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy --all-targets -D warnings"
cargo clippy --workspace --all-targets -- -D warnings

step "cargo test (workspace, as root)"
cargo test --workspace

step "CRDs and examples (offline apiextensions/v1, schema and CEL validation)"
venv="${XDG_CACHE_HOME:-$HOME/.cache}/usernsguard/venv-crds"
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/pip" install -q -r tests/requirements.txt
"$venv/bin/python" tests/validate_crds.py
cargo run -q -p usernsguard-agent -- crds --out-dir crds --check

step "SELinux lane: selftest in an SELinux-enforcing qemu guest (tests/selinux-lane/README.md)"
# `--all-targets` skips this test=false target, so lint it explicitly.
cargo clippy -q -p usernsguard-agent --test selinux_lane -- -D warnings
cargo build -q --release -p usernsguard-agent
bash tests/selinux-lane/run.sh "$target/release/usernsguard" "$target/selinux-lane/guest.json"
USERNSGUARD_SELINUX_LANE_JSON="$target/selinux-lane/guest.json" cargo test -p usernsguard-agent --test selinux_lane
# The lane must fail loudly, never pass vacuously: not enforcing, no SELinux, no init.
bash tests/selinux-lane/check-guards.sh

step "container image (scripts/image.sh: buildah, static musl usernsguard + pinned bundled runc)"
scripts/image.sh

step "Helm chart: lint, render, validate, schema, admission policy, alerts, dashboard (tests/chart/run.sh)"
tests/chart/run.sh "$target/release/usernsguard"

step "static builds (musl, glibc crt-static): same selftest verdicts as the dynamic build"
verdicts() {
  local out rc=0
  out=$("$1" selftest --output json --work-dir "/run/usernsguard-static-$2") || rc=$?
  [ "$rc" -le 1 ] || { echo "$1 selftest exited $rc" >&2; return 1; }
  jq -c '[.handlers[] | {handler, verdict, checks: [.checks[] | {check, result, reason}]}]' <<<"$out"
}
reference=$(verdicts "$target/release/usernsguard" dynamic)
for bin in $(scripts/build-static.sh all); do
  got=$(verdicts "$bin" static)
  if [ "$got" != "$reference" ]; then
    echo "$bin: selftest verdicts differ from the dynamic build:" >&2
    echo "  static:  $got" >&2
    echo "  dynamic: $reference" >&2
    exit 1
  fi
  echo "$bin ($(du -h "$bin" | cut -f1)): $got"
done

step "benchmarks (figures, not pass/fail)"
cargo bench -q -p usernsguard-agent --bench selftest
cargo bench -q -p usernsguard-runtime --bench cri_pod
cargo bench -q -p usernsguard-agent --bench watch_memory
cargo bench -q -p usernsguard-agent --bench watch_cluster
cargo bench -q -p usernsguard-runtime --bench classify -- --warm-up-time 1 --measurement-time 3 typical_mix
cargo bench -q -p usernsguard-runtime --bench install_noop

echo
echo "all test steps passed"
