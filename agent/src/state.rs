//! The VM lifecycle as an explicit state machine. Pure: the supervisor asks it what is allowed
//! and what an observed fact (a QMP event, a process exit) means; it performs the I/O itself.
//!
//! ```text
//! Pending ─start─► Starting ─► Running ⇄ Paused
//!                                 │        │
//!                               stop     stop
//!                                 ▼        ▼
//!            Stopped ◄─exit─ Stopping   (any) ─unexpected exit─► Failed
//! ```

use hypersdk_proto::agent::v1 as pb;
use serde::{Deserialize, Serialize};

use crate::process::ExitInfo;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Phase {
    Pending,
    Starting,
    Running,
    Paused,
    Stopping,
    Stopped,
    Migrating,
    Failed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Start,
    Stop,
    Restart,
    Pause,
    Resume,
}

impl Action {
    pub fn verb(self) -> &'static str {
        match self {
            Action::Start => "start",
            Action::Stop => "stop",
            Action::Restart => "restart",
            Action::Pause => "pause",
            Action::Resume => "resume",
        }
    }
}

impl Phase {
    /// A QEMU process exists in this phase.
    pub fn has_process(self) -> bool {
        matches!(
            self,
            Phase::Starting | Phase::Running | Phase::Paused | Phase::Stopping | Phase::Migrating
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
        }
    }
}

/// Whether `action` may be taken in `phase`; the error says why not.
pub fn check(phase: Phase, action: Action) -> Result<(), String> {
    use Action::*;
    use Phase::*;
    let ok = match action {
        Start => matches!(phase, Pending | Stopped | Failed),
        Stop => matches!(phase, Starting | Running | Paused | Stopping),
        Restart => matches!(phase, Running | Paused),
        Pause => phase == Running,
        Resume => phase == Paused,
    };
    if ok {
        Ok(())
    } else {
        Err(format!(
            "cannot {} a VM that is {}",
            action.verb(),
            phase.name()
        ))
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
    /// Exit code, or None when a signal ended it.
    pub code: Option<i32>,
    pub signal: Option<i32>,
    /// The last lines QEMU wrote to stderr.
    pub stderr_tail: String,
}

impl Exit {
    pub fn of(guest_shutdown: Option<String>, info: ExitInfo, stderr_tail: String) -> Exit {
        Exit {
            guest_shutdown,
            code: info.code,
            signal: info.signal,
            stderr_tail,
        }
    }
}

/// The phase and message after the QEMU process is gone.
pub fn on_exit(phase: Phase, exit: &Exit) -> (Phase, String) {
    if phase == Phase::Stopping {
        return (Phase::Stopped, "stopped".into());
    }
    if let Some(reason) = &exit.guest_shutdown
        && exit.code == Some(0)
    {
        return (Phase::Stopped, format!("guest powered off ({reason})"));
    }
    let how = match (exit.code, exit.signal) {
        (Some(c), _) => format!("QEMU exited with status {c}"),
        (None, Some(s)) => format!("QEMU was killed by signal {s}"),
        (None, None) => "QEMU ended".to_string(),
    };
    let tail = exit.stderr_tail.trim();
    if tail.is_empty() {
        (Phase::Failed, how)
    } else {
        (Phase::Failed, format!("{how}: {tail}"))
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
        assert_eq!(e, "cannot start a VM that is Running");
        assert!(check(Phase::Stopped, Action::Pause).is_err());
        assert!(check(Phase::Stopped, Action::Stop).is_err());
        assert!(check(Phase::Running, Action::Resume).is_err());
        assert!(check(Phase::Stopped, Action::Restart).is_err());
    }

    #[test]
    fn run_state_moves_between_running_and_paused() {
        assert_eq!(on_run_state(Phase::Starting, true), Phase::Running);
        assert_eq!(on_run_state(Phase::Running, false), Phase::Paused);
        assert_eq!(on_run_state(Phase::Paused, true), Phase::Running);
        assert_eq!(on_run_state(Phase::Stopping, true), Phase::Stopping);
    }

    fn exit(guest: Option<&str>, code: Option<i32>, signal: Option<i32>) -> Exit {
        Exit {
            guest_shutdown: guest.map(String::from),
            code,
            signal,
            stderr_tail: String::new(),
        }
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
}
