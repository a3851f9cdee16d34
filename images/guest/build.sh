#!/usr/bin/env bash
# Builds the HyperSDK test guest from Debian packages only:
#   OUTDIR/vmlinuz     Debian's cloud kernel (linux-image-cloud-amd64, resolved to the real package)
#   OUTDIR/initrd.img  newc cpio: busybox-static, qemu-ga and its shared libraries, a few kernel
#                      modules, /init (images/guest/init), /sbin/shutdown (images/guest/shutdown) and
#                      /sbin/hypersdk-uevent (images/guest/uevent), /sbin/hypersdk-dhcp
#                      (images/guest/dhcp)
#   OUTDIR/disk.qcow2  a 64 MiB ext4 data disk (made without root: mkfs.ext4 -d + qemu-img convert)
# Usage: images/guest/build.sh [OUTDIR]     (default: <repo>/target/guest)
# Packages are fetched with `apt-get download` into OUTDIR/cache/debs and unpacked with `dpkg -x`;
# nothing is installed on the host and no host binary ends up in the guest.
# The build is cached: a second run with the same build.sh/init/shutdown/uevent/dhcp is a no-op.
# Needs: apt-get, apt-cache, dpkg, cpio, gzip, zstd (only for .ko.zst modules), mkfs.ext4, qemu-img.
set -euo pipefail
export LC_ALL=C

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
OUT=${1:-$REPO/target/guest}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
CACHE=$OUT/cache
STAMP=$OUT/.stamp
INPUTS=(build.sh init shutdown uevent dhcp)
ARCH_TRIPLET=x86_64-linux-gnu

# Initramfs compression: "none" boots fastest under TCG (the kernel only copies the files; see
# README.md for the measurement), "gzip" makes the file ~2.5x smaller.
INITRD_COMPRESSION=${HYPERSDK_INITRD_COMPRESSION:-none}
DISK_MIB=64

# Kernel modules the guest loads (only those that are modular in this kernel end up in the
# initramfs, with their dependencies, in load order).
REQUIRED_MODULES=(virtio_pci virtio_blk virtio_console)
OPTIONAL_MODULES=(virtio_net virtio_mem virtio_balloon evdev button ext4 jbd2 mbcache crc16 crc32c_generic pvpanic_mmio)

log() { echo "guest: $*" >&2; }
die() { log "error: $*"; exit 1; }

input_hash() {
  (cd "$HERE" && for f in "${INPUTS[@]}"; do echo "== $f"; cat "$f"; done
   echo "compression=$INITRD_COMPRESSION disk=$DISK_MIB kernel=${HYPERSDK_GUEST_KERNEL_PKG:-}") | sha256sum | cut -d' ' -f1
}

is_fresh() {
  [[ -f $STAMP && "$(cat "$STAMP")" == "$1" && -s $OUT/vmlinuz && -s $OUT/initrd.img && -s $OUT/disk.qcow2 ]]
}

HASH=$(input_hash)
if is_fresh "$HASH"; then
  echo "guest: cached in $OUT ($(cat "$OUT/.summary" 2>/dev/null || echo "vmlinuz initrd.img disk.qcow2"))"
  exit 0
fi

# One build at a time per OUTDIR (tests may race to build).
exec 9>"$OUT/.lock"
flock 9
if is_fresh "$HASH"; then
  echo "guest: cached in $OUT (built concurrently)"
  exit 0
fi

T0=$(date +%s%N)
SUDO=""
[[ $(id -u) -eq 0 ]] || SUDO="sudo"

# ---------------------------------------------------------------------------------------------
# Debian packages
# ---------------------------------------------------------------------------------------------
# apt-cache is slow where its binary cache is disabled (Docker images: ~1.3 s per call), so all
# look-ups are batched: one recursive `apt-cache depends`, one `apt-get download --print-uris`.
# Output: "<pkg>: <dep> <dep>..." for every package reached from qemu-guest-agent and
# linux-image-cloud-amd64 (Depends/PreDepends, first alternative and the others, no virtuals).
dep_graph() {
  apt-cache depends --recurse --no-recommends --no-suggests --no-conflicts --no-breaks \
    --no-replaces --no-enhances qemu-guest-agent linux-image-cloud-amd64 2>/dev/null \
    | awk '/^[^ ]/ { p = $1; printf "\n%s:", p; next }
           $1 ~ /^\|?(Pre)?Depends:$/ && $2 !~ /^</ { printf " %s", $2 }
           END { print "" }'
}
DEBS=$CACHE/debs
mkdir -p "$DEBS"

# Resolves the package set and downloads what the cache lacks. Returns 1 (instead of dying) when
# the apt lists are missing or stale, so that the caller can run apt-get update and retry.
fetch_packages() {
  local GRAPH p d ds queue file size _uri pkg
  GRAPH=$(dep_graph)
  grep -q '^linux-image-cloud-amd64:' <<<"$GRAPH" || return 1

  # linux-image-cloud-amd64 is a metapackage: its candidate depends on
  # linux-image-<ver>-cloud-amd64. HYPERSDK_GUEST_KERNEL_PKG overrides it (e.g.
  # linux-image-6.12.<n>+deb12-cloud-amd64 from bookworm-backports).
  KPKG=${HYPERSDK_GUEST_KERNEL_PKG:-}
  [[ -n $KPKG ]] ||
    KPKG=$(grep '^linux-image-cloud-amd64:' <<<"$GRAPH" | tr ' ' '\n' | grep -m1 -E '^linux-image-[0-9].*-cloud-amd64$')
  [[ -n $KPKG ]] || return 1

  # The closure of qemu-guest-agent's dependencies through lib* packages only (the rest, e.g.
  # init-system-helpers, is packaging glue the guest does not need). The loader check further
  # down proves the set is complete.
  declare -A DEPS=() SEEN=()
  while IFS=: read -r p ds; do
    [[ -n $p ]] && DEPS[${p%%:*}]=$ds
  done <<<"$GRAPH"
  LIBPKGS=()
  queue=(qemu-guest-agent)
  while ((${#queue[@]})); do
    p=${queue[0]}
    queue=("${queue[@]:1}")
    for d in ${DEPS[$p]:-}; do
      d=${d%%:*}
      [[ $d == lib* && -z ${SEEN[$d]:-} ]] || continue
      SEEN[$d]=1
      LIBPKGS+=("$d")
      queue+=("$d")
    done
  done
  PKGS=("$KPKG" busybox-static qemu-guest-agent "${LIBPKGS[@]}")

  # "'URI' file size hash" per package: the file name apt-get download will write.
  URIS=$(apt-get download --print-uris "${PKGS[@]}" 2>/dev/null) || return 1
  DEBFILE=()
  MISSING=()
  while read -r _uri file size _; do
    pkg=${file%%_*}
    DEBFILE[$pkg]=$DEBS/$file
    [[ -f $DEBS/$file && $(stat -c %s "$DEBS/$file") == "$size" ]] || MISSING+=("$pkg")
  done <<<"$URIS"
  for p in "${PKGS[@]}"; do [[ -n ${DEBFILE[$p]:-} ]] || return 1; done
  if ((${#MISSING[@]})); then
    log "downloading ${MISSING[*]}"
    (cd "$DEBS" && apt-get download -q -o APT::Sandbox::User=root "${MISSING[@]}" >/dev/null) || return 1
  fi
  return 0
}
declare -A DEBFILE=()
if ! fetch_packages; then
  log "apt lists missing or stale: running apt-get update"
  $SUDO apt-get update -qq
  fetch_packages || die "cannot resolve or download the guest's Debian packages"
fi

WORK=$CACHE/work
rm -rf "$WORK"
TREE=$WORK/tree
mkdir -p "$TREE"
declare -A USED=()
for p in "${PKGS[@]}"; do
  f=${DEBFILE[$p]:-}
  [[ -n $f && -f $f ]] || die "download of $p did not produce a .deb"
  USED[$f]=1
  [[ $p == "$KPKG" ]] || dpkg -x "$f" "$TREE"
done
for f in "$DEBS"/*.deb; do # drop superseded versions
  [[ -n ${USED[$f]:-} ]] || rm -f "$f"
done
# The kernel package is big (xz): keep it unpacked in the cache, keyed by its .deb name.
KDEB=${DEBFILE[$KPKG]}
KTREE=$CACHE/kernel/$(basename "$KDEB" .deb)
if [[ ! -d $KTREE ]]; then
  rm -rf "$CACHE/kernel"
  mkdir -p "$CACHE/kernel"
  dpkg -x "$KDEB" "$KTREE.tmp"
  mv "$KTREE.tmp" "$KTREE"
fi

KVER=$(cd "$KTREE/lib/modules" && ls | head -n1)
[[ -n $KVER && -f $KTREE/boot/vmlinuz-$KVER ]] || die "no kernel in $KPKG"
KDIR=$KTREE/lib/modules/$KVER

# ---------------------------------------------------------------------------------------------
# initramfs staging tree
# ---------------------------------------------------------------------------------------------
ST=$WORK/initrd
mkdir -p "$ST"/{bin,sbin,usr/bin,usr/sbin,etc,dev,proc,sys,run,tmp,root,mnt/disk,var,lib64} \
  "$ST/lib/$ARCH_TRIPLET" "$ST/lib/modules/$KVER"
chmod 1777 "$ST/tmp"
ln -s /run "$ST/var/run"
ln -s /tmp "$ST/var/tmp"

# busybox and its applets
install -m 0755 "$TREE/bin/busybox" "$ST/bin/busybox"
while read -r applet; do
  case $applet in bin/busybox | linuxrc | */linuxrc) continue ;; esac
  [[ -e $ST/$applet || -L $ST/$applet ]] || ln -s /bin/busybox "$ST/$applet"
done < <("$TREE/bin/busybox" --list-full)

# qemu-ga and every shared library it needs (resolved by the Debian loader against the tree)
install -m 0755 "$TREE/usr/sbin/qemu-ga" "$ST/usr/sbin/qemu-ga"
LDSO=$TREE/lib/$ARCH_TRIPLET/ld-linux-x86-64.so.2
[[ -x $LDSO ]] || die "no dynamic loader in libc6"
LIBPATH=$TREE/lib/$ARCH_TRIPLET:$TREE/usr/lib/$ARCH_TRIPLET
"$LDSO" --inhibit-cache --library-path "$LIBPATH" --list "$TREE/usr/sbin/qemu-ga" >"$WORK/ldd.txt" \
  || die "loader could not resolve qemu-ga: $(cat "$WORK/ldd.txt")"
NLIBS=0
while read -r name arrow path _; do
  [[ $arrow == "=>" ]] || continue
  [[ $path == "$TREE"/* ]] || die "qemu-ga needs $name, not provided by ${LIBPKGS[*]} ($path)"
  if [[ $name == /* ]]; then dest=$ST$name; else dest=$ST/lib/$ARCH_TRIPLET/$name; fi
  mkdir -p "$(dirname "$dest")"
  cp -L "$path" "$dest"
  NLIBS=$((NLIBS + 1))
done <"$WORK/ldd.txt"
[[ -e $ST/lib64/ld-linux-x86-64.so.2 ]] || die "dynamic loader missing from the initramfs"

# kernel modules: only the modular ones, with their dependencies (read from each module's
# modinfo), decompressed, plus a modules.dep in depmod's format for busybox modprobe
declare -A MODFILE=() BUILTIN=() ADDED=() MODDEPS=()
while read -r f; do
  b=${f##*/}; b=${b%%.ko*}; MODFILE[${b//-/_}]=$f
done < <(find "$KDIR/kernel" -name '*.ko*')
while read -r f; do
  b=${f##*/}; b=${b%%.ko*}; BUILTIN[${b//-/_}]=1
done <"$KDIR/modules.builtin"
MODORDER=() # dependencies first
add_module() { # name required(0/1)
  local m=${1//-/_} f dest deps d
  [[ -z ${ADDED[$m]:-} && -z ${BUILTIN[$m]:-} ]] || return 0
  f=${MODFILE[$m]:-}
  if [[ -z $f ]]; then
    [[ $2 == 1 ]] && die "kernel $KVER has no module $m and it is not built in"
    log "note: kernel $KVER has no module $m (skipped)"
    return 0
  fi
  ADDED[$m]=1
  dest=$ST/lib/modules/$KVER/$m.ko
  case $f in # busybox insmod/modprobe want plain .ko
    *.ko) cp "$f" "$dest" ;;
    *.ko.xz) "$TREE/bin/busybox" xzcat "$f" >"$dest" ;;
    *.ko.zst) zstd -q -d -c "$f" >"$dest" ;;
    *.ko.gz) gzip -d -c "$f" >"$dest" ;;
    *) die "unknown module format $f" ;;
  esac
  deps=$(tr '\0' '\n' <"$dest" | sed -n 's/^depends=//p' | head -n1)
  MODDEPS[$m]=""
  for d in ${deps//,/ }; do
    d=${d//-/_}
    add_module "$d" 1
    [[ -n ${BUILTIN[$d]:-} ]] || MODDEPS[$m]+=" $d"
  done
  MODORDER+=("$m")
}
for m in "${REQUIRED_MODULES[@]}"; do add_module "$m" 1; done
for m in "${OPTIONAL_MODULES[@]}"; do add_module "$m" 0; done
closure() { # module -> CLOSURE[] (transitive dependencies)
  local d
  for d in ${MODDEPS[$1]}; do
    [[ -z ${CLOSURE[$d]:-} ]] || continue
    CLOSURE[$d]=1
    closure "$d"
  done
}
for m in "${MODORDER[@]}"; do # depmod order: "m.ko: <dependent ... base>" (loaded right to left)
  declare -A CLOSURE=()
  closure "$m"
  line="$m.ko:"
  for ((i = ${#MODORDER[@]} - 1; i >= 0; i--)); do
    d=${MODORDER[i]}
    [[ -n ${CLOSURE[$d]:-} ]] && line+=" $d.ko"
  done
  echo "$line"
  unset CLOSURE
done >"$ST/lib/modules/$KVER/modules.dep"
cp "$KDIR/modules.builtin" "$ST/lib/modules/$KVER/modules.builtin"

# guest scripts and config
install -m 0755 "$HERE/init" "$ST/init"
install -m 0755 "$HERE/shutdown" "$ST/sbin/shutdown"
install -m 0755 "$HERE/uevent" "$ST/sbin/hypersdk-uevent"
install -m 0755 "$HERE/dhcp" "$ST/sbin/hypersdk-dhcp"
mkdir -p "$ST/etc/acpi/PWRF"
printf '#!/bin/sh\necho HYPERSDK-POWER-BUTTON >/dev/console\nexec /sbin/shutdown -P +0 "power button"\n' \
  >"$ST/etc/acpi/PWRF/00000080"
chmod 0755 "$ST/etc/acpi/PWRF/00000080"
cat >"$ST/etc/fstab" <<'EOF'
devtmpfs /dev devtmpfs mode=0755,nosuid 0 0
proc /proc proc nosuid,nodev,noexec 0 0
sysfs /sys sysfs nosuid,nodev,noexec 0 0
tmpfs /run tmpfs mode=0755,nosuid,nodev 0 0
tmpfs /tmp tmpfs mode=1777,nosuid,nodev 0 0
EOF
printf 'root:x:0:0:root:/root:/bin/sh\n' >"$ST/etc/passwd"
printf 'root:x:0:\n' >"$ST/etc/group"
echo hypersdk-guest >"$ST/etc/hostname"
printf 'ID=hypersdk-guest\nNAME="HyperSDK test guest"\nPRETTY_NAME="HyperSDK test guest (Debian %s)"\nVERSION_ID=1\n' \
  "$KVER" >"$ST/etc/os-release"

# newc cpio, owned by root, deterministic order
(cd "$ST" && find . -mindepth 1 | sort | cpio -o -H newc -R 0:0 --reproducible --quiet) >"$WORK/initrd.cpio"
case $INITRD_COMPRESSION in
  none) mv "$WORK/initrd.cpio" "$WORK/initrd.img" ;;
  gzip) gzip -n -9 -c "$WORK/initrd.cpio" >"$WORK/initrd.img" ;;
  *) die "unknown INITRD_COMPRESSION $INITRD_COMPRESSION" ;;
esac

# ---------------------------------------------------------------------------------------------
# data disk: ext4 made from a staging dir (no root, no loop device), converted to qcow2
# ---------------------------------------------------------------------------------------------
DS=$WORK/disk
mkdir -p "$DS"
echo "HyperSDK test guest data disk. The guest keeps its counter in ./counter." >"$DS/README"
rm -f "$WORK/disk.raw"
mkfs.ext4 -q -F -b 4096 -L hypersdk -d "$DS" \
  -E root_owner=0:0,lazy_itable_init=0,lazy_journal_init=0 "$WORK/disk.raw" "${DISK_MIB}M" >/dev/null
qemu-img convert -f raw -O qcow2 "$WORK/disk.raw" "$WORK/disk.qcow2"

# ---------------------------------------------------------------------------------------------
# publish atomically, stamp last
# ---------------------------------------------------------------------------------------------
rm -f "$STAMP"
cp "$KTREE/boot/vmlinuz-$KVER" "$OUT/vmlinuz.tmp" && mv -f "$OUT/vmlinuz.tmp" "$OUT/vmlinuz"
mv -f "$WORK/initrd.img" "$OUT/initrd.img"
mv -f "$WORK/disk.qcow2" "$OUT/disk.qcow2"
rm -rf "$WORK"
SUMMARY="kernel $KVER, initrd $(($(stat -c %s "$OUT/initrd.img") / 1024)) KiB ($INITRD_COMPRESSION; busybox, qemu-ga + $NLIBS libs, ${#MODORDER[@]} modules), disk ${DISK_MIB} MiB"
echo "$SUMMARY" >"$OUT/.summary"
echo "$HASH" >"$STAMP"
MS=$((($(date +%s%N) - T0) / 1000000))
printf 'guest: built %s in %d.%ds: %s\n' "$OUT" $((MS / 1000)) $((MS % 1000 / 100)) "$SUMMARY"
