#!/usr/bin/env bash
# mmdebstrap customize hook of images/cloud/build.sh: configures the root tree for fast first
# boots under TCG. Usage: customize.sh TREE ROOT_UUID UNIT-TO-MASK...
set -euo pipefail
TREE=$1 ROOT_UUID=$2
shift 2
in_tree() { chroot "$TREE" "$@"; }

# initramfs: only what finds the root disk (ext4 is built into Debian's cloud kernel).
printf '%s\n' virtio_pci virtio_blk virtio_scsi sd_mod >"$TREE/etc/initramfs-tools/modules"
in_tree update-initramfs -u -k all >&2

cat >"$TREE/etc/fstab" <<EOF
UUID=$ROOT_UUID / ext4 rw,discard,errors=remount-ro 0 1
EOF
echo debian >"$TREE/etc/hostname"
printf '127.0.0.1 localhost\n::1 localhost ip6-localhost ip6-loopback\n' >"$TREE/etc/hosts"
: >"$TREE/etc/machine-id" # generated at first boot, so every VM has its own

# cloud-init: NoCloud only (no network probing for other clouds), networkd as renderer, one host
# key type (key generation is slow under TCG), and only the modules a VM's user data commonly
# uses (each one is Python imported at boot; the lists replace Debian's).
cat >"$TREE/etc/cloud/cloud.cfg.d/90-hypersdk.cfg" <<'EOF'
datasource_list: [NoCloud, None]
ssh_genkeytypes: [ed25519]
system_info:
  network:
    renderers: [networkd]
cloud_init_modules: [seed_random, bootcmd, write-files, growpart, resizefs, disk_setup, mounts,
  set_hostname, update_hostname, update_etc_hosts, users-groups, ssh]
cloud_config_modules: [set-passwords, timezone, package-update-upgrade-install, runcmd]
cloud_final_modules: [scripts-vendor, scripts-per-once, scripts-per-boot, scripts-per-instance,
  scripts-user, ssh-authkey-fingerprints, keys-to-console, final-message, power-state-change]
EOF

# Network without cloud-init too: DHCP on every Ethernet link (cloud-init's own files sort first).
cat >"$TREE/etc/systemd/network/99-dhcp.network" <<'EOF'
[Match]
Type=ether

[Network]
DHCP=yes
EOF
mkdir -p "$TREE/etc/systemd/system/systemd-networkd-wait-online.service.d"
cat >"$TREE/etc/systemd/system/systemd-networkd-wait-online.service.d/any.conf" <<'EOF'
[Service]
ExecStart=
ExecStart=/lib/systemd/systemd-networkd-wait-online --any --timeout=30
EOF
in_tree systemctl enable systemd-networkd.service >&2
in_tree systemctl mask "$@" >&2

# Host keys are made per VM at first boot (cloud-init), never shipped in the image.
rm -f "$TREE"/etc/ssh/ssh_host_*
echo "cloud: customized $TREE (root UUID $ROOT_UUID)" >&2
