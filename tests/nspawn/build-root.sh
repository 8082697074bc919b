#!/usr/bin/env bash
# Builds, once, the Debian 12 root that tests/nspawn/up.sh boots with systemd-nspawn -b:
# systemd as PID 1 and Debian's containerd 1.6 (with runc) enabled as a unit. No
# dbus-daemon: PID 1 serves /run/systemd/private itself, which is all the tests use.
#
#   root:  ${USERNSGUARD_CACHE:-~/.cache/usernsguard}/nspawn-root   (never booted directly)
#   .debs: ${USERNSGUARD_CACHE:-~/.cache/usernsguard}/debs          (reused on rebuild)
#
# The root is rebuilt when its marker is missing or names another recipe; bump RECIPE when
# the packages or the configuration below change. Needs debootstrap and network access the
# first time (about a minute, mostly dpkg).
set -euo pipefail
CACHE=${USERNSGUARD_CACHE:-$HOME/.cache/usernsguard}
ROOT=$CACHE/nspawn-root
DEBS=$CACHE/debs
MIRROR=${MIRROR:-http://deb.debian.org/debian}
PKGS=systemd,systemd-sysv,containerd
RECIPE="usernsguard nspawn root v1: bookworm minbase $PKGS"
MARK=.usernsguard-root

ready() { [ "$(cat "$ROOT/$MARK" 2>/dev/null)" = "$RECIPE" ]; }
ready && { echo "root ready: $ROOT"; exit 0; }

command -v debootstrap >/dev/null || { echo "debootstrap is not installed: apt-get install debootstrap (scripts/install-deps.sh does)" >&2; exit 1; }
mkdir -p "$CACHE" "$DEBS"
# One builder at a time; whoever waited finds the root ready.
exec 9>"$CACHE/nspawn-root.lock"
flock 9
ready && { echo "root ready: $ROOT"; exit 0; }

t0=$(date +%s%N)
NEW=$ROOT.new
rm -rf "$NEW"
debootstrap --variant=minbase --include="$PKGS" --cache-dir="$DEBS" bookworm "$NEW" "$MIRROR" >&2
echo usernsguard-ct > "$NEW/etc/hostname"
: > "$NEW/etc/machine-id"          # empty: systemd makes a transient one at each boot
rm -f "$NEW/etc/resolv.conf"; : > "$NEW/etc/resolv.conf"
# Units that only slow the boot down or wait for a network the container does not have.
for u in systemd-networkd-wait-online.service apt-daily.timer apt-daily-upgrade.timer e2scrub_all.timer fstrim.timer; do
  chroot "$NEW" systemctl mask "$u" >/dev/null
done
chroot "$NEW" systemctl enable containerd.service >/dev/null
chroot "$NEW" apt-get clean
grep -q '^version = 2' "$NEW/etc/containerd/config.toml"   # Debian's config, which the tests break and restore
echo "$RECIPE" > "$NEW/$MARK"
rm -rf "$ROOT"
mv "$NEW" "$ROOT"
echo "built $ROOT in $(( ($(date +%s%N) - t0) / 1000000 )) ms ($(du -sh "$ROOT" | cut -f1); .deb cache $(du -sh "$DEBS" | cut -f1))"
