//! Reconciler errors. Each names what failed; the error policy logs it and retries.

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("agent on node {node}: {status}")]
    Agent { node: String, status: tonic::Status },
    #[error("finalizer: {0}")]
    Finalizer(#[source] Box<kube::runtime::finalizer::Error<Error>>),
    #[error("{0} has no namespace")]
    NoNamespace(String),
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
