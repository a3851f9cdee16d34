//! Mutual TLS between real processes: agents serving https:// with certificates issued by
//! `hyperctl certs`, clients refused for every wrong certificate with nothing changed, live
//! migration between two https:// agents, and certificates replaced on disk while a VM runs.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};
use std::sync::Arc;
use std::time::Duration;

use hypersdk_proto::agent::v1 as pb;
use hypersdk_proto::agent::v1::agent_service_client::AgentServiceClient;
use hypersdk_proto::endpoint::{self, Address};
use hypersdk_tests::free_port;
use hypersdk_tests::pki::{Pki, tls_flags};
use hypersdk_tests::*;
use hypersdk_tls::TlsFiles;
use hypersdk_tls::issue::{self, Validity};
use hypersdk_tls::role::Role;
use hypersdk_tls::rustls;
use tonic::Code;

fn hyperctl(args: &[&str]) -> Output {
    Command::new(bin("hyperctl")).args(args).output().unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn args_of(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

async fn tls_client(port: u16, files: &TlsFiles) -> Result<Client, endpoint::ConnectError> {
    let addr = Address::Tls(format!("127.0.0.1:{port}"));
    endpoint::connect(&addr, Some(files)).await
}

/// The agent's answer to `files`' holder deleting `name`.
async fn delete_as(port: u16, files: &TlsFiles, name: &str) -> tonic::Status {
    let mut c = tls_client(port, files).await.unwrap();
    let req = pb::DeleteVmRequest {
        name: name.into(),
        keep_disks: false,
    };
    c.delete_vm(req).await.unwrap_err()
}

/// Issues through hyperctl: `certs issue --ca DIR --role ROLE --name NAME --san 127.0.0.1`.
fn issue_by_cli(ca: &Path, role: &str, name: &str) -> TlsFiles {
    let out = ca.join("issued");
    let o = hyperctl(&[
        "certs",
        "issue",
        "--ca",
        ca.to_str().unwrap(),
        "--role",
        role,
        "--name",
        name,
        "--san",
        "127.0.0.1",
        "--days",
        "30",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    TlsFiles {
        cert: out.join(format!("{name}.crt")),
        key: out.join(format!("{name}.key")),
        ca: ca.join("ca.crt"),
    }
}

/// hyperctl makes a CA and certificates; an admin's works against an https:// agent (with
/// hyperctl and from code); no certificate, a foreign CA's, an expired one, an agent's calling
/// DeleteVm and plain HTTP/2 on the TLS port are refused with the reason, and the VM stays.
#[tokio::test(flavor = "multi_thread")]
async fn admins_are_served_and_every_other_client_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca");
    let o = hyperctl(&["certs", "init", ca.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
    let mode = std::fs::metadata(ca.join("ca.key"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    // Bad flags are named, and write nothing.
    for (args, needle) in [
        (vec!["--role", "root", "--name", "x"], "--role"),
        (vec!["--role", "agent", "--name", "n1"], "--san"),
        (vec!["--role", "admin", "--name", "a/b"], "--name"),
        (
            vec!["--role", "admin", "--name", "a", "--days", "0"],
            "--days",
        ),
    ] {
        let mut all = vec![
            "certs",
            "issue",
            "--ca",
            ca.to_str().unwrap(),
            "--out",
            "/tmp/hs-never",
        ];
        all.extend(args);
        let o = hyperctl(&all);
        assert!(
            !o.status.success() && text(&o).contains(needle),
            "{needle}: {}",
            text(&o)
        );
    }
    assert!(!Path::new("/tmp/hs-never").exists());

    let port = free_port();
    let agent_files = issue_by_cli(&ca, "agent", "node-tls");
    let agent = Agent::start_with("node-tls", &args_of(&tls_flags(port, &agent_files))).await;
    let admin = issue_by_cli(&ca, "admin", "alice");
    let https = format!("https://127.0.0.1:{port}");
    let flags = |f: &TlsFiles| [&f.cert, &f.key, &f.ca].map(|p| p.to_string_lossy().into_owned());
    let [cert, key, ca_file] = flags(&admin);
    let o = hyperctl(&[
        "--agent",
        &https,
        "--tls-cert",
        &cert,
        "--tls-key",
        &key,
        "--tls-ca",
        &ca_file,
        "-o",
        "json",
        "node",
        "info",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let node: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(node["nodeName"], "node-tls");
    assert!(
        (29..=30).contains(&node["tlsDaysLeft"].as_i64().unwrap()),
        "{node}"
    );
    let o = hyperctl(&["--agent", &https, "node", "info"]);
    assert!(text(&o).contains("needs --tls-cert"), "{}", text(&o));

    let mut c = tls_client(port, &admin).await.unwrap();
    create(&mut c, agent.small_spec("keep"), false).await;
    let before = VmState::from(&get(&mut c, "keep").await);

    let pki_foreign = Pki::new();
    let mut foreign = pki_foreign.issue("mallory", Role::Admin("mallory".into()));
    foreign.ca = admin.ca.clone();
    let s = delete_as(port, &foreign, "keep").await;
    assert_eq!(s.code(), Code::Unauthenticated, "{s:?}");
    assert!(
        s.message().contains("not issued by the cluster CA"),
        "{s:?}"
    );

    let ca_pem = hypersdk_tls::files::read_pem(&ca, "ca").unwrap();
    let long_ago = Validity {
        not_before: time::OffsetDateTime::now_utc() - time::Duration::days(10),
        days: 2,
    };
    let old = issue::issue(&ca_pem, &Role::Admin("old".into()), &[], long_ago).unwrap();
    let (cert, key) = hypersdk_tls::files::write_pem(&dir.path().join("old"), "old", &old).unwrap();
    let expired = TlsFiles {
        cert,
        key,
        ca: admin.ca.clone(),
    };
    let s = delete_as(port, &expired, "keep").await;
    assert_eq!(s.code(), Code::Unauthenticated, "{s:?}");
    assert!(s.message().contains("expired"), "{s:?}");

    let peer = issue_by_cli(&ca, "agent", "node-other");
    let s = delete_as(port, &peer, "keep").await;
    assert_eq!(s.code(), Code::PermissionDenied, "{s:?}");
    for needle in [
        "hypersdk://agent/node-other",
        "/hypersdk.agent.v1.AgentService/DeleteVm",
    ] {
        assert!(s.message().contains(needle), "{needle}: {s:?}");
    }

    // A TLS client that presents no certificate.
    let roots = hypersdk_tls::files::read_roots(&admin.ca).unwrap();
    let mut anonymous = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    anonymous.alpn_protocols = vec![b"h2".to_vec()];
    let channel = endpoint::tls_channel(Arc::new(anonymous), &format!("127.0.0.1:{port}"))
        .await
        .unwrap();
    let s = AgentServiceClient::new(channel)
        .delete_vm(pb::DeleteVmRequest {
            name: "keep".into(),
            keep_disks: false,
        })
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::Unauthenticated, "{s:?}");
    assert!(s.message().contains("no client certificate"), "{s:?}");

    // Plain HTTP/2 on the TLS port gets no answer: the server fails the handshake.
    let plain = Address::Tcp(format!("127.0.0.1:{port}"));
    match endpoint::connect(&plain, None).await {
        Err(e) => println!("plaintext refused at connect: {e}"),
        Ok(mut c) => {
            // The connection breaks (the code depends on when hyper notices).
            let e = c
                .delete_vm(pb::DeleteVmRequest {
                    name: "keep".into(),
                    keep_disks: false,
                })
                .await;
            println!("plaintext call: {:?}", e.unwrap_err());
        }
    }

    assert_eq!(VmState::from(&get(&mut c, "keep").await), before);
}

/// An agent refuses to serve plain gRPC beyond loopback, and https:// without certificates.
#[tokio::test(flavor = "multi_thread")]
async fn agents_refuse_unsafe_listen_addresses() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_str().unwrap();
    for (listen, needle) in [
        (
            "http://192.0.2.1:7443",
            "plain gRPC is only served on loopback",
        ),
        ("https://127.0.0.1:7443", "https:// needs --tls-cert"),
    ] {
        let o = Command::new(bin("hypersdk-agent"))
            .args(["--data-dir", data, "--listen", listen, "--simulate"])
            .output()
            .unwrap();
        assert!(
            !o.status.success() && text(&o).contains(needle),
            "{listen}: {}",
            text(&o)
        );
    }
    let o = Command::new(bin("hypersdk-agent"))
        .args([
            "--data-dir",
            data,
            "--migration-address",
            "192.0.2.1",
            "--simulate",
        ])
        .output()
        .unwrap();
    assert!(
        !o.status.success() && text(&o).contains("without TLS only on loopback"),
        "{}",
        text(&o)
    );
    let o = Command::new(bin("hypersdk-agent"))
        .args(["--data-dir", data, "--tls-cert", "/x.crt", "--simulate"])
        .output()
        .unwrap();
    assert!(
        !o.status.success() && text(&o).contains("--tls-key"),
        "{}",
        text(&o)
    );
}

/// A live migration between two https:// agents: the source presents its agent certificate
/// to the target; the guest keeps counting.
#[tokio::test(flavor = "multi_thread")]
async fn live_migration_between_tls_agents_keeps_the_guest_counting() {
    let pki = Pki::new();
    let (pa, pb_) = (free_port(), free_port());
    let fa = pki.issue("mtls-a", Role::Agent("mtls-a".into()));
    let fb = pki.issue("mtls-b", Role::Agent("mtls-b".into()));
    let src = Agent::start_with("mtls-a", &args_of(&tls_flags(pa, &fa))).await;
    let dst = Agent::peer_of(&src, "mtls-b", &args_of(&tls_flags(pb_, &fb))).await;
    let admin = pki.issue("admin", Role::Admin("admin".into()));
    let mut a = tls_client(pa, &admin).await.unwrap();
    let mut b = tls_client(pb_, &admin).await.unwrap();

    let vm = create(&mut a, src.small_spec("mover"), true).await;
    let counter = current_counter(&vm, Duration::from_secs(120)).await;
    let target = Address::Tls(format!("127.0.0.1:{pb_}"));
    let progress = migrate(&mut a, "mover", &target, Default::default())
        .await
        .unwrap();
    assert_eq!(
        final_phase(&progress).0,
        pb::MigrationPhase::Completed,
        "{progress:?}"
    );
    // Both QEMUs verify the other's certificate: a stream that completed was TLS end to end.
    assert!(
        progress.last().is_some_and(|p| p.encrypted),
        "QEMU's stream was not put over TLS: {progress:?}"
    );
    let moved = get(&mut b, "mover").await;
    assert_eq!(phase(&moved), pb::VmPhase::Running);
    wait_counter_above(&moved, counter, Duration::from_secs(60)).await;
    assert_eq!(
        count_markers(&serial(&moved), READY_MARKER),
        0,
        "the guest rebooted"
    );
    let gone = a
        .get_vm(pb::GetVmRequest {
            name: "mover".into(),
        })
        .await;
    assert_eq!(gone.unwrap_err().code(), Code::NotFound);
    drop(dst);
}

/// Files overwrite `to`'s paths in place, as a certificate rotation would.
fn replace(to: &TlsFiles, pem: &issue::Pem, ca: &str) {
    std::fs::write(&to.cert, &pem.cert).unwrap();
    std::fs::write(&to.key, &pem.key).unwrap();
    std::fs::write(&to.ca, ca).unwrap();
}

/// The agent's certificate, key and CA are replaced (by a new CA's) while a VM runs: the next
/// connection uses the new ones (clients of the old CA are refused, the new CA's served, GetNode
/// reports the new expiry) with no restart of the agent or the VM.
#[tokio::test(flavor = "multi_thread")]
async fn certificates_replaced_on_disk_are_used_without_a_restart() {
    let old_pki = Pki::new();
    let port = free_port();
    let files = old_pki.issue("rot", Role::Agent("rot".into()));
    let agent = Agent::start_with("rot", &args_of(&tls_flags(port, &files))).await;
    let old_admin = old_pki.issue("admin", Role::Admin("admin".into()));
    let mut c = tls_client(port, &old_admin).await.unwrap();
    let vm = create(&mut c, agent.small_spec("steady"), true).await;
    wait_counting(&vm, Duration::from_secs(120)).await;
    let pid = get(&mut c, "steady").await.status.unwrap().pid;
    let agent_pid = agent.pid();

    let new_pki = Pki::new();
    let new_cert = issue::issue(
        &new_pki.ca,
        &Role::Agent("rot".into()),
        &["127.0.0.1".into()],
        Validity::days_from_now(7),
    )
    .unwrap();
    replace(&files, &new_cert, &new_pki.ca.cert);

    let new_admin = new_pki.issue("admin", Role::Admin("admin".into()));
    let mut fresh = eventually(
        Duration::from_secs(10),
        "a client of the new CA",
        async || {
            let mut c = tls_client(port, &new_admin)
                .await
                .map_err(|e| e.to_string())?;
            c.get_node(pb::GetNodeRequest {})
                .await
                .map_err(|e| e.to_string())?;
            Ok::<_, String>(c)
        },
    )
    .await;
    let node = fresh
        .get_node(pb::GetNodeRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!((6..=7).contains(&node.tls_days_left), "{node:?}");
    let refused = match tls_client(port, &old_admin).await {
        Err(e) => e.to_string(),
        Ok(mut c) => c
            .get_node(pb::GetNodeRequest {})
            .await
            .unwrap_err()
            .to_string(),
    };
    println!("old CA's client: {refused}");
    let again = get(&mut fresh, "steady").await;
    assert_eq!(
        again.status.as_ref().unwrap().pid,
        pid,
        "the VM was restarted"
    );
    assert_eq!(agent.pid(), agent_pid);
    wait_counting(&again, Duration::from_secs(60)).await;
    assert_eq!(
        count_markers(&serial(&again), READY_MARKER),
        1,
        "the guest rebooted"
    );
}
