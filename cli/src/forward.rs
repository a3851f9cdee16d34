//! `hyperctl vm port-forward NAME LOCAL:GUEST`: a loopback port on this machine whose
//! connections are carried over gRPC to the agent, which connects to the guest's port on the
//! node network.

use hypersdk_proto::agent::v1 as pb;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;

use crate::Client;

/// `LOCAL:GUEST`; LOCAL 0 takes any free port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ports {
    pub local: u16,
    pub guest: u16,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("LOCAL:GUEST: {0}")]
pub struct PortsError(String);

impl std::str::FromStr for Ports {
    type Err = PortsError;

    fn from_str(s: &str) -> Result<Ports, PortsError> {
        let (local, guest) = s
            .split_once(':')
            .ok_or_else(|| PortsError(format!("{s:?} is not LOCAL:GUEST (e.g. 2222:22)")))?;
        let port = |what: &str, v: &str, zero_ok: bool| {
            v.parse::<u16>()
                .ok()
                .filter(|p| zero_ok || *p != 0)
                .ok_or_else(|| PortsError(format!("{what} port {v:?} is not a TCP port")))
        };
        Ok(Ports {
            local: port("local", local, true)?,
            guest: port("guest", guest, false)?,
        })
    }
}

pub async fn run(client: &Client, name: String, ports: Ports) -> anyhow::Result<()> {
    // Loopback only: whoever reaches the port reaches the guest.
    let listener = TcpListener::bind(("127.0.0.1", ports.local)).await?;
    let local = listener.local_addr()?;
    println!("Forwarding from {local} to {name}:{}", ports.guest);
    loop {
        let (conn, _) = listener.accept().await?;
        let client = client.clone();
        let name = name.clone();
        tokio::spawn(async move {
            if let Err(e) = carry(client, conn, name, ports.guest).await {
                eprintln!("hyperctl: connection to {}: {e}", ports.guest);
            }
        });
    }
}

/// One connection, both ways, until both sides are done.
async fn carry(mut client: Client, conn: TcpStream, name: String, port: u16) -> anyhow::Result<()> {
    let (tx, rx) = mpsc::channel(16);
    tx.send(pb::PortForwardInput {
        name,
        port: port.into(),
        data: Vec::new(),
    })
    .await?;
    let mut from_guest = client
        .port_forward(ReceiverStream::new(rx))
        .await?
        .into_inner();
    let (mut reader, mut writer) = conn.into_split();
    let up = async move {
        let mut buf = vec![0u8; 16 << 10];
        loop {
            match reader.read(&mut buf).await {
                Ok(0) | Err(_) => return, // dropping tx half-closes towards the guest
                Ok(n) => {
                    let msg = pb::PortForwardInput {
                        name: String::new(),
                        port: 0,
                        data: buf[..n].to_vec(),
                    };
                    if tx.send(msg).await.is_err() {
                        return;
                    }
                }
            }
        }
    };
    let down = async move {
        while let Some(msg) = from_guest.next().await {
            let msg = msg?;
            writer.write_all(&msg.data).await?;
        }
        writer.shutdown().await?;
        anyhow::Ok(())
    };
    let (_, down) = tokio::join!(up, down);
    down
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_parse_and_errors_name_the_argument() {
        assert_eq!(
            "2222:22".parse(),
            Ok(Ports {
                local: 2222,
                guest: 22
            })
        );
        assert_eq!(
            "0:80".parse(),
            Ok(Ports {
                local: 0,
                guest: 80
            })
        );
        for bad in ["22", "a:22", "22:0", "70000:22", "22:"] {
            let e = bad.parse::<Ports>().unwrap_err();
            assert!(e.to_string().starts_with("LOCAL:GUEST: "), "{e}");
        }
    }
}
