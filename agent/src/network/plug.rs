//! A VM's `bridge` NICs on the node network: an address reserved and a tap on the bridge before
//! QEMU starts, both given back when the VM leaves this node.

use tracing::warn;

use super::{bridge_nics, setup};
use crate::error::AgentError;
use crate::spec::VmSpec;
use crate::vm::actor::Supervisor;

impl Supervisor {
    /// Makes the taps QEMU will open for `spec`'s bridge NICs, and reserves their addresses.
    pub(crate) fn plug_nics(&self, spec: &VmSpec) -> Result<(), AgentError> {
        let nics = bridge_nics(spec);
        if nics.is_empty() {
            return Ok(());
        }
        super::check_bridge_nics(spec, self.ctx.network.is_some())?;
        let Some(net) = &self.ctx.network else {
            return Ok(());
        };
        let macs: Vec<String> = nics.iter().map(|(_, mac)| mac.clone()).collect();
        net.reserve(&spec.name, &macs)
            .map_err(|e| self.qemu_error(format!("node network: {e}")))?;
        for (i, _) in &nics {
            setup::tap(&net.config.bridge, &self.files.tap(*i))
                .map_err(|e| self.qemu_error(format!("node network: {e}")))?;
        }
        Ok(())
    }

    /// Removes the VM's taps and gives its addresses back.
    pub(crate) fn unplug_nics(&self) {
        let Some(net) = &self.ctx.network else {
            return;
        };
        for (i, _) in bridge_nics(&self.spec) {
            if let Err(e) = setup::remove_tap(&self.files.tap(i)) {
                warn!("{e}");
            }
        }
        net.release(&self.spec.name);
    }
}
