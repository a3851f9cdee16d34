//! Bytes between a gRPC bidirectional stream and a connection on the node (the serial
//! console's socket, a TCP connection to a guest port).

use std::pin::Pin;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::{Status, Streaming};

pub type ByteStream<O> = Pin<Box<dyn Stream<Item = Result<O, Status>> + Send>>;

/// Copies `first` and then each inbound message's bytes (`data_of`) to `conn`, and what `conn`
/// says back to the returned stream (`wrap`). Ends when either side ends; `on_end` runs then
/// (it releases whatever the attachment held). `hello`, if any, is the first outbound message.
pub fn pipe<C, I, O>(
    conn: C,
    first: Vec<u8>,
    mut inbound: Streaming<I>,
    data_of: fn(I) -> Vec<u8>,
    wrap: fn(Vec<u8>) -> O,
    hello: Option<O>,
    on_end: impl FnOnce() + Send + 'static,
) -> ByteStream<O>
where
    C: AsyncRead + AsyncWrite + Send + 'static,
    I: Send + 'static,
    O: Send + 'static,
{
    let (mut reader, mut writer) = tokio::io::split(conn);
    let (tx, rx) = mpsc::channel::<Result<O, Status>>(16);
    let to_conn = async move {
        if !first.is_empty() && writer.write_all(&first).await.is_err() {
            return;
        }
        while let Some(Ok(msg)) = inbound.next().await {
            let data = data_of(msg);
            if !data.is_empty() && writer.write_all(&data).await.is_err() {
                return;
            }
        }
        // The client is done sending: half-close, so the peer sees end of input.
        let _ = writer.shutdown().await;
    };
    // The only sender: the stream ends as soon as the peer closes, even while the client is
    // still sending (an HTTP/1.0 client waits for that end before it closes its side).
    let out = tx;
    let from_conn = async move {
        if let Some(h) = hello
            && out.send(Ok(h)).await.is_err()
        {
            return;
        }
        let mut buf = vec![0u8; 16 << 10];
        loop {
            match reader.read(&mut buf).await {
                Ok(0) => return,
                Ok(n) => {
                    if out.send(Ok(wrap(buf[..n].to_vec()))).await.is_err() {
                        return;
                    }
                }
                Err(e) => {
                    let _ = out.send(Err(Status::unavailable(e.to_string()))).await;
                    return;
                }
            }
        }
    };
    tokio::spawn(async move {
        // The input side ending (the client half-closed) leaves the output flowing until the
        // peer closes; the attachment is over when both are.
        tokio::join!(to_conn, from_conn);
        on_end();
    });
    Box::pin(ReceiverStream::new(rx))
}
