//! Prometheus metrics, rendered in the text exposition format for `/metrics`.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;

#[derive(Default)]
pub struct Metrics {
    /// (metric, kind label) -> count.
    counters: Mutex<BTreeMap<(&'static str, String), u64>>,
}

/// The counters, by kind of object.
pub const RECONCILES: &str = "hypersdk_reconciles_total";
pub const RECONCILE_ERRORS: &str = "hypersdk_reconcile_errors_total";
pub const SCHEDULING_FAILURES: &str = "hypersdk_scheduling_failures_total";
pub const VMS_PLACED: &str = "hypersdk_vms_placed_total";

const HELP: &[(&str, &str)] = &[
    (RECONCILES, "Reconciliations run, by kind."),
    (RECONCILE_ERRORS, "Reconciliations that failed, by kind."),
    (
        SCHEDULING_FAILURES,
        "Placement attempts that found no node.",
    ),
    (VMS_PLACED, "VMs placed on a node."),
];

impl Metrics {
    pub fn inc(&self, metric: &'static str, kind: &str) {
        *self
            .counters
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry((metric, kind.to_string()))
            .or_default() += 1;
    }

    /// The exposition text, plus `gauges` computed by the caller at scrape time.
    pub fn render(&self, gauges: &[(&str, &str, f64)]) -> String {
        let counters = self.counters.lock().unwrap_or_else(|p| p.into_inner());
        let mut out = String::new();
        for (metric, help) in HELP {
            let _ = writeln!(out, "# HELP {metric} {help}\n# TYPE {metric} counter");
            for ((m, kind), v) in counters.iter().filter(|((m, _), _)| m == metric) {
                let _ = writeln!(out, "{m}{{kind=\"{kind}\"}} {v}");
            }
        }
        for (metric, help, v) in gauges {
            let _ = writeln!(
                out,
                "# HELP {metric} {help}\n# TYPE {metric} gauge\n{metric} {v}"
            );
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_and_gauges() {
        let m = Metrics::default();
        m.inc(RECONCILES, "VirtualMachine");
        m.inc(RECONCILES, "VirtualMachine");
        let text = m.render(&[("hypersdk_agents_reachable", "Agents answering.", 2.0)]);
        assert!(
            text.contains("hypersdk_reconciles_total{kind=\"VirtualMachine\"} 2\n"),
            "{text}"
        );
        assert!(
            text.contains("# TYPE hypersdk_agents_reachable gauge\nhypersdk_agents_reachable 2\n"),
            "{text}"
        );
    }
}
