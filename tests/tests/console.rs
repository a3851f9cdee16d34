//! `hyperctl vm console` driven through a pseudo-terminal as a person would: it shows the
//! guest's console, runs a command typed into it, refuses a second client while attached,
//! detaches on Ctrl-], and the serial log goes on being written all along.

use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hypersdk_tests::{Agent, bin, create, eventually, serial, wait_boots};

const BOOT: Duration = Duration::from_secs(120);
const SCREEN: Duration = Duration::from_secs(60);

/// `hyperctl vm console NAME` on a pty: what it printed so far, and the keyboard.
struct Terminal {
    child: std::process::Child,
    keyboard: std::fs::File,
    screen: Arc<Mutex<String>>,
}

impl Terminal {
    fn attach(agent: &Agent, name: &str) -> Terminal {
        let pty = nix::pty::openpty(None, None).unwrap();
        let tty = |fd: &OwnedFd| Stdio::from(fd.try_clone().unwrap());
        let child = Command::new(bin("hyperctl"))
            .arg("--agent")
            .arg(agent.address.to_string())
            .args(["vm", "console", name])
            .stdin(tty(&pty.slave))
            .stdout(tty(&pty.slave))
            .stderr(tty(&pty.slave))
            .spawn()
            .unwrap();
        drop(pty.slave);
        let keyboard = std::fs::File::from(pty.master.try_clone().unwrap());
        let mut display = std::fs::File::from(pty.master);
        let screen = Arc::new(Mutex::new(String::new()));
        let shown = screen.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = display.read(&mut buf) {
                if n == 0 {
                    break;
                }
                shown
                    .lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        Terminal {
            child,
            keyboard,
            screen,
        }
    }

    fn type_keys(&mut self, keys: &[u8]) {
        self.keyboard.write_all(keys).unwrap();
    }

    fn screen(&self) -> String {
        self.screen.lock().unwrap().clone()
    }

    /// Waits until the screen shows `text` (after what it showed at `from` bytes).
    async fn wait_for(&self, text: &str, from: usize) {
        eventually(SCREEN, &format!("{text:?} on the console"), async || {
            let s = self.screen();
            if s.get(from..).is_some_and(|rest| rest.contains(text)) {
                Ok(())
            } else {
                Err(format!("screen:\n{s}"))
            }
        })
        .await
    }
}

#[tokio::test]
async fn console_runs_a_typed_command_and_detaches_on_ctrl_bracket() {
    let agent = Agent::start("console-1").await;
    let mut client = agent.client().await;
    let vm = create(&mut client, agent.small_spec("c1"), true).await;
    wait_boots(&vm, 1, BOOT).await;

    let mut term = Terminal::attach(&agent, "c1");
    term.wait_for("attached to the console of c1", 0).await;
    // The guest's own output reaches the terminal (its counter, once a second).
    term.wait_for("HYPERSDK-COUNTER", 0).await;
    let from = term.screen().len();
    // Enter gives the shell's prompt; then a command whose answer differs from its echo.
    term.type_keys(b"\r");
    term.wait_for("guest# ", from).await;
    term.type_keys(b"echo console-$((6*7))-ok\r");
    term.wait_for("console-42-ok", from).await;

    // A second client is refused while the first is attached.
    let second = Command::new(bin("hyperctl"))
        .arg("--agent")
        .arg(agent.address.to_string())
        .args(["vm", "console", "c1"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&second.stderr);
    assert_eq!(second.status.code(), Some(1), "{err}");
    assert!(err.contains("already has a client"), "{err}");

    // Ctrl-] detaches: hyperctl ends by itself and says so.
    term.type_keys(&[0x1d]);
    let status = eventually(SCREEN, "hyperctl to end after Ctrl-]", async || {
        term.child.try_wait().ok().flatten()
    })
    .await;
    assert!(status.success(), "{status:?}: {}", term.screen());
    assert!(term.screen().contains("detached"), "{}", term.screen());

    // The serial log has all of it, and goes on while nobody is attached.
    let log = serial(&vm);
    assert!(log.contains("console-42-ok"), "serial:\n{log}");
    let size = log.len();
    eventually(
        SCREEN,
        "the serial log to grow after the detach",
        async || serial(&vm).len() > size,
    )
    .await;

    // The console is free again for the next client (once the agent has seen the first go).
    let mut again = eventually(SCREEN, "the console to take a client again", async || {
        let mut t = Terminal::attach(&agent, "c1");
        loop {
            if t.screen().contains("attached to the console of c1") {
                return Ok(t);
            }
            if let Ok(Some(_)) = t.child.try_wait() {
                return Err(t.screen());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    let from = again.screen().len();
    again.type_keys(b"echo again-$((2+3))\r");
    again.wait_for("again-5", from).await;
    again.type_keys(&[0x1d]);
    eventually(SCREEN, "the second session to end", async || {
        again.child.try_wait().ok().flatten().is_some()
    })
    .await;
}
