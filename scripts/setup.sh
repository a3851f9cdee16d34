#!/usr/bin/env bash
# Installs what the demo and the tests need on a Debian machine, only when missing:
# QEMU 10 (bookworm-backports), qemu-img, OVMF, the guest and cloud image build tools, Node.js and
# npm (the dashboard's build), Chromium and its WebDriver (the dashboard's browser tests),
# cargo-nextest, the dashboard's script (dashboard/dist/app.js, embedded in the controller), the
# test guest, the cloud image, the container runtime of the one-node cluster (scripts/cluster.sh),
# and the S3-compatible server of the backup tests (versitygw, built from its Go module).
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
export DEBIAN_FRONTEND=noninteractive

need_pkgs=()
qemu_major() { qemu-system-x86_64 --version 2>/dev/null | sed -n 's/.*version \([0-9]*\)\..*/\1/p' | head -n1; }
major=$(qemu_major || true)
if [ -z "$major" ] || [ "$major" -lt 9 ]; then need_pkgs+=(qemu-system-x86); fi
command -v qemu-img >/dev/null || need_pkgs+=(qemu-utils)
command -v mkfs.ext4 >/dev/null || need_pkgs+=(e2fsprogs)
command -v cpio >/dev/null || need_pkgs+=(cpio)
command -v zstd >/dev/null || need_pkgs+=(zstd)
# scripts/cluster.sh: Debian's containerd, runc and CNI plugins (in /usr/lib/cni), what the kubelet
# and kube-proxy call, and what packs images.
command -v containerd >/dev/null || need_pkgs+=(containerd)
command -v runc >/dev/null || need_pkgs+=(runc)
[ -x /usr/lib/cni/bridge ] || need_pkgs+=(containernetworking-plugins)
command -v iptables >/dev/null || need_pkgs+=(iptables)
# The agent's node network (--bridge): bridges and taps with iproute2, NAT with iptables.
command -v ip >/dev/null || need_pkgs+=(iproute2)
command -v conntrack >/dev/null || need_pkgs+=(conntrack)
command -v jq >/dev/null || need_pkgs+=(jq)
# The image import benchmark compares the agent with curl.
command -v curl >/dev/null || need_pkgs+=(curl)
[ -f /usr/share/OVMF/OVMF_CODE_4M.fd ] || need_pkgs+=(ovmf)
# The cloud image build (images/cloud/build.sh).
command -v mmdebstrap >/dev/null || need_pkgs+=(mmdebstrap)
command -v grub-mkimage >/dev/null || need_pkgs+=(grub-common)
command -v sfdisk >/dev/null || need_pkgs+=(fdisk)
command -v mkfs.vfat >/dev/null || need_pkgs+=(dosfstools)
command -v mcopy >/dev/null || need_pkgs+=(mtools)
command -v npm >/dev/null || need_pkgs+=(nodejs npm)
command -v chromium >/dev/null || need_pkgs+=(chromium)
command -v chromedriver >/dev/null || need_pkgs+=(chromium-driver)

if [ ${#need_pkgs[@]} -gt 0 ]; then
  codename=$(. /etc/os-release && echo "${VERSION_CODENAME:-bookworm}")
  list=/etc/apt/sources.list.d/hypersdk-backports.list
  if [ "$codename" = bookworm ] && ! grep -rqs "bookworm-backports" /etc/apt/sources.list /etc/apt/sources.list.d/; then
    echo "setup: enabling bookworm-backports for QEMU 10"
    echo "deb http://deb.debian.org/debian bookworm-backports main" | $SUDO tee "$list" >/dev/null
  fi
  echo "setup: installing ${need_pkgs[*]}"
  $SUDO apt-get update -qq
  target=()
  [ "$codename" = bookworm ] && target=(-t bookworm-backports)
  $SUDO apt-get install -y -qq --no-install-recommends "${target[@]}" "${need_pkgs[@]}" >/dev/null
fi
echo "setup: $(qemu-system-x86_64 --version | head -n1)"

if ! cargo nextest --version >/dev/null 2>&1; then
  echo "setup: installing cargo-nextest"
  cargo install --locked cargo-nextest
fi

# The dashboard's script, embedded in the controller binary (its build stops without it).
if [ ! -d dashboard/node_modules ] || [ dashboard/package-lock.json -nt dashboard/node_modules/.package-lock.json ]; then
  echo "setup: installing the dashboard's build tools (npm ci in dashboard/)"
  (cd dashboard && npm ci --no-audit --no-fund --loglevel=error)
fi
echo "setup: building the dashboard (dashboard/dist/app.js)"
(cd dashboard && npm run --silent build)

images/guest/build.sh target/guest
images/cloud/build.sh target/cloud

# The S3-compatible server of the backup tests and benchmark: Versity Gateway, built from its Go
# module (pinned) into target/s3/bin, with Go's module and build caches kept under target/s3.
VERSITYGW_VERSION=v1.8.0
if [ ! -x target/s3/bin/versitygw ] || [ "$(cat target/s3/version 2>/dev/null)" != "$VERSITYGW_VERSION" ]; then
  command -v go >/dev/null || { echo "setup: Go is needed to build versitygw (apt-get install golang)" >&2; exit 1; }
  echo "setup: building versitygw $VERSITYGW_VERSION (S3 server of the backup tests) into target/s3/bin; the first build downloads its modules and takes minutes"
  mkdir -p target/s3
  GOFLAGS=-mod=mod GOBIN="$PWD/target/s3/bin" GOPATH="$PWD/target/s3/go" GOCACHE="$PWD/target/s3/cache" \
    go install "github.com/versity/versitygw/cmd/versitygw@$VERSITYGW_VERSION"
  echo "$VERSITYGW_VERSION" >target/s3/version
  echo "setup: versitygw ready ($(target/s3/bin/versitygw --version 2>/dev/null | head -n1))"
fi
