#!/usr/bin/env bash
# Proves the lane's guards: a guest that is not SELinux-enforcing, or that never reaches
# init, must make run.sh fail with the matching message, never pass or skip. Uses the
# repro payload, so it needs no usernsguard binary. About 30 s with a warm cache.
set -uo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
out=$(mktemp -d "${TMPDIR:-/tmp}/selinux-lane-guards.XXXXXX")
trap 'rm -rf "$out"' EXIT
failed=0

expect_failure() { # name, kernel args appended, message run.sh must print
    local log="$out/$1.log" rc=0
    SELINUX_LANE_MODE=repro SELINUX_LANE_APPEND="$2" bash "$here/run.sh" none "$out/$1/out.txt" > "$log" 2>&1 || rc=$?
    if [ "$rc" != 0 ] && grep -qF "FAILED: $3" "$log"; then
        echo "ok: $1 (append '$2') fails with \"$3\""
    else
        echo "NOT OK: $1 (append '$2'): exit $rc, expected non-zero with \"FAILED: $3\"; log:"
        tail -n 20 "$log"
        failed=$((failed + 1))
    fi
}

expect_failure permissive "enforcing=0" "SELinux is not enforcing in the guest"
expect_failure selinux-off "security=apparmor" "guest: LANE-FATAL: kernel has no selinuxfs"
expect_failure no-init "rdinit=/nonexistent" "guest did not boot"
passed=$((3 - failed))
echo "$passed passed, $failed failed"
[ "$failed" = 0 ]
