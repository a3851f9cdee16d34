//! The node agent's gRPC API, generated from `proto/hypersdk/agent/v1/agent.proto`.

pub mod agent {
    pub mod v1 {
        tonic::include_proto!("hypersdk.agent.v1");
    }
}

/// Encoded `FileDescriptorSet` of every service here, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/hypersdk_descriptor.bin"));

pub mod endpoint;
pub mod quantity;
