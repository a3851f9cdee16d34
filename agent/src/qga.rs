//! QEMU guest agent client, over the VM's virtio-serial channel (a unix socket on the host).
//!
//! The channel has no framing of its own: stale replies from an earlier, timed-out request can
//! still be in flight. Every session therefore starts with `guest-sync-delimited`, whose reply
//! follows a 0xFF byte and carries our random id; anything before it is discarded.

use std::path::Path;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

#[derive(Debug, Clone, thiserror::Error)]
pub enum QgaError {
    #[error("guest agent socket: {0}")]
    Io(String),
    #[error("guest agent did not answer within {0:?}")]
    Timeout(Duration),
    #[error("guest agent {command}: {desc}")]
    Command { command: String, desc: String },
    #[error("guest agent {command}: unexpected reply: {why}")]
    Decode { command: String, why: String },
}

pub struct Qga {
    stream: BufReader<UnixStream>,
}

impl Qga {
    /// Connects to the host side of the channel; [`Qga::sync`] tells whether a guest agent answers.
    pub async fn connect(path: &Path) -> Result<Qga, QgaError> {
        let stream = UnixStream::connect(path)
            .await
            .map_err(|e| QgaError::Io(format!("{}: {e}", path.display())))?;
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
            let mut skipped = Vec::new();
            self.stream
                .read_until(0xff, &mut skipped)
                .await
                .map_err(|e| QgaError::Io(e.to_string()))?;
            if skipped.last() != Some(&0xff) {
                return Err(QgaError::Io("guest agent channel closed".into()));
            }
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
            serde_json::from_value(ret).map_err(|e| QgaError::Decode {
                command: C::NAME.into(),
                why: e.to_string(),
            })
        })
        .await
    }

    async fn write(&mut self, bytes: &[u8]) -> Result<(), QgaError> {
        self.stream
            .get_mut()
            .write_all(bytes)
            .await
            .map_err(|e| QgaError::Io(e.to_string()))
    }

    async fn read_line(&mut self, command: &str) -> Result<Value, QgaError> {
        let mut line = String::new();
        let n = self
            .stream
            .read_line(&mut line)
            .await
            .map_err(|e| QgaError::Io(e.to_string()))?;
        if n == 0 {
            return Err(QgaError::Io("guest agent channel closed".into()));
        }
        serde_json::from_str(line.trim_start_matches('\u{ff}')).map_err(|e| QgaError::Decode {
            command: command.into(),
            why: format!("{e}: {line:?}"),
        })
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
