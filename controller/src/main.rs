//! `hypersdk-controller`: runs the controllers in a cluster (or against a kubeconfig), or
//! standalone over an in-process API fed from a manifest directory; `crds` writes the CRDs.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};
use hypersdk_controller::context::{Context, Settings};
use hypersdk_controller::dashboard::Access;
use hypersdk_controller::dashboard::serve::Dashboard;
use hypersdk_controller::http::{self, Readiness};
use hypersdk_controller::leader::Elector;
use hypersdk_controller::nodes::{Agents, discover};
use hypersdk_controller::scheduling::{Policy, Strategy};
use hypersdk_controller::standalone::{FakeApi, Standalone};
use hypersdk_controller::{certs, controllers, crd};
use tracing::{error, info, warn};
use tracing_subscriber::EnvFilter;

#[derive(Parser)]
#[command(
    name = "hypersdk-controller",
    version,
    about = "HyperSDK controller: places VirtualMachines on node agents"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Subcommand)]
enum Command {
    /// Writes the CustomResourceDefinitions (generated from the Rust types) to a directory.
    Crds {
        #[arg(long, default_value = "deploy/crds")]
        out: PathBuf,
    },
    /// In an agent pod (its init container): obtains the agent's certificate through a
    /// CertificateSigningRequest that the controller signs for the pod's node.
    AgentCertificate {
        /// The pod's name, which names the request.
        #[arg(long, env = "POD_NAME")]
        pod: String,
        /// Where tls.crt, tls.key and ca.crt are written.
        #[arg(long)]
        out: PathBuf,
        /// Seconds to wait for the signature.
        #[arg(long, default_value = "300")]
        timeout: u64,
    },
}

#[derive(clap::Args)]
struct RunArgs {
    /// Run without a cluster: an in-process API fed from --manifests, agents from --agent.
    #[arg(long, env = "HYPERSDK_STANDALONE")]
    standalone: bool,
    /// Directory of manifests (standalone); status is written to DIR/status/.
    #[arg(long, env = "HYPERSDK_MANIFESTS", required_if_eq("standalone", "true"))]
    manifests: Option<PathBuf>,
    /// An agent: NODE=ADDR, ADDR being unix:///path, http://host:port (loopback) or
    /// https://host:port (repeatable).
    #[arg(long = "agent", env = "HYPERSDK_AGENTS", value_delimiter = ',')]
    agents: Vec<String>,
    /// A label of a --agent node, for nodeSelector: NODE=KEY=VALUE (repeatable).
    #[arg(long = "node-label", value_delimiter = ',')]
    node_labels: Vec<String>,
    /// Grid carbon intensity of a --agent node in gCO2eq/kWh: NODE=GRAMS (repeatable).
    #[arg(long = "carbon-intensity", value_delimiter = ',')]
    carbon: Vec<String>,
    /// A --agent node to drain: no new VMs go there, and its VMs leave as their
    /// evictionStrategy says (repeatable; in a cluster, the Node's spec.unschedulable).
    #[arg(long = "unschedulable", value_delimiter = ',')]
    unschedulable: Vec<String>,
    #[arg(long, env = "HYPERSDK_STRATEGY", value_enum, default_value = "spread")]
    strategy: Strategy,
    /// vCPUs placeable per host CPU.
    #[arg(long, env = "HYPERSDK_CPU_OVERCOMMIT", default_value = "4", value_parser = ratio)]
    cpu_overcommit: f64,
    /// Guest memory placeable per byte of host memory.
    #[arg(long, env = "HYPERSDK_MEMORY_OVERCOMMIT", default_value = "1", value_parser = ratio)]
    memory_overcommit: f64,
    /// Place VMs only on nodes whose agent runs them under KVM.
    #[arg(long, env = "HYPERSDK_REQUIRE_KVM")]
    require_kvm: bool,
    /// Seconds an agent's lease lasts without renewal: an agent cut off from the controller for
    /// this long stops its highly available VMs (fencing).
    #[arg(long, env = "HYPERSDK_FENCE_TIMEOUT", default_value = "20", value_parser = clap::value_parser!(u64).range(1..=600))]
    fence_timeout: u64,
    /// Seconds waited beyond a lost agent's fence timeout before its highly available VMs
    /// start on another node.
    #[arg(long, env = "HYPERSDK_FENCE_MARGIN", default_value = "10")]
    fence_margin: u64,
    /// Seconds a guest gets to power off on stop before it is ended.
    #[arg(long, env = "HYPERSDK_STOP_TIMEOUT", default_value = "30")]
    stop_timeout: u32,
    /// Where /metrics, /healthz, /readyz and the dashboard are served. On a non-loopback
    /// address the dashboard's API needs --dashboard-token-file.
    #[arg(long, env = "HYPERSDK_METRICS_ADDR", default_value = "127.0.0.1:8080")]
    metrics_addr: SocketAddr,
    /// A file holding the bearer token the dashboard's API requires (`Authorization: Bearer`).
    #[arg(long, env = "HYPERSDK_DASHBOARD_TOKEN_FILE")]
    dashboard_token_file: Option<PathBuf>,
    /// Let the dashboard create VMOperations and VMSnapshots (it is read-only otherwise).
    #[arg(long, env = "HYPERSDK_DASHBOARD_ACTIONS")]
    dashboard_actions: bool,
    /// In a cluster: namespace and label selector of the agent pods, and their gRPC port.
    #[arg(
        long,
        env = "HYPERSDK_AGENT_NAMESPACE",
        default_value = "hypersdk-system"
    )]
    agent_namespace: String,
    #[arg(
        long,
        env = "HYPERSDK_AGENT_SELECTOR",
        default_value = "app.kubernetes.io/name=hypersdk-agent"
    )]
    agent_selector: String,
    #[arg(long, env = "HYPERSDK_AGENT_PORT", default_value = "7443")]
    agent_port: u16,
    /// The controller's certificate for https:// agents (in a cluster: agent pods are then
    /// reached over https).
    #[command(flatten)]
    tls: hypersdk_tls::TlsArgs,
    /// Namespace of the leader-election Lease (and of --cluster-ca).
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    lease_namespace: String,
    /// In a cluster: the Secret holding the cluster CA (made when missing). The controller then
    /// issues its own certificate into --tls-dir, reaches agents over https with it, and signs
    /// the agent pods' certificate requests.
    #[arg(long, env = "HYPERSDK_CLUSTER_CA", conflicts_with_all = ["standalone", "tls_cert"])]
    cluster_ca: Option<String>,
    /// With --cluster-ca: where the controller's certificate is written.
    #[arg(long, env = "HYPERSDK_TLS_DIR", default_value = "/run/hypersdk/tls")]
    tls_dir: PathBuf,
    /// With --cluster-ca: days the certificates it issues are valid.
    #[arg(long, default_value = "365", value_parser = clap::value_parser!(u32).range(1..))]
    certificate_days: u32,
    /// With --cluster-ca: the ServiceAccount of the agent pods, the only one whose
    /// certificate requests are signed.
    #[arg(long, default_value = "hypersdk-agent")]
    agent_service_account: String,
    /// The Deployment that owns what the controller creates (the CA Secret, the Lease), so
    /// that deleting it removes them.
    #[arg(long, env = "HYPERSDK_OWNER_DEPLOYMENT")]
    owner_deployment: Option<String>,
}

fn ratio(s: &str) -> anyhow::Result<f64> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 && v <= 100.0 => Ok(v),
        _ => bail!("{s:?} is not a ratio between 0 (exclusive) and 100"),
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_env("HYPERSDK_LOG").unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Crds { out }) => write_crds(&out),
        Some(Command::AgentCertificate { pod, out, timeout }) => {
            let client = kube::Client::try_default()
                .await
                .context("connecting to the Kubernetes API")?;
            let name = format!("hypersdk-agent-{pod}");
            certs::request::obtain(client, &name, &out, Duration::from_secs(timeout)).await?;
            Ok(())
        }
        None => serve(cli.run).await,
    }
}

fn write_crds(out: &std::path::Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(out).with_context(|| format!("--out {}", out.display()))?;
    for (file, yaml) in crd::render() {
        let path = out.join(file);
        std::fs::write(&path, yaml).with_context(|| format!("writing {}", path.display()))?;
        println!("{}", path.display());
    }
    Ok(())
}

async fn serve(args: RunArgs) -> anyhow::Result<()> {
    let client = if args.standalone {
        FakeApi::new().client("default")
    } else {
        kube::Client::try_default()
            .await
            .context("connecting to the Kubernetes API")?
    };
    let owner = match &args.owner_deployment {
        Some(name) if !args.standalone => {
            Some(certs::ca::owner(client.clone(), &args.lease_namespace, name).await?)
        }
        _ => None,
    };
    let identity = identity();
    let (tls, signer) = match &args.cluster_ca {
        Some(secret) => {
            let ca =
                certs::ca::ensure(client.clone(), &args.lease_namespace, secret, owner.clone())
                    .await?;
            let files = certs::ca::write_own(&args.tls_dir, &ca, &identity, args.certificate_days)?;
            let signer = certs::signer::Signer {
                client: client.clone(),
                ca,
                agent_user: format!(
                    "system:serviceaccount:{}:{}",
                    args.agent_namespace, args.agent_service_account
                ),
                days: args.certificate_days,
            };
            (Some(files), Some(signer))
        }
        None => (args.tls.files(), None),
    };
    let agents = Arc::new(Agents::new(Duration::from_secs(args.fence_timeout)).with_tls(tls));
    let ctx = Arc::new(Context::new(client.clone(), agents, settings(&args)));
    let ready = Arc::new(Readiness::default());
    let listener = tokio::net::TcpListener::bind(args.metrics_addr)
        .await
        .with_context(|| format!("--metrics-addr {}", args.metrics_addr))?;
    let dashboard = Dashboard::new(ctx.clone(), dashboard_access(&args)?);
    tokio::spawn(http::serve(listener, dashboard, ready.clone()));
    // Ready to serve (the dashboard, metrics); only the leader reconciles.
    ready.set(true);

    let elector = Elector::new(
        client.clone(),
        &args.lease_namespace,
        "hypersdk-controller",
        &identity,
        Duration::from_secs(15),
    )
    .with_owner(owner);
    elector.acquire().await.context("leader election")?;
    ready.set_leading(true);
    // Only the leader reaches agents (it renews their leases) and signs certificates.
    find_agents(&args, &client, &ctx.agents)?;
    if let Some(signer) = signer {
        tokio::spawn(signer.run());
    }
    info!(identity, "controllers starting");
    tokio::select! {
        _ = controllers::run(ctx, shutdown_signal()) => Ok(()),
        _ = elector.hold() => bail!("lost the leader lease; exiting so that only one replica reconciles"),
    }
}

/// Standalone: the manifest directory feeds the API and `--agent` names the agents. In a cluster:
/// `--agent` if given, else the agent pods.
fn find_agents(args: &RunArgs, client: &kube::Client, agents: &Arc<Agents>) -> anyhow::Result<()> {
    if args.standalone {
        let dir = args
            .manifests
            .clone()
            .expect("clap requires --manifests with --standalone");
        if !dir.is_dir() {
            bail!("--manifests {}: not a directory", dir.display());
        }
        tokio::spawn(follow_manifests(Standalone::new(client.clone(), dir)));
    }
    if args.standalone || !args.agents.is_empty() {
        let mut nodes = discover::from_flags(&args.agents, &args.node_labels, &args.carbon)?;
        discover::drain(&mut nodes, &args.unschedulable)?;
        agents.sync(nodes);
    } else {
        tokio::spawn(discover::watch_pods(
            client.clone(),
            agents.clone(),
            args.agent_namespace.clone(),
            args.agent_selector.clone(),
            args.agent_port,
        ));
    }
    Ok(())
}

/// Applies the manifest directory every half second.
async fn follow_manifests(mut standalone: Standalone) {
    loop {
        if let Err(e) = standalone.sync().await {
            error!(
                error = format!("{:#}", anyhow::Error::new(e)),
                "manifest directory"
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Who may use the dashboard: the token from its file; exposed unless on loopback.
fn dashboard_access(args: &RunArgs) -> anyhow::Result<Access> {
    let token = match &args.dashboard_token_file {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("--dashboard-token-file {}", path.display()))?;
            let token = text.trim().to_string();
            if token.is_empty() {
                bail!(
                    "--dashboard-token-file {}: the file is empty",
                    path.display()
                );
            }
            Some(token)
        }
        None => None,
    };
    let exposed = !args.metrics_addr.ip().is_loopback();
    if exposed && token.is_none() {
        warn!(
            addr = %args.metrics_addr,
            "the dashboard refuses every request: a non-loopback address needs --dashboard-token-file"
        );
    }
    Ok(Access {
        token,
        exposed,
        actions: args.dashboard_actions,
    })
}

fn settings(args: &RunArgs) -> Settings {
    Settings {
        policy: Policy {
            cpu_overcommit: args.cpu_overcommit,
            memory_overcommit: args.memory_overcommit,
            strategy: args.strategy,
            require_kvm: args.require_kvm,
        },
        fence_margin: Duration::from_secs(args.fence_margin),
        stop_timeout_seconds: args.stop_timeout,
    }
}

/// This replica's name in the leader Lease: the pod's, else host and process.
fn identity() -> String {
    std::env::var("POD_NAME").unwrap_or_else(|_| {
        format!(
            "{}-{}",
            std::env::var("HOSTNAME").unwrap_or_else(|_| "controller".into()),
            std::process::id()
        )
    })
}

/// SIGTERM or SIGINT.
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => {},
        _ = int.recv() => {},
    }
}
