#!/usr/bin/env bash
# Installs the Debian packages usernsguard's build, self-test and test suite need.
# Usage: scripts/install-deps.sh [selftest|all]   (default: all)
set -euo pipefail

what="${1:-all}"
runtime_pkgs=(runc crun)
build_pkgs=(pkg-config libselinux1-dev libclang-dev protobuf-compiler)   # protoc: k8s-cri's generated CRI client
static_pkgs=(musl-tools file)   # scripts/build-static.sh
test_pkgs=(
  containerd containernetworking-plugins busybox-static iproute2 jq
  prometheus            # promtool and a real server for the scrape test
  python3-venv          # offline CRD/example validation
  buildah libc6-dev     # test images (tests/containerd: a static pause), the container image
  debootstrap systemd-container   # tests/nspawn: a real systemd for the restart tests
  qemu-system-x86 policycoreutils secilc cpio e2fsprogs kmod bzip2 binutils   # SELinux qemu lane
)

case "$what" in
  selftest) pkgs=("${runtime_pkgs[@]}" "${build_pkgs[@]}") ;;
  all) pkgs=("${runtime_pkgs[@]}" "${build_pkgs[@]}" "${static_pkgs[@]}" "${test_pkgs[@]}") ;;
  *) echo "usage: $0 [selftest|all]" >&2; exit 2 ;;
esac

missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "installing: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# The musl target for the static build (the container image's binary).
if [ "$what" = all ] && ! rustup target list --installed 2>/dev/null | grep -qx x86_64-unknown-linux-musl; then
  rustup target add x86_64-unknown-linux-musl
fi
