#!/bin/sh
# Diagnostic payload (SELINUX_LANE_MODE=repro): the motivating failure reproduced with the
# runtimes alone, no usernsguard involved. Runs a busybox bundle through runc and crun
# with a runtime-made userns, with a pre-created userns+netns (as containerd 2.x does),
# and with the pre-created one but no mount label. Prints one text block per run.
# The label is the one the loaded policy gave /dev/mqueue (mounted after the load); busybox
# cannot read xattrs, so the caller passes it (REPRO_LABEL) for this diagnostic only.
label=${REPRO_LABEL:-system_u:object_r:tmpfs_t:s0}
# Which labels the loaded policy accepts (a write to selinuxfs' context node validates one).
for l in "$label" system_u:object_r:container_file_t:s0; do
    if printf %s "$l" > /sys/fs/selinux/context 2>/dev/null; then v=valid; else v=invalid; fi
    echo "== label $l: $v in the loaded policy =="
done
work=/run/repro
rm -rf "$work"; mkdir -p "$work/rootfs/bin"
cp /bin/busybox "$work/rootfs/bin/busybox"
ln -s busybox "$work/rootfs/bin/sh"
ln -s busybox "$work/rootfs/bin/stat"
mkdir -p "$work/rootfs/proc" "$work/rootfs/dev" "$work/rootfs/sys"

unshare -U -n sleep 600 &
holder=$!
sleep 0.2
echo "0 100000 65536" > /proc/$holder/uid_map
echo "0 100000 65536" > /proc/$holder/gid_map

config() { # $1 = userns/netns mode (created|joined), $2 = with label (yes|no)
    if [ "$1" = joined ]; then
        userns="{\"type\":\"user\",\"path\":\"/proc/$holder/ns/user\"},{\"type\":\"network\",\"path\":\"/proc/$holder/ns/net\"}"
    else
        userns='{"type":"user"},{"type":"network"}'
    fi
    lbl=""
    [ "$2" = yes ] && lbl=",\"mountLabel\":\"$label\""
    cat > "$work/config.json" <<JSON
{"ociVersion":"1.0.2",
 "process":{"terminal":false,"user":{"uid":0,"gid":0},"cwd":"/","env":["PATH=/bin"],
   "args":["/bin/sh","-c","echo mqueue-owner=\$(stat -c %u:%g /dev/mqueue)"]},
 "root":{"path":"rootfs","readonly":true},
 "hostname":"probe",
 "mounts":[
  {"destination":"/proc","type":"proc","source":"proc"},
  {"destination":"/dev","type":"tmpfs","source":"tmpfs","options":["nosuid","mode=755","size=1m"]},
  {"destination":"/dev/mqueue","type":"mqueue","source":"mqueue","options":["nosuid","noexec","nodev"]},
  {"destination":"/sys","type":"sysfs","source":"sysfs","options":["nosuid","noexec","nodev","ro"]}],
 "linux":{
  "uidMappings":[{"containerID":0,"hostID":100000,"size":65536}],
  "gidMappings":[{"containerID":0,"hostID":100000,"size":65536}],
  "namespaces":[{"type":"pid"},{"type":"ipc"},{"type":"uts"},{"type":"mount"},$userns]$lbl}}
JSON
}

n=0
for rt in runc crun; do
    for case in created:yes joined:yes joined:no; do
        n=$((n + 1))
        config "${case%%:*}" "${case##*:}"
        extra=""
        [ "$rt" = crun ] && extra="--cgroup-manager=disabled"
        out=$(timeout 60 $rt $extra run -b "$work" "repro$n" 2>&1)
        echo "== $rt ${case%%:*} label=${case##*:} exit=$? =="
        echo "$out"
    done
done
kill $holder
