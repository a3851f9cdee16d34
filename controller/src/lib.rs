//! The HyperSDK cluster controller: CRD types, the scheduler, and the reconcilers that place
//! VirtualMachines on node agents.
//!
//! - [`crd`]: the `hypersdk.io/v1alpha1` types (the CRDs are generated from them).
//! - [`controllers`]: the kube-runtime Controllers and what triggers each; [`reconcile`]: one
//!   reconciler per kind; [`context`]: what they share, among it [`waiting`] (who waits for
//!   which object, for the watches to wake) and [`retries`] (back-off after failures).
//! - [`scheduling`]: choosing a node (pure) and the accounting of placed VMs.
//! - [`nodes`]: the agents (registry, gRPC connections, discovery) and the agent's VM spec.
//! - [`standalone`]: the in-process API and the manifest directory, for running without a cluster.
//! - [`certs`]: the cluster CA in a cluster, and agent certificates through CSRs.
//! - [`leader`] (Lease election), [`http`] (`/metrics`, `/healthz`, `/readyz`), [`metrics`].
//! - [`dashboard`]: the web dashboard on the same port (live state, actions, access).

pub mod certs;
pub mod context;
pub mod controllers;
pub mod crd;
pub mod dashboard;
pub mod error;
pub mod http;
pub mod leader;
pub mod metrics;
pub mod nodes;
pub mod reconcile;
pub mod retries;
pub mod scheduling;
pub mod standalone;
pub mod waiting;
