#!/usr/bin/env bash
# Builds the local test images (no registry, no pull): the static "pause" sandbox image,
# and, when asked, a probe image holding one payload binary (with the shared libraries
# `ldd` names, so a debug build works too). Both are FROM scratch, built with buildah on
# vfs storage in a throwaway store, and exported as docker archives under the cache.
#   build-images.sh                      -> prints the pause archive
#   build-images.sh BINARY REF IN_IMAGE  -> also builds REF with BINARY at IN_IMAGE; prints
#                                           both archives (cached by the binary's content)
set -euo pipefail
source "$(dirname "$0")/lib.sh"
out=$CACHE/images
mkdir -p "$out"
for tool in buildah gcc; do command -v "$tool" >/dev/null || { echo "build-images: $tool is missing (scripts/install-deps.sh all)" >&2; exit 1; }; done

build_pause() {
  local archive=$out/pause-$(sha256sum "$UG_HERE/images/pause.c" | cut -c1-12).tar
  [ -s "$archive" ] && { echo "$archive"; return; }
  local store ctr mnt tmp
  store=$(mktemp -d /tmp/ug-buildah.XXXXXX)
  local B=(buildah --storage-driver vfs --root "$store/root" --runroot "$store/run")
  tmp=$(mktemp -d)
  gcc -static -Os -s -o "$tmp/pause" "$UG_HERE/images/pause.c"
  ctr=$("${B[@]}" from scratch)
  mnt=$("${B[@]}" mount "$ctr")
  install -m 0755 "$tmp/pause" "$mnt/pause"
  "${B[@]}" umount "$ctr" >/dev/null
  "${B[@]}" config --entrypoint '["/pause"]' --cmd '' --user 65535:65535 --os linux --arch amd64 "$ctr"
  "${B[@]}" commit -q --rm "$ctr" "$PAUSE_REF" >/dev/null
  "${B[@]}" push -q "$PAUSE_REF" "docker-archive:$archive.tmp:$PAUSE_REF"
  mv "$archive.tmp" "$archive"
  rm -rf "$tmp" "$store"
  echo "build-images: built $PAUSE_REF" >&2
  echo "$archive"
}

build_payload() { # binary ref in-image-path
  local bin=$1 ref=$2 dest=$3 key archive store ctr mnt lib
  key=$( { sha256sum "$bin" | cut -c1-16; echo "$ref $dest"; } | sha256sum | cut -c1-16)
  archive=$out/probe-$key.tar
  [ -s "$archive" ] && { echo "$archive"; return; }
  store=$(mktemp -d /tmp/ug-buildah.XXXXXX)
  local B=(buildah --storage-driver vfs --root "$store/root" --runroot "$store/run")
  ctr=$("${B[@]}" from scratch)
  mnt=$("${B[@]}" mount "$ctr")
  install -D -m 0755 "$bin" "$mnt$dest"
  # A dynamic payload (a debug build) takes its libraries along; a static one has none.
  for lib in $(ldd "$bin" 2>/dev/null | grep -o '/[^ ]*' || true); do
    install -D -m 0755 "$(readlink -f "$lib")" "$mnt$lib"
  done
  mkdir -p "$mnt/proc" "$mnt/sys" "$mnt/dev" "$mnt/tmp" "$mnt/etc"
  echo 'root:x:0:0:root:/:/nonexistent' >"$mnt/etc/passwd"
  "${B[@]}" umount "$ctr" >/dev/null
  "${B[@]}" config --entrypoint '[]' --cmd "[\"$dest\"]" --os linux --arch amd64 "$ctr"
  "${B[@]}" commit -q --rm "$ctr" "$ref" >/dev/null
  "${B[@]}" push -q "$ref" "docker-archive:$archive.tmp:$ref"
  mv "$archive.tmp" "$archive"
  rm -rf "$store"
  echo "build-images: built $ref from $bin" >&2
  echo "$archive"
}

build_pause
if [ $# -eq 3 ]; then
  build_payload "$@"
elif [ $# -ne 0 ]; then
  echo "usage: $0 [BINARY REF IN_IMAGE]" >&2
  exit 2
fi
