#!/usr/bin/env bash
# Builds a Debian 12 (bookworm) cloud disk image for HyperSDK's tests, from Debian's packages only:
#   OUTDIR/disk.qcow2   GPT: 1 MiB BIOS boot partition (GRUB core for SeaBIOS), 16 MiB ESP
#                       (EFI/BOOT/BOOTX64.EFI for OVMF), ext4 root filling the rest (last, so
#                       cloud-init's growpart can grow it). Virtual size 2 GiB.
# Inside: linux-image-cloud-amd64 with a small initramfs, systemd (networkd), cloud-init (NoCloud
# only), qemu-guest-agent, openssh-server, GRUB's BIOS and EFI images. Kernel cmdline
# console=ttyS0. No password anywhere: users come from cloud-init.
# Usage: images/cloud/build.sh [OUTDIR]     (default: <repo>/target/cloud)
# The root tree is made by mmdebstrap from the mirrors apt uses on this machine, the file system
# by `mkfs.ext4 -d`, the ESP by mkfs.vfat + mtools, the disk by sfdisk + dd, the boot loaders by
# grub-mkimage: no mount, no loop device. Downloaded packages are kept in OUTDIR/cache/debs.
# The build is cached: a second run with the same build.sh and customize.sh is a no-op.
# Needs root and: mmdebstrap, grub-common (grub-mkimage; the GRUB modules come from the image),
# fdisk (sfdisk), dosfstools + mtools, e2fsprogs, qemu-utils.
set -euo pipefail
export LC_ALL=C

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
OUT=${1:-$REPO/target/cloud}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
CACHE=$OUT/cache
STAMP=$OUT/.stamp

SUITE=bookworm
DISK_MIB=2048
BIOS_MIB=1
ESP_MIB=16
# Fixed identifiers: every VM made from this image has the same ones, as with any cloud image.
ROOT_UUID=6a1b5e0c-9a53-4a3c-8d1e-2f4b7c9d0e11
ROOT_LABEL=cloudimg-rootfs
PACKAGES=(
  linux-image-cloud-amd64 initramfs-tools zstd systemd-sysv systemd-resolved udev dbus
  cloud-init cloud-guest-utils e2fsprogs iproute2 sudo
  qemu-guest-agent openssh-server grub-pc-bin grub-efi-amd64-bin grub2-common
)
# Timers and services a short-lived test VM does not need; each costs boot time under TCG.
MASK=(
  apt-daily.timer apt-daily-upgrade.timer e2scrub_all.timer e2scrub_reap.service fstrim.timer
  dpkg-db-backup.timer man-db.timer getty@tty1.service systemd-pstore.service
  systemd-binfmt.service dev-hugepages.mount sys-kernel-debug.mount sys-kernel-tracing.mount
  sys-fs-fuse-connections.mount modprobe@drm.service modprobe@fuse.service
)
GRUB_MODULES=(part_gpt part_msdos ext2 fat search search_fs_uuid configfile normal linux echo test serial terminal)

log() { echo "cloud: $*" >&2; }
# put_le FILE OFFSET BYTES VALUE: writes VALUE little-endian into FILE at OFFSET.
put_le() {
  local i hex=""
  for ((i = 0; i < $3; i++)); do hex+=$(printf '\\x%02x' $((($4 >> (8 * i)) & 255))); done
  printf '%b' "$hex" | dd of="$1" bs=1 seek="$2" conv=notrunc status=none
}
die() { log "error: $*"; exit 1; }

input_hash() {
  cat "$HERE/build.sh" "$HERE/customize.sh" | sha256sum | cut -d' ' -f1
}
is_fresh() { [[ -f $STAMP && "$(cat "$STAMP")" == "$1" && -s $OUT/disk.qcow2 ]]; }

HASH=$(input_hash)
if is_fresh "$HASH"; then
  echo "cloud: cached in $OUT ($(cat "$OUT/.summary" 2>/dev/null || echo disk.qcow2))"
  exit 0
fi
exec 9>"$OUT/.lock" # one build at a time per OUTDIR
flock 9
if is_fresh "$HASH"; then
  echo "cloud: cached in $OUT (built concurrently)"
  exit 0
fi
[[ $(id -u) -eq 0 ]] || die "needs root (mmdebstrap runs the packages' scripts in a chroot)"
T0=$(date +%s)

WORK=$CACHE/work
trap 'rm -rf "$WORK"' EXIT
rm -rf "$WORK"
mkdir -p "$WORK" "$CACHE/debs"

# ---------------------------------------------------------------------------------------------
# root tree, kept in the cache while its inputs are unchanged (the disk layout below can then
# be rebuilt in a minute)
# ---------------------------------------------------------------------------------------------
TREE=$CACHE/tree
# The mirrors apt uses here, for the bookworm suites (not backports).
mapfile -t SOURCES < <(apt-get indextargets --format '$(REPO_URI) $(RELEASE)' 'Created-By: Packages' |
  awk -v s="$SUITE" '$2 == s || $2 == s "-updates" || $2 == s "-security" { print "deb " $1 " " $2 " main" }' | sort -u)
((${#SOURCES[@]})) || die "apt has no $SUITE sources (run apt-get update)"
# Written before any package is configured, so the kernel's first initramfs is already small.
SETUP_INITRAMFS='mkdir -p "$1/etc/initramfs-tools/conf.d" && printf "MODULES=list\nCOMPRESS=zstd\nBUSYBOX=n\n" >"$1/etc/initramfs-tools/conf.d/hypersdk.conf"'
TREE_KEY=$( (cat "$HERE/customize.sh"; echo "${PACKAGES[*]} ${MASK[*]} $SUITE $ROOT_UUID $SETUP_INITRAMFS") | sha256sum | cut -d' ' -f1)
if [[ "$(cat "$TREE.key" 2>/dev/null)" != "$TREE_KEY" ]]; then
  rm -rf "$TREE" "$TREE.tmp" "$TREE.key"
  log "mmdebstrap $SUITE from ${SOURCES[*]}"
  mmdebstrap --variant=minbase --include="$(IFS=,; echo "${PACKAGES[*]}")" \
    --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/locale/*' \
    --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-include=/usr/share/doc/*/copyright' \
    --skip=download/empty --skip=essential/unlink \
    --setup-hook='mkdir -p "$1/var/cache/apt/archives"' \
    --setup-hook="sync-in $CACHE/debs /var/cache/apt/archives/" \
    --setup-hook="$SETUP_INITRAMFS" \
    --customize-hook="sync-out /var/cache/apt/archives $CACHE/debs" \
    --customize-hook="$HERE/customize.sh \"\$1\" $ROOT_UUID ${MASK[*]}" \
    --customize-hook='rm -f "$1"/var/cache/apt/archives/*.deb "$1"/var/lib/apt/lists/*_Packages' \
    "$SUITE" "$TREE.tmp" "${SOURCES[@]}" >&2
  mv "$TREE.tmp" "$TREE"
  echo "$TREE_KEY" >"$TREE.key"
fi
KVER=$(cd "$TREE/lib/modules" && ls | head -n1)
[[ -f $TREE/boot/vmlinuz-$KVER && -f $TREE/boot/initrd.img-$KVER ]] || die "no kernel/initrd in the tree"

# ---------------------------------------------------------------------------------------------
# boot loaders: GRUB images with their modules built in, an early config that finds the root
# file system, and one grub.cfg on it for both
# ---------------------------------------------------------------------------------------------
# no_timer_check: a guest starved of host CPU (TCG on a loaded host) otherwise fails the
# IO-APIC timer check at boot with a panic.
CMDLINE="root=UUID=$ROOT_UUID ro console=ttyS0,115200n8 quiet no_timer_check"
mkdir -p "$TREE/boot/grub"
cat >"$TREE/boot/grub/grub.cfg" <<EOF
serial --unit=0 --speed=115200
terminal_input serial console
terminal_output serial console
set default=0
set timeout=0
set timeout_style=hidden
menuentry 'Debian GNU/Linux 12 (HyperSDK cloud image)' {
  linux /boot/vmlinuz-$KVER $CMDLINE
  initrd /boot/initrd.img-$KVER
}
EOF
cat >"$WORK/early.cfg" <<EOF
search --no-floppy --fs-uuid --set=root $ROOT_UUID
set prefix=(\$root)/boot/grub
configfile \$prefix/grub.cfg
EOF
GRUBLIB=$TREE/usr/lib/grub
mkdir -p "$WORK/bios"
cp "$GRUBLIB/i386-pc/boot.img" "$WORK/bios/"
grub-mkimage -O i386-pc -d "$GRUBLIB/i386-pc" -o "$WORK/bios/core.img" -c "$WORK/early.cfg" \
  -p /boot/grub biosdisk "${GRUB_MODULES[@]}"
grub-mkimage -O x86_64-efi -d "$GRUBLIB/x86_64-efi" -o "$WORK/BOOTX64.EFI" -c "$WORK/early.cfg" \
  -p /boot/grub "${GRUB_MODULES[@]}"

# ---------------------------------------------------------------------------------------------
# partitions, laid into the disk file
# ---------------------------------------------------------------------------------------------
ROOT_MIB=$((DISK_MIB - 1 - BIOS_MIB - ESP_MIB - 1)) # 1 MiB before, 1 MiB for the backup GPT
mkfs.vfat -C -n EFI "$WORK/esp.img" $((ESP_MIB * 1024)) >/dev/null
mmd -i "$WORK/esp.img" ::/EFI ::/EFI/BOOT
mcopy -i "$WORK/esp.img" "$WORK/BOOTX64.EFI" ::/EFI/BOOT/BOOTX64.EFI
DISK=$WORK/disk.raw
truncate -s "${DISK_MIB}M" "$DISK"
sfdisk -q "$DISK" <<EOF
label: gpt
start=1MiB, size=${BIOS_MIB}MiB, type=21686148-6449-6E6F-744E-656564454649, name=bios
size=${ESP_MIB}MiB, type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B, name=esp
size=${ROOT_MIB}MiB, type=4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709, name=root
EOF
dd if="$WORK/esp.img" of="$DISK" bs=1M seek=$((1 + BIOS_MIB)) conv=notrunc,sparse status=none
# The root file system is made in place, at its partition's offset (no second copy on disk).
log "mkfs.ext4 -d ($(du -sm "$TREE" | cut -f1) MiB of files)"
mkfs.ext4 -q -F -L "$ROOT_LABEL" -U "$ROOT_UUID" -d "$TREE" \
  -E offset=$(((1 + BIOS_MIB + ESP_MIB) << 20)),root_owner=0:0,lazy_itable_init=0,lazy_journal_init=0 \
  "$DISK" "${ROOT_MIB}M"
# What grub-bios-setup does (it needs the block device of its own directory, which a
# container may not have): boot.img's code into the protective MBR, told where core.img starts;
# core.img into the BIOS boot partition, its first sector told where the rest of it is.
BIOS_LBA=2048
(($(stat -c %s "$WORK/bios/core.img") <= BIOS_MIB << 20)) || die "core.img does not fit the BIOS boot partition"
put_le "$WORK/bios/boot.img" $((0x5c)) 8 $BIOS_LBA # kernel (core.img) sector
put_le "$WORK/bios/boot.img" $((0x64)) 1 $((0xff)) # boot drive: the one the BIOS booted
put_le "$WORK/bios/boot.img" $((0x66)) 2 $((0x9090)) # hard disk: skip the floppy drive check
put_le "$WORK/bios/core.img" $((0x200 - 12)) 8 $((BIOS_LBA + 1)) # diskboot's block list
dd if="$WORK/bios/boot.img" of="$DISK" bs=440 count=1 conv=notrunc status=none
dd if="$WORK/bios/core.img" of="$DISK" bs=512 seek=$BIOS_LBA conv=notrunc status=none

rm -f "$STAMP"
qemu-img convert -f raw -O qcow2 -c "$DISK" "$OUT/disk.qcow2.tmp"
mv -f "$OUT/disk.qcow2.tmp" "$OUT/disk.qcow2"
SUMMARY="Debian $SUITE, kernel $KVER, $(($(stat -c %s "$OUT/disk.qcow2") >> 20)) MiB qcow2, ${DISK_MIB} MiB virtual"
echo "$SUMMARY" >"$OUT/.summary"
echo "$HASH" >"$STAMP"
log "built $OUT/disk.qcow2 in $(($(date +%s) - T0))s: $SUMMARY"
