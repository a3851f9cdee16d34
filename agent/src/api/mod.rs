//! The agent's gRPC API: the service over the VM registry, the server that exposes it (with
//! health and reflection), and `--simulate`, the same API with no QEMU behind it.

pub mod convert;
pub mod server;
pub mod service;
pub mod simulate;
