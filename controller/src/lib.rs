//! The HyperSDK cluster controller: schedules VirtualMachines onto node agents.
//!
//! CRD types, the scheduler and the reconcilers live here as they land.
