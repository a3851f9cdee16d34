//! What happens when QEMU ends: the phase it leaves, the callers of a stop, and the restart
//! policy with its back-off.

use crate::context::now_ms;
use crate::qemu::process;
use crate::vm::actor::{ScheduledRestart, Supervisor, Task};
use crate::vm::guest::GuestView;
use crate::vm::phase::{self, Exit, Phase};
use crate::vm::reason::Reason;
use std::time::Duration;
use tokio::sync::mpsc;
use tracing::{info, warn};

impl Supervisor {
    pub(crate) async fn on_exit(&mut self, info: process::ExitInfo) {
        let Some(run) = self.running.take() else {
            return;
        };
        self.end_migration_with_process().await;
        if self.gone {
            // The VM had been handed over just before.
            return;
        }
        let tail = process::stderr_tail(&self.dir, run.stderr_from, 600);
        if self.status.phase == Phase::Incoming {
            // The VM still lives at the source; nothing of it stays here.
            warn!(
                "the incoming QEMU ended ({}): {tail}",
                phase::how_it_ended(info.code, info.signal)
            );
            drop(run);
            let _ = self.remove(Reason::IncomingFailed).await;
            return;
        }
        let exit = Exit {
            guest_shutdown: run.guest_shutdown.clone(),
            guest_panicked: run.guest_panicked,
            code: info.code,
            signal: info.signal,
            stderr_tail: tail,
        };
        drop(run);
        let stopping = self.task.take_stopping();
        let (phase, mut message) = phase::on_exit(self.status.phase, &exit);
        let fenced = stopping.as_ref().is_some_and(|s| s.fenced);
        if phase == Phase::Stopped && stopping.as_ref().is_some_and(|s| s.timed_out) {
            message = "guest did not power off in time; QEMU ended".into();
        }
        if fenced {
            message = crate::vm::stop::FENCED.into();
        }
        info!(?phase, message, "QEMU exited");
        let ran_for = Duration::from_millis((now_ms() - self.status.started_at_ms).max(0) as u64);
        self.forget_process();
        let reason = if fenced {
            Reason::Fenced
        } else if phase == Phase::Failed {
            Reason::ProcessExited
        } else {
            Reason::Stopped
        };
        self.set_phase(phase, &message, reason);
        match stopping {
            Some(stopping) => {
                let result = if stopping.restart {
                    self.start().await
                } else {
                    Ok(self.snapshot())
                };
                for w in stopping.waiters {
                    let _ = w.send(result.clone());
                }
            }
            None => self.schedule_restart(ran_for),
        }
    }

    /// Clears what belonged to the QEMU process that has just ended: its status figures, the
    /// guest-agent reports still queued from it, its sockets and its cgroup.
    pub(crate) fn forget_process(&mut self) {
        self.qga_rx = mpsc::channel(1).1;
        self.status.agent_connected = false;
        self.status.guest = GuestView::default();
        self.status.qemu_status.clear();
        self.status.started_at_ms = 0;
        for sock in [&self.files.qmp_socket, &self.files.qga_socket] {
            let _ = std::fs::remove_file(sock);
        }
        if let Ok(cg) = &self.ctx.cgroups {
            cg.remove(&self.spec.name);
        }
    }

    /// Applies the restart policy after QEMU ended without being asked to.
    pub(crate) fn schedule_restart(&mut self, ran_for: Duration) {
        if ran_for >= phase::STEADY_RUN {
            self.status.restart_count = 0;
        }
        if self.spec.high_availability && self.ctx.fence.fenced() {
            // It may run elsewhere by now: the controller starts it again if not.
            return;
        }
        let policy = self.spec.restart_policy;
        let Some(delay) =
            phase::restart_delay(policy, self.status.phase, self.status.restart_count)
        else {
            return;
        };
        self.task = Task::Restart(ScheduledRestart {
            at: tokio::time::Instant::now() + delay,
            at_ms: now_ms() + delay.as_millis() as i64,
            delay,
        });
        info!(?delay, "restart scheduled");
        let message = self.message();
        self.publish(Reason::RestartScheduled, &message);
    }

    pub(crate) async fn auto_restart(&mut self) {
        self.task.take_restart();
        self.status.restart_count += 1;
        info!(attempt = self.status.restart_count, "restarting by policy");
        if let Err(e) = self.start().await {
            warn!("restart failed: {e}");
            // A launch that fails counts like a crash: back off and try again.
            self.schedule_restart(Duration::ZERO);
        }
    }
}
