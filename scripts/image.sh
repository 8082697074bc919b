#!/usr/bin/env bash
# Builds the usernsguard container image offline with buildah (vfs storage, FROM scratch):
# the static musl `usernsguard` (stripped) as the entrypoint, and the runtimes a
# RuntimeProfile with `source: Bundled` installs, each pinned by sha256 below. Exports it as
# an OCI archive (what a registry push would carry) and as a docker archive (what
# `ctr images import` reads in the tests), tagged as the chart's default image, and prints
# both paths and the uncompressed size.
#
#   scripts/image.sh [OUT_DIR]        (default target/image)
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
out=${1:-target/image}

version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
app_version=$(sed -n 's/^appVersion: "\(.*\)"/\1/p' charts/usernsguard/Chart.yaml)
repository=$(sed -n 's/^  repository: //p' charts/usernsguard/values.yaml | head -1)
[ "$version" = "$app_version" ] || { echo "image: Cargo version $version != chart appVersion $app_version" >&2; exit 1; }
ref="$repository:$version"

# Bundled runtimes: name in the image -> source file and its pinned sha256. The image holds
# them at /usr/local/lib/usernsguard/runtimes/<name> (the agent's --bundled-runtimes).
bundled=(
  "runc ../shared/runtimes/runc-1.4.3 bc58730a7f0b625b6fef86f01f94040a0ec4c91f3b20ff505bfb3b3cc68aa976"
)

for tool in buildah strip python3; do
  command -v "$tool" >/dev/null || { echo "image: $tool is missing (scripts/install-deps.sh all)" >&2; exit 1; }
done
binary=$(scripts/build-static.sh musl)

ctx=$(mktemp -d /tmp/ug-image.XXXXXX)
store=$ctx/store
trap 'rm -rf "$ctx"' EXIT
mkdir -p "$ctx/root/usr/local/bin" "$ctx/root/usr/local/lib/usernsguard/runtimes" "$ctx/root/tmp"
strip -o "$ctx/root/usr/local/bin/usernsguard" "$binary"
for entry in "${bundled[@]}"; do
  read -r name src sum <<<"$entry"
  echo "$sum  $src" | sha256sum --check --quiet - || { echo "image: $src does not match its pinned sha256" >&2; exit 1; }
  install -m 0755 "$src" "$ctx/root/usr/local/lib/usernsguard/runtimes/$name"
done
chmod 1777 "$ctx/root/tmp"

B=(buildah --storage-driver vfs --root "$store/root" --runroot "$store/run")
ctr=$("${B[@]}" from scratch)
"${B[@]}" copy "$ctr" "$ctx/root/" / >/dev/null
"${B[@]}" config \
  --entrypoint '["/usr/local/bin/usernsguard"]' --cmd '["--help"]' \
  --os linux --arch amd64 \
  --label org.opencontainers.image.title=usernsguard \
  --label "org.opencontainers.image.version=$version" \
  --label org.opencontainers.image.licenses=Apache-2.0 \
  "$ctr"
"${B[@]}" commit -q --rm --timestamp 0 --format oci "$ctr" "$ref" >/dev/null
mkdir -p "$out"
oci=$out/usernsguard-$version.oci.tar
docker=$out/usernsguard-$version.docker.tar
rm -f "$oci" "$docker"
"${B[@]}" push -q "$ref" "oci-archive:$oci:$ref"
"${B[@]}" push -q "$ref" "docker-archive:$docker:$ref"

# Uncompressed size: the sum of the layers as tar streams (what a node unpacks).
size=$(python3 - "$oci" <<'EOF'
import gzip, json, sys, tarfile
with tarfile.open(sys.argv[1]) as t:
    blob = lambda d: t.extractfile("blobs/sha256/" + d.split(":", 1)[1]).read()
    index = json.loads(t.extractfile("index.json").read())
    manifest = json.loads(blob(index["manifests"][0]["digest"]))
    total = 0
    for layer in manifest["layers"]:
        data = blob(layer["digest"])
        total += len(gzip.decompress(data)) if "gzip" in layer["mediaType"] else len(data)
print(total)
EOF
)
echo "image: $ref, $(awk -v s="$size" 'BEGIN { printf "%.1f", s / 1048576 }') MiB uncompressed (target < 40 MB)" >&2
echo "$oci"
echo "$docker"
