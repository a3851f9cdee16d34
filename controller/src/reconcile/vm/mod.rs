//! VirtualMachine: resolve the template, place the VM (scheduler), make the agent run it as
//! `spec.running` says, report what the agent reports. The finalizer deletes it from its agent.
//! A VM waits for its template while it is missing, for room on some node while none fits,
//! and for its node while that node's agent does not answer.

use std::sync::Arc;
use std::time::Duration;

use hypersdk_proto::agent::v1 as pb;
use hypersdk_proto::quantity;
use kube::api::Api;
use kube::runtime::controller::Action;
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::runtime::reflector::ObjectRef;
use kube::{Resource, ResourceExt};
use tracing::{info, warn};

mod edit;

use crate::context::Context;
use crate::crd::vm::{VirtualMachine, VirtualMachineStatus, VmPhase};
use crate::crd::{Reason, Status, VMTemplate, VMTemplateSpec, set_condition};
use crate::error::{Error, Result};
use crate::metrics;
use crate::nodes::spec::{self, Built};
use crate::nodes::{Agent, Client};
use crate::scheduling::Request;
use crate::scheduling::placement::{Placed, VmKey};
use edit::apply::{recreate, report_edit, resize};

pub const FINALIZER: &str = "hypersdk.io/vm-cleanup";

/// Conditions, as listed in the API reference.
pub const READY: &str = "Ready";
pub const SCHEDULED: &str = "Scheduled";
pub const NODE_REACHABLE: &str = "NodeReachable";
pub const AGENT_CONNECTED: &str = "AgentConnected";
pub const DISK_READY: &str = "DiskReady";
pub const NETWORK_READY: &str = "NetworkReady";
pub const RESTART_REQUIRED: &str = "RestartRequired";

/// A VM with nothing to wait for is looked at again this often anyway.
const RESYNC: Duration = Duration::from_secs(300);
/// An agent that refused the VM (e.g. an image missing on the node) is asked again this often:
/// nothing signals a change of the node's files.
const REFUSED_RETRY: Duration = Duration::from_secs(30);

#[tracing::instrument(skip_all, fields(vm = %vm.name_any(), ns = vm.namespace().unwrap_or_default()))]
pub async fn reconcile(vm: Arc<VirtualMachine>, ctx: Arc<Context>) -> Result<Action> {
    let ns = super::namespace(vm.as_ref())?;
    let api: Api<VirtualMachine> = Api::namespaced(ctx.client.clone(), &ns);
    finalizer(&api, FINALIZER, vm, |event| async {
        match event {
            Finalizer::Apply(vm) => apply(&vm, &ns, &api, &ctx).await,
            Finalizer::Cleanup(vm) => cleanup(&vm, &ns, &ctx).await,
        }
    })
    .await
    .map_err(|e| Error::Finalizer(Box::new(e)))
}

/// One pass's working state: the status being built and the object's identity.
struct Pass<'a> {
    vm: &'a VirtualMachine,
    me: ObjectRef<VirtualMachine>,
    key: VmKey,
    status: VirtualMachineStatus,
    generation: Option<i64>,
}

impl Pass<'_> {
    fn set(&mut self, type_: &str, status: Status, reason: Reason, message: impl Into<String>) {
        set_condition(
            &mut self.status.conditions,
            type_,
            status,
            reason,
            message,
            self.generation,
        );
    }
}

async fn apply(
    vm: &VirtualMachine,
    ns: &str,
    api: &Api<VirtualMachine>,
    ctx: &Context,
) -> Result<Action> {
    let name = vm.name_any();
    let mut pass = Pass {
        vm,
        me: ObjectRef::from(vm),
        key: (ns.to_string(), name.clone()),
        status: vm.status.clone().unwrap_or_default(),
        generation: vm.metadata.generation,
    };
    pass.status.observed_generation = pass.generation;
    let action = drive(&mut pass, ns, ctx).await;
    super::write_status(api, &name, vm.status.as_ref(), &pass.status).await?;
    action
}

async fn drive(pass: &mut Pass<'_>, ns: &str, ctx: &Context) -> Result<Action> {
    let Some(built) = build(pass, ns, ctx).await? else {
        return Ok(Action::requeue(RESYNC));
    };
    report_devices(pass, &built);

    let Some(node) = place(pass, &built, ctx).await? else {
        return Ok(Action::requeue(RESYNC));
    };
    // Woken when the node's agent answers again (or goes away).
    let waiting = Some(node.clone());
    ctx.waiting.node.wait(waiting.clone(), pass.me.clone());
    let agent = ctx.agents.get(&node);
    let Some((agent, client)) = agent.as_ref().and_then(|a| Some((a, a.client()?))) else {
        return node_lost(pass, &node, agent.as_deref(), ctx).await;
    };
    ctx.waiting.node.cancel(&waiting, &pass.me);
    pass.set(
        NODE_REACHABLE,
        Status::True,
        Reason::AgentAnswers,
        format!("agent on {node} answers"),
    );
    let current = match agent.vm(&built.spec.name) {
        Some(v) => v,
        None => match create(pass, &node, agent, client.clone(), &built, ctx).await? {
            Ok(v) => v,
            Err(action) => return Ok(action),
        },
    };
    // The spec as this node runs it (its networks), which edits are measured against.
    let desired = spec::on_node(built.spec.clone(), agent.node().as_ref());
    let current = converge(pass, &node, client, current, &desired, ctx).await?;
    agent.observe(current.clone());
    report(pass, &current);
    if !pass
        .vm
        .annotations()
        .contains_key(super::migrate::MIGRATING)
    {
        remove_stopped_copies(&built.spec.name, &node, ctx).await;
        if agent.info.unschedulable && agent_phase(&current) == pb::VmPhase::Running {
            super::evict::evict(pass.vm, ns, &node, ctx).await?;
        }
    }
    Ok(Action::requeue(RESYNC))
}

/// Removes copies of the VM left stopped on other nodes: a highly available VM that was fenced
/// on a cut-off node and has run here since that node came back.
async fn remove_stopped_copies(name: &str, node: &str, ctx: &Context) {
    for other in ctx.agents.all() {
        let (Some(vm), Some(mut client)) = (other.vm(name), other.client()) else {
            continue;
        };
        let phase = agent_phase(&vm);
        if other.info.node == node || !matches!(phase, pb::VmPhase::Stopped | pb::VmPhase::Failed) {
            continue;
        }
        info!(
            other = other.info.node,
            "removing the VM's stopped copy on another node"
        );
        // It runs here now, maybe from the same disks on shared storage.
        let req = pb::DeleteVmRequest {
            name: name.into(),
            keep_disks: true,
        };
        match client.delete_vm(req).await {
            Ok(_) => other.forget(name),
            Err(e) => warn!(other = other.info.node, "removing the stopped copy: {e}"),
        }
    }
}

/// What the VM's agent is to run, from the VM and its template; None (with the reason in the
/// status) while the template is missing or the spec invalid. Until then a change of the
/// template wakes the VM.
async fn build(pass: &mut Pass<'_>, ns: &str, ctx: &Context) -> Result<Option<Built>> {
    let vm = pass.vm;
    let template_key = vm
        .spec
        .image
        .as_ref()
        .map(|i| (ns.to_string(), i.template_ref.name.clone()));
    if let Some(key) = &template_key {
        ctx.waiting.template.wait(key.clone(), pass.me.clone());
    }
    let template = match template(vm, ns, ctx).await? {
        Ok(t) => t,
        Err(e) => return Ok(not_ready(pass, Reason::TemplateNotFound, e.to_string())),
    };
    let name = vm.name_any();
    let uid = vm.uid().unwrap_or_default();
    let id = spec::Identity {
        namespace: ns,
        name: &name,
        uid: &uid,
    };
    let built = match spec::build(id, &vm.spec, template.as_ref()) {
        Ok(b) => b,
        Err(e) => return Ok(not_ready(pass, Reason::InvalidSpec, e.to_string())),
    };
    if let Some(key) = &template_key {
        ctx.waiting.template.cancel(key, &pass.me);
    }
    Ok(Some(built))
}

/// A VM's `spec.image.templateRef` names a VMTemplate that does not exist.
#[derive(Debug, thiserror::Error)]
#[error("spec.image.templateRef: VMTemplate {name:?} not found in namespace {namespace}")]
struct TemplateNotFound {
    name: String,
    namespace: String,
}

/// The spec of the VM's template, if it names one.
async fn template(
    vm: &VirtualMachine,
    ns: &str,
    ctx: &Context,
) -> Result<std::result::Result<Option<VMTemplateSpec>, TemplateNotFound>> {
    let Some(image) = &vm.spec.image else {
        return Ok(Ok(None));
    };
    let name = &image.template_ref.name;
    let found = Api::<VMTemplate>::namespaced(ctx.client.clone(), ns)
        .get_opt(name)
        .await?;
    Ok(found.map(|t| Some(t.spec)).ok_or_else(|| TemplateNotFound {
        name: name.clone(),
        namespace: ns.into(),
    }))
}

/// The VM is not on its node's agent: it moved (follow it), is leaving (wait), or is created
/// there now. Err is what to do instead of going on.
async fn create(
    pass: &mut Pass<'_>,
    node: &str,
    agent: &Agent,
    mut client: Client,
    built: &Built,
    ctx: &Context,
) -> Result<std::result::Result<pb::Vm, Action>> {
    let vm = pass.vm;
    if let Some(other) = found_on_agent(ctx, &built.spec.name, Some(node)) {
        // Moved by a live migration (a VMOperation, or hyperctl): follow it.
        info!(from = node, to = other, "VM found on another node");
        pass.status.node_name = Some(other.clone());
        let msg = format!("now runs on node {other} (was {node})");
        ctx.event(&vm.object_ref(&()), false, Reason::Moved, msg)
            .await;
        return Ok(Err(Action::requeue(Duration::from_millis(10))));
    }
    if vm.annotations().contains_key(super::migrate::MIGRATING) {
        // Leaving this node; not to be created here again. The migration's end changes the VM.
        return Ok(Err(Action::requeue(RESYNC)));
    }
    info!(node, "creating VM on agent");
    let req = pb::CreateVmRequest {
        spec: Some(spec::on_node(built.spec.clone(), agent.node().as_ref())),
        start: vm.spec.running,
    };
    let created = match client.create_vm(req).await {
        Err(s) if s.code() == tonic::Code::AlreadyExists => {
            let req = pb::GetVmRequest {
                name: built.spec.name.clone(),
            };
            call(node, client.get_vm(req).await)?
        }
        Err(s) if s.code() == tonic::Code::InvalidArgument => {
            let message = s.message().to_string();
            not_ready::<()>(pass, Reason::AgentRefused, message);
            return Ok(Err(Action::requeue(REFUSED_RETRY)));
        }
        other => call(node, other)?,
    };
    agent.observe(created.clone());
    let msg = format!("created on node {node}");
    ctx.event(&vm.object_ref(&()), false, Reason::Created, msg)
        .await;
    Ok(Ok(created))
}

/// A reachable node (other than `except`) whose agent has the VM.
fn found_on_agent(ctx: &Context, name: &str, except: Option<&str>) -> Option<String> {
    ctx.agents
        .all()
        .into_iter()
        .find(|a| {
            Some(a.info.node.as_str()) != except && a.client().is_some() && a.vm(name).is_some()
        })
        .map(|a| a.info.node.clone())
}

/// Records a problem that needs the user (or another object) to change: None, to stop here.
fn not_ready<T>(pass: &mut Pass<'_>, reason: Reason, message: String) -> Option<T> {
    if pass.status.node_name.is_none() {
        pass.status.phase = Some(VmPhase::Pending);
    }
    pass.status.message = Some(message.clone());
    pass.set(READY, Status::False, reason, message);
    None
}

fn report_devices(pass: &mut Pass<'_>, built: &Built) {
    if built.unprovisioned_disks.is_empty() {
        pass.set(
            DISK_READY,
            Status::True,
            Reason::Attached,
            "all disks are attached",
        );
    } else {
        let msg = format!(
            "disks {} have no image, path or size: the node agent cannot make them",
            built.unprovisioned_disks.join(", ")
        );
        pass.set(DISK_READY, Status::False, Reason::NotProvisioned, msg);
    }
}

/// The VM's node, placing it first if needed; None while it cannot (or need not) be placed.
async fn place(pass: &mut Pass<'_>, built: &Built, ctx: &Context) -> Result<Option<String>> {
    let vm = pass.vm;
    let memory_bytes = quantity::parse_bytes(&vm.spec.memory).unwrap_or(0);
    if pass.status.node_name.is_none() {
        // Already on a node's agent (a clone made there, or a placement lost with the
        // controller's state): it stays where its disks are.
        if let Some(node) = found_on_agent(ctx, &built.spec.name, None) {
            info!(node, "found on a node's agent");
            let msg = format!("already on node {node}");
            pass.set(SCHEDULED, Status::True, Reason::Found, msg);
            pass.status.node_name = Some(node);
        }
    }
    if let Some(node) = &pass.status.node_name {
        let placed = Placed {
            node: node.clone(),
            cpus: built.spec.cpus,
            memory_bytes,
        };
        ctx.placements.record(pass.key.clone(), placed);
        return Ok(Some(node.clone()));
    }
    if !vm.spec.running {
        pass.status.phase = Some(VmPhase::Stopped);
        pass.status.message = None;
        pass.set(
            READY,
            Status::False,
            Reason::Stopped,
            "spec.running is false",
        );
        return Ok(None);
    }
    let req = Request::for_vm(&vm.spec);
    // Woken when any node comes, goes or changes its room.
    ctx.waiting.node.wait(None, pass.me.clone());
    let placed = ctx
        .placements
        .place(pass.key.clone(), &req, &ctx.agents, &ctx.settings.policy);
    match placed {
        Err(why) => {
            unschedulable(pass, &why.to_string(), ctx).await;
            Ok(None)
        }
        Ok(node) => {
            ctx.waiting.node.cancel(&None, &pass.me);
            scheduled(pass, &node, ctx).await;
            Ok(Some(node))
        }
    }
}

async fn unschedulable(pass: &mut Pass<'_>, why: &str, ctx: &Context) {
    ctx.metrics
        .inc(metrics::SCHEDULING_FAILURES, "VirtualMachine");
    pass.status.phase = Some(VmPhase::Pending);
    pass.status.message = Some(why.to_string());
    pass.set(SCHEDULED, Status::False, Reason::Unschedulable, why);
    pass.set(READY, Status::False, Reason::Unschedulable, why);
    let vm = pass.vm.object_ref(&());
    ctx.event(&vm, true, Reason::FailedScheduling, why.to_string())
        .await;
}

async fn scheduled(pass: &mut Pass<'_>, node: &str, ctx: &Context) {
    ctx.metrics.inc(metrics::VMS_PLACED, "VirtualMachine");
    info!(node, "placed");
    pass.status.node_name = Some(node.to_string());
    pass.status.phase = Some(VmPhase::Creating);
    let msg = format!("placed on node {node}");
    pass.set(SCHEDULED, Status::True, Reason::Scheduled, msg.clone());
    ctx.event(&pass.vm.object_ref(&()), false, Reason::Scheduled, msg)
        .await;
}

/// The VM's agent does not answer: say so, and move a highly available VM once the agent has
/// stopped it (its lease has run out there, see `Agent::fenced_by`) and a margin has passed.
async fn node_lost(
    pass: &mut Pass<'_>,
    node: &str,
    agent: Option<&Agent>,
    ctx: &Context,
) -> Result<Action> {
    let lost_for = agent.map_or(Duration::MAX, |a| a.lost_for());
    let msg = format!("agent on node {node} does not answer");
    pass.set(
        NODE_REACHABLE,
        Status::False,
        Reason::AgentUnreachable,
        msg.clone(),
    );
    pass.set(READY, Status::False, Reason::NodeLost, msg.clone());
    pass.status.message = Some(msg);
    let ha = pass
        .vm
        .spec
        .high_availability
        .as_ref()
        .is_some_and(|h| h.enabled);
    if !ha {
        // Woken when the agent answers again.
        return Ok(Action::requeue(RESYNC));
    }
    // An agent gone from the registry holds no lease this controller renews.
    if let Some(safe) = agent.map(|a| a.fenced_by() + ctx.settings.fence_margin) {
        let now = std::time::Instant::now();
        if now < safe {
            return Ok(Action::requeue(safe - now + Duration::from_millis(50)));
        }
    }
    ctx.placements.release(&pass.key);
    ctx.waiting.node.cancel(&Some(node.to_string()), &pass.me);
    pass.status.node_name = None;
    pass.status.phase = Some(VmPhase::Pending);
    pass.status.cpus = None;
    pass.status.memory = None;
    let msg = format!(
        "node {node} lost for {}s and its lease has run out (the VM is stopped there); \
         placing the VM on another node",
        lost_for.as_secs()
    );
    pass.set(SCHEDULED, Status::False, Reason::Rescheduling, msg.clone());
    ctx.event(&pass.vm.object_ref(&()), true, Reason::Rescheduling, msg)
        .await;
    Ok(Action::requeue(Duration::from_millis(10)))
}

/// Starts or stops the VM on its agent as `spec.running` asks; returns what the agent reports.
async fn converge(
    pass: &mut Pass<'_>,
    node: &str,
    mut client: Client,
    current: pb::Vm,
    desired: &pb::VmSpec,
    ctx: &Context,
) -> Result<pb::Vm> {
    let phase = agent_phase(&current);
    let name = current
        .spec
        .as_ref()
        .map(|s| s.name.clone())
        .unwrap_or_default();
    let edit = current
        .spec
        .as_ref()
        .map(|s| edit::plan(desired, s))
        .unwrap_or_default();
    report_edit(pass, &edit);
    let running = pass.vm.spec.running;
    use pb::VmPhase as P;
    if running && phase == P::Stopped && !edit.restart.is_empty() {
        return recreate(pass, node, client, desired, &edit, ctx).await;
    }
    if running && phase == P::Running && edit.live() {
        return resize(pass, node, client, current, edit, ctx).await;
    }
    if running && matches!(phase, P::Pending | P::Stopped) {
        info!(node, "starting VM");
        let vm = call(node, client.start_vm(pb::StartVmRequest { name }).await)?;
        ctx.event(
            &pass.vm.object_ref(&()),
            false,
            Reason::Started,
            format!("started on node {node}"),
        )
        .await;
        return Ok(vm);
    }
    if !running && matches!(phase, P::Running | P::Paused | P::Starting) {
        info!(node, "stopping VM");
        let req = pb::StopVmRequest {
            name,
            timeout_seconds: ctx.settings.stop_timeout_seconds,
            // A paused guest cannot react to ACPI power-down.
            force: phase == P::Paused,
        };
        let vm = call(node, client.stop_vm(req).await)?;
        ctx.event(
            &pass.vm.object_ref(&()),
            false,
            Reason::Stopped,
            format!("stopped on node {node}"),
        )
        .await;
        return Ok(vm);
    }
    Ok(current)
}

fn agent_phase(vm: &pb::Vm) -> pb::VmPhase {
    vm.status
        .as_ref()
        .and_then(|s| pb::VmPhase::try_from(s.phase).ok())
        .unwrap_or(pb::VmPhase::Unspecified)
}

/// The VM's phase as the API reports it, from the agent's.
pub fn phase_from_agent(phase: pb::VmPhase, running: bool) -> VmPhase {
    use pb::VmPhase as P;
    match phase {
        P::Running | P::Stopping => VmPhase::Running,
        P::Paused => VmPhase::Paused,
        P::Migrating | P::Incoming => VmPhase::Migrating,
        P::Importing => VmPhase::Importing,
        P::Failed => VmPhase::Failed,
        P::Stopped => VmPhase::Stopped,
        P::Pending if !running => VmPhase::Stopped,
        P::Pending | P::Starting | P::Unspecified => VmPhase::Creating,
    }
}

fn report(pass: &mut Pass<'_>, vm: &pb::Vm) {
    let status = vm.status.clone().unwrap_or_default();
    let phase = phase_from_agent(agent_phase(vm), pass.vm.spec.running);
    pass.status.phase = Some(phase);
    // The agent names the disk at fault: "spec.disks[0].image: ... has digest ...".
    let disk_problem = phase == VmPhase::Failed && status.message.starts_with("spec.disks[");
    if phase == VmPhase::Importing || disk_problem {
        let reason = match phase {
            VmPhase::Importing => Reason::Importing,
            _ => Reason::DiskFailed,
        };
        pass.set(DISK_READY, Status::False, reason, status.message.clone());
    }
    let live = matches!(
        phase,
        VmPhase::Running | VmPhase::Paused | VmPhase::Migrating
    );
    pass.status.cpus = (live && status.cpus > 0).then_some(status.cpus);
    pass.status.memory =
        (live && status.memory_bytes > 0).then(|| quantity::format_bytes(status.memory_bytes));
    pass.status.message = (!status.message.is_empty()).then(|| status.message.clone());
    if status.agent_connected {
        pass.set(
            AGENT_CONNECTED,
            Status::True,
            Reason::GuestAgentConnected,
            "the guest agent answers",
        );
    } else {
        pass.set(
            AGENT_CONNECTED,
            Status::False,
            Reason::GuestAgentNotConnected,
            "no guest agent answers",
        );
    }
    pass.status.interfaces = super::network::interfaces(&status);
    let (ok, reason, message) = super::network::readiness(vm, live);
    let ok = if ok { Status::True } else { Status::False };
    pass.set(NETWORK_READY, ok, reason, message);
    match phase {
        VmPhase::Running => pass.set(READY, Status::True, Reason::Phase(phase), "the VM runs"),
        other => pass.set(READY, Status::False, Reason::Phase(other), status.message),
    }
}

fn call<T>(node: &str, r: std::result::Result<tonic::Response<T>, tonic::Status>) -> Result<T> {
    r.map(tonic::Response::into_inner)
        .map_err(|s| Error::agent(node, s))
}

/// Removes the VM from its agent. An unreachable agent cannot hold deletion hostage: the VM is
/// forgotten with a warning event (the agent keeps it until someone deletes it there).
/// How long a deletion waits for an unreachable agent before it forgets the VM there.
const CLEANUP_GRACE: Duration = Duration::from_secs(60);

/// Since when deletion was asked for (zero if the server gave no time).
fn deleting_for(vm: &VirtualMachine) -> Duration {
    let Some(t) = &vm.metadata.deletion_timestamp else {
        return Duration::ZERO;
    };
    let since = k8s_openapi::jiff::Timestamp::now().duration_since(t.0);
    Duration::try_from(since).unwrap_or(Duration::ZERO)
}

async fn cleanup(vm: &VirtualMachine, ns: &str, ctx: &Context) -> Result<Action> {
    let key = (ns.to_string(), vm.name_any());
    if let Some(node) = vm.status.as_ref().and_then(|s| s.node_name.clone()) {
        let agent_name = spec::agent_name(ns, &vm.name_any());
        match ctx
            .agents
            .get(&node)
            .and_then(|a| a.client().map(|c| (a, c)))
        {
            Some((agent, mut client)) => {
                let r = client
                    .delete_vm(pb::DeleteVmRequest {
                        name: agent_name.clone(),
                        keep_disks: false,
                    })
                    .await;
                match r {
                    Ok(_) => {}
                    Err(s) if s.code() == tonic::Code::NotFound => {}
                    Err(s) => return Err(Error::agent(&node, s)),
                }
                agent.forget(&agent_name);
                info!(node, "deleted from agent");
            }
            // Just after a controller start (or a blip) the agent may not be connected yet:
            // give it a while before the VM is forgotten there.
            None if deleting_for(vm) < CLEANUP_GRACE => {
                info!(node, "agent not reachable yet; deletion waits for it");
                return Ok(Action::requeue(Duration::from_secs(2)));
            }
            None => {
                let msg = format!(
                    "agent on node {node} did not answer for {CLEANUP_GRACE:?}; VM {agent_name} may remain there"
                );
                warn!("{msg}");
                ctx.event(&vm.object_ref(&()), true, Reason::CleanupSkipped, msg)
                    .await;
            }
        }
    }
    ctx.placements.release(&key);
    Ok(Action::await_change())
}
