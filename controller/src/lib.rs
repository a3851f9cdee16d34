//! The HyperSDK cluster controller: CRD types, the scheduler, and the reconcilers that place
//! VirtualMachines on node agents.
//!
//! Pure parts (unit-tested without I/O): [`crd`], [`schema`], [`scheduler`],
//! [`agentspec`], [`leader::decide`], [`fakeapi::store`]. I/O: [`agents`] (gRPC to node agents),
//! [`reconcile`] and [`run`] (kube-runtime controllers), [`fakeapi`] (the in-process API),
//! [`standalone`], [`discovery`], [`http`].

pub mod agents;
pub mod agentspec;
pub mod context;
pub mod crd;
pub mod discovery;
pub mod error;
pub mod fakeapi;
pub mod http;
pub mod leader;
pub mod metrics;
pub mod placement;
pub mod reconcile;
pub mod run;
pub mod scheduler;
pub mod schema;
pub mod standalone;
