//! The guest agent of one running VM: whether it answers, and what the guest says it has.
//!
//! One watcher task per QEMU process keeps a single connection (the virtio-serial channel takes
//! one client), pings it, and reports the guest's online vCPUs and memory to the supervisor.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::sync::{Notify, mpsc, oneshot};

use crate::qemu::qga::{Qga, QgaError};

/// Quickly while the guest agent is not up yet, slowly once it is.
const RETRY: Duration = Duration::from_millis(100);
const HEALTHY_INTERVAL: Duration = Duration::from_secs(5);
/// A healthy guest agent answers in milliseconds; while waiting for one to appear, a short
/// timeout keeps detection quick (a late reply is skipped by the next sync).
const PROBE_TIMEOUT: Duration = Duration::from_millis(300);
const TIMEOUT: Duration = Duration::from_secs(2);

/// What the guest agent said last.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GuestView {
    pub connected: bool,
    pub cpus: u32,
    pub memory_bytes: u64,
    /// The guest's network interfaces, loopback left out.
    pub interfaces: Vec<GuestNic>,
}

/// A network interface as the guest sees it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GuestNic {
    pub name: String,
    /// Lowercase, as QEMU gives it (`52:54:00:..`); empty for interfaces without one.
    pub mac: String,
    /// With their prefix length, `10.254.0.2/24`.
    pub ips: Vec<String>,
}

/// The interfaces from `guest-network-get-interfaces`, without loopback.
fn nics(list: Vec<qapi::qga::GuestNetworkInterface>) -> Vec<GuestNic> {
    list.into_iter()
        .filter(|i| i.name != "lo")
        .map(|i| GuestNic {
            name: i.name,
            mac: i.hardware_address.unwrap_or_default().to_ascii_lowercase(),
            ips: i
                .ip_addresses
                .unwrap_or_default()
                .into_iter()
                .map(|a| crate::network::with_prefix(&a.ip_address, a.prefix))
                .collect(),
        })
        .collect()
}

/// Asks the watcher to look now: once (the guest runs again after a move or a restore), or
/// often for a while (a resize, which the guest carries out over seconds). Looking often means
/// a guest agent command every [`ATTENTIVE_INTERVAL`]: work for the guest and for QEMU, so it
/// is kept to when a change is expected.
#[derive(Debug, Clone, Default)]
pub struct Refresh {
    wake: Arc<Notify>,
    closely: Arc<AtomicBool>,
}

/// How often the watcher looks while the guest is expected to change.
const ATTENTIVE_INTERVAL: Duration = Duration::from_millis(20);
/// How long the watcher keeps looking often after [`Refresh::closely`].
const ATTENTIVE_FOR: Duration = Duration::from_secs(30);

impl Refresh {
    pub fn now(&self) {
        self.wake.notify_one();
    }

    pub fn closely(&self) {
        self.closely.store(true, Ordering::Relaxed);
        self.wake.notify_one();
    }

    /// For the watcher, once woken: whether to look often (asked for since the last wake).
    fn take_closely(&self) -> bool {
        self.closely.swap(false, Ordering::Relaxed)
    }
}

/// Freezing waits for the guest's filesystems to flush.
const FREEZE_TIMEOUT: Duration = Duration::from_secs(20);

/// Why a command for the guest was not carried out.
#[derive(Debug, thiserror::Error)]
pub enum GuestError {
    #[error("the guest agent is not connected")]
    NotConnected,
    #[error("the guest agent watcher has ended")]
    WatcherGone,
    #[error(transparent)]
    Qga(#[from] QgaError),
}

type Command = (bool, oneshot::Sender<Result<(), GuestError>>);

/// Commands for the guest, carried out by the watcher on its connection.
#[derive(Debug, Clone)]
pub struct Commands(mpsc::Sender<Command>);

impl Commands {
    /// Freezes (`true`) or thaws the guest's filesystems (`guest-fsfreeze-*`).
    pub async fn fsfreeze(&self, freeze: bool) -> Result<(), GuestError> {
        let (tx, rx) = oneshot::channel();
        let sent = self.0.send((freeze, tx)).await;
        sent.map_err(|_| GuestError::WatcherGone)?;
        rx.await.map_err(|_| GuestError::WatcherGone)?
    }
}

/// A command channel and the receiver to hand to [`watch`].
pub fn commands() -> (Commands, mpsc::Receiver<Command>) {
    let (tx, rx) = mpsc::channel(1);
    (Commands(tx), rx)
}

async fn fsfreeze(conn: &mut Option<Qga>, freeze: bool) -> Result<(), GuestError> {
    let qga = conn.as_mut().ok_or(GuestError::NotConnected)?;
    qga.sync(TIMEOUT).await?;
    if freeze {
        qga.execute(qapi::qga::guest_fsfreeze_freeze {}, FREEZE_TIMEOUT)
            .await?;
    } else {
        qga.execute(qapi::qga::guest_fsfreeze_thaw {}, FREEZE_TIMEOUT)
            .await?;
    }
    Ok(())
}

/// What the guest reports now. `memory_before` is the last memory figure seen: listing memory
/// blocks fails now and then while the guest adds or removes them (a block's sysfs entry goes
/// away under the guest agent), and that is no reason to report no memory at all.
async fn view(qga: &mut Qga, probe: bool, before: &GuestView) -> Result<GuestView, QgaError> {
    let memory_before = before.memory_bytes;
    qga.sync(if probe { PROBE_TIMEOUT } else { TIMEOUT })
        .await?;
    qga.execute(qapi::qga::guest_ping {}, TIMEOUT).await?;
    let cpus = qga.execute(qapi::qga::guest_get_vcpus {}, TIMEOUT).await?;
    // A guest without memory-block support reports 0 (it never had a figure); a timeout ends
    // this look (its late reply must not be read as the answer to the next command).
    let memory_bytes = match (
        qga.execute(qapi::qga::guest_get_memory_blocks {}, TIMEOUT)
            .await,
        qga.execute(qapi::qga::guest_get_memory_block_info {}, TIMEOUT)
            .await,
    ) {
        (Err(e @ QgaError::Timeout(_)), _) | (_, Err(e @ QgaError::Timeout(_))) => return Err(e),
        (Ok(blocks), Ok(info)) => {
            (blocks.iter().filter(|b| b.online).count() as u64).saturating_mul(info.size)
        }
        _ => memory_before,
    };
    // A guest agent built without network support answers with an error: no interfaces known.
    let interfaces = match qga
        .execute(qapi::qga::guest_network_get_interfaces {}, TIMEOUT)
        .await
    {
        Ok(list) => nics(list),
        Err(e @ QgaError::Timeout(_)) => return Err(e),
        Err(_) => before.interfaces.clone(),
    };
    Ok(GuestView {
        connected: true,
        cpus: cpus.iter().filter(|c| c.online).count() as u32,
        memory_bytes,
        interfaces,
    })
}

/// Watches the guest agent for the life of one QEMU process; sends each change of view.
pub async fn watch(
    socket: PathBuf,
    refresh: Refresh,
    tx: mpsc::Sender<GuestView>,
    mut commands: mpsc::Receiver<Command>,
) {
    let mut conn: Option<Qga> = None;
    let mut last = GuestView::default();
    let mut attentive_until = tokio::time::Instant::now();
    loop {
        if conn.is_none() {
            conn = Qga::connect(&socket).await.ok();
        }
        let now = match &mut conn {
            Some(qga) => match view(qga, !last.connected, &last).await {
                Ok(v) => v,
                // It answered, with an error: a passing one (the guest is changing), not news.
                Err(QgaError::Command { .. }) if last.connected => last.clone(),
                Err(QgaError::Timeout(_) | QgaError::Command { .. }) => GuestView::default(),
                Err(_) => {
                    conn = None;
                    GuestView::default()
                }
            },
            None => GuestView::default(),
        };
        let connected = now.connected;
        if now != last {
            last = now.clone();
            if tx.send(now).await.is_err() {
                return;
            }
        }
        let attentive = tokio::time::Instant::now() < attentive_until;
        let pause = match (connected, attentive) {
            (true, true) => ATTENTIVE_INTERVAL,
            (true, false) => HEALTHY_INTERVAL,
            (false, _) => RETRY,
        };
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = refresh.wake.notified() => {
                if refresh.take_closely() {
                    attentive_until = tokio::time::Instant::now() + ATTENTIVE_FOR;
                }
            }
            Some((freeze, reply)) = commands.recv() => {
                let _ = reply.send(fsfreeze(&mut conn, freeze).await);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_close_refresh_makes_the_watcher_look_often() {
        let r = Refresh::default();
        r.now();
        assert!(
            !r.take_closely(),
            "a look after a move or restore is a single one"
        );
        r.closely();
        assert!(r.take_closely());
        assert!(!r.take_closely(), "once per request");
    }
}
