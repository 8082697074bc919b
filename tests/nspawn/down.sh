#!/usr/bin/env bash
# Stops a container started by up.sh and removes everything it left: processes (killed
# through the container's cgroups if a clean poweroff did not end them), the overlay
# mount, the cgroups, the state dir. Exits non-zero if something could not be removed.
set -uo pipefail
NAME=${1:?usage: down.sh NAME}
STATE=/run/usernsguard-nspawn/$NAME
[ -d "$STATE" ] || { echo "not running: $NAME"; exit 0; }
NSPAWN=$(cat "$STATE/nspawn.pid" 2>/dev/null || true)
CGDIRS=$(cat "$STATE/cgroups" 2>/dev/null || true)
t0=$(date +%s%N)
if [ -n "$NSPAWN" ] && kill -0 "$NSPAWN" 2>/dev/null; then
  # SIGTERM to nspawn: it asks the container's systemd for a clean poweroff (SIGRTMIN+3).
  kill -TERM "$NSPAWN"
  for _ in $(seq 300); do kill -0 "$NSPAWN" 2>/dev/null || break; sleep 0.05; done
  kill -0 "$NSPAWN" 2>/dev/null && { echo "nspawn still running after 15 s: SIGKILL" >&2; kill -KILL "$NSPAWN"; }
fi
# Whatever is still in the container's cgroups (nspawn was killed, or never exited cleanly).
procs() { for d in $CGDIRS; do [ -d "$d" ] && find "$d" -name cgroup.procs -exec cat {} + 2>/dev/null; done | sort -u; }
for _ in $(seq 50); do
  left=$(procs); [ -z "$left" ] && break
  kill -KILL $left 2>/dev/null; sleep 0.1
done
rc=0
mountpoint -q "$STATE/merged" && { umount "$STATE/merged" || umount -l "$STATE/merged" || rc=1; }
for d in $CGDIRS; do
  [ -d "$d" ] && find "$d" -depth -type d -exec rmdir {} + 2>/dev/null
  [ -d "$d" ] && { echo "cgroup $d not removed: processes $(procs | tr '\n' ' ')" >&2; rc=1; }
done
rm -rf "$STATE"
rmdir /run/usernsguard-nspawn 2>/dev/null || true
# nspawn leaves these empty dirs; drop them when no other container uses them.
rmdir /run/systemd/nspawn/locks /run/systemd/nspawn/propagate /run/systemd/nspawn 2>/dev/null || true
echo "stopped $NAME in $(( ($(date +%s%N) - t0) / 1000000 )) ms"
exit $rc
