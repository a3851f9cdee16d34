//! QEMU itself: its process (spawn, adopt, exit), its QMP monitor and the guest agent inside
//! the VM; and `qemu-img` for disk images.

pub mod img;
pub mod process;
pub mod qga;
pub mod qmp;
