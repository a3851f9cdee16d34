//! Pausing, resuming, stopping (ACPI power-down with a deadline, or a kill) and removing a VM.

use crate::error::AgentError;
use crate::vm::actor::POWERDOWN_REPEAT;
use crate::vm::actor::Reply;
use crate::vm::actor::Supervisor;
use crate::vm::actor::{Stopping, Task};
use crate::vm::phase::{Action, Phase};
use crate::vm::reason::{Reason, event};
use hypersdk_proto::agent::v1 as pb;
use std::time::Duration;

/// What a fenced VM's status says.
pub(crate) const FENCED: &str = "fenced: this node's lease from the controller ran out, so the \
    VM was stopped here and may run on another node";
use tracing::{info, warn};

impl Supervisor {
    pub(crate) async fn pause(&mut self) -> Result<pb::Vm, AgentError> {
        self.check(Action::Pause)?;
        self.qmp_call(|q| async move { q.execute(qapi::qmp::stop {}).await })
            .await?;
        self.status.qemu_status = "paused".into();
        self.set_phase(Phase::Paused, "paused", Reason::Paused);
        Ok(self.snapshot())
    }

    pub(crate) async fn resume(&mut self) -> Result<pb::Vm, AgentError> {
        self.check(Action::Resume)?;
        self.qmp_call(|q| async move { q.execute(qapi::qmp::cont {}).await })
            .await?;
        self.status.qemu_status = "running".into();
        self.set_phase(Phase::Running, "resumed", Reason::Resumed);
        Ok(self.snapshot())
    }

    /// Begins a stop; `reply` is answered when QEMU has exited (and, for a restart, started again).
    pub(crate) async fn stop(
        &mut self,
        timeout: Duration,
        force: bool,
        restart: bool,
        reply: Reply,
    ) {
        let action = if restart {
            Action::Restart
        } else {
            Action::Stop
        };
        if !restart && self.task.take_restart().is_some() {
            // Stopping a VM that waits for its restart policy cancels the restart.
            self.set_phase(
                Phase::Stopped,
                "restart cancelled by a stop request",
                Reason::Stopped,
            );
            let _ = reply.send(Ok(self.snapshot()));
            return;
        }
        if let Err(e) = self.check(action) {
            let _ = reply.send(Err(e));
            return;
        }
        if let Task::Stopping(stopping) = &mut self.task {
            // Already stopping: join the wait; a forced stop cuts the grace period short.
            stopping.waiters.push(reply);
            // A stop wins over a restart under way; a restart joins a stop as a stop.
            stopping.restart &= restart;
            if force {
                self.kill();
            }
            return;
        }
        // A paused guest cannot react to ACPI, and a starting one may not listen yet.
        let graceful = !force && self.status.phase == Phase::Running;
        self.begin_stop(timeout, graceful, restart, reply).await;
    }

    /// The node's lease ran out: ends QEMU at once (the controller may start the VM elsewhere
    /// after the fence timeout, so there is no time for a power button) and drops a scheduled
    /// restart. `reply` is answered once QEMU has exited.
    pub(crate) async fn fence(&mut self, reply: Reply) {
        if self.task.take_restart().is_some() {
            self.set_phase(Phase::Stopped, FENCED, Reason::Fenced);
        }
        if self.running.is_none() {
            let _ = reply.send(Ok(self.snapshot()));
            return;
        }
        match std::mem::take(&mut self.task) {
            Task::Stopping(mut s) => {
                s.waiters.push(reply);
                s.restart = false;
                s.fenced = true;
                self.task = Task::Stopping(s);
                self.kill();
                return;
            }
            Task::Migrating(m) => {
                let _ = m.cancel.send(true);
            }
            _ => {}
        }
        self.begin_stop(Duration::ZERO, false, false, reply).await;
        if let Task::Stopping(s) = &mut self.task {
            s.fenced = true;
        }
    }

    /// Enters Stopping: presses the power button (graceful) or ends QEMU.
    pub(crate) async fn begin_stop(
        &mut self,
        timeout: Duration,
        graceful: bool,
        restart: bool,
        reply: Reply,
    ) {
        self.task = Task::Stopping(Stopping {
            deadline: tokio::time::Instant::now() + if graceful { timeout } else { Duration::ZERO },
            next_powerdown: graceful.then(|| tokio::time::Instant::now() + POWERDOWN_REPEAT),
            waiters: vec![reply],
            restart,
            timed_out: false,
            fenced: false,
        });
        self.set_phase(
            Phase::Stopping,
            if graceful {
                "ACPI power-down sent"
            } else {
                "stopping"
            },
            Reason::Stopping,
        );
        if graceful {
            if let Err(e) = self
                .qmp_call(|q| async move { q.execute(qapi::qmp::system_powerdown {}).await })
                .await
            {
                warn!("system_powerdown failed, ending QEMU: {e}");
                self.kill();
            }
        } else {
            self.kill();
        }
    }

    pub(crate) async fn on_stop_tick(&mut self) {
        let Task::Stopping(s) = &mut self.task else {
            return;
        };
        let now = tokio::time::Instant::now();
        if now < s.deadline {
            s.next_powerdown = Some(now + POWERDOWN_REPEAT);
            let _ = self
                .qmp_call(|q| async move { q.execute(qapi::qmp::system_powerdown {}).await })
                .await;
            return;
        }
        // Only once: the process exit ends the stop. A forced stop pressed no button, so it
        // did not time out.
        s.timed_out = s.next_powerdown.take().is_some();
        s.deadline = now + Duration::from_secs(3600);
        warn!("guest did not power off in time; ending QEMU");
        self.kill();
    }

    /// Ends the VM here: its QEMU (if any) and its files. `reason` goes out with the DELETED
    /// event (Deleted, MigratedAway, IncomingAborted, IncomingFailed).
    pub(crate) async fn remove(&mut self, reason: Reason) -> Result<pb::Vm, AgentError> {
        match std::mem::take(&mut self.task) {
            Task::Migrating(m) => {
                let _ = m.cancel.send(true);
            }
            Task::Stopping(s) => {
                for waiter in s.waiters {
                    let _ = waiter.send(Err(AgentError::NotFound(self.spec.name.clone())));
                }
            }
            Task::Restart(_) | Task::None => {}
        }
        if let Some(mut run) = self.running.take() {
            run.qemu.kill();
            run.qemu.wait().await;
        }
        if let Ok(cg) = &self.ctx.cgroups {
            cg.remove(&self.spec.name);
        }
        self.unplug_nics();
        self.ctx
            .store
            .remove(&self.spec.name)
            .map_err(|e| AgentError::Internal(format!("removing {}: {e}", self.dir.display())))?;
        // Snapshots of a VM that left this node cannot be restored here.
        self.ctx.snapshots.remove_vm(&self.spec.name);
        if reason == Reason::Deleted {
            // The disks made for the VM or a clone's copies go with it (after a migration they
            // may be in use on the target, which sees them through shared storage: kept then).
            crate::disks::make::remove_made(&self.spec);
            let dir = crate::clone::clone_dir(&self.ctx.images_dir, &self.spec.name);
            if let Err(e) = std::fs::remove_dir_all(&dir)
                && e.kind() != std::io::ErrorKind::NotFound
            {
                warn!("removing {}: {e}", dir.display());
            }
        }
        info!(%reason, "removed from this node");
        self.gone = true;
        let vm = self.snapshot();
        let deleted = event(pb::EventType::Deleted, vm.clone(), reason, "");
        let _ = self.ctx.events.send(deleted);
        Ok(vm)
    }
}
