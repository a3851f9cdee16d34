#!/usr/bin/env bash
# Packs a directory into a one-layer OCI image archive that `ctr images import` reads, with no
# registry and no image builder: oci-archive.sh ROOTFS NAME:TAG OUT.tar ENTRYPOINT [ARG...]
# The archive is reproducible: file times, owners and order are fixed.
set -euo pipefail
[ $# -ge 4 ] || { echo "usage: $0 ROOTFS NAME:TAG OUT.tar ENTRYPOINT [ARG...]" >&2; exit 2; }
rootfs=$1 name=$2 out=$3
shift 3
[ -d "$rootfs" ] || { echo "oci-archive: rootfs $rootfs is not a directory" >&2; exit 2; }

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
blobs=$work/blobs/sha256
mkdir -p "$blobs"

# put FILE: stores FILE as a blob; prints "DIGEST SIZE".
put() {
  local sum size
  sum=$(sha256sum "$1" | cut -d' ' -f1)
  size=$(stat -c %s "$1")
  mv "$1" "$blobs/$sum"
  echo "sha256:$sum $size"
}
json_strings() { printf '%s\n' "$@" | jq -R . | jq -cs .; }

tar --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner --format=gnu \
  -C "$rootfs" -cf "$work/layer" .
read -r layer layer_size < <(put "$work/layer")

jq -cn --arg layer "$layer" --argjson entrypoint "$(json_strings "$@")" '{
  architecture: "amd64", os: "linux",
  config: {Entrypoint: $entrypoint, WorkingDir: "/",
    Env: ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]},
  rootfs: {type: "layers", diff_ids: [$layer]}
}' >"$work/config"
read -r config config_size < <(put "$work/config")

jq -cn --arg config "$config" --argjson config_size "$config_size" \
  --arg layer "$layer" --argjson layer_size "$layer_size" '{
  schemaVersion: 2, mediaType: "application/vnd.oci.image.manifest.v1+json",
  config: {mediaType: "application/vnd.oci.image.config.v1+json", digest: $config, size: $config_size},
  layers: [{mediaType: "application/vnd.oci.image.layer.v1.tar", digest: $layer, size: $layer_size}]
}' >"$work/manifest"
read -r manifest manifest_size < <(put "$work/manifest")

jq -cn --arg manifest "$manifest" --argjson size "$manifest_size" --arg name "$name" '{
  schemaVersion: 2, mediaType: "application/vnd.oci.image.index.v1+json",
  manifests: [{mediaType: "application/vnd.oci.image.manifest.v1+json", digest: $manifest, size: $size,
    platform: {architecture: "amd64", os: "linux"},
    annotations: {"io.containerd.image.name": $name, "org.opencontainers.image.ref.name": $name}}]
}' >"$work/index.json"
echo '{"imageLayoutVersion":"1.0.0"}' >"$work/oci-layout"

mkdir -p "$(dirname "$out")"
tar --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner --format=gnu \
  -C "$work" -cf "$out.tmp" oci-layout index.json blobs
mv "$out.tmp" "$out"
