//! Image import benchmark: a qcow2 image served over HTTP on 127.0.0.1 by the benchmark itself,
//! imported by the agent into its cache (download, SHA-256 while it streams, fsync, rename) and
//! fetched by `curl` to the same file system, alternating, in the same run. Prints MiB/s of
//! each (medians) and their ratio.
//!
//! Run with `scripts/bench.sh image_import` (release build). `BENCH_N` sets the rounds
//! (default 5); `BENCH_IMAGE_MIB` the image's size (default 256).

use std::path::Path;
use std::time::{Duration, Instant};

use hypersdk_proto::agent::v1 as pb;
use hypersdk_tests::*;
use sha2::Digest;

/// A qcow2 image of `mib` MiB of incompressible data.
fn make_image(dir: &Path, mib: usize) -> Vec<u8> {
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let raw: Vec<u8> = (0..mib << 17)
        .flat_map(|_| {
            // xorshift64: fast, and no block repeats, so nothing is deduplicated or sparse.
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state.to_le_bytes()
        })
        .collect();
    let (raw_path, qcow2) = (dir.join("bench.raw"), dir.join("bench.qcow2"));
    std::fs::write(&raw_path, raw).unwrap();
    let ok = std::process::Command::new("qemu-img")
        .args(["convert", "-q", "-f", "raw", "-O", "qcow2"])
        .args([&raw_path, &qcow2])
        .status()
        .unwrap()
        .success();
    assert!(ok, "qemu-img convert");
    std::fs::remove_file(raw_path).unwrap();
    let bytes = std::fs::read(&qcow2).unwrap();
    std::fs::remove_file(qcow2).unwrap();
    bytes
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// One import through the agent: from CreateVm to the image in the cache.
async fn agent_import(
    agent: &Agent,
    c: &mut Client,
    url: &str,
    checksum: &str,
    cached: &Path,
) -> Duration {
    let mut spec = agent.small_spec("bench-import");
    spec.disks = vec![pb::Disk {
        name: "root".into(),
        image: Some(pb::DiskImage {
            source: url.into(),
            checksum: checksum.into(),
        }),
        ..Default::default()
    }];
    let t0 = Instant::now();
    create(c, spec, true).await;
    eventually(
        Duration::from_secs(600),
        "the image in the cache",
        async || cached.exists(),
    )
    .await;
    let took = t0.elapsed();
    c.delete_vm(pb::DeleteVmRequest {
        keep_disks: false,
        name: "bench-import".into(),
    })
    .await
    .unwrap();
    std::fs::remove_file(cached).unwrap();
    took
}

/// One download by curl to a file beside the agent's cache.
fn curl(url: &str, to: &Path) -> Duration {
    let t0 = Instant::now();
    let ok = std::process::Command::new("curl")
        .args(["-sSf", "-o"])
        .arg(to)
        .arg(url)
        .status()
        .unwrap()
        .success();
    let took = t0.elapsed();
    assert!(ok, "curl {url}");
    std::fs::remove_file(to).unwrap();
    took
}

#[tokio::main]
async fn main() {
    let rounds = bench_rounds(5);
    let mib: usize = std::env::var("BENCH_IMAGE_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256);
    let agent = Agent::start("bench-import").await;
    let mut c = agent.client().await;
    let image = make_image(agent.dir.path(), mib);
    let size = image.len() as f64 / (1 << 20) as f64;
    let d = sha2::Sha256::digest(&image);
    let hex: String = d.iter().map(|b| format!("{b:02x}")).collect();
    let server = ImageServer::start(None).await;
    server.put("/bench.qcow2", image);
    let url = server.url("/bench.qcow2");
    let cache = agent.data_dir().join("images/cache");
    let cached = cache.join(format!("sha256-{hex}.qcow2"));
    let beside = cache.join("curl.qcow2");
    println!("image: {size:.0} MiB qcow2 over http://127.0.0.1, {rounds} rounds each, alternating");
    let (mut agent_rates, mut curl_rates) = (Vec::new(), Vec::new());
    for round in 1..=rounds {
        let a = agent_import(&agent, &mut c, &url, &format!("sha256:{hex}"), &cached).await;
        let k = curl(&url, &beside);
        let (ra, rk) = (size / a.as_secs_f64(), size / k.as_secs_f64());
        println!("  round {round}: agent {ra:.0} MiB/s ({a:.2?}), curl {rk:.0} MiB/s ({k:.2?})");
        agent_rates.push(ra);
        curl_rates.push(rk);
    }
    assert_eq!(
        server.hits("/bench.qcow2"),
        2 * rounds,
        "one download per import and per curl"
    );
    let (a, k) = (median(agent_rates), median(curl_rates));
    println!(
        "median: agent {a:.0} MiB/s, curl {k:.0} MiB/s; agent/curl = {:.2}",
        a / k
    );
}
