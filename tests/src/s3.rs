//! A real S3-compatible server for backup tests: Versity Gateway (`versitygw`, Apache-2.0, Go),
//! built from its module by `scripts/setup.sh` into `target/s3/bin`. Its `posix` backend keeps
//! each bucket as a directory and each object as a file under it, so tests can count and
//! corrupt objects directly; requests are signed with SigV4 and checked against the account
//! given at start (wrong credentials are refused like on AWS).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use hypersdk_proto::agent::v1 as pb;

use crate::{free_port, repo_root, wait_until};

pub const ACCESS_KEY: &str = "hypersdk-test";
pub const SECRET_KEY: &str = "hypersdk-test-secret";

pub struct S3Server {
    pub root: tempfile::TempDir,
    pub port: u16,
    child: Option<Child>,
}

/// The gateway binary, or a panic saying how to get it.
pub fn versitygw() -> PathBuf {
    let path = repo_root().join("target/s3/bin/versitygw");
    assert!(
        path.is_file(),
        "{} missing: run scripts/setup.sh (builds it with `go install`)",
        path.display()
    );
    path
}

impl S3Server {
    /// Starts a server on a free loopback port with an empty root.
    pub fn start() -> S3Server {
        let root = tempfile::Builder::new()
            .prefix("hs-s3-")
            .tempdir_in("/tmp")
            .unwrap();
        let mut s = S3Server {
            root,
            port: free_port(),
            child: None,
        };
        s.spawn();
        s
    }

    fn spawn(&mut self) {
        let data = self.root.path().join("data");
        std::fs::create_dir_all(&data).unwrap();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.root.path().join("versitygw.log"))
            .unwrap();
        let child = Command::new(versitygw())
            .args(["--access", ACCESS_KEY, "--secret", SECRET_KEY])
            .args(["--port", &format!("127.0.0.1:{}", self.port)])
            .arg("posix")
            .arg(&data)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .stdin(Stdio::null())
            .spawn()
            .expect("starting versitygw");
        self.child = Some(child);
        let port = self.port;
        wait_until(Duration::from_secs(30), "versitygw to listen", || {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Makes bucket `name` (the posix backend's buckets are the root's directories).
    pub fn create_bucket(&self, name: &str) {
        std::fs::create_dir_all(self.bucket_dir(name)).unwrap();
    }

    pub fn bucket_dir(&self, name: &str) -> PathBuf {
        self.root.path().join("data").join(name)
    }

    /// Where a repository at `prefix` of `bucket` is, with this server's credentials.
    pub fn location(&self, bucket: &str, prefix: &str) -> pb::S3Location {
        pb::S3Location {
            endpoint: self.endpoint(),
            region: "us-east-1".into(),
            bucket: bucket.into(),
            prefix: prefix.into(),
            access_key_id: ACCESS_KEY.into(),
            secret_access_key: SECRET_KEY.into(),
            storage_class: String::new(),
        }
    }

    /// Ends the server at once (as a crash or a network cut would).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same port and data.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    /// The object files under `prefix` of `bucket` (the gateway's own metadata left out).
    pub fn objects(&self, bucket: &str, prefix: &str) -> Vec<PathBuf> {
        let mut out = Vec::new();
        walk(&self.bucket_dir(bucket).join(prefix), &mut out);
        out.sort();
        out
    }
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') {
            continue; // the gateway's temporary and metadata files
        }
        if p.is_dir() {
            walk(&p, out);
        } else {
            out.push(p);
        }
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        self.kill();
    }
}
