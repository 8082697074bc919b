#!/bin/busybox sh
# shellcheck shell=dash
# Stage 1 of the SELinux lane guest (PID 1 from the initramfs).
# Loads the few modules an ext4 root on a virtio disk needs, mounts it and hands over.
# The real root is ext4 rather than the initramfs because the self-test's idmap-mount
# check must see the same filesystem kind as the host it is compared with (tmpfs has no
# idmapped mounts before Linux 6.3), and because pivot_root cannot leave an initramfs.
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
# Leading newline: the firmware leaves escape sequences on the current console line.
echo
echo "LANE: stage1 up"
while read -r mod; do
    [ -n "$mod" ] || continue
    # crc32c-intel may be refused on CPUs without SSE4.2; crc32c_generic covers it.
    insmod "/modules/$mod" 2>/dev/null || echo "LANE: insmod $mod failed (continuing)"
done < /modules/order
i=0
while [ ! -b /dev/vda ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
mkdir -p /newroot
if ! mount -t ext4 /dev/vda /newroot; then
    echo "LANE-FATAL: cannot mount the root disk /dev/vda"
    reboot -f
fi
umount /proc /sys /dev
exec switch_root /newroot /sbin/lane-init
