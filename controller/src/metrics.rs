//! Prometheus metrics, rendered in the text exposition format for `/metrics`.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::{Arc, Mutex};

use crate::nodes::Agent;

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

/// A gauge computed at scrape time: its samples by label set (`node="n1"`, or "" for none).
pub struct Gauge<'a> {
    pub name: &'a str,
    pub help: &'a str,
    pub samples: Vec<(String, f64)>,
}

impl<'a> Gauge<'a> {
    /// A gauge without labels.
    pub fn single(name: &'a str, help: &'a str, value: f64) -> Self {
        Gauge {
            name,
            help,
            samples: vec![(String::new(), value)],
        }
    }
}

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
    pub fn render(&self, gauges: &[Gauge]) -> String {
        let counters = self.counters.lock().unwrap_or_else(|p| p.into_inner());
        let mut out = String::new();
        for (metric, help) in HELP {
            let _ = writeln!(out, "# HELP {metric} {help}\n# TYPE {metric} counter");
            for ((m, kind), v) in counters.iter().filter(|((m, _), _)| m == metric) {
                let _ = writeln!(out, "{m}{{kind=\"{kind}\"}} {v}");
            }
        }
        for Gauge {
            name,
            help,
            samples,
        } in gauges
        {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
            for (labels, v) in samples {
                match labels.is_empty() {
                    true => writeln!(out, "{name} {v}"),
                    false => writeln!(out, "{name}{{{labels}}} {v}"),
                }
                .expect("writing to a String");
            }
        }
        out
    }
}

/// The gauges about agents: how many, how many answer, and their certificates' expiry (agents
/// serving https report it in GetNode).
pub fn agent_gauges(agents: &[Arc<Agent>]) -> [Gauge<'static>; 3] {
    let reachable = agents.iter().filter(|a| a.client().is_some()).count();
    let tls_days_left = agents
        .iter()
        .filter_map(|a| {
            let node = a.node().filter(|n| !n.tls_not_after.is_empty())?;
            let labels = format!("node=\"{}\"", a.info.node);
            Some((labels, node.tls_days_left as f64))
        })
        .collect();
    [
        Gauge::single("hypersdk_agents", "Agents known.", agents.len() as f64),
        Gauge::single(
            "hypersdk_agents_reachable",
            "Agents answering.",
            reachable as f64,
        ),
        Gauge {
            name: "hypersdk_agent_tls_days_left",
            help: "Whole days until the agent's TLS server certificate expires (negative once expired).",
            samples: tls_days_left,
        },
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_and_gauges() {
        let m = Metrics::default();
        m.inc(RECONCILES, "VirtualMachine");
        m.inc(RECONCILES, "VirtualMachine");
        let days = Gauge {
            name: "hypersdk_agent_tls_days_left",
            help: "Days left.",
            samples: vec![("node=\"n1\"".into(), 30.0), ("node=\"n2\"".into(), -1.0)],
        };
        let text = m.render(&[
            Gauge::single("hypersdk_agents_reachable", "Agents answering.", 2.0),
            days,
        ]);
        assert!(
            text.contains("hypersdk_reconciles_total{kind=\"VirtualMachine\"} 2\n"),
            "{text}"
        );
        assert!(
            text.contains("# TYPE hypersdk_agents_reachable gauge\nhypersdk_agents_reachable 2\n"),
            "{text}"
        );
        assert!(
            text.contains("gauge\nhypersdk_agent_tls_days_left{node=\"n1\"} 30\nhypersdk_agent_tls_days_left{node=\"n2\"} -1\n"),
            "{text}"
        );
    }
}
