//! This node's lease, shared by the gRPC service (renewals, node facts), the VMs (may a highly
//! available VM start?) and the watcher that fences; kept on disk across agent restarts.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use hypersdk_proto::agent::v1 as pb;
use tracing::warn;

use super::{Lease, RenewError, issue};
use crate::vm::actor::Op;
use crate::vm::registry::Vms;

const FILE: &str = "lease.json";
/// How often the watcher looks at the lease: the controller's margin covers this delay.
const CHECK: Duration = Duration::from_millis(100);

#[derive(Debug)]
pub struct Hold {
    path: PathBuf,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    lease: Lease,
    last_token: u64,
}

/// Microseconds since boot on CLOCK_BOOTTIME: the same for every process, and it keeps counting
/// while the host is suspended (a suspended node's lease runs out like everyone else's).
pub fn now_us() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime only writes the timespec; CLOCK_BOOTTIME exists on Linux ≥ 2.6.39.
    unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    ts.tv_sec as u64 * 1_000_000 + ts.tv_nsec as u64 / 1_000
}

impl Hold {
    /// The lease kept in `data_dir`, or none.
    pub fn load(data_dir: &Path) -> Hold {
        let path = data_dir.join(FILE);
        let lease = std::fs::read(&path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        Hold {
            path,
            state: Mutex::new(State {
                lease,
                last_token: 0,
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Renews with `token` (0: only asks for one) and answers with the next token.
    pub fn renew(&self, token: u64, timeout: Duration) -> Result<pb::Lease, RenewError> {
        let now = now_us();
        let mut s = self.lock();
        if token != 0 {
            let before = s.lease;
            s.lease.renew(token, timeout, now)?;
            if s.lease != before {
                self.save(&s.lease);
            }
        }
        s.last_token = issue(s.last_token, now);
        Ok(view(&s.lease, s.last_token, now))
    }

    /// The lease as node facts show it (no token).
    pub fn view(&self) -> pb::Lease {
        view(&self.lock().lease, 0, now_us())
    }

    /// The lease ran out and highly available VMs may not run here.
    pub fn fenced(&self) -> bool {
        self.lock().lease.fenced
    }

    /// Marks the lease fenced once it has run out: true the first time.
    fn must_fence(&self) -> bool {
        let mut s = self.lock();
        let due = s.lease.must_fence(now_us());
        if due {
            self.save(&s.lease);
        }
        due
    }

    fn save(&self, lease: &Lease) {
        let tmp = self.path.with_extension("json.tmp");
        let written = serde_json::to_vec(lease)
            .map_err(std::io::Error::other)
            .and_then(|b| std::fs::write(&tmp, b))
            .and_then(|()| std::fs::rename(&tmp, &self.path));
        if let Err(e) = written {
            warn!(path = %self.path.display(), "cannot keep the lease: {e}");
        }
    }
}

fn view(lease: &Lease, token: u64, now: u64) -> pb::Lease {
    pb::Lease {
        token,
        remaining_ms: lease.remaining(now).as_millis() as u64,
        fenced: lease.fenced,
    }
}

/// Stops every highly available VM of `vms` once the lease has run out.
pub async fn watch(hold: Arc<Hold>, vms: Arc<Vms>) {
    let mut tick = tokio::time::interval(CHECK);
    loop {
        tick.tick().await;
        if !hold.must_fence() {
            continue;
        }
        warn!("the controller's lease ran out: stopping the highly available VMs");
        for vm in vms.list().await {
            let Some(spec) = vm.spec.filter(|s| s.high_availability) else {
                continue;
            };
            if let Err(e) = vms.call(&spec.name, Op::Fence).await {
                warn!(vm = spec.name, "fencing: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_restarted_agent_keeps_its_lease_and_fences_on_time() {
        let dir = tempfile::tempdir().unwrap();
        let hold = Hold::load(dir.path());
        assert_eq!(hold.view().remaining_ms, 0);
        let token = hold.renew(0, Duration::from_secs(60)).unwrap().token;
        hold.renew(token, Duration::from_secs(60)).unwrap();
        // A new agent process reads the same lease.
        let again = Hold::load(dir.path());
        assert!(again.view().remaining_ms > 50_000, "{:?}", again.view());
        assert!(!again.must_fence());
        // One that ran out while no agent was there is fenced at once, and stays so.
        again.save(&Lease {
            until_us: Some(now_us() - 1_000_000),
            fenced: false,
        });
        let after = Hold::load(dir.path());
        assert!(after.must_fence());
        assert!(after.fenced() && Hold::load(dir.path()).fenced());
    }
}
