//! The serial console over gRPC: QEMU's serial port is a unix socket (a chardev that also
//! writes the serial log, attached or not), and one client at a time is piped to it.
//!
//! This file is the pure part: who is attached. [`attach`] connects to the socket.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

pub mod attach;

/// The VMs whose console has a client now. A second client is refused rather than sharing the
/// input: two people typing into one shell interleave keystrokes.
#[derive(Debug, Default, Clone)]
pub struct Attachments(Arc<Mutex<BTreeSet<String>>>);

/// Held for as long as a client is attached; dropping it frees the console.
#[derive(Debug)]
pub struct Attached {
    set: Attachments,
    vm: String,
}

impl Attachments {
    /// The console of `vm` for one client, or None while another client has it.
    pub fn take(&self, vm: &str) -> Option<Attached> {
        let mut set = self.0.lock().unwrap_or_else(|p| p.into_inner());
        set.insert(vm.to_string()).then(|| Attached {
            set: self.clone(),
            vm: vm.to_string(),
        })
    }
}

impl Drop for Attached {
    fn drop(&mut self) {
        let mut set = self.set.0.lock().unwrap_or_else(|p| p.into_inner());
        set.remove(&self.vm);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_client_per_console_until_it_detaches() {
        let a = Attachments::default();
        let first = a.take("web").expect("free");
        assert!(a.take("web").is_none(), "a second client is refused");
        let other = a.take("db").expect("another VM's console is free");
        drop(first);
        assert!(a.take("web").is_some(), "free again after the detach");
        drop(other);
    }
}
