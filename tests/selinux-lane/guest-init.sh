#!/bin/sh
# Stage 2 of the SELinux lane guest: PID 1 on the ext4 root (/sbin/lane-init).
# Loads the compiled policy, mounts the filesystems the self-test needs AFTER the load
# (so they carry labels from the loaded policy), runs the payload and prints its JSON
# base64-encoded between markers on the serial console, then powers the guest off.
# Every line the host checks starts with "LANE"; failures say LANE-FATAL.
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root

fatal() {
    echo "LANE-FATAL: $*"
    sync
    reboot -f
}

mount -t proc proc /proc || fatal "mount /proc"
mount -t sysfs sysfs /sys || fatal "mount /sys"
mount -t devtmpfs devtmpfs /dev || fatal "mount /dev"

[ -d /sys/fs/selinux ] || fatal "kernel has no selinuxfs: SELinux is not enabled (cmdline: $(cat /proc/cmdline))"
mount -t selinuxfs selinuxfs /sys/fs/selinux || fatal "mount selinuxfs"
# selinuxfs takes the policy in ONE write(2): cat writes in chunks and gets EINVAL.
dd if=/lane/policy.bin of=/sys/fs/selinux/load bs=64M 2>/dev/null || fatal "loading /lane/policy.bin into /sys/fs/selinux/load failed"
echo "LANE: policy loaded ($(wc -c < /lane/policy.bin) bytes, policyvers $(cat /sys/fs/selinux/policyvers))"
echo "LANE: selinux enforce=$(cat /sys/fs/selinux/enforce) context=$(tr -d '\0' < /proc/self/attr/current)"

# Mounted after the policy load, so the policy's fs_use rules label them.
mkdir -p /dev/mqueue /dev/shm /dev/pts
mount -t mqueue mqueue /dev/mqueue || fatal "mount /dev/mqueue"
mount -t tmpfs -o mode=1777 shm /dev/shm || fatal "mount /dev/shm"
mount -t devpts -o newinstance,ptmxmode=0666 devpts /dev/pts || fatal "mount /dev/pts"
mount -t cgroup2 cgroup2 /sys/fs/cgroup || fatal "mount cgroup2"
mount -t securityfs securityfs /sys/kernel/security 2>/dev/null || true
echo "LANE: lsm=$(cat /sys/kernel/security/lsm 2>/dev/null || true)"
# /proc/version ends with the package version: "... Debian 6.1.176-1 (2025-...)".
echo "LANE: kernel $(uname -r) $(grep -o 'Debian [0-9][^ ]*' /proc/version | tail -n1)"
ip link set lo up 2>/dev/null || true
mkdir -p /run /tmp && chmod 1777 /tmp

mode=$(sed -n 's/.*lane\.mode=\([a-z]*\).*/\1/p' /proc/cmdline)
echo "LANE: payload ${mode:-selftest} starting at uptime $(cut -d' ' -f1 /proc/uptime)s"
if [ "$mode" = repro ]; then
    /lane/repro.sh > /lane/out.json 2> /lane/err.txt
else
    usernsguard selftest --output json > /lane/out.json 2> /lane/err.txt
fi
rc=$?
echo "LANE: payload exit=$rc at uptime $(cut -d' ' -f1 /proc/uptime)s"
echo "LANE: payload stderr follows"
sed 's/^/LANE-STDERR: /' /lane/err.txt | tail -n 60
echo "LANE-JSON-BEGIN"
base64 < /lane/out.json
echo "LANE-JSON-END"
# The same failure through containerd 2.1 with enable_selinux = true (run.sh installs it
# in selftest mode unless SELINUX_LANE_NO_CRI=1).
[ "$mode" != repro ] && [ -x /lane/cri.sh ] && /lane/cri.sh
# AVC records, as the kernel prints them (no auditd here; rate-limited, so counts are "at
# least"). permissive=1: logged but allowed (container_t is permissive); permissive=0: a
# real denial. runc's setxattr EPERM produces neither.
dmesg | grep 'avc:  denied' > /lane/avc.txt
echo "LANE: avc denials: $(grep -c 'permissive=0' /lane/avc.txt) enforced, $(grep -c 'permissive=1' /lane/avc.txt) logged in permissive domains"
grep 'permissive=0' /lane/avc.txt | head -n 10 | sed 's/^/LANE-AVC: /'
echo "LANE: done"
sync
reboot -f
