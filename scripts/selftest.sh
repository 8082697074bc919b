#!/usr/bin/env bash
# The main job on a fresh machine: install runc and crun, build usernsguard, and run its
# self-test against them. Extra arguments go to `usernsguard selftest` (e.g. --output json).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
scripts/install-deps.sh selftest
cargo build --release -q -p usernsguard-agent
exec "${CARGO_TARGET_DIR:-target}/release/usernsguard" selftest "$@"
