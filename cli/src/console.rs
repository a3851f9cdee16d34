//! `hyperctl vm console NAME`: the VM's serial console on this terminal, until Ctrl-] (or the
//! end of standard input, or the VM's QEMU going away).

use std::io::{Read, Write};
use std::os::fd::AsFd;

use hypersdk_proto::agent::v1 as pb;
use nix::sys::termios::{self, SetArg, Termios};
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;

use crate::Client;

/// Ctrl-], as telnet and virsh use it: rarely typed into a guest.
const DETACH: u8 = 0x1d;

/// The terminal in raw mode (keys go to the guest as typed, Ctrl-C included) until dropped.
struct Raw(Option<Termios>);

impl Raw {
    fn enter() -> Raw {
        let stdin = std::io::stdin();
        let Ok(saved) = termios::tcgetattr(stdin.as_fd()) else {
            return Raw(None); // not a terminal: bytes pass as they are
        };
        let mut raw = saved.clone();
        termios::cfmakeraw(&mut raw);
        match termios::tcsetattr(stdin.as_fd(), SetArg::TCSANOW, &raw) {
            Ok(()) => Raw(Some(saved)),
            Err(_) => Raw(None),
        }
    }
}

impl Drop for Raw {
    fn drop(&mut self) {
        if let Some(saved) = &self.0 {
            let _ = termios::tcsetattr(std::io::stdin().as_fd(), SetArg::TCSANOW, saved);
        }
    }
}

/// What the keyboard reader saw: bytes for the guest, or the end (detach or end of input).
enum Keys {
    Bytes(Vec<u8>),
    End,
}

/// Standard input, read on its own thread (blocking reads), until Ctrl-] or its end.
fn keyboard() -> mpsc::Receiver<Keys> {
    let (tx, rx) = mpsc::channel(64);
    std::thread::spawn(move || {
        let mut buf = [0u8; 1024];
        let mut stdin = std::io::stdin();
        loop {
            let n = match stdin.read(&mut buf) {
                Ok(0) | Err(_) => 0,
                Ok(n) => n,
            };
            let chunk = &buf[..n];
            let (keys, end) = match chunk.iter().position(|b| *b == DETACH) {
                Some(i) => (&chunk[..i], true),
                None => (chunk, n == 0),
            };
            if !keys.is_empty() && tx.blocking_send(Keys::Bytes(keys.to_vec())).is_err() {
                return;
            }
            if end {
                let _ = tx.blocking_send(Keys::End);
                return;
            }
        }
    });
    rx
}

pub async fn run(client: &mut Client, name: String) -> anyhow::Result<()> {
    let (tx, rx) = mpsc::channel(64);
    tx.send(pb::ConsoleInput {
        name: name.clone(),
        data: Vec::new(),
    })
    .await?;
    let mut output = client.console(ReceiverStream::new(rx)).await?.into_inner();
    let raw = Raw::enter();
    eprint!("hyperctl: attached to the console of {name}; Ctrl-] detaches\r\n");
    let mut keys = keyboard();
    let mut stdout = std::io::stdout();
    let why = loop {
        tokio::select! {
            k = keys.recv() => match k {
                Some(Keys::Bytes(data)) => {
                    let msg = pb::ConsoleInput { name: String::new(), data };
                    if tx.send(msg).await.is_err() {
                        break "the agent closed the console";
                    }
                }
                Some(Keys::End) | None => break "detached",
            },
            out = output.next() => match out {
                Some(Ok(o)) => {
                    stdout.write_all(&o.data)?;
                    stdout.flush()?;
                }
                Some(Err(status)) => {
                    drop(raw);
                    return Err(status.into());
                }
                None => break "the console closed (the VM stopped?)",
            },
        }
    };
    drop(raw);
    eprintln!("\r\nhyperctl: {why}");
    Ok(())
}
