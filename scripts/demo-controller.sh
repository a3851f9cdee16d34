#!/usr/bin/env bash
# The controller demo, standalone (no cluster): two node agents, a manifest directory with a
# VMTemplate for the test guest and the user's own VirtualMachine manifest (unchanged). The
# controller places the VM on one of the two nodes, it boots; the seed's VMOperations migrate
# it live to the other node and clone it there; `running: false` stops it; removing the
# manifest deletes it from its node.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo build --workspace --bins --locked -q

work=$(mktemp -d /tmp/hypersdk-ctl-demo.XXXXXX)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null && wait "$p" 2>/dev/null || true; done
  # Agents leave VMs running by design; the demo ends the QEMUs it started (their command
  # lines name the demo's directory).
  pkill -f -- "-name guest=default-my-vm" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
status="$work/vms/status/virtualmachine-default-my-vm.yaml"
wait_status() { # PATTERN: waits until the VM's status file matches
  for _ in $(seq 1800); do grep -q "$1" "$status" 2>/dev/null && return; sleep 0.1; done
  echo "timed out waiting for '$1'; controller log:" >&2; tail -20 "$work/controller.log" >&2; exit 1
}

mkdir -p "$work/images" "$work/vms"
cp target/guest/vmlinuz target/guest/initrd.img target/guest/disk.qcow2 "$work/images/"

step "Starting two node agents sharing the image directory $work/images"
for n in node-1 node-2; do
  target/debug/hypersdk-agent --node-name "$n" --data-dir "$work/$n" \
    --listen "unix://$work/$n/agent.sock" --image-dir "$work/images" 2>>"$work/$n.log" &
  pids+=($!)
done

step "Manifests: a VMTemplate for the test guest, and the seed VirtualMachine as the user wrote it"
cat > "$work/vms/template.yaml" <<YAML
apiVersion: hypersdk.io/v1alpha1
kind: VMTemplate
metadata:
  name: ubuntu-22-04-template
spec:
  displayName: "HyperSDK test guest"
  defaultSpec:
    boot:
      kernel: $work/images/vmlinuz
      initrd: $work/images/initrd.img
      cmdline: "console=ttyS0 quiet memhp_default_state=online_movable tsc=reliable no_timer_check nohz=off highres=off pti=on cryptomgr.notests"
  image:
    source: $work/images/disk.qcow2
YAML
cp deploy/examples/vm-my-vm.yaml "$work/vms/my-vm.yaml"
sed -n '/^apiVersion/,$p' "$work/vms/my-vm.yaml" | head -12

step "Starting the controller: --standalone --manifests $work/vms"
# The seed VM asks for 8Gi; QEMU allocates guest memory lazily, so the demo lets the scheduler
# place up to 4x the host's memory.
target/debug/hypersdk-controller --standalone --manifests "$work/vms" \
  --agent "node-1=unix://$work/node-1/agent.sock" --agent "node-2=unix://$work/node-2/agent.sock" \
  --memory-overcommit 4 --metrics-addr 127.0.0.1:0 2>"$work/controller.log" &
pids+=($!)

step "Waiting for my-vm to run (status written to $status)"
wait_status "phase: Running"
cat "$status"
node=$(sed -n 's/^ *nodeName: //p' "$status")
serial=$(ls "$work/$node"/vms/*/serial.log)
for _ in $(seq 1800); do grep -q HYPERSDK-GUEST-READY "$serial" && break; sleep 0.1; done
echo "serial console of the guest on $node:"
tail -n 3 "$serial" | sed 's/^/  | /'

opstatus() { echo "$work/vms/status/vmoperation-default-$1.yaml"; }
wait_op() { # NAME: waits until the operation has finished, then shows it
  for _ in $(seq 1800); do grep -qE "phase: (Succeeded|Failed)" "$(opstatus "$1")" 2>/dev/null && break; sleep 0.1; done
  grep -E "phase|message|percent" "$(opstatus "$1")" | sed 's/^/  /'
}
other=$([ "$node" = node-2 ] && echo node-1 || echo node-2)
step "The seed VMOperation migrate (live, 100Mbps, auto-converge) to $other; under TCG the guest pauses for the copy"
sed "s/targetNode: node-2/targetNode: $other/" deploy/examples/vmoperation-migrate-my-vm.yaml \
  > "$work/vms/migrate.yaml"
wait_op migrate-my-vm
wait_status "nodeName: $other"
grep -E "phase|nodeName" "$status"
node=$other
serial=$(ls "$work/$node"/vms/*/serial.log)
for _ in $(seq 100); do grep -q HYPERSDK-COUNTER "$serial" && break; sleep 0.1; done
echo "serial console on $node (the guest counts on, no boot):"
tail -n 2 "$serial" | sed 's/^/  | /'

step "The seed VMOperation clone, unchanged: my-vm-clone, linked, started, on $node"
cp deploy/examples/vmoperation-clone-my-vm.yaml "$work/vms/clone.yaml"
wait_op clone-my-vm
clone_status="$work/vms/status/virtualmachine-default-my-vm-clone.yaml"
for _ in $(seq 1800); do grep -q "phase: Running" "$clone_status" 2>/dev/null && break; sleep 0.1; done
grep -E "phase|nodeName" "$clone_status"

step "Setting running: false in the manifest"
sed -i 's/running: true/running: false/' "$work/vms/my-vm.yaml"
wait_status "phase: Stopped"
grep -E "phase|nodeName" "$status"

step "Removing the manifest: the VM is deleted from $node"
rm "$work/vms/my-vm.yaml"
for _ in $(seq 300); do [ ! -e "$status" ] && break; sleep 0.1; done
ls "$work/$node/vms/" 2>/dev/null | sed 's/^/  remaining on the node: /' || true
echo "done"
