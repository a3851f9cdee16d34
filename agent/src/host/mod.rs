//! Facts and resources of the node: the accelerator and why, the KVM probe, memory and CPUs,
//! cgroups, how QEMU is started (on the host from a pod), the policy for files VMs may use, and disk image header checks.

pub mod accel;
pub mod cgroup;
pub mod image;
pub mod kvm;
pub mod launch;
pub mod node;
pub mod paths;
