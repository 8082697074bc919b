#!/usr/bin/env bash
# SELinux lane: boots a real SELinux-enforcing Debian kernel under qemu (TCG), runs
# `usernsguard selftest --output json` inside it against real runc and crun, then starts
# containerd 2.1 in it (enable_selinux = true, handlers for the runc 1.2.0 and 1.2.1
# releases, Debian's runc and crun) and runs `usernsguard selftest --cri-config` against
# that, and writes the JSON documents the guest printed.
#
#   tests/selinux-lane/run.sh [USERNSGUARD_BINARY [OUT_JSON]]
#
# Defaults: target/release/usernsguard and target/selinux-lane/guest.json. Beside OUT_JSON
# it leaves guest-cri.json (the containerd run), host.json (the same binary's selftest on
# this host, which the integration test compares the guest's against), kernel.txt (the
# kernel package that booted, and why that one) and console.log (the serial console).
#
# Environment (all optional):
#   SELINUX_LANE_CACHE    download/compile cache (default ${XDG_CACHE_HOME:-~/.cache}/usernsguard/selinux-lane)
#   SELINUX_LANE_TIMEOUT  seconds qemu may run before it is killed (default 300)
#   SELINUX_LANE_MODE     selftest (default) | repro (runs runc/crun directly, no usernsguard)
#   SELINUX_LANE_NO_APT=1 never call apt-get install (fail if a tool is missing)
#   SELINUX_LANE_APPEND   extra guest kernel arguments, appended last (e.g. enforcing=0 to
#                         see the lane refuse a permissive guest)
#   SELINUX_LANE_KERNEL_PIN   preferred kernel as PACKAGE=VERSION (default below)
#   SELINUX_LANE_KERNEL_META  package whose dependency is the fallback kernel (linux-image-amd64)
#   SELINUX_LANE_NO_CRI=1 selftest mode without the containerd run (no guest-cri.json)
#   SELINUX_LANE_CRI_HANDLERS  the guest containerd's handlers, "name=host-binary ..."
#   RUNTIMES_DIR          where the runc releases are (tests/containerd/lib.sh: ../shared/runtimes)
#
# It fails loudly (non-zero, with the console tail) when the guest does not boot, when
# SELinux is not enforcing in it, when no 6.1 kernel can be had, or when a JSON document
# does not come back. It does not judge the verdicts: agent/tests/selinux_lane.rs does that.
set -euo pipefail

start_ns=$(date +%s%N)
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)

bin=${1:-${USERNSGUARD_BIN:-$repo/target/release/usernsguard}}
out=${2:-$repo/target/selinux-lane/guest.json}
mode=${SELINUX_LANE_MODE:-selftest}
cache=${SELINUX_LANE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/usernsguard/selinux-lane}
timeout_s=${SELINUX_LANE_TIMEOUT:-300}

# Guest inputs. The kernel is Debian bookworm's 6.1 (SELinux built in, selectable with
# security=selinux). The pin is the preferred build; Debian drops superseded kernel packages
# from the archive at point releases, so when apt cannot download it the lane falls back to
# the 6.1 kernel linux-image-amd64 depends on, and fails only when no 6.1 kernel can be had.
kernel_pin=${SELINUX_LANE_KERNEL_PIN:-linux-image-6.1.0-50-amd64=6.1.176-1}
kernel_meta=${SELINUX_LANE_KERNEL_META:-linux-image-amd64}
policy_pkg=selinux-policy-default
policy_ver=2:2.20221101-9

# Host packages this script needs (command -> Debian package).
host_tools=(
    "qemu-system-x86_64 qemu-system-x86"
    "secilc secilc"
    "/usr/libexec/selinux/hll/pp policycoreutils"
    "cpio cpio"
    "mke2fs e2fsprogs"
    "depmod kmod"
    "bunzip2 bzip2"
    "jq jq"
    "strip binutils"
    "runc runc"
    "crun crun"
)

say() { printf 'selinux-lane: %s\n' "$*" >&2; }
elapsed() {
    local ms=$((($(date +%s%N) - start_ns) / 1000000))
    printf '%d.%03d' $((ms / 1000)) $((ms % 1000))
}
die() {
    say "FAILED: $*"
    say "wall time $(elapsed) s"
    exit 1
}

case "$mode" in selftest | repro) ;; *) die "SELINUX_LANE_MODE must be selftest or repro, got '$mode'" ;; esac
# selftest mode also runs containerd 2.1 in the guest (the CRI run, guest-cri.json).
cri=""
if [ "$mode" = selftest ] && [ "${SELINUX_LANE_NO_CRI:-}" != 1 ]; then
    cri=1
    # The private-containerd test harness: its image builder, containerd 2.1's location and
    # the runc releases (RUNTIMES_DIR).
    # shellcheck source=../containerd/lib.sh
    source "$repo/tests/containerd/lib.sh"
    # Handlers as name=host-binary words; the runc releases are static, Debian's runc and
    # crun are the ones the direct run uses.
    cri_handlers=${SELINUX_LANE_CRI_HANDLERS:-"runc-1-2-0=$RUNTIMES_DIR/runc-1.2.0 runc-1-2-1=$RUNTIMES_DIR/runc-1.2.1 runc=/usr/sbin/runc crun=/usr/bin/crun"}
    host_tools+=("buildah buildah" "gcc gcc")
fi
if [ "$mode" = selftest ]; then
    [ -x "$bin" ] || die "usernsguard binary '$bin' does not exist or is not executable (build it with: cargo build --release -p usernsguard-agent)"
fi
[ "$(id -u)" = 0 ] || die "must run as root (apt-get, and the guest image is built with root-owned files)"

# --- host tools -------------------------------------------------------------------------
missing=()
for t in "${host_tools[@]}"; do
    read -r tool pkg <<< "$t"
    command -v "$tool" >/dev/null 2>&1 || missing+=("$pkg")
done
if ! busybox_path=$(command -v busybox) || ldd "$busybox_path" >/dev/null 2>&1; then
    missing+=(busybox-static)
fi
if [ ${#missing[@]} -gt 0 ]; then
    [ "${SELINUX_LANE_NO_APT:-}" = 1 ] && die "missing host packages: ${missing[*]}"
    say "installing ${missing[*]}"
    apt-get update -qq >&2 || die "apt-get update failed"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2 ||
        die "apt-get install ${missing[*]} failed"
fi
busybox_path=$(command -v busybox)
ldd "$busybox_path" >/dev/null 2>&1 && die "$busybox_path is dynamically linked; install busybox-static"
pp=/usr/libexec/selinux/hll/pp

# --- downloads (cached) -----------------------------------------------------------------
mkdir -p "$cache/debs"
cached_deb() { # package version -> path of its readable .deb in the cache, or nothing
    # apt-get download names files with the epoch's colon escaped (2%3a2.2022...).
    local pattern="${1}_*${2#*:}_*.deb" f
    f=$(find "$cache/debs" -maxdepth 1 -name "$pattern" | head -n1)
    # A download cut short in an earlier run must not poison the cache.
    if [ -n "$f" ] && ! dpkg-deb --info "$f" > /dev/null 2>&1; then
        say "discarding unreadable cached $f"
        rm -f "$f"
        f=""
    fi
    echo "$f"
}
apt_updated=""
apt_update_once() {
    [ -z "$apt_updated" ] || return 0
    apt_updated=1
    apt-get update -qq >&2 || say "apt-get update failed (continuing with the lists apt has)"
}
download() { # package version -> success when its .deb is in the cache afterwards
    [ -n "$(cached_deb "$1" "$2")" ] && return 0
    say "downloading $1=$2"
    local try
    for try in 1 2; do
        (cd "$cache/debs" && apt-get download -q -o APT::Sandbox::User=root "$1=$2" >&2) &&
            [ -n "$(cached_deb "$1" "$2")" ] && return 0
        # Stale package lists are the usual cause: refresh them once per run and retry.
        [ "$try" = 1 ] && [ -z "$apt_updated" ] || return 1
        apt_update_once
    done
    return 1
}
fetch() { # package version -> path of the .deb in the cache
    download "$1" "$2" || die "cannot download $1=$2 (pinned in $0; if Debian dropped it, update the pin)"
    cached_deb "$1" "$2"
}

# The kernel: the pin if apt can download it (or it is cached), else the 6.1 kernel that
# $kernel_meta depends on. A pin found unavailable is remembered (per pin), so warm runs
# do not ask the archive again.
kernel_pkg=${kernel_pin%%=*}
kernel_ver=${kernel_pin#*=}
[ "$kernel_pkg" != "$kernel_pin" ] && [ -n "$kernel_pkg" ] && [ -n "$kernel_ver" ] ||
    die "SELINUX_LANE_KERNEL_PIN must be PACKAGE=VERSION, got '$kernel_pin'"
pin_mark="$cache/kernel-pin-unavailable/$(printf %s "$kernel_pin" | tr -c 'A-Za-z0-9.+~-' _)"
kernel_fallback() { # -> PACKAGE=VERSION of the 6.1 kernel $kernel_meta depends on
    local dep ver
    dep=$(apt-cache depends "$kernel_meta" 2> /dev/null | awk '$1 == "Depends:" && $2 ~ /^linux-image-/ {print $2; exit}')
    if [ -z "$dep" ] && [ -z "$apt_updated" ]; then
        apt_update_once
        dep=$(apt-cache depends "$kernel_meta" 2> /dev/null | awk '$1 == "Depends:" && $2 ~ /^linux-image-/ {print $2; exit}')
    fi
    [ -n "$dep" ] || die "no 6.1 kernel can be had: the pin $kernel_pin cannot be downloaded and apt knows no kernel $kernel_meta depends on"
    case "$dep" in
        linux-image-6.1.*) ;;
        *) die "no 6.1 kernel can be had: the pin $kernel_pin cannot be downloaded and $kernel_meta depends on $dep" ;;
    esac
    ver=$(apt-cache policy "$dep" 2> /dev/null | awk '$1 == "Candidate:" {print $2; exit}')
    case "$ver" in
        6.1.*) ;;
        *) die "no 6.1 kernel can be had: the pin $kernel_pin cannot be downloaded and $dep has no 6.1 candidate (apt says '${ver:-nothing}')" ;;
    esac
    echo "$dep=$ver"
}
kernel_how=pinned
if [ -z "$(cached_deb "$kernel_pkg" "$kernel_ver")" ]; then
    if [ -e "$pin_mark" ]; then
        kernel_how="fallback: the pin $kernel_pin could not be downloaded ($(cat "$pin_mark"))"
    elif ! download "$kernel_pkg" "$kernel_ver"; then
        kernel_how="fallback: apt cannot download the pin $kernel_pin"
        # Remembered only when the archive no longer lists it (a network failure is not).
        if ! apt-cache madison "$kernel_pkg" 2> /dev/null | awk -F'|' '{gsub(/ /, "", $2); print $2}' | grep -qxF -- "$kernel_ver"; then
            mkdir -p "$(dirname "$pin_mark")"
            echo "not in apt's package lists on $(date -u +%Y-%m-%d)" > "$pin_mark"
        fi
    fi
    if [ "$kernel_how" != pinned ]; then
        fallback=$(kernel_fallback)
        say "FALLBACK: pinned kernel $kernel_pin is not available; using $fallback, which $kernel_meta depends on"
        kernel_pkg=${fallback%%=*}
        kernel_ver=${fallback#*=}
        download "$kernel_pkg" "$kernel_ver" || die "no 6.1 kernel can be had: neither the pin $kernel_pin nor the fallback $fallback can be downloaded"
        kernel_how="$kernel_how; $kernel_meta depends on $kernel_pkg"
    fi
fi
kernel_deb=$(cached_deb "$kernel_pkg" "$kernel_ver")
say "kernel: $kernel_pkg $kernel_ver ($kernel_how)"
policy_deb=$(fetch "$policy_pkg" "$policy_ver")

# --- kernel and the modules the guest loads from its initramfs (cached per version) ------
# ext4 on virtio for the root disk; overlay for containerd's overlayfs snapshotter; bridge
# and veth for the pods' bridge CNI network.
kmods=(crc32c_generic crc32c-intel virtio_pci virtio_blk ext4 overlay bridge veth)
kdir="$cache/kernel-$kernel_ver-$(echo "${kmods[*]}" | sha256sum | cut -c1-8)"
if [ ! -s "$kdir/order" ]; then
    say "extracting $kernel_pkg"
    rm -rf "$kdir" "$kdir.tmp"
    mkdir -p "$kdir.tmp/x" "$kdir.tmp/modules"
    dpkg-deb -x "$kernel_deb" "$kdir.tmp/x"
    vmlinuz=$(find "$kdir.tmp/x/boot" -maxdepth 1 -name 'vmlinuz-*' | head -n1)
    [ -n "$vmlinuz" ] || die "$kernel_pkg $kernel_ver has no /boot/vmlinuz-*"
    kernel_rel=${vmlinuz##*/vmlinuz-}
    depmod -b "$kdir.tmp/x" "$kernel_rel"
    cp "$vmlinuz" "$kdir.tmp/vmlinuz"
    echo "$kernel_rel" > "$kdir.tmp/release"
    for m in "${kmods[@]}"; do
        modprobe -d "$kdir.tmp/x" -S "$kernel_rel" --show-depends "$m" | awk '$1 == "insmod" {print $2}'
    done | awk '!seen[$0]++' | while read -r ko; do
        cp "$ko" "$kdir.tmp/modules/"
        basename "$ko" >> "$kdir.tmp/modules/order"
    done
    for m in ext4 overlay bridge veth; do
        grep -q "^$m.ko$" "$kdir.tmp/modules/order" || die "$m.ko not found in $kernel_pkg"
    done
    mv "$kdir.tmp/modules/order" "$kdir.tmp/order"
    rm -rf "$kdir.tmp/x"
    mv "$kdir.tmp" "$kdir"
fi
kernel_rel=$(cat "$kdir/release")

# --- policy: every module of selinux-policy-default plus container.cil, compiled once per
# input; beside it the policy's lxc_contexts, where containerd takes its labels from -------
tools_ver=$(dpkg-query -W -f '${Version}' secilc policycoreutils 2>/dev/null || true)
policy_key=$( (sha256sum "$policy_deb" "$here/container.cil"; echo "$tools_ver -c 33 -M true -U allow") | sha256sum | cut -c1-16)
policy_bin="$cache/policy-$policy_key.bin"
lxc_contexts="$cache/policy-$policy_key.lxc_contexts"
if [ ! -s "$policy_bin" ] || [ ! -s "$lxc_contexts" ]; then
    say "compiling $policy_pkg (converting .pp modules to CIL)"
    pwork=$(mktemp -d)
    dpkg-deb -x "$policy_deb" "$pwork/x"
    mkdir "$pwork/cil"
    for f in "$pwork"/x/usr/share/selinux/default/*.pp.bz2; do
        n=$(basename "$f" .pp.bz2)
        bunzip2 -c "$f" > "$pwork/cil/$n.pp"
        "$pp" "$pwork/cil/$n.pp" "$pwork/cil/$n.cil" || die "pp failed on $n.pp"
    done
    [ -s "$pwork/cil/base.cil" ] || die "$policy_pkg has no base module"
    cp "$here/container.cil" "$pwork/cil/zz-lane-container.cil"
    lxc="$pwork/x/etc/selinux/default/contexts/lxc_contexts"
    grep -q '^file *= *"system_u:object_r:container_file_t:' "$lxc" ||
        die "$policy_pkg's lxc_contexts does not name container_file_t, which container.cil declares"
    # handle-unknown=allow: this refpolicy predates classes the kernel has (user_namespace, ...);
    # deny would break every runtime for reasons that have nothing to do with this test.
    modules=("$pwork/cil/base.cil")
    for f in "$pwork"/cil/*.cil; do
        [ "$f" = "$pwork/cil/base.cil" ] || modules+=("$f")
    done
    secilc -c 33 -M true -U allow -o "$policy_bin.tmp" -f /dev/null "${modules[@]}" >&2 ||
        die "secilc failed"
    mv "$policy_bin.tmp" "$policy_bin"
    cp "$lxc" "$lxc_contexts"
    rm -rf "$pwork"
fi

work=$(mktemp -d "${TMPDIR:-/tmp}/selinux-lane.XXXXXX")
trap 'rm -rf "$work"' EXIT

# --- containerd 2.1, its images and handlers for the CRI run (cached) -----------------------
probe_ref=localhost/usernsguard/probe:lane
if [ -n "$cri" ]; then
    ug_ensure_containerd_21 || die "cannot unpack containerd 2.1 into $CACHE/containerd-2.1"
    ctrd_bin=$CACHE/containerd-2.1/usr/bin
    # The probe image holds the same binary the guest runs, stripped (a debug build
    # would make the image, and its import under TCG, hundreds of MiB). build-images.sh
    # caches the image by the stripped binary's content.
    probe_bin="$work/probe/usernsguard"
    mkdir -p "$work/probe"
    strip -o "$probe_bin" "$bin" || die "strip $bin failed"
    built=$("$repo/tests/containerd/build-images.sh" "$probe_bin" "$probe_ref" /usr/local/bin/usernsguard) ||
        die "building the pause and probe images failed (tests/containerd/build-images.sh)"
    mapfile -t archives <<< "$built"
    [ "${#archives[@]}" = 2 ] || die "build-images.sh printed ${#archives[@]} archives, expected 2"
fi
# The guest's containerd: 2.1's binaries and shim, the handlers' runtimes, bridge CNI,
# enable_selinux = true, the images to import, and the CRI run's script.
add_containerd() {
    local b h name hbin gbin runtimes=""
    for b in containerd containerd-shim-runc-v2 ctr; do
        copy_with_libs "$ctrd_bin/$b" "/opt/containerd/bin/$b"
    done
    for b in bridge host-local loopback; do
        copy_with_libs "/usr/lib/cni/$b" "/opt/cni/bin/$b"
    done
    for h in $cri_handlers; do
        name=${h%%=*} hbin=${h#*=}
        [ -x "$hbin" ] || die "CRI handler $name: $hbin is not an executable"
        gbin=$hbin
        [ -e "$root$gbin" ] || { gbin=/opt/runtimes/$(basename "$hbin"); copy_with_libs "$hbin" "$gbin"; }
        runtimes+="
[plugins.\"io.containerd.cri.v1.runtime\".containerd.runtimes.$name]
  runtime_type = \"io.containerd.runc.v2\"
  [plugins.\"io.containerd.cri.v1.runtime\".containerd.runtimes.$name.options]
    BinaryName = \"$gbin\"
    Root = \"/run/lane-rt/$name\"
"
    done
    mkdir -p "$root/etc/containerd" "$root/etc/cni/net.d" "$root/lane/images" "$root/var/lib/containerd"
    cat > "$root/etc/containerd/config.toml" << TOML
version = 3
root = "/var/lib/containerd"
state = "/run/containerd"
disabled_plugins = [
  "io.containerd.snapshotter.v1.aufs",
  "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.zfs",
  "io.containerd.snapshotter.v1.devmapper",
]

[grpc]
  address = "/run/containerd/containerd.sock"

[plugins."io.containerd.nri.v1.nri"]
  disable = true

[plugins."io.containerd.cri.v1.images"]
  snapshotter = "overlayfs"

[plugins."io.containerd.cri.v1.images".pinned_images]
  sandbox = "$PAUSE_REF"

[plugins."io.containerd.cri.v1.runtime"]
  enable_selinux = true
  cdi_spec_dirs = []

[plugins."io.containerd.cri.v1.runtime".containerd]
  default_runtime_name = "${cri_handlers%%=*}"
$runtimes
[plugins."io.containerd.cri.v1.runtime".cni]
  bin_dirs = ["/opt/cni/bin"]
  conf_dir = "/etc/cni/net.d"
  max_conf_num = 1
TOML
    cat > "$root/etc/cni/net.d/10-lane.conflist" << 'JSON'
{
  "cniVersion": "1.0.0",
  "name": "lane",
  "plugins": [
    {
      "type": "bridge",
      "bridge": "lane0",
      "isGateway": false,
      "ipMasq": false,
      "ipam": { "type": "host-local", "ranges": [[{ "subnet": "10.88.0.0/24" }]], "dataDir": "/run/lane-cni" }
    }
  ]
}
JSON
    cp "${archives[0]}" "$root/lane/images/pause.tar"
    cp "${archives[1]}" "$root/lane/images/probe.tar"
    echo "$probe_ref" > "$root/lane/images/probe.ref"
    install -m 0755 "$here/guest-cri.sh" "$root/lane/cri.sh"
}

# --- guest image ----------------------------------------------------------------------------
out_dir=$(dirname "$out")
mkdir -p "$out_dir"
out=$(cd "$out_dir" && pwd)/$(basename "$out")
console="$out_dir/console.log"
host_json="$out_dir/host.json"
cri_out="$out_dir/guest-cri.json"
kernel_txt="$out_dir/kernel.txt"
rm -f "$out" "$console" "$console.first-boot" "$host_json" "$cri_out" "$kernel_txt"
echo "$kernel_pkg $kernel_ver $kernel_rel ($kernel_how)" > "$kernel_txt"
if [ "$mode" = selftest ]; then
    # The same binary and runtimes on this host (no SELinux): the baseline the guest's
    # verdicts are compared with.
    host_rc=0
    "$bin" selftest --output json > "$host_json" 2> "$out_dir/host.stderr" || host_rc=$?
    if [ "$host_rc" = 2 ] || ! jq -e .handlers "$host_json" > /dev/null 2>&1; then
        cat "$out_dir/host.stderr" >&2
        die "usernsguard selftest on the host failed (exit $host_rc)"
    fi
    say "host selftest done after $(elapsed) s (exit $host_rc)"
fi
root="$work/root"
mkdir -p "$root"/{usr/bin,usr/sbin,usr/lib,usr/lib64,etc,proc,sys,dev,run,tmp,root,var/lib,lane}
# usr-merged like the Debian host, so the probe's read-only /usr, /lib, /lib64 binds match.
ln -s usr/bin "$root/bin"
ln -s usr/sbin "$root/sbin"
ln -s usr/lib "$root/lib"
ln -s usr/lib64 "$root/lib64"
cp "$busybox_path" "$root/usr/bin/busybox"
for a in $("$busybox_path" --list); do
    [ -e "$root/usr/bin/$a" ] || ln -s busybox "$root/usr/bin/$a"
done
copy_with_libs() { # host binary -> guest path, plus every library ldd names (none if static)
    install -D -m 0755 "$1" "$root$2"
    { ldd "$1" || true; } | awk '/=> \// {print $3} /^\t\// {print $1}' | while read -r lib; do
        local dst="/usr${lib#/usr}"
        [ -e "$root$dst" ] || install -D -m 0755 "$(readlink -f "$lib")" "$root$dst"
    done
}
copy_with_libs "$(command -v runc)" /usr/sbin/runc
copy_with_libs "$(command -v crun)" /usr/bin/crun
if [ "$mode" = selftest ]; then
    copy_with_libs "$bin" /usr/bin/usernsguard
    # A debug build carries tens of MiB of DWARF the guest never reads.
    strip --strip-debug "$root/usr/bin/usernsguard"
    if [ -n "$cri" ]; then add_containerd; fi
fi
printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n' > "$root/etc/passwd"
printf 'root:x:0:\nnogroup:x:65534:\n' > "$root/etc/group"
echo lane > "$root/etc/hostname"
printf '127.0.0.1 localhost lane\n' > "$root/etc/hosts"
: > "$root/etc/resolv.conf"
cp "$policy_bin" "$root/lane/policy.bin"
# Where containerd (go-selinux) and usernsguard find the container labels: the policy's own
# lxc_contexts, under the policy name /etc/selinux/config gives.
mkdir -p "$root/etc/selinux"
printf 'SELINUX=enforcing\nSELINUXTYPE=default\n' > "$root/etc/selinux/config"
install -D -m 0644 "$lxc_contexts" "$root/etc/selinux/default/contexts/lxc_contexts"
install -m 0755 "$here/guest-init.sh" "$root/sbin/lane-init"
install -m 0755 "$here/repro.sh" "$root/lane/repro.sh"
size_mb=$(($(du -sm "$root" | cut -f1) + 192))
mke2fs -q -F -t ext4 -L lane -d "$root" "$work/root.img" "${size_mb}M" > /dev/null || die "mke2fs failed"

init="$work/initramfs"
mkdir -p "$init"/{bin,proc,sys,dev,newroot,modules}
cp "$busybox_path" "$init/bin/busybox"
ln -s busybox "$init/bin/sh"
cp "$kdir"/modules/*.ko "$kdir/order" "$init/modules/"
install -m 0755 "$here/initramfs-init.sh" "$init/init"
(cd "$init" && find . | cpio -o -H newc --quiet) > "$work/initramfs.cpio" || die "cpio failed"
say "guest image ready after $(elapsed) s (root ${size_mb} MiB ext4, policy $(stat -c %s "$policy_bin") bytes)"

# --- boot -------------------------------------------------------------------------------------
# TCG only: nested KVM on these machines aborts (-cpu host) or hangs (-cpu kvm64).
# no_timer_check: on a busy host TCG can be too slow for the kernel's early IO-APIC timer
# test; one boot here (while cargo was building) panicked under x86_late_time_init.
boot() {
    qemu_rc=0
    timeout --kill-after=10 "$timeout_s" qemu-system-x86_64 \
        -accel tcg -cpu max -m 1G -smp 1 -nographic -no-reboot \
        -kernel "$kdir/vmlinuz" -initrd "$work/initramfs.cpio" \
        -drive "file=$work/root.img,if=virtio,format=raw" \
        -nic none \
        -append "console=ttyS0 security=selinux enforcing=1 no_timer_check quiet loglevel=3 panic=-1 lane.mode=$mode ${SELINUX_LANE_APPEND:-}" \
        < /dev/null > "$console" 2>&1 || qemu_rc=$?
    tr -d '\r' < "$console" > "$console.tmp" && mv "$console.tmp" "$console"
}
boot
if [ "$qemu_rc" = 0 ] && ! grep -q '^LANE: stage1 up' "$console"; then
    # The kernel died before our init ran: that is the emulator, not the product. One more
    # boot, said out loud; the first console is kept.
    mv "$console" "$console.first-boot"
    say "RETRY: the guest kernel stopped before init (console kept in $console.first-boot):"
    grep -E 'Kernel panic|RIP:|\] [a-z_]+\+0x' "$console.first-boot" | head -n 8 >&2 || true
    boot
fi

show_console() { say "last console lines ($console):"; grep -v '^[A-Za-z0-9+/=]*$' "$console" | tail -n 40 >&2 || true; }
if [ "$qemu_rc" = 124 ] || [ "$qemu_rc" = 137 ]; then
    show_console
    die "guest did not finish within ${timeout_s} s (qemu killed)"
fi
[ "$qemu_rc" = 0 ] || { show_console; die "qemu exited with $qemu_rc"; }
grep -q '^LANE: stage1 up' "$console" || { show_console; die "guest did not boot (no stage-1 marker on the serial console)"; }
if grep -q '^LANE-FATAL' "$console"; then
    show_console
    die "guest: $(grep '^LANE-FATAL' "$console" | head -n1)"
fi
grep -q '^LANE: selinux enforce=1 ' "$console" || { show_console; die "SELinux is not enforcing in the guest"; }
grep '^LANE' "$console" | grep -v -e '^LANE-JSON' -e '^LANE-STDERR' -e '^LANE-CRI-JSON' -e '^LANE-CRI-STDERR' >&2 || true
grep -q '^LANE-JSON-END' "$console" || { show_console; die "guest printed no complete JSON block"; }
sed -n '/^LANE-JSON-BEGIN$/,/^LANE-JSON-END$/p' "$console" | sed '1d;$d' | base64 -d > "$out" ||
    { show_console; die "JSON block from the guest does not decode"; }
payload_rc=$(sed -n 's/^LANE: payload exit=\([0-9]*\).*/\1/p' "$console")

if [ "$mode" = repro ]; then
    cat "$out" >&2
else
    jq -e . "$out" > /dev/null || { show_console; die "guest output is not JSON (kept in $out)"; }
    [ "$payload_rc" != 2 ] || { show_console; die "usernsguard selftest could not run in the guest (exit 2)"; }
    guest_mode=$(jq -r '.node.selinux.mode // "missing"' "$out")
    [ "$guest_mode" = enforcing ] || die "usernsguard reports SELinux mode '$guest_mode' in the guest, expected enforcing"
    jq -r '"selinux: \(.node.selinux.mode) mountLabel=\(.node.selinux.mountLabel // "none") (\(.node.selinux.mountLabelSource // "-"))",
           (.handlers[] | "\(.handler): \(.verdict)  " + ([.checks[] | "\(.check)=\(.result)\(if .reason then "(" + .reason + ")" else "" end)"] | join(" ")))' "$out" >&2
fi
say "JSON written to $out (selftest exit $payload_rc; console in $console)"
if [ -n "$cri" ]; then
    grep -q '^LANE-CRI-JSON-END' "$console" ||
        { show_console; die "guest printed no CRI JSON block (the containerd 2.1 run; see the 'LANE: cri' lines)"; }
    sed -n '/^LANE-CRI-JSON-BEGIN$/,/^LANE-CRI-JSON-END$/p' "$console" | sed '1d;$d' | base64 -d > "$cri_out" ||
        { show_console; die "CRI JSON block from the guest does not decode"; }
    jq -e .handlers "$cri_out" > /dev/null 2>&1 || { show_console; die "the CRI run's output is not a selftest report (kept in $cri_out)"; }
    cri_rc=$(sed -n 's/^LANE: cri payload exit=\([0-9]*\).*/\1/p' "$console")
    [ "$cri_rc" != 2 ] || { show_console; die "usernsguard selftest --cri-config could not run in the guest (exit 2)"; }
    jq -r '"cri: \(.cri.runtime // "none") \(.cri.version // "") selinuxLabels=\(.cri.selinuxLabels // false) mountLabel=\(.node.selinux.mountLabel // "none") (\(.node.selinux.mountLabelSource // "-"))",
           (.handlers[] | "\(.handler) (\(.runtime) \(.version)): \(.verdict)  " + ([.checks[] | "\(.check)=\(.result)\(if .reason then "(" + .reason + ")" else "" end)"] | join(" "))),
           (.handlers[] | .handler as $h | .checks[] | select(.check == "cri-pod") | "\($h) cri-pod: \(.message)")' "$cri_out" >&2
    say "CRI JSON written to $cri_out (selftest exit $cri_rc)"
fi
say "kernel: $(cat "$kernel_txt")"
say "wall time $(elapsed) s"
ms=$((($(date +%s%N) - start_ns) / 1000000))
[ "$ms" -le 300000 ] || say "WARNING: over the lane's 5-minute budget"
