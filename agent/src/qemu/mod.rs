//! QEMU itself: its process (spawn, adopt, exit), its QMP monitor and the guest agent inside
//! the VM.

pub mod process;
pub mod qga;
pub mod qmp;
