#!/usr/bin/env bash
# Proves the lane's guards: a guest that is not SELinux-enforcing, or that never reaches
# init, must make run.sh fail with the matching message, never pass or skip; a pinned kernel
# apt cannot download must lead to the 6.1 kernel linux-image-amd64 depends on (said out
# loud, and that kernel is what boots), and no 6.1 kernel at all must fail. Uses the repro
# payload, so it needs no usernsguard binary. About 70 s with a warm cache.
set -uo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
out=$(mktemp -d "${TMPDIR:-/tmp}/selinux-lane-guards.XXXXXX")
cache=${SELINUX_LANE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/usernsguard/selinux-lane}
# Pins no archive has, unique per run and case so the "unavailable pin" memory of run.sh
# is not what decides: apt is asked every time.
fake_pin() { echo "linux-image-6.1.0-50-amd64=6.1.176-1~lane-guard-$$-$1"; }
trap 'rm -rf "$out" "$cache"/kernel-pin-unavailable/*lane-guard-$$*' EXIT
failed=0
total=0

expect_failure() { # name, kernel args appended, message run.sh must print [, env assignments]
    local log="$out/$1.log" rc=0
    total=$((total + 1))
    env SELINUX_LANE_MODE=repro SELINUX_LANE_APPEND="$2" "${@:4}" bash "$here/run.sh" none "$out/$1/out.txt" > "$log" 2>&1 || rc=$?
    if [ "$rc" != 0 ] && grep -qF "FAILED: $3" "$log"; then
        echo "ok: $1 (append '$2'${4:+ ${*:4}}) fails with \"$3\""
    else
        echo "NOT OK: $1 (append '$2'${4:+ ${*:4}}): exit $rc, expected non-zero with \"FAILED: $3\"; log:"
        tail -n 20 "$log"
        failed=$((failed + 1))
    fi
}

expect_failure permissive "enforcing=0" "SELinux is not enforcing in the guest"
expect_failure selinux-off "security=apparmor" "guest: LANE-FATAL: kernel has no selinuxfs"
expect_failure no-init "rdinit=/nonexistent" "guest did not boot"
expect_failure no-kernel "" "no 6.1 kernel can be had" \
    SELINUX_LANE_KERNEL_PIN="$(fake_pin no-kernel)" SELINUX_LANE_KERNEL_META=lane-guard-no-such-package

# The fallback: the pin cannot be downloaded, so the lane boots what linux-image-amd64
# depends on, and says so.
total=$((total + 1))
log="$out/fallback.log"
rc=0
pin=$(fake_pin fallback)
want_pkg=$(apt-cache depends linux-image-amd64 2> /dev/null | awk '$1 == "Depends:" && $2 ~ /^linux-image-/ {print $2; exit}')
want_rel=${want_pkg#linux-image-}
SELINUX_LANE_MODE=repro SELINUX_LANE_KERNEL_PIN="$pin" bash "$here/run.sh" none "$out/fallback/out.txt" > "$log" 2>&1 || rc=$?
if [ "$rc" = 0 ] && [ -n "$want_pkg" ] &&
    grep -qF "FALLBACK: pinned kernel $pin is not available; using $want_pkg=" "$log" &&
    grep -q "^LANE: kernel $want_rel " "$log" &&
    grep -q "^$want_pkg .* $want_rel (fallback: apt cannot download the pin" "$out/fallback/kernel.txt"; then
    echo "ok: fallback (pin $pin) boots $(cut -d' ' -f1-2 "$out/fallback/kernel.txt"), the kernel linux-image-amd64 depends on"
else
    echo "NOT OK: fallback (pin $pin): exit $rc, expected 0, a FALLBACK line naming ${want_pkg:-<apt knows no linux-image-amd64>} and that kernel booted; log:"
    tail -n 20 "$log"
    failed=$((failed + 1))
fi

echo "$((total - failed)) passed, $failed failed"
[ "$failed" = 0 ]
