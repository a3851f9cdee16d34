//! The two streaming attachments: the serial console, and a TCP connection to a guest port.

use hypersdk_proto::agent::v1 as pb;
use tonic::{Request, Status, Streaming};
use tracing::{Instrument, info, info_span};

use super::pipe::{ByteStream, pipe};
use crate::error::AgentError;
use crate::spec::argv::{VmFiles, mac_address};
use crate::spec::check_name;
use crate::vm::registry::Vms;

/// The first message of a stream, which names the VM.
async fn first<T>(inbound: &mut Streaming<T>) -> Result<T, Status> {
    inbound
        .message()
        .await?
        .ok_or_else(|| Status::invalid_argument("name: the first message must name the VM"))
}

/// The VM, if its QEMU runs (console and guest ports exist only then).
async fn running(vms: &Vms, name: &str) -> Result<pb::Vm, Status> {
    check_name("name", name)?;
    let vm = vms.get(name).await?;
    let phase = vm.status.as_ref().map_or(0, |s| s.phase);
    let live = [
        pb::VmPhase::Running,
        pb::VmPhase::Paused,
        pb::VmPhase::Migrating,
    ];
    if !live.iter().any(|p| *p as i32 == phase) {
        let phase = pb::VmPhase::try_from(phase).map_or("unknown".into(), |p| {
            p.as_str_name()
                .trim_start_matches("VM_PHASE_")
                .to_lowercase()
        });
        return Err(AgentError::Conflict {
            name: name.to_string(),
            why: format!("is {phase}, not running"),
        }
        .into());
    }
    Ok(vm)
}

pub async fn console(
    vms: &Vms,
    req: Request<Streaming<pb::ConsoleInput>>,
) -> Result<ByteStream<pb::ConsoleOutput>, Status> {
    let mut inbound = req.into_inner();
    let hello = first(&mut inbound).await?;
    let name = hello.name.clone();
    running(vms, &name).await?;
    let span = info_span!("vm", name = %name);
    let ctx = vms.context();
    let held = ctx
        .consoles
        .take(&name)
        .ok_or_else(|| AgentError::Conflict {
            name: name.clone(),
            why: "its console already has a client (one at a time; that one detaches with Ctrl-])"
                .into(),
        })?;
    let socket = VmFiles::in_dir(&ctx.store.vm_dir(&name)).console_socket;
    let conn = crate::console::attach::connect(&name, &socket)
        .instrument(span.clone())
        .await?;
    span.in_scope(|| info!("console attached"));
    Ok(pipe(
        conn,
        hello.data,
        inbound,
        |m| m.data,
        |data| pb::ConsoleOutput { data },
        None,
        move || {
            drop(held);
            span.in_scope(|| info!("console detached"));
        },
    ))
}

pub async fn port_forward(
    vms: &Vms,
    req: Request<Streaming<pb::PortForwardInput>>,
) -> Result<ByteStream<pb::PortForwardOutput>, Status> {
    let mut inbound = req.into_inner();
    let hello = first(&mut inbound).await?;
    let name = hello.name.clone();
    let port = u16::try_from(hello.port)
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| {
            Status::invalid_argument(format!("port: {} is not a TCP port (1-65535)", hello.port))
        })?;
    let vm = running(vms, &name).await?;
    let span = info_span!("vm", name = %name);
    let macs: Vec<String> = vm
        .spec
        .iter()
        .flat_map(|s| s.networks.iter().enumerate())
        .filter(|(_, n)| matches!(n.backend, Some(pb::network::Backend::Bridge(_))))
        .map(|(i, _)| mac_address(&name, i))
        .collect();
    let no_address = |why: &str| AgentError::Conflict {
        name: name.clone(),
        why: format!("port-forward reaches guests on the node network only: {why}"),
    };
    if macs.is_empty() {
        return Err(no_address("the VM has no bridge (pod-network) NIC").into());
    }
    let ip = vms
        .context()
        .network
        .as_ref()
        .and_then(|net| net.address_of(&name, &macs))
        .ok_or_else(|| no_address("no address is leased to the VM"))?;
    let conn = crate::network::forward::connect(&name, ip, port)
        .instrument(span.clone())
        .await?;
    let to = format!("{ip}:{port}");
    span.in_scope(|| info!(to, "port forward connected"));
    Ok(pipe(
        conn,
        hello.data,
        inbound,
        |m| m.data,
        |data| pb::PortForwardOutput {
            data,
            connected_to: String::new(),
        },
        Some(pb::PortForwardOutput {
            data: Vec::new(),
            connected_to: to,
        }),
        move || span.in_scope(|| info!("port forward closed")),
    ))
}
