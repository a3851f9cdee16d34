//! Scheduling: a pure function from the node inventory and one VM's needs to a node, or the reason
//! none fits (in the shape kube-scheduler reports: "0/3 nodes are available: ...").
//! [`placement`] keeps the controller's accounting of placed VMs and places new ones with it.
//!
//! Filters: node reachable, KVM (when required), free cpu and memory under the overcommit ratios,
//! nodeSelector, carbon intensity ceiling. Scores: spread (most free after placement) or bin-pack
//! (least free), plus lower carbon intensity for carbon-aware VMs and a preference for KVM nodes.

pub mod placement;

use std::collections::BTreeMap;

use hypersdk_proto::quantity;

use crate::crd::VirtualMachineSpec;

/// A node selector key every node matches with its own name (a restore places a VM where its
/// disks were written).
pub const NODE_LABEL: &str = "hypersdk.io/node";

/// One node as the scheduler sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeInfo {
    pub name: String,
    /// Its agent answers.
    pub reachable: bool,
    /// The agent runs VMs under KVM (not TCG emulation).
    pub kvm: bool,
    pub cpus: u32,
    pub memory_bytes: u64,
    /// Held by VMs placed there (the controller's accounting).
    pub allocated_cpus: u32,
    pub allocated_memory_bytes: u64,
    pub labels: BTreeMap<String, String>,
    /// Grid carbon intensity (gCO2eq/kWh) where the node runs, when known.
    pub carbon_intensity: Option<u32>,
    /// Drained: takes no new VMs.
    pub unschedulable: bool,
}

/// What one VM needs.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Request {
    pub cpus: u32,
    pub memory_bytes: u64,
    pub node_selector: BTreeMap<String, String>,
    /// Carbon-aware placement: `Some(ceiling)`; `Some(None)` prefers greener nodes without a ceiling.
    pub carbon_aware: Option<Option<u32>>,
}

impl Request {
    /// What a VirtualMachine asks for.
    pub fn for_vm(spec: &VirtualMachineSpec) -> Request {
        Request {
            cpus: spec.cpus,
            memory_bytes: quantity::parse_bytes(&spec.memory).unwrap_or(0),
            node_selector: spec.node_selector.clone(),
            carbon_aware: spec
                .carbon_aware
                .as_ref()
                .filter(|c| c.enabled)
                .map(|c| c.max_intensity),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Strategy {
    /// Most free capacity left: VMs spread over nodes.
    #[default]
    Spread,
    /// Least free capacity left: nodes fill up one after another.
    BinPack,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Policy {
    /// vCPUs placeable per host CPU.
    pub cpu_overcommit: f64,
    /// Guest memory placeable per byte of host memory.
    pub memory_overcommit: f64,
    pub strategy: Strategy,
    /// Refuse nodes that would run VMs under TCG emulation.
    pub require_kvm: bool,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            cpu_overcommit: 4.0,
            memory_overcommit: 1.0,
            strategy: Strategy::Spread,
            require_kvm: false,
        }
    }
}

/// Why no node fits, counted per filter.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Unschedulable {
    pub nodes: usize,
    pub unreachable: usize,
    pub unschedulable: usize,
    pub no_kvm: usize,
    pub selector: usize,
    pub carbon: usize,
    pub cpu: usize,
    pub memory: usize,
}

impl std::fmt::Display for Unschedulable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "0/{} nodes are available", self.nodes)?;
        let reasons = [
            (self.unreachable, "agent unreachable"),
            (self.unschedulable, "unschedulable"),
            (self.no_kvm, "no usable KVM"),
            (self.selector, "didn't match nodeSelector"),
            (
                self.carbon,
                "carbon intensity above carbonAware.maxIntensity",
            ),
            (self.cpu, "insufficient cpu"),
            (self.memory, "insufficient memory"),
        ];
        let mut sep = ": ";
        for (n, why) in reasons.into_iter().filter(|(n, _)| *n > 0) {
            write!(f, "{sep}{n} {why}")?;
            sep = ", ";
        }
        if self.nodes == 0 {
            write!(f, ": no agents are registered")?;
        }
        Ok(())
    }
}

impl std::error::Error for Unschedulable {}

/// Picks the best node for `req`; ties go to the first node in `nodes` order.
pub fn schedule<'a>(
    nodes: &'a [NodeInfo],
    req: &Request,
    policy: &Policy,
) -> Result<&'a NodeInfo, Unschedulable> {
    let mut why = Unschedulable {
        nodes: nodes.len(),
        ..Default::default()
    };
    let mut best: Option<(f64, &NodeInfo)> = None;
    for node in nodes {
        let Some(score) = fit(node, req, policy, &mut why) else {
            continue;
        };
        if best.is_none_or(|(s, _)| score > s) {
            best = Some((score, node));
        }
    }
    best.map(|(_, n)| n).ok_or(why)
}

/// The node's score for `req`, or None (counting the reason) when it does not fit.
fn fit(node: &NodeInfo, req: &Request, policy: &Policy, why: &mut Unschedulable) -> Option<f64> {
    if !node.reachable {
        why.unreachable += 1;
        return None;
    }
    if node.unschedulable {
        why.unschedulable += 1;
        return None;
    }
    if policy.require_kvm && !node.kvm {
        why.no_kvm += 1;
        return None;
    }
    if !req
        .node_selector
        .iter()
        .all(|(k, v)| node.labels.get(k) == Some(v) || (k == NODE_LABEL && *v == node.name))
    {
        why.selector += 1;
        return None;
    }
    if let (Some(Some(max)), Some(intensity)) = (req.carbon_aware, node.carbon_intensity)
        && intensity > max
    {
        why.carbon += 1;
        return None;
    }
    let cpu_cap = node.cpus as f64 * policy.cpu_overcommit;
    let mem_cap = node.memory_bytes as f64 * policy.memory_overcommit;
    let cpu_free = cpu_cap - node.allocated_cpus as f64 - req.cpus as f64;
    let mem_free = mem_cap - node.allocated_memory_bytes as f64 - req.memory_bytes as f64;
    if cpu_free < 0.0 {
        why.cpu += 1;
        return None;
    }
    if mem_free < 0.0 {
        why.memory += 1;
        return None;
    }
    // Free share after placement, 0..=100, the scarcer resource counting.
    let free = 100.0 * (cpu_free / cpu_cap.max(1.0)).min(mem_free / mem_cap.max(1.0));
    let mut score = match policy.strategy {
        Strategy::Spread => free,
        Strategy::BinPack => 100.0 - free,
    };
    if req.carbon_aware.is_some() {
        // Greener counts more than packing: 0 gCO2/kWh scores +200, 1000 or unknown scores 0.
        let intensity = node.carbon_intensity.unwrap_or(1000).min(1000) as f64;
        score += 200.0 * (1.0 - intensity / 1000.0);
    }
    if node.kvm {
        score += 50.0;
    }
    Some(score)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GI: u64 = 1 << 30;

    fn node(name: &str, cpus: u32, mem_gi: u64) -> NodeInfo {
        NodeInfo {
            name: name.into(),
            reachable: true,
            kvm: false,
            cpus,
            memory_bytes: mem_gi * GI,
            allocated_cpus: 0,
            allocated_memory_bytes: 0,
            labels: BTreeMap::new(),
            carbon_intensity: None,
            unschedulable: false,
        }
    }

    fn req(cpus: u32, mem_gi: u64) -> Request {
        Request {
            cpus,
            memory_bytes: mem_gi * GI,
            ..Default::default()
        }
    }

    fn exact() -> Policy {
        Policy {
            cpu_overcommit: 1.0,
            ..Policy::default()
        }
    }

    #[test]
    fn spread_and_binpack_pick_opposite_ends() {
        let mut nodes = vec![node("a", 8, 16), node("b", 8, 16)];
        nodes[0].allocated_cpus = 4;
        nodes[0].allocated_memory_bytes = 8 * GI;
        assert_eq!(schedule(&nodes, &req(1, 1), &exact()).unwrap().name, "b");
        let pack = Policy {
            strategy: Strategy::BinPack,
            ..exact()
        };
        assert_eq!(schedule(&nodes, &req(1, 1), &pack).unwrap().name, "a");
    }

    #[test]
    fn reasons_are_counted_per_filter() {
        let mut nodes = vec![
            node("gone", 64, 64),
            node("small", 2, 64),
            node("tiny", 64, 1),
            node("other", 64, 64),
        ];
        nodes[0].reachable = false;
        nodes[3].labels.insert("zone".into(), "b".into());
        let mut r = req(4, 8);
        r.node_selector.insert("zone".into(), "a".into());
        let e = schedule(&nodes, &r, &exact()).unwrap_err();
        assert_eq!(
            e.to_string(),
            "0/4 nodes are available: 1 agent unreachable, 3 didn't match nodeSelector"
        );
        let e = schedule(&nodes[..3], &req(4, 8), &exact()).unwrap_err();
        assert_eq!(
            e.to_string(),
            "0/3 nodes are available: 1 agent unreachable, 1 insufficient cpu, 1 insufficient memory"
        );
        let mut drained = nodes[1..3].to_vec();
        drained[0].unschedulable = true;
        let e = schedule(&drained, &req(4, 8), &exact()).unwrap_err();
        assert_eq!(
            e.to_string(),
            "0/2 nodes are available: 1 unschedulable, 1 insufficient memory"
        );
        assert_eq!(
            schedule(&[], &req(1, 1), &exact()).unwrap_err().to_string(),
            "0/0 nodes are available: no agents are registered"
        );
    }

    #[test]
    fn overcommit_and_kvm() {
        let nodes = vec![node("a", 2, 4)];
        assert!(schedule(&nodes, &req(6, 1), &exact()).is_err());
        assert!(schedule(&nodes, &req(6, 1), &Policy::default()).is_ok());
        let kvm_only = Policy {
            require_kvm: true,
            ..Policy::default()
        };
        let e = schedule(&nodes, &req(1, 1), &kvm_only).unwrap_err();
        assert_eq!(e.no_kvm, 1);
        let mut both = vec![node("tcg", 64, 64), node("kvm", 8, 8)];
        both[1].kvm = true;
        assert_eq!(schedule(&both, &req(1, 1), &exact()).unwrap().name, "kvm");
    }

    #[test]
    fn carbon_aware_prefers_green_and_honours_ceiling() {
        let mut nodes = vec![
            node("coal", 64, 64),
            node("wind", 4, 8),
            node("unknown", 64, 64),
        ];
        nodes[0].carbon_intensity = Some(700);
        nodes[1].carbon_intensity = Some(50);
        let mut r = req(1, 1);
        // Without carbon awareness the emptiest node wins.
        assert_eq!(schedule(&nodes, &r, &exact()).unwrap().name, "coal");
        r.carbon_aware = Some(Some(200));
        assert_eq!(schedule(&nodes, &r, &exact()).unwrap().name, "wind");
        nodes[1].allocated_cpus = 4;
        // Unknown intensity passes the ceiling but scores as the dirtiest.
        assert_eq!(schedule(&nodes, &r, &exact()).unwrap().name, "unknown");
        nodes.remove(2);
        let e = schedule(&nodes, &r, &exact()).unwrap_err();
        assert_eq!((e.carbon, e.cpu), (1, 1));
    }
}
