//! Why a VM event happened: the `reason` of every `VmEvent` the agent sends. Clients (the
//! controller, hyperctl, tests) match these words, so they are one list here.

use hypersdk_proto::agent::v1 as pb;

macro_rules! reasons {
    ($($(#[$doc:meta])* $name:ident),* $(,)?) => {
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub enum Reason {
            $($(#[$doc])* $name,)*
        }

        impl Reason {
            /// The word on the wire: the variant's name.
            pub fn as_str(self) -> &'static str {
                match self {
                    $(Reason::$name => stringify!($name),)*
                }
            }
        }
    };
}

reasons! {
    /// Listed when a watch begins.
    Existing,
    Created,
    Cloned,
    /// A QEMU left running by an earlier agent process was taken over.
    Adopted,
    Starting,
    StartFailed,
    /// The VM's image is being fetched into the node's cache.
    Importing,
    ImportProgress,
    /// A disk of the VM could not be made (its image could not be imported, or is too big).
    DiskFailed,
    Running,
    Paused,
    Resumed,
    /// Any other phase change QEMU reported.
    PhaseChanged,
    Refreshed,
    Stopping,
    Stopped,
    /// QEMU ended without being asked to.
    ProcessExited,
    /// Stopped because the node's lease ran out (see `crate::fence`).
    Fenced,
    RestartScheduled,
    Resized,
    ResizeFailed,
    Shutdown,
    Reset,
    GuestPanicked,
    GuestAgentConnected,
    GuestAgentDisconnected,
    GuestChanged,
    Migrating,
    MigrationProgress,
    MigrationFailed,
    /// Arrived here by live migration.
    Migrated,
    /// A migration target's QEMU waits for the state.
    Incoming,
    SnapshotCreated,
    SnapshotFailed,
    SnapshotDeleted,
    Restored,
    RestoreFailed,
    /// Removed: by request.
    Deleted,
    /// Removed: it runs on another node now.
    MigratedAway,
    /// Removed: the migration it waited for ended without a hand-over.
    IncomingAborted,
    /// Removed: its QEMU ended while it waited for the state.
    IncomingFailed,
}

/// A watch event about `vm`.
pub fn event(kind: pb::EventType, vm: pb::Vm, reason: Reason, message: &str) -> pb::VmEvent {
    pb::VmEvent {
        r#type: kind as i32,
        vm: Some(vm),
        reason: reason.as_str().into(),
        message: message.into(),
    }
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_wire_word_is_the_name() {
        assert_eq!(Reason::MigratedAway.as_str(), "MigratedAway");
        assert_eq!(Reason::Deleted.to_string(), "Deleted");
    }
}
