//! QMP client: one connection to a QEMU process's monitor socket.
//!
//! Lines are read as plain JSON so that an event or enum value newer than the `qapi` schema
//! cannot break the session; commands and their replies use `qapi`'s typed structs.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::net::unix::OwnedWriteHalf;
use tokio::sync::{Mutex, broadcast, oneshot};

/// How long QEMU may take to greet a new QMP connection.
const GREETING_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a command may take before the caller gets [`QmpError::Timeout`].
const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    #[error("QMP socket: {}: {source}", path.display())]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("QMP socket: {0}")]
    Io(#[source] std::io::Error),
    #[error("QMP connection closed")]
    Closed,
    /// QEMU answered the command with an error.
    #[error("QMP {command}: {class}: {desc}")]
    Command {
        command: String,
        class: String,
        desc: String,
    },
    /// The arguments do not fit the command's schema.
    #[error("QMP {command}: bad arguments: {source}")]
    Encode {
        command: String,
        #[source]
        source: serde_json::Error,
    },
    /// The reply does not fit the command's schema.
    #[error("QMP {command}: unexpected reply: {source}")]
    Decode {
        command: String,
        #[source]
        source: serde_json::Error,
    },
    /// A reply without `return` or `error`, or a greeting without `QMP`.
    #[error("QMP {command}: unexpected reply: {reply}")]
    Malformed { command: String, reply: String },
    #[error("QMP {0}: no reply within {COMMAND_TIMEOUT:?}")]
    Timeout(String),
}

/// An asynchronous QMP event, kept raw so unknown events pass through.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub name: String,
    pub data: Value,
}

type Pending = Arc<std::sync::Mutex<HashMap<u64, oneshot::Sender<Value>>>>;

#[derive(Clone)]
pub struct Qmp {
    writer: Arc<Mutex<OwnedWriteHalf>>,
    pending: Pending,
    next_id: Arc<AtomicU64>,
    events: broadcast::Sender<Event>,
}

impl std::fmt::Debug for Qmp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Qmp").finish_non_exhaustive()
    }
}

impl Qmp {
    /// Connects to a QMP socket, reads the greeting and negotiates capabilities.
    pub async fn connect(path: &Path) -> Result<Qmp, QmpError> {
        let stream = UnixStream::connect(path)
            .await
            .map_err(|source| QmpError::Connect {
                path: path.to_path_buf(),
                source,
            })?;
        let (read, write) = stream.into_split();
        let mut lines = BufReader::new(read).lines();
        // QEMU serves one monitor client at a time, and a QEMU whose main loop is stuck accepts
        // the connection but never greets: do not wait forever.
        let greeting = tokio::time::timeout(GREETING_TIMEOUT, lines.next_line())
            .await
            .map_err(|_| QmpError::Timeout("greeting".into()))?
            .map_err(QmpError::Io)?
            .ok_or(QmpError::Closed)?;
        if serde_json::from_str::<Value>(&greeting)
            .ok()
            .and_then(|v| v.get("QMP").cloned())
            .is_none()
        {
            return Err(QmpError::Malformed {
                command: "greeting".into(),
                reply: greeting,
            });
        }
        let pending: Pending = Default::default();
        let (events, _) = broadcast::channel(256);
        tokio::spawn(read_loop(lines, pending.clone(), events.clone()));
        let qmp = Qmp {
            writer: Arc::new(Mutex::new(write)),
            pending,
            next_id: Arc::new(AtomicU64::new(1)),
            events,
        };
        qmp.execute(qapi::qmp::qmp_capabilities { enable: None })
            .await?;
        Ok(qmp)
    }

    /// Events from now on. The stream ends (RecvError::Closed) when the connection closes.
    pub fn events(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }

    pub async fn execute<C: qapi::Command>(&self, command: C) -> Result<C::Ok, QmpError> {
        let arguments = serde_json::to_value(&command).map_err(|source| QmpError::Encode {
            command: C::NAME.into(),
            source,
        })?;
        let reply = self.execute_value(C::NAME, arguments).await?;
        serde_json::from_value(reply).map_err(|source| QmpError::Decode {
            command: C::NAME.into(),
            source,
        })
    }

    /// [`Qmp::execute`] for arguments built as JSON: they are read as `C` (so checked against
    /// its schema) before anything is sent.
    pub async fn execute_json<C>(&self, arguments: Value) -> Result<C::Ok, QmpError>
    where
        C: qapi::Command + serde::de::DeserializeOwned,
    {
        self.execute(command::<C>(arguments)?).await
    }

    /// Runs a command by name with JSON arguments; returns its `return` value.
    pub async fn execute_value(&self, name: &str, arguments: Value) -> Result<Value, QmpError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.pending.lock().unwrap().insert(id, tx);
        let mut msg = json!({ "execute": name, "id": id });
        if arguments.as_object().is_some_and(|o| !o.is_empty()) {
            msg["arguments"] = arguments;
        }
        let mut line = msg.to_string();
        line.push('\n');
        let written = self.writer.lock().await.write_all(line.as_bytes()).await;
        if let Err(e) = written {
            self.pending.lock().unwrap().remove(&id);
            return Err(QmpError::Io(e));
        }
        let reply = match tokio::time::timeout(COMMAND_TIMEOUT, rx).await {
            Ok(Ok(reply)) => reply,
            Ok(Err(_)) => return Err(QmpError::Closed),
            Err(_) => {
                self.pending.lock().unwrap().remove(&id);
                return Err(QmpError::Timeout(name.into()));
            }
        };
        reply_result(name, reply)
    }
}

/// A typed command from arguments written as JSON, checked against the command's schema.
pub fn command<C>(arguments: Value) -> Result<C, QmpError>
where
    C: qapi::Command + serde::de::DeserializeOwned,
{
    serde_json::from_value(arguments).map_err(|source| QmpError::Encode {
        command: C::NAME.into(),
        source,
    })
}

/// QAPI enums serialise as their QMP string ("running").
pub fn enum_name<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_value(v)
        .ok()
        .and_then(|v| v.as_str().map(String::from))
        .unwrap_or_default()
}

/// Splits a reply into its `return` value or its error.
fn reply_result(command: &str, mut reply: Value) -> Result<Value, QmpError> {
    if let Some(err) = reply.get("error") {
        let field = |k: &str| err.get(k).and_then(Value::as_str).unwrap_or("").to_string();
        return Err(QmpError::Command {
            command: command.into(),
            class: field("class"),
            desc: field("desc"),
        });
    }
    reply
        .get_mut("return")
        .map(Value::take)
        .ok_or_else(|| QmpError::Malformed {
            command: command.into(),
            reply: reply.to_string(),
        })
}

async fn read_loop(
    mut lines: tokio::io::Lines<BufReader<tokio::net::unix::OwnedReadHalf>>,
    pending: Pending,
    events: broadcast::Sender<Event>,
) {
    while let Ok(Some(line)) = lines.next_line().await {
        let Ok(mut msg) = serde_json::from_str::<Value>(&line) else {
            tracing::warn!(line, "QMP sent a line that is not JSON");
            continue;
        };
        if let Some(name) = msg.get("event").and_then(Value::as_str) {
            let event = Event {
                name: name.to_string(),
                data: msg.get_mut("data").map(Value::take).unwrap_or(Value::Null),
            };
            let _ = events.send(event);
        } else if let Some(id) = msg.get("id").and_then(Value::as_u64)
            && let Some(tx) = pending.lock().unwrap().remove(&id)
        {
            let _ = tx.send(msg);
        }
    }
    // Dropping the senders fails every waiting command with `Closed`.
    pending.lock().unwrap().clear();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_replies_and_errors() {
        let ok = reply_result(
            "query-status",
            json!({"return": {"status": "running"}, "id": 1}),
        );
        assert_eq!(ok.unwrap()["status"], "running");
        let err = reply_result(
            "cont",
            json!({"error": {"class": "GenericError", "desc": "no"}, "id": 2}),
        )
        .unwrap_err();
        assert_eq!(err.to_string(), "QMP cont: GenericError: no");
        assert!(matches!(
            reply_result("x", json!({"id": 3})),
            Err(QmpError::Malformed { .. })
        ));
    }

    /// A scripted peer on a real socket: greeting, capabilities, an unknown event, a reply.
    #[tokio::test]
    async fn talks_to_a_peer_and_keeps_unknown_events() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp.sock");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let peer = tokio::spawn(async move {
            let (s, _) = listener.accept().await.unwrap();
            let (r, mut w) = s.into_split();
            let mut lines = BufReader::new(r).lines();
            w.write_all(b"{\"QMP\": {\"version\": {}, \"capabilities\": []}}\n")
                .await
                .unwrap();
            let caps: Value =
                serde_json::from_str(&lines.next_line().await.unwrap().unwrap()).unwrap();
            assert_eq!(caps["execute"], "qmp_capabilities");
            w.write_all(format!("{{\"return\": {{}}, \"id\": {}}}\n", caps["id"]).as_bytes())
                .await
                .unwrap();
            let q: Value =
                serde_json::from_str(&lines.next_line().await.unwrap().unwrap()).unwrap();
            w.write_all(b"{\"event\": \"FUTURE_EVENT_FROM_QEMU_99\", \"data\": {\"x\": 1}, \"timestamp\": {}}\n").await.unwrap();
            w.write_all(
                format!("{{\"return\": {{\"status\": \"running\", \"running\": true, \"singlestep\": false}}, \"id\": {}}}\n", q["id"]).as_bytes(),
            )
            .await
            .unwrap();
        });
        let qmp = Qmp::connect(&path).await.unwrap();
        // Arguments that do not fit the schema are refused before anything is sent.
        let bad = json!({"capabilities": [{"capability": "no-such-capability", "state": true}]});
        let refused = qmp
            .execute_json::<qapi::qmp::migrate_set_capabilities>(bad)
            .await;
        assert!(
            matches!(&refused, Err(QmpError::Encode { command, .. }) if command == "migrate-set-capabilities"),
            "{refused:?}"
        );
        let mut events = qmp.events();
        let status = qmp.execute(qapi::qmp::query_status {}).await.unwrap();
        assert!(status.running);
        let ev = events.recv().await.unwrap();
        assert_eq!(ev.name, "FUTURE_EVENT_FROM_QEMU_99");
        peer.await.unwrap();
        // The peer hung up: further commands fail instead of hanging.
        assert!(qmp.execute(qapi::qmp::query_status {}).await.is_err());
    }
}
