#!/bin/sh
# The SELinux lane's CRI run (/lane/cri.sh in the guest, called by /sbin/lane-init after the
# direct self-test): starts containerd 2.1 with enable_selinux = true and the handlers
# run.sh registered in /etc/containerd/config.toml, imports the pause and probe images,
# runs `usernsguard selftest --cri-config` against it and prints that JSON between
# LANE-CRI-JSON-BEGIN/END. Problems are printed as "LANE: cri ..." lines with the tail of
# containerd's log; run.sh fails when the JSON block is missing.
sock=/run/containerd/containerd.sock
config=/etc/containerd/config.toml
log=/lane/containerd.log
probe_ref=$(cat /lane/images/probe.ref)
# containerd runs containerd-shim-runc-v2 from its PATH: 2.1's own shim, first.
export PATH=/opt/containerd/bin:$PATH

up() { cut -d' ' -f1 /proc/uptime; }
ctrd_tail() { grep -E 'level=(error|warning|fatal)' "$log" | tail -n "${1:-15}" | sed 's/^/LANE-CTRD: /'; }

echo "LANE: cri: starting containerd at uptime $(up)s"
containerd --config "$config" > "$log" 2>&1 &
ctrd=$!
i=0
until grep -q 'containerd successfully booted' "$log"; do
    i=$((i + 1))
    if [ $i -gt 1200 ] || ! kill -0 $ctrd 2> /dev/null; then
        echo "LANE: cri: containerd did not come up (after $((i / 10)) s)"
        tail -n 20 "$log" | sed 's/^/LANE-CTRD: /'
        exit 1
    fi
    sleep 0.1
done
echo "LANE: cri: containerd ready at uptime $(up)s"

for archive in /lane/images/*.tar; do
    if ! ctr --address "$sock" --namespace k8s.io images import --snapshotter overlayfs "$archive" > /dev/null 2> /lane/import.err; then
        echo "LANE: cri: ctr images import $archive failed: $(tail -n 3 /lane/import.err | tr '\n' ' ')"
        exit 1
    fi
done
echo "LANE: cri: images imported at uptime $(up)s: $(ctr --address "$sock" --namespace k8s.io images ls -q | tr '\n' ' ')"

usernsguard selftest --cri-config "$config" --probe-image "$probe_ref" --timeout 60s --output json \
    > /lane/cri.json 2> /lane/cri-err.txt
rc=$?
echo "LANE: cri payload exit=$rc at uptime $(up)s"
sed 's/^/LANE-CRI-STDERR: /' /lane/cri-err.txt | tail -n 30
ctrd_tail 15
echo "LANE-CRI-JSON-BEGIN"
base64 < /lane/cri.json
echo "LANE-CRI-JSON-END"
kill $ctrd 2> /dev/null
exit 0
