#!/usr/bin/env bash
# Starts a private containerd test instance and imports the test images.
#   start.sh NAME 16|21 [IMAGE_ARCHIVE...]
# Environment: UG_HANDLERS ("name=binary ..."; default: every runtime here), ENABLE_SELINUX,
# LOG_LEVEL, UG_CONFIG (start with this config file instead of a generated one; it must use
# this instance's root, state and socket), UG_KEEP_CONFIG=1 (restart with the config as it is
# now, e.g. after an installer changed it). Idempotent: a running instance only gets the
# images. Prints the socket path on stdout.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
ug_instance "${1:?usage: start.sh NAME 16|21 [IMAGE_ARCHIVE...]}" "${2:?usage: start.sh NAME 16|21}"
shift 2
[ "$VER" = 21 ] && ug_ensure_containerd_21
pause=$("$UG_HERE/build-images.sh")

if ug_running; then
  echo "$NAME already running (pid $(cat "$PIDFILE"))" >&2
else
  # Leftovers of a crashed run go first (the root, with its images, is kept).
  if [ -z "${UG_KEEP_CONFIG:-}" ] && { [ -d "$STATE" ] || [ -n "$(ug_shim_pids)" ]; }; then
    KEEP_ROOT=1 "$UG_HERE/stop.sh" "$NAME" "$VER" >/dev/null
  fi
  mkdir -p "$STATE" "$ROOTDIR"
  if [ -z "${UG_KEEP_CONFIG:-}" ]; then
    ug_write_cni
    [ -n "${UG_CONFIG:-}" ] || ug_write_config
  fi
  ip netns list | grep -qw "$NETNS" || ip netns add "$NETNS"
  ip netns exec "$NETNS" ip link set lo up
  : >"$LOG"
  t0=$(date +%s%N)
  # Only the network namespace is private (nsenter --net keeps the host mount namespace,
  # unlike `ip netns exec`). PATH puts this version's containerd-shim-runc-v2 first: 2.1
  # with 1.6's shim advertises no handler features.
  setsid nsenter --net="/run/netns/$NETNS" -- \
    env PATH="$BIN:/usr/sbin:/usr/bin:/sbin:/bin" "$BIN/containerd" --config "$CFG" \
    </dev/null >>"$LOG" 2>&1 &
  echo $! >"$PIDFILE"
  for _ in $(seq 1 500); do
    grep -q 'containerd successfully booted' "$LOG" && break
    ug_running || { echo "containerd $NAME exited:" >&2; tail -20 "$LOG" >&2; exit 1; }
    sleep 0.02
  done
  grep -q 'containerd successfully booted' "$LOG" || { echo "containerd $NAME not ready after 10 s:" >&2; tail -20 "$LOG" >&2; exit 1; }
  echo "$NAME ready in $(( ($(date +%s%N) - t0) / 1000000 )) ms (pid $(cat "$PIDFILE"))" >&2
fi

for archive in "$pause" "$@"; do
  ref=$(tar -xOf "$archive" manifest.json | python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["RepoTags"][0])')
  if ! "${CTR[@]}" images ls -q | grep -qx "$ref"; then
    "${CTR[@]}" images import --snapshotter overlayfs "$archive" >/dev/null
    echo "imported $ref" >&2
  fi
done
echo "$SOCK"
