#!/usr/bin/env bash
# Builds fully static `usernsguard` binaries: musl (what the container image ships) and glibc
# with crt-static. Prints the path of each. Usage: scripts/build-static.sh [musl|gnu|all]
# (default all). Needs the musl target (`rustup target add x86_64-unknown-linux-musl`) and
# Debian's musl-tools; scripts/install-deps.sh all provides both.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
what="${1:-all}"
build() {
  local target=$1
  # With an explicit --target, RUSTFLAGS reach only the target's crates, not build scripts
  # or proc macros, which must stay dynamic.
  RUSTFLAGS="-C target-feature=+crt-static" cargo build -q --release --locked \
    --target "$target" -p usernsguard-agent --bin usernsguard
  local bin="${CARGO_TARGET_DIR:-target}/$target/release/usernsguard"
  if ! file "$bin" | grep -Eq 'static(-pie)? linked|statically linked'; then
    echo "build-static: $bin is not statically linked: $(file -b "$bin")" >&2
    exit 1
  fi
  echo "$bin"
}
case "$what" in
  musl) build x86_64-unknown-linux-musl ;;
  gnu) build x86_64-unknown-linux-gnu ;;
  all) build x86_64-unknown-linux-musl; build x86_64-unknown-linux-gnu ;;
  *) echo "usage: $0 [musl|gnu|all]" >&2; exit 2 ;;
esac
