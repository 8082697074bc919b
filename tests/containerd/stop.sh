#!/usr/bin/env bash
# Stops a containerd test instance and removes everything it left: containers (through each
# handler's runtime binary and state root), containerd, its shims and their children,
# mounts, cgroups, the network namespace and the state dir. KEEP_ROOT=1 keeps the root dir
# (images, metadata); KEEP_STATE=1 keeps the config and state files too, for a restart
# (stop.sh then only stops containerd, as `systemctl restart` would). Idempotent.
#   stop.sh NAME 16|21
set -euo pipefail
source "$(dirname "$0")/lib.sh"
ug_instance "${1:?usage: stop.sh NAME 16|21}" "${2:?usage: stop.sh NAME 16|21}"

if [ -n "${KEEP_STATE:-}" ]; then
  if ug_running; then
    pid=$(cat "$PIDFILE")
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 200); do ug_alive "$pid" || break; sleep 0.05; done
    ug_alive "$pid" && { echo "containerd $NAME did not stop" >&2; exit 1; }
  fi
  echo "$NAME stopped (state kept)" >&2
  exit 0
fi

# Container ids known to this instance (bundle dirs), for the cgroup sweep.
ids=$(ls "$STATE/io.containerd.runtime.v2.task/k8s.io" 2>/dev/null || true)

# 1. Containers still known to a runtime (the shim uses <Root>/<namespace> as --root).
for root in "$RT_ROOT"/*/*/; do
  [ -d "$root" ] || continue
  handler=$(basename "$(dirname "$root")")
  bin=$(awk -v h="runtimes.$handler.options]" 'index($0, h) {f=1; next} f && /BinaryName/ {gsub(/[" ]/, "", $3); print $3; exit}' "$CFG" 2>/dev/null || true)
  [ -x "$bin" ] || continue
  for id in $(ls "$root"); do
    [ -d "$root/$id" ] || continue
    ids="$ids $id"
    "$bin" --root "$root" kill "$id" KILL >/dev/null 2>&1 || true
    "$bin" --root "$root" delete -f "$id" >/dev/null 2>&1 || true
  done
done

# 2. containerd itself.
if ug_running; then
  pid=$(cat "$PIDFILE")
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 1 100); do ug_alive "$pid" || break; sleep 0.05; done
  kill -KILL "$pid" 2>/dev/null || true
fi

# 3. Shims (they outlive containerd by design) and whatever still runs under them.
pids=$(ug_shim_pids)
if [ -n "$pids" ]; then
  for s in $pids; do
    kids=$(ps -o pid= --ppid "$s" 2>/dev/null || true)
    # shellcheck disable=SC2086
    [ -z "$kids" ] || kill -KILL $kids 2>/dev/null || true
  done
  # shellcheck disable=SC2086
  kill -TERM $pids 2>/dev/null || true
  for _ in $(seq 1 20); do [ -z "$(ug_shim_pids)" ] && break; sleep 0.05; done
  pids=$(ug_shim_pids)
  # shellcheck disable=SC2086
  [ -z "$pids" ] || kill -KILL $pids 2>/dev/null || true
fi

# 4. Mounts (rootfs overlays, shm, pinned netns/userns) under our dirs, deepest first.
for _ in 1 2 3; do
  m=$(ug_mounts)
  [ -z "$m" ] && break
  while read -r mp; do umount "$mp" 2>/dev/null || umount -l "$mp" 2>/dev/null || true; done <<<"$m"
done

# 5. Cgroups of our containers (a runtime's delete removes them; killed leftovers keep them).
for id in $ids; do
  for d in /sys/fs/cgroup/*/*/"$id" /sys/fs/cgroup/*/"$id" /sys/fs/cgroup/*/k8s.io/"$id"; do
    [ -d "$d" ] && rmdir "$d" 2>/dev/null || true
  done
done

# 6. Network namespace (takes the bridge and the host ends of the veths with it), files.
if ip netns list | grep -qw "$NETNS"; then ip netns del "$NETNS"; fi
rm -rf "$STATE"
[ -n "${KEEP_ROOT:-}" ] || rm -rf "$ROOTDIR"
left=$(ug_mounts; ug_shim_pids)
[ -z "$left" ] || { echo "containerd $NAME left: $left" >&2; exit 1; }
echo "$NAME stopped and cleaned" >&2
