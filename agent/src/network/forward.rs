//! A TCP connection from the node to a guest port, for `PortForward`.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use tokio::net::TcpStream;

use crate::error::AgentError;

/// A guest that is up answers a connect at once (accepting or refusing); one that is not yet
/// up, or drops packets, would leave the client hanging for minutes without this.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

pub async fn connect(vm: &str, ip: Ipv4Addr, port: u16) -> Result<TcpStream, AgentError> {
    let to = SocketAddr::from((ip, port));
    let failed = |why: String| AgentError::Conflict {
        name: vm.to_string(),
        why: format!("cannot connect to the guest at {to}: {why}"),
    };
    match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(to)).await {
        Ok(Ok(s)) => {
            let _ = s.set_nodelay(true);
            Ok(s)
        }
        Ok(Err(e)) => Err(failed(e.to_string())),
        Err(_) => Err(failed(format!("no answer within {CONNECT_TIMEOUT:?}"))),
    }
}
