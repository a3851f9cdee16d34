//! The hyperctl surface users and scripts rely on, against a real agent and QEMU.

use std::process::{Command, Output, Stdio};
use std::time::Duration;

use hypersdk_tests::*;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};

/// How long a watch event may take to arrive (bounds the wait only).
const EVENT: Duration = Duration::from_secs(60);

fn hyperctl(agent: &Agent, args: &[&str]) -> Output {
    Command::new(bin("hyperctl"))
        .env("HYPERSDK_AGENT", agent.address.to_string())
        .args(args)
        .output()
        .unwrap()
}

fn json(agent: &Agent, args: &[&str]) -> Value {
    let mut all = args.to_vec();
    all.extend(["-o", "json"]);
    let out = hyperctl(agent, &all);
    assert!(
        out.status.success(),
        "hyperctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)))
}

#[tokio::test(flavor = "multi_thread")]
async fn vm_lifecycle_from_the_command_line() {
    let agent = Agent::start("node-cli").await;
    let node = json(&agent, &["node", "info"]);
    assert_eq!(node["nodeName"], "node-cli");
    assert!(matches!(node["accelerator"].as_str(), Some("kvm" | "tcg")));
    assert!(node["qemuVersion"].as_str().unwrap().contains("QEMU"));

    // `vm watch -o json` streams NDJSON while we work. It opens with the VMs that exist: the
    // first line (a VM made beforehand) says the watch is live, so it misses nothing of cli-vm.
    let spec = agent.guest_spec("cli-vm");
    let boot = spec.boot.clone().unwrap();
    let args = ["vm", "create", "early", "--cpus", "1", "--memory", "64Mi"];
    json(&agent, &[&args[..], &["--kernel", &boot.kernel]].concat());
    let mut watch = tokio::process::Command::new(bin("hyperctl"))
        .env("HYPERSDK_AGENT", agent.address.to_string())
        .args(["vm", "watch", "-o", "json"])
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(watch.stdout.take().unwrap()).lines();
    let mut next_event = async || {
        let line = tokio::time::timeout(EVENT, lines.next_line())
            .await
            .expect("a watch event in time")
            .unwrap()
            .expect("the watch goes on");
        serde_json::from_str::<Value>(&line).unwrap()
    };
    let first = next_event().await;
    assert_eq!(
        (&first["type"], &first["vm"]["name"]),
        (&Value::from("ADDED"), &Value::from("early"))
    );

    let vm = json(
        &agent,
        &[
            "vm",
            "create",
            "cli-vm",
            "--cpus",
            "1",
            "--memory",
            "256Mi",
            "--max-cpus",
            "2",
            "--kernel",
            &boot.kernel,
            "--initrd",
            &boot.initrd,
            "--cmdline",
            &boot.cmdline,
            "--disk",
            &spec.disks[0].path,
            "--start",
        ],
    );
    assert_eq!(vm["name"], "cli-vm");
    assert_eq!(vm["status"]["phase"], "Running");
    assert!(vm["status"]["pid"].as_u64().unwrap() > 0);
    assert_eq!(
        vm["spec"]["disks"][0]["format"], "qcow2",
        "format read from the image header"
    );

    let list = json(&agent, &["vm", "list"]);
    assert_eq!(list.as_array().unwrap().len(), 2);
    let yaml = hyperctl(&agent, &["vm", "get", "cli-vm", "-o", "yaml"]);
    assert!(String::from_utf8_lossy(&yaml.stdout).contains("phase: Running"));
    let table = hyperctl(&agent, &["vm", "list"]);
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(
        table.contains("NAME") && table.contains("cli-vm") && table.contains("Running"),
        "{table}"
    );

    assert_eq!(
        json(&agent, &["vm", "pause", "cli-vm"])["status"]["phase"],
        "Paused"
    );
    assert_eq!(
        json(&agent, &["vm", "resume", "cli-vm"])["status"]["phase"],
        "Running"
    );
    assert_eq!(
        json(&agent, &["vm", "stop", "cli-vm", "--force"])["status"]["phase"],
        "Stopped"
    );
    assert_eq!(
        json(&agent, &["vm", "delete", "cli-vm"])["deleted"],
        "cli-vm"
    );

    // The watch saw the VM appear, run and go away.
    let mut seen = vec![];
    while seen
        .last()
        .is_none_or(|s: &String| !s.starts_with("DELETED"))
    {
        let ev = next_event().await;
        if ev["vm"]["name"] == "cli-vm" {
            seen.push(format!(
                "{}:{}",
                ev["type"].as_str().unwrap(),
                ev["vm"]["status"]["phase"].as_str().unwrap()
            ));
        }
    }
    let _ = watch.kill().await;
    assert_eq!(
        seen.first().map(String::as_str),
        Some("ADDED:Pending"),
        "{seen:?}"
    );
    for expected in [
        "MODIFIED:Starting",
        "MODIFIED:Running",
        "MODIFIED:Paused",
        "MODIFIED:Stopped",
    ] {
        assert!(
            seen.iter().any(|s| s == expected),
            "{expected} missing from {seen:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn manifests_and_errors() {
    let agent = Agent::start("node-cli-f").await;
    let spec = agent.guest_spec("from-yaml");
    let boot = spec.boot.clone().unwrap();
    let manifest = format!(
        "apiVersion: hypersdk.io/v1alpha1\nkind: VirtualMachine\nmetadata:\n  name: from-yaml\nspec:\n  cpus: 1\n  memory: 256Mi\n  running: false\n  boot:\n    kernel: {}\n    initrd: {}\n    cmdline: {}\n  disks:\n    - name: root\n      path: {}\n  networks:\n    - name: default\n      type: pod-network\n",
        boot.kernel, boot.initrd, boot.cmdline, spec.disks[0].path
    );
    let file = agent.dir.path().join("vm.yaml");
    std::fs::write(&file, manifest).unwrap();
    let vm = json(&agent, &["vm", "create", "-f", file.to_str().unwrap()]);
    assert_eq!(vm["status"]["phase"], "Pending");
    assert_eq!(vm["spec"]["networks"][0], "default");

    // Errors: exit status 1 (2 for usage errors), the field named on stderr, nothing on stdout.
    for (args, code, needle) in [
        (
            vec![
                "vm", "create", "x", "--cpus", "1", "--memory", "8XB", "--kernel", "/k",
            ],
            1,
            "spec.memory",
        ),
        (
            vec![
                "vm", "create", "Bad", "--cpus", "1", "--memory", "1Gi", "--kernel", "/k",
            ],
            1,
            "spec.name",
        ),
        (vec!["vm", "get", "missing"], 1, "not found"),
        (
            vec!["--agent", "tcp://nowhere", "vm", "list"],
            2,
            "expected unix://",
        ),
        (vec!["vm", "create", "x", "--memory", "1Gi"], 2, "--cpus"),
    ] {
        let out = hyperctl(&agent, &args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(code), "{args:?}: {stderr}");
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
        assert!(out.stdout.is_empty());
    }
    let out = Command::new(bin("hyperctl"))
        .args(["--agent", "unix:///nonexistent/agent.sock", "vm", "list"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot reach the agent"));
}
