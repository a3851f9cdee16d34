//! The HyperSDK node agent: launches QEMU VMs, supervises them through QMP and the guest agent,
//! and serves the `hypersdk.agent.v1` gRPC API.
//!
//! Pure logic (tested without processes): [`spec`], [`quantity`], [`argv`], [`state`], [`accel`],
//! [`image`] header parsing. I/O at the edges: [`process`], [`qmp`], [`qga`], [`store`], [`kvm`],
//! [`service`], [`server`]. [`simulate`] stands in for QEMU with `--simulate`. [`supervisor`] owns one VM's lifecycle; [`vms`] is the registry.

pub mod accel;
pub mod argv;
pub mod cgroup;
pub mod clone;
pub mod config;
pub mod context;
pub mod error;
pub mod guest;
pub mod hotplug;
pub mod image;
pub mod kvm;
pub mod migration;
pub mod node;
pub mod outgoing;
pub mod paths;
pub mod process;
pub mod qga;
pub mod qmp;
pub use hypersdk_proto::quantity;
pub mod resolve;
pub mod server;
pub mod service;
pub mod simulate;
pub mod snapshot;
pub mod snapshot_files;
pub mod spec;
pub mod state;
pub mod store;
pub mod supervisor;
pub mod vms;
