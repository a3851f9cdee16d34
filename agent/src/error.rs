//! The agent's errors, and how each maps to a gRPC status.

use crate::spec::FieldError;

#[derive(Debug, Clone, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Invalid(#[from] FieldError),
    #[error("VM {0:?} not found")]
    NotFound(String),
    #[error("VM {0:?} already exists")]
    AlreadyExists(String),
    /// The request is valid but not in the VM's current state.
    #[error("VM {name:?}: {why}")]
    Conflict { name: String, why: String },
    /// QEMU failed or misbehaved while carrying out the request.
    #[error("VM {name:?}: {why}")]
    Qemu { name: String, why: String },
    #[error("{0}")]
    Internal(String),
}

impl From<AgentError> for tonic::Status {
    fn from(e: AgentError) -> Self {
        let msg = e.to_string();
        match e {
            AgentError::Invalid(_) => tonic::Status::invalid_argument(msg),
            AgentError::NotFound(_) => tonic::Status::not_found(msg),
            AgentError::AlreadyExists(_) => tonic::Status::already_exists(msg),
            AgentError::Conflict { .. } => tonic::Status::failed_precondition(msg),
            AgentError::Qemu { .. } => tonic::Status::aborted(msg),
            AgentError::Internal(_) => tonic::Status::internal(msg),
        }
    }
}

impl From<FieldError> for tonic::Status {
    fn from(e: FieldError) -> Self {
        AgentError::Invalid(e).into()
    }
}
