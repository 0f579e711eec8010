//! A real headless Chromium for the playground's test, driven over W3C WebDriver (Debian's
//! ChromeDriver, spoken to with plain HTTP: a session, navigation, elements, scripts and
//! screenshots are all the test needs).

use base64::Engine;
use kiln_local::moto::{CHROMEDRIVER, CHROMIUM};
use serde_json::{Value, json};
use std::{
    os::unix::process::CommandExt,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

/// WebDriver's key for an element reference.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

/// ChromeDriver and one browser session; both end when it drops.
pub struct Browser {
    session: String,
    base: String,
    http: reqwest::Client,
    // Dropped after the session is ended (fields drop in order): then the processes, then
    // the profile folder.
    _driver: Driver,
    _profile: TempDir,
}

/// ChromeDriver in a process group of its own, with the Chromium it starts: killed together
/// when this drops, whatever happened to the session.
struct Driver(Child);

impl Drop for Driver {
    fn drop(&mut self) {
        let group = self.0.id() as i32;
        // SAFETY: kill(2) with a negative pid signals the group this process leads; no memory
        // is shared with it.
        unsafe {
            libc::kill(-group, libc::SIGKILL);
        }
        let _ = self.0.wait();
    }
}

/// A fresh user-data folder per browser (Chromium refuses one another instance holds).
struct TempDir(std::path::PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl Browser {
    /// Starts ChromeDriver on a free port and a headless Chromium session (installing both
    /// with apt-get on first use).
    pub async fn start() -> anyhow::Result<Self> {
        kiln_local::ensure_browser()?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let driver = Driver(
            Command::new(CHROMEDRIVER)
                .arg(format!("--port={port}"))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .process_group(0)
                .spawn()?,
        );
        let base = format!("http://127.0.0.1:{port}");
        let http = reqwest::Client::new();
        let started = Instant::now();
        while http.get(format!("{base}/status")).send().await.is_err() {
            anyhow::ensure!(started.elapsed() < Duration::from_secs(20), "ChromeDriver did not start");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let profile = TempDir(std::env::temp_dir().join(format!("kiln-chromium-{}-{port}", std::process::id())));
        // As root in a container: no sandbox; no GPU; no background connections (the machine's
        // network is closed and Chromium would keep trying).
        let args = [
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--window-size=1280,1000",
            &format!("--user-data-dir={}", profile.0.display()),
        ];
        let capabilities = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {"binary": CHROMIUM, "args": args},
        }}});
        let answer: Value = http.post(format!("{base}/session")).json(&capabilities).send().await?.json().await?;
        let session = answer["value"]["sessionId"]
            .as_str()
            .ok_or_else(|| anyhow::anyhow!("no WebDriver session: {answer}"))?
            .to_owned();
        Ok(Self { session, base, http, _driver: driver, _profile: profile })
    }

    async fn call(&self, method: reqwest::Method, path: &str, body: Value) -> anyhow::Result<Value> {
        let url = format!("{}/session/{}{path}", self.base, self.session);
        let mut request = self.http.request(method.clone(), url);
        if method != reqwest::Method::GET {
            request = request.json(&body);
        }
        let answer: Value = request.send().await?.json().await?;
        if let Some(error) = answer["value"]["error"].as_str() {
            anyhow::bail!("WebDriver {path}: {error}: {}", answer["value"]["message"]);
        }
        Ok(answer["value"].clone())
    }

    pub async fn open(&self, url: &str) -> anyhow::Result<()> {
        self.call(reqwest::Method::POST, "/url", json!({"url": url})).await.map(drop)
    }

    async fn element(&self, css: &str) -> anyhow::Result<String> {
        let found =
            self.call(reqwest::Method::POST, "/element", json!({"using": "css selector", "value": css})).await?;
        Ok(found[ELEMENT].as_str().ok_or_else(|| anyhow::anyhow!("no element {css}: {found}"))?.to_owned())
    }

    /// Replaces the text of the input `css` with `text`, as typed keys.
    pub async fn type_into(&self, css: &str, text: &str) -> anyhow::Result<()> {
        let element = self.element(css).await?;
        self.call(reqwest::Method::POST, &format!("/element/{element}/clear"), json!({})).await?;
        self.call(reqwest::Method::POST, &format!("/element/{element}/value"), json!({"text": text})).await.map(drop)
    }

    pub async fn click(&self, css: &str) -> anyhow::Result<()> {
        let element = self.element(css).await?;
        self.call(reqwest::Method::POST, &format!("/element/{element}/click"), json!({})).await.map(drop)
    }

    /// Runs `script` (a function body; `return` answers) in the page.
    pub async fn eval(&self, script: &str) -> anyhow::Result<Value> {
        self.call(reqwest::Method::POST, "/execute/sync", json!({"script": script, "args": []})).await
    }

    /// Evaluates `script` until it answers something other than `null` or `false`.
    pub async fn wait_for(&self, script: &str, limit: Duration) -> anyhow::Result<Value> {
        let started = Instant::now();
        loop {
            let value = self.eval(script).await?;
            if !(value.is_null() || value == Value::Bool(false)) {
                return Ok(value);
            }
            if started.elapsed() > limit {
                let page = self.eval("return document.body.innerText").await.unwrap_or_default();
                anyhow::bail!("waited {limit:?} for `{script}`; the page says:\n{}", page.as_str().unwrap_or(""));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// The window as a PNG.
    pub async fn screenshot(&self) -> anyhow::Result<Vec<u8>> {
        let encoded = self.call(reqwest::Method::GET, "/screenshot", Value::Null).await?;
        Ok(base64::engine::general_purpose::STANDARD.decode(encoded.as_str().unwrap_or_default())?)
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // Ending the session closes Chromium (a raw DELETE: no runtime here); the driver's
        // process group is killed after, in any case.
        if let Ok(mut stream) = std::net::TcpStream::connect(self.base.trim_start_matches("http://")) {
            use std::io::{Read, Write};
            let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
            let request = format!(
                "DELETE /session/{} HTTP/1.1\r\nHost: {}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                self.session,
                self.base.trim_start_matches("http://")
            );
            if stream.write_all(request.as_bytes()).is_ok() {
                let _ = stream.read_to_end(&mut Vec::new());
            }
        }
    }
}
