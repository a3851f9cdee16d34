//! A link between the controller and an agent that a test can cut and heal: a relay on a unix
//! socket of its own in front of the agent's. Cut, it drops every connection and closes new
//! ones at once, as a host cut off from the controller; healed, it relays again.

use std::path::{Path, PathBuf};

use hypersdk_proto::endpoint::Address;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::watch;

pub struct Link {
    /// Where the controller reaches the agent through the link.
    pub address: Address,
    up: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Link {
    /// A link to the agent at `target` (a unix socket), listening in `dir`.
    pub fn new(target: &Address, dir: &Path) -> Link {
        let Address::Unix(target) = target.clone() else {
            panic!("links relay unix sockets: {target}");
        };
        let path = dir.join("link.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let (up, _) = watch::channel(true);
        let task = tokio::spawn(relay(listener, target, up.subscribe()));
        Link {
            address: Address::Unix(path),
            up,
            task,
        }
    }

    pub fn cut(&self) {
        self.up.send_replace(false);
    }

    pub fn heal(&self) {
        self.up.send_replace(true);
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn relay(listener: UnixListener, target: PathBuf, up: watch::Receiver<bool>) {
    while let Ok((client, _)) = listener.accept().await {
        if !*up.borrow() {
            continue;
        }
        let (target, mut up) = (target.clone(), up.clone());
        tokio::spawn(async move {
            let Ok(agent) = UnixStream::connect(&target).await else {
                return;
            };
            let (mut client, mut agent) = (client, agent);
            tokio::select! {
                _ = tokio::io::copy_bidirectional(&mut client, &mut agent) => {}
                _ = up.wait_for(|up| !*up) => {}
            }
        });
    }
}
