#!/usr/bin/env bash
# SELinux lane: boots a real SELinux-enforcing Debian kernel under qemu (TCG), runs
# `usernsguard selftest --output json` inside it against real runc and crun, and writes
# the JSON the guest printed to OUT_JSON.
#
#   tests/selinux-lane/run.sh [USERNSGUARD_BINARY [OUT_JSON]]
#
# Defaults: target/release/usernsguard and target/selinux-lane/guest.json. Beside OUT_JSON
# it leaves host.json (the same binary's selftest on this host, which the integration test
# compares the guest's against) and console.log (the guest's serial console).
#
# Environment (all optional):
#   SELINUX_LANE_CACHE    download/compile cache (default ${XDG_CACHE_HOME:-~/.cache}/usernsguard/selinux-lane)
#   SELINUX_LANE_TIMEOUT  seconds qemu may run before it is killed (default 240)
#   SELINUX_LANE_MODE     selftest (default) | repro (runs runc/crun directly, no usernsguard)
#   SELINUX_LANE_NO_APT=1 never call apt-get install (fail if a tool is missing)
#   SELINUX_LANE_APPEND   extra guest kernel arguments, appended last (e.g. enforcing=0 to
#                         see the lane refuse a permissive guest)
#
# It fails loudly (non-zero, with the console tail) when the guest does not boot, when
# SELinux is not enforcing in it, or when no JSON comes back. It does not judge the
# verdicts: agent/tests/selinux_lane.rs does that from the JSON.
set -euo pipefail

start_ns=$(date +%s%N)
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)

bin=${1:-${USERNSGUARD_BIN:-$repo/target/release/usernsguard}}
out=${2:-$repo/target/selinux-lane/guest.json}
mode=${SELINUX_LANE_MODE:-selftest}
cache=${SELINUX_LANE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/usernsguard/selinux-lane}
timeout_s=${SELINUX_LANE_TIMEOUT:-240}

# Pinned guest inputs. The kernel is Debian bookworm's 6.1 (SELinux built in, selectable
# with security=selinux); this exact build is in both bookworm and bookworm-security.
kernel_pkg=linux-image-6.1.0-50-amd64
kernel_ver=6.1.176-1
kernel_rel=6.1.0-50-amd64
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
fetch() { # package version -> path of the .deb in the cache
    # apt-get download names files with the epoch's colon escaped (2%3a2.2022...).
    local pattern="${1}_*${2#*:}_*.deb" f
    f=$(find "$cache/debs" -maxdepth 1 -name "$pattern" | head -n1)
    # A download cut short in an earlier run must not poison the cache.
    if [ -n "$f" ] && ! dpkg-deb --info "$f" > /dev/null 2>&1; then
        say "discarding unreadable cached $f"
        rm -f "$f"
        f=""
    fi
    if [ -z "$f" ]; then
        say "downloading $1=$2"
        (cd "$cache/debs" && apt-get download -q -o APT::Sandbox::User=root "$1=$2" >&2) ||
            (apt-get update -qq >&2 && cd "$cache/debs" && apt-get download -q -o APT::Sandbox::User=root "$1=$2" >&2) ||
            die "cannot download $1=$2 (pinned in $0; if Debian dropped it, update the pin)"
        f=$(find "$cache/debs" -maxdepth 1 -name "$pattern" | head -n1)
    fi
    [ -n "$f" ] || die "downloaded $1=$2 but cannot find it in $cache/debs"
    echo "$f"
}
kernel_deb=$(fetch "$kernel_pkg" "$kernel_ver")
policy_deb=$(fetch "$policy_pkg" "$policy_ver")

# --- kernel and the modules an ext4 root on virtio needs (cached) ------------------------
kdir="$cache/kernel-$kernel_ver"
if [ ! -s "$kdir/order" ]; then
    say "extracting $kernel_pkg"
    rm -rf "$kdir" "$kdir.tmp"
    mkdir -p "$kdir.tmp/x" "$kdir.tmp/modules"
    dpkg-deb -x "$kernel_deb" "$kdir.tmp/x"
    depmod -b "$kdir.tmp/x" "$kernel_rel"
    cp "$kdir.tmp/x/boot/vmlinuz-$kernel_rel" "$kdir.tmp/vmlinuz"
    for m in crc32c_generic crc32c-intel virtio_pci virtio_blk ext4; do
        modprobe -d "$kdir.tmp/x" -S "$kernel_rel" --show-depends "$m" | awk '$1 == "insmod" {print $2}'
    done | awk '!seen[$0]++' | while read -r ko; do
        cp "$ko" "$kdir.tmp/modules/"
        basename "$ko" >> "$kdir.tmp/modules/order"
    done
    grep -q '^ext4.ko$' "$kdir.tmp/modules/order" || die "ext4.ko not found in $kernel_pkg"
    mv "$kdir.tmp/modules/order" "$kdir.tmp/order"
    rm -rf "$kdir.tmp/x"
    mv "$kdir.tmp" "$kdir"
fi

# --- policy: every module of selinux-policy-default, compiled once per input ------------
tools_ver=$(dpkg-query -W -f '${Version}' secilc policycoreutils 2>/dev/null || true)
policy_key=$( (sha256sum "$policy_deb"; echo "$tools_ver -c 33 -M true -U allow") | sha256sum | cut -c1-16)
policy_bin="$cache/policy-$policy_key.bin"
if [ ! -s "$policy_bin" ]; then
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
    # handle-unknown=allow: this refpolicy predates classes the kernel has (user_namespace, ...);
    # deny would break every runtime for reasons that have nothing to do with this test.
    modules=("$pwork/cil/base.cil")
    for f in "$pwork"/cil/*.cil; do
        [ "$f" = "$pwork/cil/base.cil" ] || modules+=("$f")
    done
    secilc -c 33 -M true -U allow -o "$policy_bin.tmp" -f /dev/null "${modules[@]}" >&2 ||
        die "secilc failed"
    mv "$policy_bin.tmp" "$policy_bin"
    rm -rf "$pwork"
fi

# --- guest image ----------------------------------------------------------------------------
out_dir=$(dirname "$out")
mkdir -p "$out_dir"
out=$(cd "$out_dir" && pwd)/$(basename "$out")
console="$out_dir/console.log"
host_json="$out_dir/host.json"
rm -f "$out" "$console" "$console.first-boot" "$host_json"
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
work=$(mktemp -d "${TMPDIR:-/tmp}/selinux-lane.XXXXXX")
trap 'rm -rf "$work"' EXIT

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
copy_with_libs() { # host binary -> guest path, plus every library ldd names
    install -D -m 0755 "$1" "$root$2"
    ldd "$1" | awk '/=> \// {print $3} /^\t\// {print $1}' | while read -r lib; do
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
fi
printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n' > "$root/etc/passwd"
printf 'root:x:0:\nnogroup:x:65534:\n' > "$root/etc/group"
echo lane > "$root/etc/hostname"
cp "$policy_bin" "$root/lane/policy.bin"
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
grep '^LANE' "$console" | grep -v -e '^LANE-JSON' -e '^LANE-STDERR' >&2 || true
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
say "wall time $(elapsed) s"
ms=$((($(date +%s%N) - start_ns) / 1000000))
[ "$ms" -le 300000 ] || say "WARNING: over the lane's 5-minute budget"
