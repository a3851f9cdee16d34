//! QEMU guest agent client, over the VM's virtio-serial channel (a unix socket on the host).
//!
//! The channel has no framing of its own: stale replies from an earlier, timed-out request can
//! still be in flight. Every session therefore starts with `guest-sync-delimited`, whose reply
//! follows a 0xFF byte and carries our random id; anything before it is discarded.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

#[derive(Debug, thiserror::Error)]
pub enum QgaError {
    #[error("guest agent socket: {}: {source}", path.display())]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("guest agent socket: {0}")]
    Io(#[source] std::io::Error),
    #[error("guest agent channel closed")]
    Closed,
    #[error("guest agent sent more than {MAX_REPLY} bytes without a delimiter")]
    TooLong,
    #[error("guest agent did not answer within {0:?}")]
    Timeout(Duration),
    #[error("guest agent {command}: {desc}")]
    Command { command: String, desc: String },
    #[error("guest agent {command}: unexpected reply: {source}: {line:?}")]
    NotJson {
        command: String,
        line: String,
        #[source]
        source: serde_json::Error,
    },
    /// The reply does not fit the command's schema.
    #[error("guest agent {command}: unexpected reply: {source}")]
    Decode {
        command: String,
        #[source]
        source: serde_json::Error,
    },
}

pub struct Qga {
    stream: BufReader<UnixStream>,
}

impl Qga {
    /// Connects to the host side of the channel; [`Qga::sync`] tells whether a guest agent answers.
    pub async fn connect(path: &Path) -> Result<Qga, QgaError> {
        let stream = UnixStream::connect(path)
            .await
            .map_err(|source| QgaError::Connect {
                path: path.to_path_buf(),
                source,
            })?;
        Ok(Qga {
            stream: BufReader::new(stream),
        })
    }

    /// Synchronises with the guest agent; `Timeout` while none runs in the guest. Safe to retry
    /// on the same connection: replies to earlier attempts are skipped.
    pub async fn sync(&mut self, timeout: Duration) -> Result<(), QgaError> {
        with_timeout(timeout, self.sync_inner()).await
    }

    async fn sync_inner(&mut self) -> Result<(), QgaError> {
        let id = sync_id();
        // A leading 0xFF resets the guest agent's parser if a partial request is pending.
        let mut msg = vec![0xff];
        msg.extend(
            json!({"execute": "guest-sync-delimited", "arguments": {"id": id}})
                .to_string()
                .bytes(),
        );
        msg.push(b'\n');
        self.write(&msg).await?;
        loop {
            // Whatever precedes the delimiter is stale; it is read and dropped.
            read_until_bounded(&mut self.stream, 0xff).await?;
            let reply = self.read_line("guest-sync-delimited").await?;
            if reply.get("return").and_then(Value::as_u64) == Some(id) {
                return Ok(());
            }
        }
    }

    pub async fn execute<C: qapi::Command>(
        &mut self,
        command: C,
        timeout: Duration,
    ) -> Result<C::Ok, QgaError> {
        with_timeout(timeout, async {
            let msg = json!({"execute": C::NAME, "arguments": command});
            let mut line = msg.to_string().into_bytes();
            line.push(b'\n');
            self.write(&line).await?;
            let mut reply = self.read_line(C::NAME).await?;
            if let Some(err) = reply.get("error") {
                return Err(QgaError::Command {
                    command: C::NAME.into(),
                    desc: err.get("desc").and_then(Value::as_str).unwrap_or("").into(),
                });
            }
            let ret = reply
                .get_mut("return")
                .map(Value::take)
                .unwrap_or(Value::Null);
            serde_json::from_value(ret).map_err(|source| QgaError::Decode {
                command: C::NAME.into(),
                source,
            })
        })
        .await
    }

    async fn write(&mut self, bytes: &[u8]) -> Result<(), QgaError> {
        self.stream
            .get_mut()
            .write_all(bytes)
            .await
            .map_err(QgaError::Io)
    }

    async fn read_line(&mut self, command: &str) -> Result<Value, QgaError> {
        let line = read_until_bounded(&mut self.stream, b'\n').await?;
        serde_json::from_slice(&line).map_err(|source| QgaError::NotJson {
            command: command.into(),
            line: String::from_utf8_lossy(&line).into_owned(),
            source,
        })
    }
}

/// The guest is untrusted: a reply may not be longer than this.
const MAX_REPLY: usize = 1 << 20;

/// Reads up to and including `delim`, refusing to buffer more than [`MAX_REPLY`] bytes.
async fn read_until_bounded(
    stream: &mut BufReader<UnixStream>,
    delim: u8,
) -> Result<Vec<u8>, QgaError> {
    let mut out = Vec::new();
    loop {
        let buf = stream.fill_buf().await.map_err(QgaError::Io)?;
        if buf.is_empty() {
            return Err(QgaError::Closed);
        }
        let (take, done) = match buf.iter().position(|b| *b == delim) {
            Some(i) => (i + 1, true),
            None => (buf.len(), false),
        };
        out.extend_from_slice(&buf[..take]);
        stream.consume(take);
        if out.len() > MAX_REPLY {
            return Err(QgaError::TooLong);
        }
        if done {
            return Ok(out);
        }
    }
}

async fn with_timeout<T>(
    limit: Duration,
    f: impl Future<Output = Result<T, QgaError>>,
) -> Result<T, QgaError> {
    tokio::time::timeout(limit, f)
        .await
        .unwrap_or(Err(QgaError::Timeout(limit)))
}

/// A fresh id per sync, so a reply to an older sync is never mistaken for this one.
fn sync_id() -> u64 {
    use std::time::{SystemTime, UNIX_EPOCH};
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    // Keep it within JSON's exact integer range.
    (nanos ^ (std::process::id() as u64) << 32) & ((1 << 53) - 1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    /// A scripted guest agent on a real socket: stale output first, then the right reply.
    #[tokio::test]
    async fn sync_skips_stale_replies_and_bounds_what_it_reads() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qga.sock");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let peer = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = vec![0u8; 512];
            let n = s.read(&mut buf).await.unwrap();
            let req: Value = serde_json::from_slice(&buf[1..n]).unwrap();
            let id = req["arguments"]["id"].as_u64().unwrap();
            let stale = b"{\"return\": {}}\n\xff{\"return\": 12345}\n";
            s.write_all(stale).await.unwrap();
            let mut reply = vec![0xff];
            reply.extend(format!("{{\"return\": {id}}}\n").bytes());
            s.write_all(&reply).await.unwrap();
            // Then a reply that never ends.
            let _ = s.read(&mut buf).await.unwrap();
            let endless = vec![b'x'; MAX_REPLY + 10];
            let _ = s.write_all(&endless).await;
        });
        let mut qga = Qga::connect(&path).await.unwrap();
        qga.sync(Duration::from_secs(5)).await.unwrap();
        let err = qga
            .execute(qapi::qga::guest_ping {}, Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(err.to_string().contains("without a delimiter"), "{err}");
        peer.await.unwrap();
    }
}
