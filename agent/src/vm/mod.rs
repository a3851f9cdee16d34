//! One VM on this node: the actor task that owns its QEMU process, the phase state machine it
//! follows, and the registry of all VMs.

pub mod actor;
mod exit;
pub mod guest;
mod observe;
pub mod phase;
pub mod reason;
pub mod registry;
mod resize;
mod start;
mod status;
mod stop;

#[cfg(test)]
mod tests;
