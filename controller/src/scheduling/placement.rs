//! The controller's accounting of placed VMs, and placing new ones: the inventory handed to the
//! scheduler is the agents' node facts with this accounting subtracted, under one lock so two
//! VMs scheduled at once never both take the last free slot.

use std::collections::HashMap;
use std::sync::Mutex;

use super::{NodeInfo, Policy, Request, Unschedulable, schedule};
use crate::nodes::Agents;

/// A VirtualMachine's identity: namespace and name.
pub type VmKey = (String, String);

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placed {
    pub node: String,
    pub cpus: u32,
    pub memory_bytes: u64,
}

#[derive(Default)]
pub struct Placements {
    placed: Mutex<HashMap<VmKey, Placed>>,
}

impl Placements {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<VmKey, Placed>> {
        self.placed.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records a placement read back from a VM's status (after a controller restart).
    pub fn record(&self, key: VmKey, placed: Placed) {
        self.lock().insert(key, placed);
    }

    /// The VM now runs on `node` (a migration), with the same size.
    pub fn moved(&self, key: &VmKey, node: &str) {
        if let Some(p) = self.lock().get_mut(key) {
            p.node = node.to_string();
        }
    }

    pub fn release(&self, key: &VmKey) {
        self.lock().remove(key);
    }

    /// Chooses a node for `req` and records the placement, or says why none fits.
    pub fn place(
        &self,
        key: VmKey,
        req: &Request,
        agents: &Agents,
        policy: &Policy,
    ) -> Result<String, Unschedulable> {
        let mut placed = self.lock();
        placed.remove(&key);
        let nodes = inventory(agents, &placed);
        let node = schedule(&nodes, req, policy)?.name.clone();
        placed.insert(
            key,
            Placed {
                node: node.clone(),
                cpus: req.cpus,
                memory_bytes: req.memory_bytes,
            },
        );
        Ok(node)
    }

    /// The scheduler's view of every agent's node now.
    pub fn inventory(&self, agents: &Agents) -> Vec<NodeInfo> {
        inventory(agents, &self.lock())
    }
}

fn inventory(agents: &Agents, placed: &HashMap<VmKey, Placed>) -> Vec<NodeInfo> {
    let mut used: HashMap<&str, (u32, u64)> = HashMap::new();
    for p in placed.values() {
        let u = used.entry(p.node.as_str()).or_default();
        u.0 += p.cpus;
        u.1 += p.memory_bytes;
    }
    agents
        .all()
        .into_iter()
        .map(|a| {
            let node = a.node().unwrap_or_default();
            let (cpus, mem) = used.get(a.info.node.as_str()).copied().unwrap_or_default();
            NodeInfo {
                name: a.info.node.clone(),
                reachable: a.client().is_some(),
                kvm: node.accelerator == "kvm",
                cpus: node.cpus,
                memory_bytes: node.memory_total_bytes,
                // VMs the agent runs that this controller did not place count as well.
                allocated_cpus: cpus.max(node.allocated_cpus),
                allocated_memory_bytes: mem.max(node.allocated_memory_bytes),
                labels: a.info.labels.clone(),
                carbon_intensity: a.info.carbon_intensity,
                unschedulable: a.info.unschedulable,
            }
        })
        .collect()
}
