//! The reasons of conditions and events, as they appear on the wire (`reason` of a condition,
//! `reason` and `action` of an event). Code and tests name them through [`Reason`], never as
//! string literals.

use super::vm::VmPhase;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    // VirtualMachine conditions.
    TemplateNotFound,
    InvalidSpec,
    AgentRefused,
    AgentAnswers,
    AgentUnreachable,
    NodeLost,
    Found,
    Scheduled,
    Unschedulable,
    Rescheduling,
    Attached,
    NotProvisioned,
    /// The node fetches the VM's image; the message has the percent.
    Importing,
    /// The node could not make a disk (image import failed, size below the image's).
    DiskFailed,
    UserNetworking,
    /// Every NIC on the node network has an address the guest reports.
    AddressAssigned,
    WaitingForAddress,
    /// The VM's QEMU does not run, so no NIC is attached.
    NotRunning,
    GuestAgentConnected,
    GuestAgentNotConnected,
    /// RestartRequired: fields of the spec that apply at the next start.
    SpecChanged,
    /// RestartRequired false: the node runs the spec as it is.
    SpecApplied,
    /// Ready while the VM runs, or not Ready named after the phase it is in.
    Phase(VmPhase),
    // VMSnapshot conditions.
    VmNotFound,
    VmNotPlaced,
    Creating,
    /// The agent-side snapshot is no longer there.
    Gone,
    // VMOperation and VMSnapshot outcomes.
    Succeeded,
    Failed,
    // VMTemplate conditions.
    ImageReferenced,
    InvalidImage,
    // Events only.
    Created,
    Started,
    Stopped,
    Moved,
    Migrated,
    Cloned,
    /// cpus or memory edited in the spec, applied live.
    Resized,
    /// Made again on its node with the edited spec, at a start.
    Recreated,
    /// Leaving a drained node.
    Evicting,
    FailedScheduling,
    CleanupSkipped,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        use Reason as R;
        match self {
            R::TemplateNotFound => "TemplateNotFound",
            R::InvalidSpec => "InvalidSpec",
            R::AgentRefused => "AgentRefused",
            R::AgentAnswers => "AgentAnswers",
            R::AgentUnreachable => "AgentUnreachable",
            R::NodeLost => "NodeLost",
            R::Found => "Found",
            R::Scheduled => "Scheduled",
            R::Unschedulable => "Unschedulable",
            R::Rescheduling => "Rescheduling",
            R::Evicting => "Evicting",
            R::Attached => "Attached",
            R::NotProvisioned => "NotProvisioned",
            R::Importing => "Importing",
            R::DiskFailed => "DiskFailed",
            R::UserNetworking => "UserNetworking",
            R::AddressAssigned => "AddressAssigned",
            R::WaitingForAddress => "WaitingForAddress",
            R::NotRunning => "NotRunning",
            R::GuestAgentConnected => "GuestAgentConnected",
            R::GuestAgentNotConnected => "GuestAgentNotConnected",
            R::Phase(p) => p.as_str(),
            R::VmNotFound => "VMNotFound",
            R::VmNotPlaced => "VMNotPlaced",
            R::Creating => "Creating",
            R::Gone => "Gone",
            R::Succeeded => "Succeeded",
            R::Failed => "Failed",
            R::ImageReferenced => "ImageReferenced",
            R::InvalidImage => "InvalidImage",
            R::Created => "Created",
            R::Started => "Started",
            R::Stopped => "Stopped",
            R::Moved => "Moved",
            R::Migrated => "Migrated",
            R::Cloned => "Cloned",
            R::Resized => "Resized",
            R::Recreated => "Recreated",
            R::SpecChanged => "SpecChanged",
            R::SpecApplied => "SpecApplied",
            R::FailedScheduling => "FailedScheduling",
            R::CleanupSkipped => "CleanupSkipped",
        }
    }
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// So that a condition's or event's reason compares with a [`Reason`].
impl PartialEq<Reason> for String {
    fn eq(&self, other: &Reason) -> bool {
        self == other.as_str()
    }
}

impl PartialEq<Reason> for &str {
    fn eq(&self, other: &Reason) -> bool {
        *self == other.as_str()
    }
}
