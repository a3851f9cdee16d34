//! Headless Chromium driven over WebDriver (Debian's `chromium` and `chromium-driver`, installed by
//! `scripts/setup.sh`): a `chromedriver` process per browser, ended on drop.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use fantoccini::elements::Element;
use fantoccini::{Client, ClientBuilder, Locator};
use hyper_util::client::legacy::connect::HttpConnector;
use serde_json::{Value, json};

use crate::free_port;
use crate::{eventually, pids_naming};

/// How long a page may take to show what a test waits for (bounds the wait only).
pub const PAGE: Duration = Duration::from_secs(30);

pub struct Browser {
    pub client: Client,
    driver: Child,
    /// Chromium's profile: names its processes, to end them with the driver.
    profile: tempfile::TempDir,
}

impl Browser {
    /// A 1280x900 headless Chromium.
    pub async fn start() -> Browser {
        let port = free_port();
        let driver = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver (scripts/setup.sh installs chromium-driver)");
        let profile = tempfile::Builder::new()
            .prefix("hs-chromium-")
            .tempdir_in("/tmp")
            .unwrap();
        let caps = json!({
            "goog:chromeOptions": {
                "binary": "/usr/bin/chromium",
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                         "--disable-dev-shm-usage", "--window-size=1280,900",
                         format!("--user-data-dir={}", profile.path().display())],
            }
        });
        let Value::Object(caps) = caps else {
            unreachable!()
        };
        let url = format!("http://127.0.0.1:{port}");
        let client = eventually(PAGE, "chromedriver and a browser session", async || {
            ClientBuilder::new(HttpConnector::new())
                .capabilities(caps.clone())
                .connect(&url)
                .await
        })
        .await;
        Browser {
            client,
            driver,
            profile,
        }
    }

    /// The text of the first element matching `css`, or None.
    pub async fn text(&self, css: &str) -> Option<String> {
        let e = self.client.find(Locator::Css(css)).await.ok()?;
        e.text().await.ok()
    }

    /// Waits until the element `css` shows `want`, for at most `bound`.
    pub async fn wait_text(&self, css: &str, want: &str, bound: Duration) {
        eventually(
            bound,
            &format!("{css} showing {want:?}"),
            async || match self.text(css).await {
                Some(t) if t == want => Ok(()),
                other => Err(format!("{other:?}")),
            },
        )
        .await
    }

    /// The element `css`, once it is there.
    pub async fn find(&self, css: &str) -> Element {
        eventually(PAGE, css, async || {
            self.client.find(Locator::Css(css)).await
        })
        .await
    }

    /// Clicks the element `css` once it is there.
    pub async fn click(&self, css: &str) {
        self.find(css).await.click().await.unwrap();
    }

    /// Runs `script` in the page; returns its value.
    pub async fn js(&self, script: &str) -> Value {
        self.client.execute(script, vec![]).await.unwrap()
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.driver.kill();
        let _ = self.driver.wait();
        for pid in pids_naming(&self.profile.path().to_string_lossy()) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}
