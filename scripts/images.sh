#!/usr/bin/env bash
# Builds HyperSDK's container images as OCI archives under target/images/, with no registry and
# no image builder: scripts/images.sh [--import]
#   hypersdk-agent:TAG       the agent, hyperctl (its probes), QEMU and qemu-img from Debian's
#                            packages on this machine (scripts/setup.sh installs them), with the
#                            libraries and firmware they load (in a cluster the agent runs the
#                            node's QEMU, so that VMs outlive the pod: see --host-launch)
#   hypersdk-controller:TAG  the controller and the libraries it links
# TAG is the workspace version (Cargo.toml), or $HYPERSDK_IMAGE_TAG. --import loads both into
# the cluster of scripts/cluster.sh. Prints each archive's path.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=target/images
TAG=${HYPERSDK_IMAGE_TAG:-$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n1)}
REPO=localhost/hypersdk
CONTAINERD_SOCK=/run/hypersdk-cluster/containerd.sock

say() { echo "images: $*"; }

# with_libs ROOTFS FILE...: copies each FILE and the shared libraries it loads into ROOTFS,
# at the same paths.
with_libs() {
  local rootfs=$1 file lib
  shift
  for file in "$@"; do
    cp --parents -L "$file" "$rootfs"
    for lib in $(ldd "$file" 2>/dev/null | awk '$2 == "=>" && $3 ~ /^\// {print $3} $1 ~ /^\// {print $1}'); do
      [ -e "$rootfs$lib" ] || cp --parents -L "$lib" "$rootfs"
    done
  done
}

# base ROOTFS: what every image has besides its programs: a root user, /tmp.
base() {
  local rootfs=$1
  mkdir -p "$rootfs/etc" "$rootfs/tmp" "$rootfs/var/lib"
  chmod 1777 "$rootfs/tmp"
  echo "root:x:0:0:root:/root:/sbin/nologin" >"$rootfs/etc/passwd"
  echo "root:x:0:" >"$rootfs/etc/group"
}

agent() {
  local rootfs=$1 qemu qemu_img modules
  qemu=$(command -v qemu-system-x86_64)
  qemu_img=$(command -v qemu-img)
  base "$rootfs"
  with_libs "$rootfs" target/release/hypersdk-agent target/release/hyperctl "$qemu" "$qemu_img"
  mv "$rootfs/target/release/hypersdk-agent" "$rootfs/target/release/hyperctl" "$rootfs/usr/bin/"
  rm -rf "$rootfs/target"
  # QEMU's firmware and option ROMs (Debian links them from seabios and ipxe: copied as files).
  mkdir -p "$rootfs/usr/share"
  cp -rL /usr/share/qemu "$rootfs/usr/share/qemu"
  [ ! -d /usr/share/seabios ] || cp -rL /usr/share/seabios "$rootfs/usr/share/seabios"
  # QEMU's loadable modules (Debian builds TCG and some devices as modules).
  modules=/usr/lib/x86_64-linux-gnu/qemu
  # shellcheck disable=SC2046 # one module a word
  [ ! -d "$modules" ] || with_libs "$rootfs" $(find "$modules" -name '*.so')
}

controller() {
  local rootfs=$1
  base "$rootfs"
  with_libs "$rootfs" target/release/hypersdk-controller
  mkdir -p "$rootfs/usr/bin"
  mv "$rootfs/target/release/hypersdk-controller" "$rootfs/usr/bin/hypersdk-controller"
  rm -rf "$rootfs/target"
}

# image NAME ENTRYPOINT: builds target/images/NAME-TAG.tar.
image() {
  local name=$1 entrypoint=$2 rootfs
  rootfs=$(mktemp -d)
  "${name#hypersdk-}" "$rootfs"
  scripts/oci-archive.sh "$rootfs" "$REPO/$name:$TAG" "$OUT/$name-$TAG.tar" "$entrypoint"
  rm -rf "$rootfs"
  say "$OUT/$name-$TAG.tar ($REPO/$name:$TAG, $(du -h "$OUT/$name-$TAG.tar" | cut -f1))"
}

say "building the release binaries"
nice cargo build --release --locked -p hypersdk-agent -p hypersdk-controller -p hyperctl
image hypersdk-agent /usr/bin/hypersdk-agent
image hypersdk-controller /usr/bin/hypersdk-controller

if [ "${1:-}" = --import ]; then
  for name in hypersdk-agent hypersdk-controller; do
    say "importing $REPO/$name:$TAG into the cluster's containerd"
    ctr --address "$CONTAINERD_SOCK" -n k8s.io images import "$OUT/$name-$TAG.tar" >/dev/null
  done
fi
