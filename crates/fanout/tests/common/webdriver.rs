//! A small WebDriver client for the browser tests: Debian's `chromedriver` started on port 0 (it prints the port
//! it took), driving headless `chromium` over the W3C WebDriver protocol, which is plain HTTP and JSON.
//!
//! # Why not a crate
//! The protocol calls the tests need are a dozen (new session, navigate, find, click, type, read text, run a
//! script, screenshot, end session). `reqwest` (already a dev-dependency, with `json`) and `serde_json` carry
//! them in about two hundred lines. `fantoccini` or `thirtyfour` would add their own HTTP stacks (hyper-rustls,
//! cookie and TLS crates) and a longer build for no test we need.
//!
//! # Processes
//! chromedriver runs in a process group of its own, chromium and its helpers inside it; dropping the
//! [`ChromeDriver`] kills the whole group, so a failing test leaves no browser behind. Each session gets a fresh
//! profile directory (`--user-data-dir`), removed on drop.
//!
//! # Missing browser
//! [`ChromeDriver::start`] panics with the install line when `chromium` or `chromedriver` is not found: the
//! browser tests fail loudly rather than skip (`make test` and `.ci/run` install both when root).
#![allow(dead_code, missing_docs)]
// Start-up and tear-down are synchronous (a process and its output); a short thread sleep is right there.
#![allow(clippy::disallowed_methods)]

use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use base64::Engine;
use serde_json::{Value, json};

/// The W3C key of an element reference in WebDriver answers.
const ELEMENT_KEY: &str = "element-6066-11e4-a52e-4f735466cecf";

/// How long chromedriver may take to say it listens, and chromium to open a session (a shared 2-core machine).
const START: Duration = Duration::from_secs(60);

/// How often the `wait_*` helpers look again.
const POLL: Duration = Duration::from_millis(100);

/// `name` on the PATH (or one of `also`), or `env`'s value when set.
fn find_program(env: &str, names: &[&str]) -> Option<PathBuf> {
    if let Some(p) = std::env::var_os(env) {
        return Some(PathBuf::from(p));
    }
    let dirs = std::env::var_os("PATH").map(|p| std::env::split_paths(&p).collect::<Vec<_>>()).unwrap_or_default();
    names.iter().flat_map(|n| dirs.iter().map(move |d| d.join(n))).find(|p| p.is_file())
}

/// The chromium binary (`CHROMIUM_BIN`, or `chromium` on the PATH) and chromedriver (`CHROMEDRIVER_BIN`, or
/// `chromedriver`); panics with the install line when either is missing.
pub fn browser_programs() -> (PathBuf, PathBuf) {
    let chromium = find_program("CHROMIUM_BIN", &["chromium", "chromium-browser"]);
    let driver = find_program("CHROMEDRIVER_BIN", &["chromedriver"]);
    match (chromium, driver) {
        (Some(c), Some(d)) => (c, d),
        (c, d) => panic!(
            "the browser test needs Debian's chromium and chromedriver (found chromium: {}, chromedriver: {}): \
             apt-get install -y chromium chromium-driver (or set CHROMIUM_BIN and CHROMEDRIVER_BIN)",
            c.map_or_else(|| "no".to_owned(), |p| p.display().to_string()),
            d.map_or_else(|| "no".to_owned(), |p| p.display().to_string()),
        ),
    }
}

/// A running chromedriver on `127.0.0.1`, killed with its browsers on drop.
pub struct ChromeDriver {
    child: Child,
    /// `http://127.0.0.1:PORT`.
    pub url: String,
    chromium: PathBuf,
    profiles: Vec<PathBuf>,
}

impl ChromeDriver {
    /// Starts chromedriver on a port of its choosing (port 0) and waits for the line that names it.
    pub fn start() -> Self {
        let (chromium, driver) = browser_programs();
        let mut child = Command::new(&driver)
            .args(["--port=0", "--allowed-ips=127.0.0.1"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", driver.display()));
        let stdout = child.stdout.take().expect("piped");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut seen = Vec::new();
        let port = loop {
            match rx.recv_timeout(START) {
                Ok(line) => {
                    // "ChromeDriver was started successfully on port 40123."
                    if let Some(rest) = line.split("started successfully on port ").nth(1) {
                        break rest.trim_end_matches('.').trim().parse::<u16>().expect("chromedriver's port");
                    }
                    seen.push(line);
                }
                Err(_) => {
                    let _ = child.kill();
                    panic!("chromedriver did not say it started within {START:?}; it said:\n{}", seen.join("\n"))
                }
            }
        };
        ChromeDriver { child, url: format!("http://127.0.0.1:{port}"), chromium, profiles: Vec::new() }
    }

    /// A new headless chromium session with a fresh profile and a `width` x `height` window.
    pub async fn session(&mut self, width: u32, height: u32) -> Session {
        let profile = super::temp_dir("chromium-profile");
        std::fs::create_dir_all(&profile).expect("profile dir");
        self.profiles.push(profile.clone());
        let args = [
            "--headless=new".to_owned(),
            // Chromium's sandbox needs user namespaces that a root session in a container does not get.
            "--no-sandbox".to_owned(),
            "--disable-gpu".to_owned(),
            "--disable-dev-shm-usage".to_owned(),
            "--no-first-run".to_owned(),
            "--no-default-browser-check".to_owned(),
            "--disable-extensions".to_owned(),
            "--disable-background-networking".to_owned(),
            "--password-store=basic".to_owned(),
            "--force-device-scale-factor=1".to_owned(),
            format!("--window-size={width},{height}"),
            format!("--user-data-dir={}", profile.display()),
        ];
        let caps = json!({
            "capabilities": {
                "alwaysMatch": {
                    "browserName": "chrome",
                    "goog:chromeOptions": { "binary": self.chromium.display().to_string(), "args": args },
                }
            }
        });
        let http = reqwest::Client::builder().timeout(START).build().expect("client");
        let answer = call(&http, reqwest::Method::POST, &format!("{}/session", self.url), Some(caps))
            .await
            .unwrap_or_else(|e| panic!("chromium did not start a WebDriver session: {e}"));
        let id = answer["sessionId"].as_str().expect("sessionId").to_owned();
        Session { http, base: format!("{}/session/{id}", self.url) }
    }
}

impl Drop for ChromeDriver {
    fn drop(&mut self) {
        // The group holds chromedriver, chromium and chromium's helpers.
        if let Some(pid) = rustix::process::Pid::from_raw(self.child.id() as i32) {
            let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::KILL);
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        for p in &self.profiles {
            let _ = std::fs::remove_dir_all(p);
        }
    }
}

/// A WebDriver error answer: its `error` code (`no such element`, `stale element reference`, ...) and message.
#[derive(Debug)]
pub struct WdError {
    pub code: String,
    pub message: String,
}

impl std::fmt::Display for WdError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.code, self.message.lines().next().unwrap_or_default())
    }
}

/// One WebDriver command; the answer's `value`.
async fn call(
    http: &reqwest::Client,
    method: reqwest::Method,
    url: &str,
    body: Option<Value>,
) -> Result<Value, WdError> {
    let request = http.request(method, url);
    // Every POST carries a JSON body, `{}` when it has nothing to say (the protocol wants one).
    let request = match body {
        Some(b) => request.json(&b),
        None => request,
    };
    let response = request.send().await.map_err(|e| WdError { code: "transport".into(), message: e.to_string() })?;
    let status = response.status();
    let value: Value = response.json().await.map_err(|e| WdError { code: "json".into(), message: e.to_string() })?;
    let value = value.get("value").cloned().unwrap_or(Value::Null);
    if status.is_success() {
        Ok(value)
    } else {
        Err(WdError {
            code: value["error"].as_str().unwrap_or("unknown error").to_owned(),
            message: value["message"].as_str().unwrap_or_default().to_owned(),
        })
    }
}

/// An element found on the page.
#[derive(Debug, Clone)]
pub struct Element(String);

/// One browser session.
pub struct Session {
    http: reqwest::Client,
    base: String,
}

impl Session {
    async fn post(&self, path: &str, body: Value) -> Result<Value, WdError> {
        call(&self.http, reqwest::Method::POST, &format!("{}{path}", self.base), Some(body)).await
    }

    async fn get(&self, path: &str) -> Result<Value, WdError> {
        call(&self.http, reqwest::Method::GET, &format!("{}{path}", self.base), None).await
    }

    /// Opens `url` and waits for its load (WebDriver's default page-load strategy).
    pub async fn goto(&self, url: &str) {
        self.post("/url", json!({ "url": url })).await.unwrap_or_else(|e| panic!("navigate to {url}: {e}"));
    }

    /// The first element matching the CSS selector `css`.
    pub async fn find(&self, css: &str) -> Result<Element, WdError> {
        let v = self.post("/element", json!({ "using": "css selector", "value": css })).await?;
        Ok(Element(v[ELEMENT_KEY].as_str().unwrap_or_else(|| panic!("element reference: {v}")).to_owned()))
    }

    /// Clicks `element` as a user would (scrolled into view, at its centre).
    pub async fn click(&self, element: &Element) -> Result<(), WdError> {
        self.post(&format!("/element/{}/click", element.0), json!({})).await.map(drop)
    }

    /// Types `text` into `element`.
    pub async fn type_into(&self, element: &Element, text: &str) -> Result<(), WdError> {
        self.post(&format!("/element/{}/value", element.0), json!({ "text": text })).await.map(drop)
    }

    /// Empties an input.
    pub async fn clear(&self, element: &Element) -> Result<(), WdError> {
        self.post(&format!("/element/{}/clear", element.0), json!({})).await.map(drop)
    }

    /// The rendered text of `element`.
    pub async fn text(&self, element: &Element) -> Result<String, WdError> {
        Ok(self.get(&format!("/element/{}/text", element.0)).await?.as_str().unwrap_or_default().to_owned())
    }

    /// Runs `script` (a function body; `arguments` holds `args`) in the page and returns what it returns.
    pub async fn script(&self, script: &str, args: Value) -> Value {
        self.post("/execute/sync", json!({ "script": script, "args": args }))
            .await
            .unwrap_or_else(|e| panic!("script failed: {e}"))
    }

    /// A PNG screenshot of the window.
    pub async fn screenshot(&self) -> Vec<u8> {
        let v = self.get("/screenshot").await.unwrap_or_else(|e| panic!("screenshot: {e}"));
        base64::engine::general_purpose::STANDARD.decode(v.as_str().expect("base64 text")).expect("base64 PNG")
    }

    /// Ends the session (chromium closes).
    pub async fn quit(self) {
        let _ = call(&self.http, reqwest::Method::DELETE, &self.base, None).await;
    }

    /// The text of the first element matching `css`, or `None` while there is none.
    pub async fn text_of(&self, css: &str) -> Option<String> {
        let e = self.find(css).await.ok()?;
        self.text(&e).await.ok()
    }

    /// Waits up to `within` until `check` holds for the text of the first element matching `css`; returns that
    /// text. Panics with `what` and the last text seen.
    pub async fn wait_text(&self, css: &str, within: Duration, what: &str, check: impl Fn(&str) -> bool) -> String {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let text = self.text_of(css).await;
            if let Some(t) = &text
                && check(t)
            {
                return t.clone();
            }
            assert!(tokio::time::Instant::now() < deadline, "not within {within:?}: {what} ({css} shows {text:?})");
            tokio::time::sleep(POLL).await;
        }
    }

    /// Waits up to `within` until the script `js` (given `args`) returns `true`; panics with `what` and the
    /// page's text.
    pub async fn wait_script(&self, js: &str, args: Value, within: Duration, what: &str) {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if self.script(js, args.clone()).await == Value::Bool(true) {
                return;
            }
            if tokio::time::Instant::now() >= deadline {
                let page = self.script("return document.body.innerText;", json!([])).await;
                panic!("not within {within:?}: {what}; the page shows:\n{}", page.as_str().unwrap_or_default());
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Clicks the first element matching `css`, finding it again while it is missing or was just redrawn
    /// (stale), for up to `within`.
    pub async fn click_css(&self, css: &str, within: Duration) {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let result = match self.find(css).await {
                Ok(e) => self.click(&e).await,
                Err(e) => Err(e),
            };
            match result {
                Ok(()) => return,
                Err(_) if tokio::time::Instant::now() < deadline => tokio::time::sleep(POLL).await,
                Err(e) => panic!("cannot click {css} within {within:?}: {e}"),
            }
        }
    }

    /// Types `text` into the first element matching `css`, emptied first.
    pub async fn fill(&self, css: &str, text: &str) {
        let e = self.find(css).await.unwrap_or_else(|e| panic!("{css}: {e}"));
        self.clear(&e).await.unwrap_or_else(|e| panic!("clear {css}: {e}"));
        self.type_into(&e, text).await.unwrap_or_else(|e| panic!("type into {css}: {e}"));
    }
}
