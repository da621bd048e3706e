//! Just enough of a W3C WebDriver client to drive Debian's headless Chromium through
//! `chromedriver`, over plain HTTP with reqwest. No browser is downloaded: the test uses the
//! machine's `chromium` and `chromium-driver` packages and fails, saying so, without them.
#![allow(dead_code, unreachable_pub)]

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

/// Where Chromium and chromedriver are; panics with what to install if either is missing.
pub struct BrowserBinaries {
    pub chromium: PathBuf,
    pub chromedriver: PathBuf,
}

fn find_program(env: &str, names: &[&str]) -> Option<PathBuf> {
    if let Some(path) = std::env::var_os(env) {
        return Some(PathBuf::from(path)).filter(|p| p.is_file());
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/bin"), PathBuf::from("/usr/lib/chromium")])
        .flat_map(|dir| names.iter().map(move |name| dir.join(name)))
        .find(|candidate| candidate.is_file())
}

pub fn require_browser() -> BrowserBinaries {
    let chromium = find_program("SITECAST_CHROMIUM", &["chromium", "chromium-browser"]);
    let chromedriver = find_program("SITECAST_CHROMEDRIVER", &["chromedriver"]);
    match (chromium, chromedriver) {
        (Some(chromium), Some(chromedriver)) => BrowserBinaries { chromium, chromedriver },
        (chromium, chromedriver) => panic!(
            "the Fleet Updates browser test needs Chromium and its WebDriver, and {} missing.\n\
             Install them: `apt-get install chromium chromium-driver` (scripts/test does this as \
             root; they are listed in .ci/packages), or point SITECAST_CHROMIUM and \
             SITECAST_CHROMEDRIVER at them.",
            match (chromium.is_none(), chromedriver.is_none()) {
                (true, true) => "both are",
                (true, false) => "chromium is",
                _ => "chromedriver is",
            }
        ),
    }
}

/// A WebDriver error answer.
#[derive(Debug)]
pub struct WebDriverError {
    pub error: String,
    pub message: String,
}

/// A headless Chromium session. Dropping it (also when a test panics) ends the session, which
/// closes the browser, and stops chromedriver.
pub struct Browser {
    http: reqwest::Client,
    base: String,
    session: String,
    driver: Child,
    _profile: tempfile::TempDir,
}

#[derive(Debug, Clone)]
pub struct Element(String);

fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    listener.local_addr().expect("address").port()
}

impl Browser {
    pub async fn start(binaries: &BrowserBinaries) -> Self {
        let port = free_port();
        let driver = Command::new(&binaries.chromedriver)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", binaries.chromedriver.display()));
        let profile = tempfile::tempdir().expect("profile directory");
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(60))
            .build()
            .expect("http client");
        let base = format!("http://127.0.0.1:{port}");
        let mut browser = Self { http, base, session: String::new(), driver, _profile: profile };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ready = browser.http.get(format!("{}/status", browser.base)).send().await;
            if let Ok(response) = ready
                && let Ok(status) = response.json::<Value>().await
                && status["value"]["ready"] == true
            {
                break;
            }
            if let Ok(Some(exit)) = browser.driver.try_wait() {
                panic!("chromedriver exited at start: {exit}");
            }
            assert!(Instant::now() < deadline, "chromedriver did not become ready in 30 s");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let profile_dir = browser._profile.path().display().to_string();
        let capabilities = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            // Prompts stay open until the test answers them (the rollback confirmation).
            "unhandledPromptBehavior": "ignore",
            "goog:loggingPrefs": {"browser": "ALL"},
            "goog:chromeOptions": {
                "binary": binaries.chromium,
                // No internet here: these keep Chromium from waiting on update and sync
                // services, and make it run as root in a container.
                "args": [
                    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                    "--disable-background-networking", "--disable-component-update",
                    "--disable-sync", "--no-first-run", "--no-default-browser-check",
                    "--disable-extensions", "--hide-scrollbars", "--lang=en-GB",
                    format!("--user-data-dir={profile_dir}"),
                ],
            },
        }}});
        let created = browser
            .try_command(reqwest::Method::POST, "/session", capabilities)
            .await
            .unwrap_or_else(|e| panic!("starting Chromium through chromedriver failed: {e:?}"));
        browser.session = created["sessionId"].as_str().expect("a WebDriver session id").to_owned();
        browser
    }

    async fn try_command(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Value,
    ) -> Result<Value, WebDriverError> {
        let mut request = self.http.request(method.clone(), format!("{}{path}", self.base));
        if method != reqwest::Method::GET && method != reqwest::Method::DELETE {
            request = request.json(&body);
        }
        let response = request.send().await.map_err(|e| WebDriverError {
            error: "transport".into(),
            message: format!("{method} {path}: {e}"),
        })?;
        let value: Value = response.json().await.map_err(|e| WebDriverError {
            error: "transport".into(),
            message: format!("{method} {path}: unreadable answer: {e}"),
        })?;
        let value = value["value"].clone();
        match value["error"].as_str() {
            Some(error) => Err(WebDriverError {
                error: error.to_owned(),
                message: value["message"].as_str().unwrap_or("").to_owned(),
            }),
            None => Ok(value),
        }
    }

    fn path(&self, rest: &str) -> String {
        format!("/session/{}{rest}", self.session)
    }

    async fn command(&self, method: reqwest::Method, rest: &str, body: Value) -> Value {
        let path = self.path(rest);
        match self.try_command(method.clone(), &path, body).await {
            Ok(value) => value,
            Err(error) => panic!("WebDriver {method} {rest} failed: {error:?}"),
        }
    }

    pub async fn goto(&self, url: &str) {
        self.command(reqwest::Method::POST, "/url", json!({"url": url})).await;
    }

    pub async fn find(&self, css: &str) -> Option<Element> {
        let body = json!({"using": "css selector", "value": css});
        let found = self.try_command(reqwest::Method::POST, &self.path("/element"), body).await;
        match found {
            Ok(value) => Some(Element(value[ELEMENT].as_str().expect("element id").to_owned())),
            Err(error) if error.error == "no such element" => None,
            Err(error) => panic!("finding {css}: {error:?}"),
        }
    }

    /// Waits for a visible element; on timeout panics with what the page shows instead.
    pub async fn wait_for(&self, css: &str) -> Element {
        let script = format!(
            "const e = document.querySelector({}); return !!e && e.getClientRects().length > 0;",
            serde_json::to_string(css).expect("json")
        );
        self.wait_until(&format!("{css} is shown"), &script).await;
        self.find(css).await.expect("element shown a moment ago")
    }

    /// Polls `script` (a function body) until it returns something truthy, for up to 15 s.
    pub async fn wait_until(&self, what: &str, script: &str) -> Value {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let value = self.execute(script, json!([])).await;
            let truthy = match &value {
                Value::Null => false,
                Value::Bool(b) => *b,
                Value::String(s) => !s.is_empty(),
                Value::Number(n) => n.as_f64() != Some(0.0),
                _ => true,
            };
            if truthy {
                return value;
            }
            if Instant::now() > deadline {
                let text = self.execute("return document.body.innerText", json!([])).await;
                let logs = self.console_logs().await;
                panic!(
                    "timed out waiting until {what}.\n--- the page shows ---\n{}\n--- console ---\n{logs:#?}",
                    text.as_str().unwrap_or("")
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub async fn execute(&self, script: &str, args: Value) -> Value {
        self.command(
            reqwest::Method::POST,
            "/execute/sync",
            json!({"script": script, "args": args}),
        )
        .await
    }

    /// Clicks like a user who first scrolled the element to the middle of the screen.
    /// chromedriver's own scrolling puts it at the very top, under a sticky header.
    pub async fn click(&self, element: &Element) {
        let scroll = "arguments[0].scrollIntoView({block: 'center', behavior: 'instant'})";
        self.execute(scroll, json!([{ELEMENT: element.0}])).await;
        self.command(reqwest::Method::POST, &format!("/element/{}/click", element.0), json!({}))
            .await;
    }

    pub async fn type_text(&self, element: &Element, text: &str) {
        let rest = format!("/element/{}/value", element.0);
        self.command(reqwest::Method::POST, &rest, json!({"text": text})).await;
    }

    pub async fn text(&self, element: &Element) -> String {
        let rest = format!("/element/{}/text", element.0);
        let value = self.command(reqwest::Method::GET, &rest, json!({})).await;
        value.as_str().unwrap_or("").to_owned()
    }

    /// The text of an open `alert`/`confirm`, if one is open.
    pub async fn alert_text(&self) -> Option<String> {
        match self.try_command(reqwest::Method::GET, &self.path("/alert/text"), json!({})).await {
            Ok(value) => value.as_str().map(str::to_owned),
            Err(error) if error.error == "no such alert" => None,
            Err(error) => panic!("reading the alert: {error:?}"),
        }
    }

    pub async fn dismiss_alert(&self) {
        self.command(reqwest::Method::POST, "/alert/dismiss", json!({})).await;
    }

    pub async fn accept_alert(&self) {
        self.command(reqwest::Method::POST, "/alert/accept", json!({})).await;
    }

    /// A cookie as the browser holds it, `HttpOnly` ones included.
    pub async fn cookie(&self, name: &str) -> Value {
        self.command(reqwest::Method::GET, &format!("/cookie/{name}"), json!({})).await
    }

    /// A Chrome DevTools Protocol command, through chromedriver.
    pub async fn cdp(&self, cmd: &str, params: Value) -> Value {
        self.command(
            reqwest::Method::POST,
            "/goog/cdp/execute",
            json!({"cmd": cmd, "params": params}),
        )
        .await
    }

    /// Makes the page's viewport exactly `width`×`height` CSS pixels; `mobile` also applies
    /// the page's `<meta name="viewport">` the way a phone does.
    pub async fn viewport(&self, width: u32, height: u32, scale: f64, mobile: bool) {
        let metrics = json!({
            "width": width, "height": height, "deviceScaleFactor": scale, "mobile": mobile,
        });
        self.cdp("Emulation.setDeviceMetricsOverride", metrics).await;
    }

    /// A PNG of the page from its top, beyond the viewport down to `max_height` CSS pixels, at
    /// the current viewport width. Scrolls to the top first (sticky headers are drawn where
    /// the scroll position puts them) and takes the focus away (no focus ring in pictures).
    pub async fn page_png(&self, max_height: f64) -> Vec<u8> {
        let size = self
            .execute(
                "window.scrollTo({top: 0, left: 0, behavior: 'instant'});
                 if (document.activeElement) document.activeElement.blur();
                 return [document.documentElement.clientWidth, document.documentElement.scrollHeight]",
                json!([]),
            )
            .await;
        let width = size[0].as_f64().expect("width");
        let height = size[1].as_f64().expect("height").min(max_height);
        let shot = self
            .cdp(
                "Page.captureScreenshot",
                json!({
                    "format": "png",
                    "captureBeyondViewport": true,
                    "clip": {"x": 0, "y": 0, "width": width, "height": height, "scale": 1},
                }),
            )
            .await;
        base64_decode(shot["data"].as_str().expect("screenshot data"))
    }

    /// Browser console entries since the last call (drained by chromedriver).
    pub async fn console_logs(&self) -> Vec<Value> {
        let body = json!({"type": "browser"});
        let logs = self.try_command(reqwest::Method::POST, &self.path("/se/log"), body).await;
        match logs {
            Ok(Value::Array(entries)) => entries,
            Ok(other) => panic!("unexpected browser log answer: {other}"),
            Err(error) => panic!("reading the browser console failed: {error:?}"),
        }
    }

    /// Ends the session and chromedriver.
    pub async fn quit(mut self) {
        let _ = self.try_command(reqwest::Method::DELETE, &self.path(""), json!({})).await;
        self.session.clear();
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if !self.session.is_empty() {
            // Async is not available here (we may be unwinding from a failed assertion), so
            // end the session with a blocking request; that makes chromedriver close Chromium.
            let address = self.base.trim_start_matches("http://").to_owned();
            let request = format!(
                "DELETE /session/{} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n",
                self.session
            );
            let _ = std::thread::spawn(move || -> std::io::Result<()> {
                let mut stream = std::net::TcpStream::connect(&address)?;
                stream.set_read_timeout(Some(Duration::from_secs(10)))?;
                stream.write_all(request.as_bytes())?;
                let mut answer = Vec::new();
                let _ = stream.read_to_end(&mut answer);
                Ok(())
            })
            .join();
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

/// Standard base64 (screenshots come as base64 and the crate has no base64 dependency).
pub fn base64_decode(text: &str) -> Vec<u8> {
    fn value(c: u8) -> u32 {
        match c {
            b'A'..=b'Z' => u32::from(c - b'A'),
            b'a'..=b'z' => u32::from(c - b'a') + 26,
            b'0'..=b'9' => u32::from(c - b'0') + 52,
            b'+' => 62,
            b'/' => 63,
            _ => panic!("not base64: {:?}", c as char),
        }
    }
    let clean: Vec<u8> = text.bytes().filter(|c| !c.is_ascii_whitespace() && *c != b'=').collect();
    let mut out = Vec::with_capacity(clean.len() * 3 / 4);
    for chunk in clean.chunks(4) {
        let mut acc = 0u32;
        for (i, &c) in chunk.iter().enumerate() {
            acc |= value(c) << (18 - 6 * i);
        }
        let bytes = acc.to_be_bytes();
        out.extend_from_slice(&bytes[1..chunk.len()]);
    }
    out
}

/// Writes `bytes` to `path` unless it already holds exactly them (keeps the file's time).
pub fn write_if_changed(path: &Path, bytes: &[u8]) {
    if std::fs::read(path).is_ok_and(|old| old == bytes) {
        return;
    }
    std::fs::write(path, bytes).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
}

#[test]
fn base64_decodes() {
    assert_eq!(base64_decode("aGVsbG8="), b"hello");
    assert_eq!(base64_decode("aGVsbG8h"), b"hello!");
    assert_eq!(base64_decode("aGk="), b"hi");
    assert_eq!(base64_decode(""), b"");
}
