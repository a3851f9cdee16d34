//! The VM lifecycle as an explicit state machine. Pure: the supervisor asks it what is allowed
//! and what an observed fact (a QMP event, a process exit) means; it performs the I/O itself.
//!
//! ```text
//! Pending ─start─► Starting ─► Running ⇄ Paused
//!                                 │        │
//!                               stop     stop
//!                                 ▼        ▼
//!            Stopped ◄─exit─ Stopping   (any) ─unexpected exit─► Failed
//!
//! Running ─migrate─► Migrating ─handed over─► (gone from this node)
//!                        └─failed/cancelled─► Running
//! (target) Incoming ─finish─► Running;  Incoming ─abort / exit─► (gone)
//! ```

use hypersdk_proto::agent::v1 as pb;
use serde::{Deserialize, Serialize};

use std::time::Duration;

use crate::spec::RestartPolicy;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Phase {
    Pending,
    Starting,
    Running,
    Paused,
    Stopping,
    Stopped,
    /// Sending its state to another node (source side).
    Migrating,
    Failed,
    /// A QEMU waiting for the VM's state from another node (target side).
    Incoming,
    /// Fetching the VM's disk image into the node's cache before its first start.
    Importing,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Start,
    Stop,
    Restart,
    Pause,
    Resume,
    Migrate,
}

impl Action {
    pub fn verb(self) -> &'static str {
        match self {
            Action::Start => "start",
            Action::Stop => "stop",
            Action::Restart => "restart",
            Action::Pause => "pause",
            Action::Resume => "resume",
            Action::Migrate => "migrate",
        }
    }
}

impl Phase {
    /// A QEMU process exists in this phase.
    pub fn has_process(self) -> bool {
        matches!(
            self,
            Phase::Starting
                | Phase::Running
                | Phase::Paused
                | Phase::Stopping
                | Phase::Migrating
                | Phase::Incoming
        )
    }

    pub fn name(self) -> &'static str {
        match self {
            Phase::Pending => "Pending",
            Phase::Starting => "Starting",
            Phase::Running => "Running",
            Phase::Paused => "Paused",
            Phase::Stopping => "Stopping",
            Phase::Stopped => "Stopped",
            Phase::Migrating => "Migrating",
            Phase::Failed => "Failed",
            Phase::Incoming => "Incoming",
            Phase::Importing => "Importing",
        }
    }
}

/// A request that the VM's phase does not allow.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot {} a VM that is {}", .action.verb(), .phase.name())]
pub struct NotAllowed {
    pub action: Action,
    pub phase: Phase,
}

/// A phase change the state machine does not have: a bug in the agent, never user input.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("no transition from {} to {}", .from.name(), .to.name())]
pub struct InvalidTransition {
    pub from: Phase,
    pub to: Phase,
}

/// Whether `action` may be taken in `phase`.
pub fn check(phase: Phase, action: Action) -> Result<(), NotAllowed> {
    use Action::*;
    use Phase::*;
    let ok = match action {
        Start => matches!(phase, Pending | Stopped | Failed),
        Stop => matches!(phase, Starting | Running | Paused | Stopping),
        Restart => matches!(phase, Running | Paused),
        Pause => phase == Running,
        Resume => phase == Paused,
        Migrate => phase == Running,
    };
    if ok {
        Ok(())
    } else {
        Err(NotAllowed { action, phase })
    }
}

/// Every phase change goes through here (staying in a phase is always allowed: the message
/// changes). See the diagram at the top.
pub fn valid_transition(from: Phase, to: Phase) -> Result<(), InvalidTransition> {
    use Phase::*;
    let ok = from == to
        || match from {
            // Stopped: a disk-only snapshot restored onto a VM that never ran.
            Pending => matches!(to, Starting | Importing | Stopped | Failed),
            // The disks are made once the image is in: QEMU starts next.
            Importing => matches!(to, Starting | Failed),
            // Incoming: a migration target's QEMU, launched paused.
            Starting => matches!(
                to,
                Running | Paused | Incoming | Stopping | Stopped | Failed
            ),
            // Stopped without Stopping: the guest powered itself off, or a restore replaced it.
            Running => matches!(to, Paused | Stopping | Migrating | Stopped | Failed),
            Paused => matches!(to, Running | Stopping | Stopped | Failed),
            Stopping => to == Stopped,
            // Running: the migration failed or was cancelled, and the VM stays here.
            Migrating => matches!(to, Running | Paused | Stopped | Failed),
            Incoming => to == Running,
            Stopped | Failed => matches!(to, Starting | Importing | Stopped | Failed),
        };
    if ok {
        Ok(())
    } else {
        Err(InvalidTransition { from, to })
    }
}

/// What QEMU's run state (from `query-status` or STOP/RESUME events) means for the phase.
pub fn on_run_state(phase: Phase, running: bool) -> Phase {
    match (phase, running) {
        (Phase::Starting | Phase::Paused, true) => Phase::Running,
        (Phase::Running, false) => Phase::Paused,
        (p, _) => p,
    }
}

/// Why the QEMU process ended, as far as the supervisor saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exit {
    /// A SHUTDOWN event said the guest powered itself off (not a crash).
    pub guest_shutdown: Option<String>,
    /// A GUEST_PANICKED event came first.
    pub guest_panicked: bool,
    /// Exit code, or None when a signal ended it.
    pub code: Option<i32>,
    pub signal: Option<i32>,
    /// The last lines QEMU wrote to stderr.
    pub stderr_tail: String,
}

/// "QEMU exited with status 1", "QEMU was killed by signal 9".
pub fn how_it_ended(code: Option<i32>, signal: Option<i32>) -> String {
    match (code, signal) {
        (Some(c), _) => format!("QEMU exited with status {c}"),
        (None, Some(s)) => format!("QEMU was killed by signal {s}"),
        (None, None) => "QEMU ended".to_string(),
    }
}

/// The phase and message after the QEMU process is gone.
pub fn on_exit(phase: Phase, exit: &Exit) -> (Phase, String) {
    if phase == Phase::Stopping {
        return (Phase::Stopped, "stopped".into());
    }
    // An adopted process's exit status is not ours to read (code None, signal None).
    let clean = exit.code == Some(0) || (exit.code.is_none() && exit.signal.is_none());
    if let Some(reason) = &exit.guest_shutdown
        && clean
    {
        return (Phase::Stopped, format!("guest powered off ({reason})"));
    }
    if exit.guest_panicked {
        return (Phase::Failed, "the guest kernel panicked".into());
    }
    let how = how_it_ended(exit.code, exit.signal);
    let tail = exit.stderr_tail.trim();
    if tail.is_empty() {
        (Phase::Failed, how)
    } else {
        (Phase::Failed, format!("{how}: {tail}"))
    }
}

/// Delay before the restart policy starts a VM again after QEMU ended on its own (not through
/// a stop request), given the phase that exit left it in and the restarts made so far; `None`
/// when it stays down. Back-off: at once, then 1 s, 2 s, 4 s … up to 5 minutes.
pub fn restart_delay(policy: RestartPolicy, after_exit: Phase, restarts: u32) -> Option<Duration> {
    let restart = match policy {
        RestartPolicy::Never => false,
        RestartPolicy::OnFailure => after_exit == Phase::Failed,
        RestartPolicy::Always => matches!(after_exit, Phase::Failed | Phase::Stopped),
    };
    restart.then(|| match restarts {
        0 => Duration::ZERO,
        n => Duration::from_secs(1u64 << (n - 1).min(9)).min(MAX_BACKOFF),
    })
}

const MAX_BACKOFF: Duration = Duration::from_secs(300);
/// A VM that ran this long since its last (re)start counts as healthy again: back-off resets.
pub const STEADY_RUN: Duration = Duration::from_secs(60);

/// The phase a gRPC status reports (for the simulator, which keeps VMs as gRPC messages).
impl TryFrom<pb::VmPhase> for Phase {
    type Error = pb::VmPhase;
    fn try_from(p: pb::VmPhase) -> Result<Self, pb::VmPhase> {
        Ok(match p {
            pb::VmPhase::Pending => Phase::Pending,
            pb::VmPhase::Starting => Phase::Starting,
            pb::VmPhase::Running => Phase::Running,
            pb::VmPhase::Paused => Phase::Paused,
            pb::VmPhase::Stopping => Phase::Stopping,
            pb::VmPhase::Stopped => Phase::Stopped,
            pb::VmPhase::Migrating => Phase::Migrating,
            pb::VmPhase::Failed => Phase::Failed,
            pb::VmPhase::Incoming => Phase::Incoming,
            pb::VmPhase::Importing => Phase::Importing,
            pb::VmPhase::Unspecified => return Err(p),
        })
    }
}

impl From<Phase> for pb::VmPhase {
    fn from(p: Phase) -> Self {
        match p {
            Phase::Pending => pb::VmPhase::Pending,
            Phase::Starting => pb::VmPhase::Starting,
            Phase::Running => pb::VmPhase::Running,
            Phase::Paused => pb::VmPhase::Paused,
            Phase::Stopping => pb::VmPhase::Stopping,
            Phase::Stopped => pb::VmPhase::Stopped,
            Phase::Migrating => pb::VmPhase::Migrating,
            Phase::Incoming => pb::VmPhase::Incoming,
            Phase::Importing => pb::VmPhase::Importing,
            Phase::Failed => pb::VmPhase::Failed,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allowed_actions_per_phase() {
        assert!(check(Phase::Pending, Action::Start).is_ok());
        assert!(check(Phase::Failed, Action::Start).is_ok());
        assert!(check(Phase::Running, Action::Pause).is_ok());
        assert!(check(Phase::Paused, Action::Resume).is_ok());
        assert!(check(Phase::Paused, Action::Stop).is_ok());
        let e = check(Phase::Running, Action::Start).unwrap_err();
        assert_eq!(e.to_string(), "cannot start a VM that is Running");
        assert!(check(Phase::Stopped, Action::Pause).is_err());
        assert!(check(Phase::Stopped, Action::Stop).is_err());
        assert!(check(Phase::Running, Action::Resume).is_err());
        assert!(check(Phase::Stopped, Action::Restart).is_err());
        assert!(check(Phase::Running, Action::Migrate).is_ok());
        assert!(check(Phase::Paused, Action::Migrate).is_err());
        for a in [
            Action::Stop,
            Action::Pause,
            Action::Restart,
            Action::Migrate,
        ] {
            assert!(check(Phase::Migrating, a).is_err(), "{a:?} while migrating");
            assert!(check(Phase::Incoming, a).is_err(), "{a:?} while incoming");
        }
    }

    #[test]
    fn run_state_moves_between_running_and_paused() {
        assert_eq!(on_run_state(Phase::Starting, true), Phase::Running);
        assert_eq!(on_run_state(Phase::Running, false), Phase::Paused);
        assert_eq!(on_run_state(Phase::Paused, true), Phase::Running);
        assert_eq!(on_run_state(Phase::Stopping, true), Phase::Stopping);
        // The migration, not QEMU's run state, decides these.
        assert_eq!(on_run_state(Phase::Migrating, false), Phase::Migrating);
        assert_eq!(on_run_state(Phase::Incoming, true), Phase::Incoming);
    }

    fn exit(guest: Option<&str>, code: Option<i32>, signal: Option<i32>) -> Exit {
        Exit {
            guest_shutdown: guest.map(String::from),
            guest_panicked: false,
            code,
            signal,
            stderr_tail: String::new(),
        }
    }

    #[test]
    fn restart_policy_and_back_off() {
        use RestartPolicy::*;
        assert_eq!(restart_delay(Never, Phase::Failed, 0), None);
        assert_eq!(
            restart_delay(OnFailure, Phase::Stopped, 0),
            None,
            "guest power-off"
        );
        assert_eq!(
            restart_delay(OnFailure, Phase::Failed, 0),
            Some(Duration::ZERO)
        );
        assert_eq!(
            restart_delay(Always, Phase::Stopped, 0),
            Some(Duration::ZERO)
        );
        let delays: Vec<_> = (0..12)
            .map(|n| restart_delay(Always, Phase::Failed, n).unwrap().as_secs())
            .collect();
        assert_eq!(delays, [0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 300, 300]);
    }

    #[test]
    fn exits_are_stops_or_failures() {
        assert_eq!(
            on_exit(Phase::Stopping, &exit(None, None, Some(9))).0,
            Phase::Stopped
        );
        let (p, m) = on_exit(Phase::Running, &exit(Some("guest-shutdown"), Some(0), None));
        assert_eq!(p, Phase::Stopped);
        assert!(m.contains("guest-shutdown"));
        let adopted = on_exit(Phase::Running, &exit(Some("guest-shutdown"), None, None));
        assert_eq!(
            adopted.0,
            Phase::Stopped,
            "an adopted guest's power-off is no failure"
        );
        let (p, m) = on_exit(Phase::Running, &exit(None, None, Some(9)));
        assert_eq!(
            (p, m.as_str()),
            (Phase::Failed, "QEMU was killed by signal 9")
        );
        let mut e = exit(None, Some(1), None);
        e.stderr_tail = "qemu: could not load kernel\n".into();
        assert_eq!(
            on_exit(Phase::Starting, &e),
            (
                Phase::Failed,
                "QEMU exited with status 1: qemu: could not load kernel".into()
            )
        );
    }

    const ALL: [Phase; 10] = [
        Phase::Importing,
        Phase::Pending,
        Phase::Starting,
        Phase::Running,
        Phase::Paused,
        Phase::Stopping,
        Phase::Stopped,
        Phase::Migrating,
        Phase::Failed,
        Phase::Incoming,
    ];

    #[test]
    fn transitions_follow_the_diagram() {
        use Phase::*;
        for p in ALL {
            assert!(valid_transition(p, p).is_ok(), "{p:?} stays");
        }
        for (from, to) in [
            (Pending, Starting),
            (Starting, Running),
            (Starting, Incoming),
            (Running, Paused),
            (Paused, Running),
            (Running, Stopping),
            (Stopping, Stopped),
            (Running, Migrating),
            (Migrating, Running),
            (Incoming, Running),
            (Running, Failed),
            (Failed, Starting),
            (Stopped, Starting),
            (Pending, Importing),
            (Importing, Starting),
            (Importing, Failed),
        ] {
            assert!(valid_transition(from, to).is_ok(), "{from:?} -> {to:?}");
        }
        for (from, to) in [
            (Pending, Running),
            (Stopped, Running),
            (Stopped, Paused),
            (Stopping, Running),
            (Stopping, Starting),
            (Incoming, Migrating),
            (Incoming, Stopped),
            (Migrating, Incoming),
            (Paused, Migrating),
            (Failed, Running),
            (Importing, Running),
            (Importing, Pending),
        ] {
            let e = valid_transition(from, to).unwrap_err();
            assert_eq!(e, InvalidTransition { from, to });
        }
        assert_eq!(
            valid_transition(Stopped, Running).unwrap_err().to_string(),
            "no transition from Stopped to Running"
        );
    }

    #[test]
    fn allowed_actions_lead_to_valid_transitions() {
        // What an allowed action makes of the phase must be a transition the machine has.
        let target = |a: Action| match a {
            Action::Start => Phase::Starting,
            Action::Stop | Action::Restart => Phase::Stopping,
            Action::Pause => Phase::Paused,
            Action::Resume => Phase::Running,
            Action::Migrate => Phase::Migrating,
        };
        for p in ALL {
            for a in [
                Action::Start,
                Action::Stop,
                Action::Restart,
                Action::Pause,
                Action::Resume,
                Action::Migrate,
            ] {
                if check(p, a).is_ok() {
                    assert!(valid_transition(p, target(a)).is_ok(), "{a:?} from {p:?}");
                }
            }
        }
    }

    #[test]
    fn grpc_phases_round_trip() {
        for p in ALL {
            assert_eq!(Phase::try_from(pb::VmPhase::from(p)), Ok(p));
        }
        assert!(Phase::try_from(pb::VmPhase::Unspecified).is_err());
    }
}
