//! Connects to a running VM's console socket.

use std::path::Path;

use tokio::net::UnixStream;

use crate::error::AgentError;

/// The console socket of the VM `name` (from its `VmFiles`), which QEMU serves while it runs.
pub async fn connect(name: &str, socket: &Path) -> Result<UnixStream, AgentError> {
    UnixStream::connect(socket)
        .await
        .map_err(|e| AgentError::Conflict {
            name: name.to_string(),
            why: format!(
                "its serial console is not available ({}: {e}); is the VM running?",
                socket.display()
            ),
        })
}
