#!/usr/bin/env bash
# Boots the cached Debian 12 root (build-root.sh, built when missing) under
# `systemd-nspawn -b` on a throw-away overlay, in the background, and waits until systemd
# is up and containerd.service is active. Last line on stdout: INIT_PID=<container PID 1,
# host view>. Stop it with down.sh NAME, which leaves nothing behind.
#
# This host's PID 1 is not systemd, so there is no machined and no system bus:
# --register=no alone still asks the bus for a scope unit ("Failed to open system bus"),
# --keep-unit stops that. With --keep-unit nspawn puts its payload/ and supervisor/
# cgroups below its own cgroup, so it is started in a cgroup of its own per container.
set -euo pipefail
NAME=${1:?usage: up.sh NAME}
HERE=$(cd "$(dirname "$0")" && pwd)
CACHE=${USERNSGUARD_CACHE:-$HOME/.cache/usernsguard}
ROOT=$CACHE/nspawn-root
STATE=/run/usernsguard-nspawn/$NAME
BOOT_TIMEOUT=${BOOT_TIMEOUT:-60}

for tool in systemd-nspawn:systemd-container nsenter:util-linux; do
  command -v "${tool%%:*}" >/dev/null || { echo "${tool%%:*} is not installed: apt-get install ${tool#*:} (scripts/install-deps.sh does)" >&2; exit 1; }
done
"$HERE/build-root.sh" >&2
# Left over from runs that died: this name, and any container whose nspawn has exited
# (a state dir without nspawn.pid may be another run booting right now: left alone).
[ -d "$STATE" ] && "$HERE/down.sh" "$NAME" >&2
for d in /run/usernsguard-nspawn/*/; do
  pid=$(cat "$d/nspawn.pid" 2>/dev/null) || continue
  kill -0 "$pid" 2>/dev/null || "$HERE/down.sh" "$(basename "$d")" >&2
done
trap '"$HERE/down.sh" "$NAME" >&2' ERR
mkdir -p "$STATE"/{upper,work,merged}
# The cached root stays pristine: the container writes to the overlay's upper dir.
mount -t overlay overlay -o "lowerdir=$ROOT,upperdir=$STATE/upper,workdir=$STATE/work" "$STATE/merged"

CG=usernsguard-nspawn-$NAME
CGDIRS=
for h in /sys/fs/cgroup/systemd /sys/fs/cgroup/unified /sys/fs/cgroup; do
  [ -e "$h/cgroup.procs" ] || continue
  [ "$h" = /sys/fs/cgroup ] && [ -n "$CGDIRS" ] && continue   # hybrid hierarchy: done
  mkdir -p "$h/$CG"; CGDIRS="$CGDIRS $h/$CG"
done
echo "$CGDIRS" > "$STATE/cgroups"

t0=$(date +%s%N)
(
  for d in $CGDIRS; do echo "$BASHPID" > "$d/cgroup.procs"; done
  # --private-network: the container sees only its own lo. --console=pipe: no TTY.
  exec setsid systemd-nspawn -b -D "$STATE/merged" --machine="$NAME" --register=no --keep-unit \
    --private-network --console=pipe </dev/null >"$STATE/console.log" 2>&1
) &
NSPAWN=$!
echo "$NSPAWN" > "$STATE/nspawn.pid"

# The container's PID 1 is nspawn's descendant whose NSpid ends in 1.
INIT=
for _ in $(seq 200); do
  for c in $(pgrep -P "$NSPAWN" || true); do
    for p in $c $(pgrep -P "$c" || true); do
      grep -qE '^NSpid:\s+[0-9]+\s+1$' "/proc/$p/status" 2>/dev/null && INIT=$p
    done
  done
  [ -n "$INIT" ] && break
  kill -0 "$NSPAWN" 2>/dev/null || { echo "systemd-nspawn exited:" >&2; cat "$STATE/console.log" >&2; false; }
  sleep 0.05
done
[ -n "$INIT" ] || { echo "no container init after 10 s" >&2; false; }
echo "$INIT" > "$STATE/init.pid"

# The private socket exists once PID 1 is up; then ask it, from inside, to finish booting.
for _ in $(seq $((BOOT_TIMEOUT * 20))); do [ -S "/proc/$INIT/root/run/systemd/private" ] && break; sleep 0.05; done
state=$(timeout "$BOOT_TIMEOUT" nsenter -t "$INIT" -a systemctl is-system-running --wait 2>/dev/null || true)
containerd=$(nsenter -t "$INIT" -a systemctl is-active containerd.service || true)
echo "container $NAME: nspawn $NSPAWN, init $INIT, system '$state', containerd '$containerd' after $(( ($(date +%s%N) - t0) / 1000000 )) ms" >&2
case "$state" in
  running|degraded) ;;
  *) echo "the container did not boot (system state '$state'); console:" >&2; tail -20 "$STATE/console.log" >&2; false ;;
esac
[ "$containerd" = active ] || { nsenter -t "$INIT" -a systemctl status --no-pager containerd.service >&2 || true; false; }
trap - ERR
echo "INIT_PID=$INIT"
