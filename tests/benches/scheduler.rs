//! Scheduler benchmark: placement decisions per second over 1,000 nodes with mixed capacity,
//! labels and carbon intensities, for spread and bin-pack. Target: at least 10,000 decisions/s.
//!
//! Run with `scripts/bench.sh scheduler`. `BENCH_N` sets the decisions per strategy (default 20000).

use std::collections::BTreeMap;
use std::time::Instant;

use hypersdk_controller::scheduling::{NodeInfo, Policy, Request, Strategy, schedule};
use hypersdk_tests::bench_rounds;

const GI: u64 = 1 << 30;

fn nodes(n: usize) -> Vec<NodeInfo> {
    (0..n)
        .map(|i| NodeInfo {
            name: format!("node-{i:04}"),
            reachable: i % 50 != 0,
            kvm: i % 3 != 0,
            cpus: 16 + (i % 4) as u32 * 16,
            memory_bytes: (64 + (i % 4) as u64 * 64) * GI,
            allocated_cpus: (i * 7 % 40) as u32,
            allocated_memory_bytes: (i as u64 * 13 % 60) * GI,
            labels: BTreeMap::from([("zone".to_string(), format!("z{}", i % 3))]),
            carbon_intensity: Some((i * 37 % 800) as u32),
            unschedulable: false,
        })
        .collect()
}

fn main() {
    let nodes = nodes(1000);
    let rounds = bench_rounds(20_000);
    let requests: Vec<Request> = (0..64)
        .map(|i| Request {
            cpus: 1 + i % 8,
            memory_bytes: (1 + (i as u64 % 16)) * GI,
            node_selector: if i % 4 == 0 {
                BTreeMap::from([("zone".into(), "z1".into())])
            } else {
                BTreeMap::new()
            },
            carbon_aware: (i % 5 == 0).then_some(Some(400)),
        })
        .collect();
    for strategy in [Strategy::Spread, Strategy::BinPack] {
        let policy = Policy {
            strategy,
            ..Policy::default()
        };
        let start = Instant::now();
        let mut placed = 0usize;
        for i in 0..rounds {
            placed += schedule(&nodes, &requests[i % requests.len()], &policy).is_ok() as usize;
        }
        let secs = start.elapsed().as_secs_f64();
        let rate = rounds as f64 / secs;
        println!(
            "scheduler {strategy:?}: {rounds} decisions over {} nodes in {secs:.3} s = {rate:.0} decisions/s ({placed} placed; target >= 10000/s)",
            nodes.len()
        );
        assert!(placed > 0);
    }
}
