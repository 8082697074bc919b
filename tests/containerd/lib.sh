# shellcheck shell=bash
# Shared settings of the private containerd test instances (see README.md here).
#   ug_instance NAME VERSION    VERSION 16 = Debian 12's containerd 1.6 (config v2),
#                               21 = Debian unstable's containerd 2.1 (config v3)
# sets NAME, VER, BIN, ROOTDIR, STATE, SOCK, CFG, LOG, PIDFILE, NETNS, BRIDGE, SUBNET, ...
set -euo pipefail

UG_HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
UG_REPO=$(cd "$UG_HERE/../.." && pwd)
CACHE=${USERNSGUARD_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/usernsguard}
PAUSE_REF=localhost/usernsguard/pause:test
# The real runc releases of ../shared/runtimes (outside the repository, as on CI machines).
RUNTIMES_DIR=${RUNTIMES_DIR:-$UG_REPO/../shared/runtimes}
LOG_LEVEL=${LOG_LEVEL:-info}
ENABLE_SELINUX=${ENABLE_SELINUX:-false}

# Handlers as "name=binary" words; the default is every runtime this machine has.
ug_default_handlers() {
  echo "runc=/usr/sbin/runc crun=/usr/bin/crun" \
    "runc-1-2-0=$RUNTIMES_DIR/runc-1.2.0 runc-1-2-1=$RUNTIMES_DIR/runc-1.2.1" \
    "runc-1-3-6=$RUNTIMES_DIR/runc-1.3.6 runc-1-4-3=$RUNTIMES_DIR/runc-1.4.3"
}

ug_instance() {
  NAME=$1 VER=$2
  case "$VER" in
    16) BIN=/usr/bin ;;
    21) BIN=$CACHE/containerd-2.1/usr/bin ;;
    *) echo "containerd version must be 16 or 21, got $VER" >&2; return 2 ;;
  esac
  [[ "$NAME" =~ ^[a-z0-9-]{1,24}$ ]] || { echo "instance name must be [a-z0-9-]{1,24}: $NAME" >&2; return 2; }
  ROOTDIR=/var/lib/usernsguard-test/$NAME
  STATE=/run/usernsguard-test/$NAME
  SOCK=$STATE/containerd.sock           # containerd refuses sockets over 104 bytes (ttrpc adds 6)
  CFG=${UG_CONFIG:-$STATE/config.toml}
  LOG=$STATE/containerd.log
  PIDFILE=$STATE/containerd.pid
  NETNS=ug-$NAME
  local h; h=$(printf '%s' "$NAME" | cksum | cut -d' ' -f1)
  BRIDGE=ugbr$((h % 100000))            # at most 15 characters
  SUBNET=10.$((200 + h % 50)).$((h / 50 % 250)).0/24   # only inside the private netns
  CNI_CONF_DIR=$STATE/cni/net.d
  CNI_BIN_DIR=/usr/lib/cni
  RT_ROOT=$STATE/rt                     # per-handler runtime state roots: $RT_ROOT/<handler>
  CTR=("$BIN/ctr" --address "$SOCK" --namespace k8s.io)
}

ug_ensure_containerd_21() {
  [ -x "$CACHE/containerd-2.1/usr/bin/containerd" ] && return 0
  local tool=$UG_REPO/../shared/tools/debian-unstable.sh
  [ -x "$tool" ] || { echo "cannot fetch containerd 2.1: $tool is missing" >&2; return 1; }
  "$tool" "$CACHE/containerd-2.1" containerd >&2
}

ug_write_cni() {
  mkdir -p "$CNI_CONF_DIR" "$STATE/cni/ipam"
  cat >"$CNI_CONF_DIR/10-$NAME.conflist" <<JSON
{
  "cniVersion": "1.0.0",
  "name": "$NAME",
  "plugins": [
    {
      "type": "bridge",
      "bridge": "$BRIDGE",
      "isGateway": true,
      "ipMasq": false,
      "ipam": { "type": "host-local", "ranges": [[{ "subnet": "$SUBNET" }]], "dataDir": "$STATE/cni/ipam" }
    }
  ]
}
JSON
}

# The runtime handler tables for the CRI plugin table $1 (v2 or v3 name).
ug_runtimes_toml() {
  local table=$1 h name bin
  for h in ${UG_HANDLERS:-$(ug_default_handlers)}; do
    name=${h%%=*} bin=${h#*=}
    [ -x "$bin" ] || { echo "handler $name: $bin is not an executable" >&2; return 1; }
    cat <<TOML

[$table.runtimes.$name]
  runtime_type = "io.containerd.runc.v2"
  [$table.runtimes.$name.options]
    BinaryName = "$bin"
    Root = "$RT_ROOT/$name"
TOML
  done
}

ug_write_config() {
  mkdir -p "$STATE" "$ROOTDIR"
  local common
  common=$(cat <<TOML
root = "$ROOTDIR"
state = "$STATE"
disabled_plugins = [
  "io.containerd.snapshotter.v1.aufs",
  "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.zfs",
  "io.containerd.snapshotter.v1.devmapper",
]

[grpc]
  address = "$SOCK"

[ttrpc]
  address = "$SOCK.ttrpc"

[debug]
  level = "$LOG_LEVEL"
TOML
)
  if [ "$VER" = 16 ]; then
    cat >"$CFG" <<TOML
version = 2
$common

[plugins."io.containerd.internal.v1.opt"]
  path = "$STATE/opt"

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "$PAUSE_REF"
  restrict_oom_score_adj = true
  enable_selinux = $ENABLE_SELINUX
  netns_mounts_under_state_dir = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"

[plugins."io.containerd.grpc.v1.cri".containerd]
  snapshotter = "overlayfs"
  default_runtime_name = "runc"
$(ug_runtimes_toml 'plugins."io.containerd.grpc.v1.cri".containerd')

[plugins."io.containerd.grpc.v1.cri".cni]
  bin_dir = "$CNI_BIN_DIR"
  conf_dir = "$CNI_CONF_DIR"
  max_conf_num = 1
TOML
  else
    cat >"$CFG" <<TOML
version = 3
$common

[plugins."io.containerd.internal.v1.opt"]
  path = "$STATE/opt"

[plugins."io.containerd.nri.v1.nri"]
  disable = true

[plugins."io.containerd.image-verifier.v1.bindir"]
  bin_dir = "$STATE/opt/image-verifier/bin"

[plugins."io.containerd.grpc.v1.cri"]
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"

[plugins."io.containerd.cri.v1.images"]
  snapshotter = "overlayfs"

[plugins."io.containerd.cri.v1.images".pinned_images]
  sandbox = "$PAUSE_REF"

[plugins."io.containerd.cri.v1.runtime"]
  restrict_oom_score_adj = true
  enable_selinux = $ENABLE_SELINUX
  netns_mounts_under_state_dir = true
  cdi_spec_dirs = []

[plugins."io.containerd.cri.v1.runtime".containerd]
  default_runtime_name = "runc"
$(ug_runtimes_toml 'plugins."io.containerd.cri.v1.runtime".containerd')

[plugins."io.containerd.cri.v1.runtime".cni]
  bin_dirs = ["$CNI_BIN_DIR"]
  conf_dir = "$CNI_CONF_DIR"
  max_conf_num = 1
TOML
  fi
}

# Alive and not a zombie (PID 1 here is no real init and reaps late; kill -0 succeeds on zombies).
ug_alive() { [ -r "/proc/$1/stat" ] && [ "$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null)" != Z ]; }
ug_running() { [ -f "$PIDFILE" ] && ug_alive "$(cat "$PIDFILE")"; }

# Shims serving this instance: their command line names our socket.
ug_shim_pids() {
  local p
  for p in /proc/[0-9]*; do
    { tr "\0" " " <"$p/cmdline"; } 2>/dev/null | grep -q -- "-address $SOCK " && echo "${p#/proc/}"
  done
  return 0
}

# Mount points under our root and state dirs, deepest first.
ug_mounts() {
  awk -v r="$ROOTDIR/" -v s="$STATE/" '{ p=$5; if (index(p"/", r)==1 || index(p"/", s)==1) print p }' /proc/self/mountinfo \
    | awk '{ print length($0) " " $0 }' | sort -rn | cut -d' ' -f2-
}
