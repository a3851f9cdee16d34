//! A minimal NBD client (fixed newstyle handshake, structured replies) over a unix socket: what
//! reading QEMU's (or qemu-nbd's) export of a disk needs: `READ`, and `BLOCK_STATUS` on a
//! `qemu:dirty-bitmap:<name>` meta context for the clusters changed since the last backup.
//! Protocol: <https://github.com/NetworkBlockDevice/nbd/blob/master/doc/proto.md>.

use std::path::{Path, PathBuf};

use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::UnixStream;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};

const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

const FLAG_FIXED_NEWSTYLE: u16 = 1;
const FLAG_NO_ZEROES: u16 = 2;

const OPT_GO: u32 = 7;
const OPT_STRUCTURED_REPLY: u32 = 8;
const OPT_SET_META_CONTEXT: u32 = 10;

const REP_ACK: u32 = 1;
const REP_INFO: u32 = 3;
const REP_META_CONTEXT: u32 = 4;
const REP_ERR_BIT: u32 = 1 << 31;
const INFO_EXPORT: u16 = 0;

const CMD_READ: u16 = 0;
const CMD_DISC: u16 = 2;
const CMD_BLOCK_STATUS: u16 = 7;

const REPLY_FLAG_DONE: u16 = 1;
const REPLY_TYPE_NONE: u16 = 0;
const REPLY_TYPE_OFFSET_DATA: u16 = 1;
const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
const REPLY_TYPE_ERROR_BIT: u16 = 1 << 15;

/// Largest reply payload accepted (QEMU's reads are at most 32 MiB).
const MAX_PAYLOAD: u32 = 64 << 20;

#[derive(Debug, thiserror::Error)]
pub enum NbdError {
    #[error("NBD socket {}: {source}", path.display())]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("NBD: {0}")]
    Io(#[from] std::io::Error),
    #[error("NBD protocol: {0}")]
    Protocol(String),
    #[error("NBD server refused {what}: error {code} {message}")]
    Refused {
        what: &'static str,
        code: u32,
        message: String,
    },
}

fn protocol(what: impl Into<String>) -> NbdError {
    NbdError::Protocol(what.into())
}

/// One connection to an export, after the handshake.
pub struct Client {
    reader: BufReader<OwnedReadHalf>,
    writer: BufWriter<OwnedWriteHalf>,
    /// The export's size in bytes.
    pub size: u64,
    /// The context id of the dirty bitmap, when one was asked for and the server has it.
    bitmap_context: Option<u32>,
    next_handle: u64,
}

impl Client {
    /// Connects to export `name` at `socket`; with `bitmap`, also asks for the meta context
    /// `qemu:dirty-bitmap:<bitmap>`.
    pub async fn connect(
        socket: &Path,
        name: &str,
        bitmap: Option<&str>,
    ) -> Result<Client, NbdError> {
        let stream = UnixStream::connect(socket)
            .await
            .map_err(|source| NbdError::Connect {
                path: socket.to_path_buf(),
                source,
            })?;
        let (r, w) = stream.into_split();
        let mut c = Client {
            reader: BufReader::with_capacity(1 << 20, r),
            writer: BufWriter::new(w),
            size: 0,
            bitmap_context: None,
            next_handle: 1,
        };
        c.handshake(name, bitmap).await?;
        Ok(c)
    }

    async fn handshake(&mut self, name: &str, bitmap: Option<&str>) -> Result<(), NbdError> {
        if self.reader.read_u64().await? != NBDMAGIC || self.reader.read_u64().await? != IHAVEOPT {
            return Err(protocol("not a newstyle NBD server"));
        }
        let flags = self.reader.read_u16().await?;
        if flags & FLAG_FIXED_NEWSTYLE == 0 {
            return Err(protocol("server lacks fixed newstyle negotiation"));
        }
        let client_flags = u32::from(FLAG_FIXED_NEWSTYLE | (flags & FLAG_NO_ZEROES));
        self.writer.write_u32(client_flags).await?;
        self.option(OPT_STRUCTURED_REPLY, &[]).await?;
        self.replies_until_ack("structured replies", |_, _| Ok(()))
            .await?;
        if let Some(bitmap) = bitmap {
            let query = format!("qemu:dirty-bitmap:{bitmap}");
            let mut data = Vec::new();
            put_str(&mut data, name);
            data.extend_from_slice(&1u32.to_be_bytes());
            put_str(&mut data, &query);
            self.option(OPT_SET_META_CONTEXT, &data).await?;
            let mut found = None;
            self.replies_until_ack("the dirty bitmap context", |kind, payload| {
                if kind == REP_META_CONTEXT && payload.len() >= 4 {
                    found = Some(u32::from_be_bytes(payload[..4].try_into().unwrap()));
                }
                Ok(())
            })
            .await?;
            self.bitmap_context =
                Some(found.ok_or_else(|| protocol(format!("the server has no {query}")))?);
        }
        let mut data = Vec::new();
        put_str(&mut data, name);
        data.extend_from_slice(&0u16.to_be_bytes());
        self.option(OPT_GO, &data).await?;
        let mut size = None;
        self.replies_until_ack("the export", |kind, payload| {
            if kind == REP_INFO && payload.len() >= 12 {
                let info = u16::from_be_bytes([payload[0], payload[1]]);
                if info == INFO_EXPORT {
                    size = Some(u64::from_be_bytes(payload[2..10].try_into().unwrap()));
                }
            }
            Ok(())
        })
        .await?;
        self.size = size.ok_or_else(|| protocol("the server did not give the export's size"))?;
        Ok(())
    }

    async fn option(&mut self, option: u32, data: &[u8]) -> Result<(), NbdError> {
        self.writer.write_u64(IHAVEOPT).await?;
        self.writer.write_u32(option).await?;
        self.writer.write_u32(data.len() as u32).await?;
        self.writer.write_all(data).await?;
        self.writer.flush().await?;
        Ok(())
    }

    /// Reads option replies, handing each non-ack one to `each`, until the ack.
    async fn replies_until_ack(
        &mut self,
        what: &'static str,
        mut each: impl FnMut(u32, &[u8]) -> Result<(), NbdError>,
    ) -> Result<(), NbdError> {
        loop {
            if self.reader.read_u64().await? != OPT_REPLY_MAGIC {
                return Err(protocol("bad option reply magic"));
            }
            let _option = self.reader.read_u32().await?;
            let kind = self.reader.read_u32().await?;
            let len = self.reader.read_u32().await?;
            if len > MAX_PAYLOAD {
                return Err(protocol("option reply too long"));
            }
            let mut payload = vec![0; len as usize];
            self.reader.read_exact(&mut payload).await?;
            if kind & REP_ERR_BIT != 0 {
                return Err(NbdError::Refused {
                    what,
                    code: kind & !REP_ERR_BIT,
                    message: String::from_utf8_lossy(&payload).into_owned(),
                });
            }
            if kind == REP_ACK {
                return Ok(());
            }
            each(kind, &payload)?;
        }
    }

    async fn request(&mut self, kind: u16, offset: u64, length: u32) -> Result<u64, NbdError> {
        let handle = self.next_handle;
        self.next_handle += 1;
        self.writer.write_u32(REQUEST_MAGIC).await?;
        self.writer.write_u16(0).await?;
        self.writer.write_u16(kind).await?;
        self.writer.write_u64(handle).await?;
        self.writer.write_u64(offset).await?;
        self.writer.write_u32(length).await?;
        self.writer.flush().await?;
        Ok(handle)
    }

    /// Reads `buf.len()` bytes at `offset` into `buf`. Holes the server reports read as zeros.
    pub async fn read(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), NbdError> {
        let handle = self.request(CMD_READ, offset, buf.len() as u32).await?;
        loop {
            let magic = self.reader.read_u32().await?;
            if magic == SIMPLE_REPLY_MAGIC {
                let error = self.reader.read_u32().await?;
                self.expect_handle(handle).await?;
                if error != 0 {
                    return Err(refused("a read", error, String::new()));
                }
                self.reader.read_exact(buf).await?;
                return Ok(());
            }
            let (flags, kind, len) = self.structured_header(magic, handle).await?;
            match kind {
                REPLY_TYPE_OFFSET_DATA => {
                    let at = self.reader.read_u64().await?;
                    let start = slice_start(at, offset, len as u64 - 8, buf.len())?;
                    self.reader
                        .read_exact(&mut buf[start..start + len as usize - 8])
                        .await?;
                }
                REPLY_TYPE_OFFSET_HOLE => {
                    let at = self.reader.read_u64().await?;
                    let hole = self.reader.read_u32().await? as u64;
                    let start = slice_start(at, offset, hole, buf.len())?;
                    buf[start..start + hole as usize].fill(0);
                }
                REPLY_TYPE_NONE => {}
                k if k & REPLY_TYPE_ERROR_BIT != 0 => {
                    return Err(self.error_reply(len, "a read").await?);
                }
                other => return Err(protocol(format!("unexpected read reply type {other}"))),
            }
            if flags & REPLY_FLAG_DONE != 0 {
                return Ok(());
            }
        }
    }

    /// The dirty ranges `(offset, length)` of the bitmap asked for at connect, in
    /// `[offset, offset + length)`; the server may answer for less: call again from the end.
    /// Returns the ranges and how far the answer went.
    pub async fn dirty_ranges(
        &mut self,
        offset: u64,
        length: u32,
    ) -> Result<(Vec<(u64, u64)>, u64), NbdError> {
        let context = self
            .bitmap_context
            .ok_or_else(|| protocol("no dirty bitmap context was negotiated"))?;
        let handle = self.request(CMD_BLOCK_STATUS, offset, length).await?;
        let mut ranges = Vec::new();
        let mut end = offset;
        loop {
            let magic = self.reader.read_u32().await?;
            if magic == SIMPLE_REPLY_MAGIC {
                let error = self.reader.read_u32().await?;
                self.expect_handle(handle).await?;
                return Err(refused("block status", error, String::new()));
            }
            let (flags, kind, len) = self.structured_header(magic, handle).await?;
            match kind {
                REPLY_TYPE_BLOCK_STATUS => {
                    let id = self.reader.read_u32().await?;
                    let mut at = offset;
                    for _ in 0..(len - 4) / 8 {
                        let extent = self.reader.read_u32().await? as u64;
                        let status = self.reader.read_u32().await?;
                        if id == context && status & 1 != 0 {
                            ranges.push((at, extent));
                        }
                        at += extent;
                    }
                    if id == context {
                        end = at;
                    }
                }
                REPLY_TYPE_NONE => {}
                k if k & REPLY_TYPE_ERROR_BIT != 0 => {
                    return Err(self.error_reply(len, "block status").await?);
                }
                other => {
                    return Err(protocol(format!(
                        "unexpected block status reply type {other}"
                    )));
                }
            }
            if flags & REPLY_FLAG_DONE != 0 {
                return Ok((ranges, end));
            }
        }
    }

    /// Every dirty range of the whole export.
    pub async fn all_dirty_ranges(&mut self) -> Result<Vec<(u64, u64)>, NbdError> {
        let mut out = Vec::new();
        let mut at = 0;
        while at < self.size {
            let len = (self.size - at).min(1 << 30) as u32;
            let (ranges, end) = self.dirty_ranges(at, len).await?;
            out.extend(ranges);
            if end <= at {
                return Err(protocol("block status made no progress"));
            }
            at = end;
        }
        Ok(out)
    }

    async fn expect_handle(&mut self, handle: u64) -> Result<(), NbdError> {
        if self.reader.read_u64().await? != handle {
            return Err(protocol("reply to another request"));
        }
        Ok(())
    }

    async fn structured_header(
        &mut self,
        magic: u32,
        handle: u64,
    ) -> Result<(u16, u16, u32), NbdError> {
        if magic != STRUCTURED_REPLY_MAGIC {
            return Err(protocol(format!("bad reply magic {magic:#x}")));
        }
        let flags = self.reader.read_u16().await?;
        let kind = self.reader.read_u16().await?;
        self.expect_handle(handle).await?;
        let len = self.reader.read_u32().await?;
        if len > MAX_PAYLOAD {
            return Err(protocol("reply too long"));
        }
        Ok((flags, kind, len))
    }

    async fn error_reply(&mut self, len: u32, what: &'static str) -> Result<NbdError, NbdError> {
        let mut payload = vec![0; len as usize];
        self.reader.read_exact(&mut payload).await?;
        let code = payload
            .get(..4)
            .map_or(0, |b| u32::from_be_bytes(b.try_into().unwrap()));
        let mlen = payload
            .get(4..6)
            .map_or(0, |b| u16::from_be_bytes(b.try_into().unwrap())) as usize;
        let message = payload
            .get(6..6 + mlen)
            .map(|m| String::from_utf8_lossy(m).into_owned())
            .unwrap_or_default();
        Ok(refused(what, code, message))
    }

    /// Ends the session politely (the server frees its state at once).
    pub async fn disconnect(mut self) {
        let _ = self.request(CMD_DISC, 0, 0).await;
    }
}

fn refused(what: &'static str, code: u32, message: String) -> NbdError {
    NbdError::Refused {
        what,
        code,
        message,
    }
}

/// Where a reply for `[at, at + len)` goes in the buffer of a read at `offset`.
fn slice_start(at: u64, offset: u64, len: u64, buf_len: usize) -> Result<usize, NbdError> {
    let start = at
        .checked_sub(offset)
        .filter(|s| s + len <= buf_len as u64)
        .ok_or_else(|| protocol("a read reply outside the request"))?;
    Ok(start as usize)
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u32).to_be_bytes());
    out.extend_from_slice(s.as_bytes());
}
