//! The HyperSDK node agent: launches QEMU VMs, supervises them through QMP and the guest agent,
//! and serves the `hypersdk.agent.v1` gRPC API.
//!
//! One folder per feature; in each, `mod.rs` is the pure part (plans, validation, figures) and
//! files named after a verb or a side hold the I/O:
//!
//! - [`api`]: the gRPC service and server, and the `--simulate` stand-in.
//! - [`spec`]: VmSpec validation, the QEMU argv builder, path resolution.
//! - [`vm`]: the per-VM actor (run loop, phase state machine, lifecycle, resize, guest view)
//!   and the registry of VMs.
//! - [`qemu`]: process spawn, the QMP client, the guest-agent client.
//! - [`host`]: accelerator choice, KVM probe, node facts, cgroups, path policy, image checks.
//! - [`image`]: images from URLs or node paths, verified, in the node's cache.
//! - [`disks`]: the disks the agent makes (overlays, blank disks); [`cloudinit`]: NoCloud.
//! - [`firmware`], [`hotplug`], [`migration`], [`snapshot`], [`clone`]: one feature each.
//! - [`fence`]: the controller's lease, and stopping highly available VMs when it runs out.
//! - [`network`]: the node bridge, NAT, taps and DHCP; [`console`]: the serial console.

pub mod api;
pub mod backup;
pub mod clone;
pub mod cloudinit;
pub mod config;
pub mod console;
pub mod context;
pub mod disks;
pub mod error;
pub mod fence;
pub mod firmware;
pub mod host;
pub mod hotplug;
pub mod image;
pub mod migration;
pub mod network;
pub mod qemu;
pub use hypersdk_proto::quantity;
pub mod snapshot;
pub mod spec;
pub mod store;
pub mod vm;
