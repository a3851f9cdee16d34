//! Reconciler errors. Each names what failed; the error policy logs it and retries.

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("agent on node {node}: {status}")]
    Agent {
        node: String,
        #[source]
        status: tonic::Status,
    },
    #[error("agent on node {node} has no VM {vm}")]
    NotOnAgent { node: String, vm: String },
    #[error("finalizer: {0}")]
    Finalizer(#[source] Box<kube::runtime::finalizer::Error<Error>>),
    #[error("{0} has no namespace")]
    NoNamespace(String),
    #[error("encoding a patch: {0}")]
    Encode(#[from] serde_json::Error),
}

impl Error {
    pub fn agent(node: &str, status: tonic::Status) -> Self {
        Error::Agent {
            node: node.into(),
            status,
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Why an agent did not do what an operation or snapshot needs, in the words their status
/// reports: it does not answer, or it refused (with its message).
#[derive(Debug, thiserror::Error)]
pub enum AgentFailure {
    #[error("agent on node {0} does not answer")]
    Unreachable(String),
    #[error("agent on node {node}: {}", .status.message())]
    Refused {
        node: String,
        #[source]
        status: tonic::Status,
    },
}

impl AgentFailure {
    pub fn refused(node: &str, status: tonic::Status) -> Self {
        AgentFailure::Refused {
            node: node.into(),
            status,
        }
    }
}
