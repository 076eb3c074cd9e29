//! Opens a page in headless Chromium and reports what the browser saw: console errors, uncaught
//! exceptions and failed loads, each image's `naturalWidth`, the title and a screenshot.
//!
//! Chromium is Debian's `chromium` (`scripts/install-chromium.sh`, run by `scripts/test` as root;
//! `NNFLOW_CHROMIUM` names another binary). Without one, `check_page` says so and gives `None`, so
//! the test passes vacuously, unless `NNFLOW_REQUIRE_BROWSER=1` (as `.ci/run` sets it): then it
//! panics. The browser is driven over the Chrome DevTools Protocol on a plain `ws://` socket.

use std::io::{BufRead, BufReader};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::{json, Value};

/// The longest any one step (start, connect, a command, the page load) may take.
const TIMEOUT: Duration = Duration::from_secs(30);

pub struct PageCheck {
    /// Uncaught exceptions, `console.error` calls and error log entries (failed resource loads
    /// among them), one line each.
    pub console_errors: Vec<String>,
    /// Every `<img>` in document order: its `src` attribute and `naturalWidth` (0: did not load).
    pub images: Vec<(String, u32)>,
    /// A PNG of the viewport, `screenshot_size` pixels.
    pub screenshot_png: Vec<u8>,
    pub title: String,
}

/// Loads `html` (a file) in headless Chromium with a `screenshot_size` (width, height) viewport and
/// waits for its load event. `None` (after printing why, to stderr) when no Chromium is found and
/// `NNFLOW_REQUIRE_BROWSER` is not 1; panics when it is required and missing.
pub fn check_page(html: &Path, screenshot_size: (u32, u32)) -> Option<PageCheck> {
    let binary = find_chromium()?;
    let html = std::fs::canonicalize(html)
        .unwrap_or_else(|e| panic!("cannot open the page {}: {e}", html.display()));
    let browser = Browser::start(&binary);
    let mut cdp = Cdp::connect(&browser);
    Some(cdp.check(&html, screenshot_size))
}

/// `NNFLOW_CHROMIUM`, else the first of the usual names on `PATH`.
fn find_chromium() -> Option<PathBuf> {
    let required = std::env::var("NNFLOW_REQUIRE_BROWSER").as_deref() == Ok("1");
    if let Some(named) = std::env::var_os("NNFLOW_CHROMIUM").filter(|v| !v.is_empty()) {
        return Some(PathBuf::from(named));
    }
    let names = [
        "chromium",
        "chromium-browser",
        "google-chrome-stable",
        "google-chrome",
    ];
    let path = std::env::var_os("PATH").unwrap_or_default();
    let found = names.iter().find_map(|name| {
        std::env::split_paths(&path)
            .map(|dir| dir.join(name))
            .find(|candidate| is_executable(candidate))
    });
    if found.is_none() {
        assert!(
            !required,
            "NNFLOW_REQUIRE_BROWSER=1 but no Chromium found on PATH (install it with \
             scripts/install-chromium.sh, as root, or name it in NNFLOW_CHROMIUM)"
        );
        eprintln!(
            "skipped: no Chromium (install it with scripts/install-chromium.sh, as root, or name \
             it in NNFLOW_CHROMIUM)"
        );
    }
    found
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// A headless Chromium with a fresh profile, in its own process group; killed (the whole group,
/// renderers included) on drop.
struct Browser {
    child: Child,
    /// `ws://127.0.0.1:PORT/devtools/browser/ID`
    websocket_url: String,
    _profile: tempfile::TempDir,
}

impl Browser {
    fn start(binary: &Path) -> Browser {
        use std::os::unix::process::CommandExt;
        let profile = tempfile::tempdir().expect("temporary Chromium profile");
        let mut child = Command::new(binary)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--no-default-browser-check",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--disable-extensions",
                "--hide-scrollbars",
                "--mute-audio",
                "--remote-debugging-address=127.0.0.1",
                "--remote-debugging-port=0",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("about:blank")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", binary.display()));
        // Reads stderr to its end (so Chromium never blocks on a full pipe), handing over the
        // DevTools line, or everything it said if it ends without one.
        let stderr = child.stderr.take().unwrap();
        let (sender, receiver) = mpsc::channel::<Result<String, String>>();
        std::thread::spawn(move || {
            let mut said = Vec::new();
            let mut sender = Some(sender);
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(url) = line.strip_prefix("DevTools listening on ") {
                    if let Some(sender) = sender.take() {
                        let _ = sender.send(Ok(url.trim().to_string()));
                    }
                } else if sender.is_some() && said.len() < 50 {
                    said.push(line);
                }
            }
            if let Some(sender) = sender {
                let _ = sender.send(Err(said.join("\n")));
            }
        });
        let mut browser = Browser {
            child,
            websocket_url: String::new(),
            _profile: profile,
        };
        browser.websocket_url = match receiver.recv_timeout(TIMEOUT) {
            Ok(Ok(url)) => url,
            Ok(Err(said)) => {
                // Its stderr is closed: it is exiting (give it a moment to say how).
                let mut status = None;
                for _ in 0..20 {
                    status = browser.child.try_wait().ok().flatten();
                    if status.is_some() {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
                let status = status.map_or("still running".to_string(), |s| s.to_string());
                panic!(
                    "{} ended without a DevTools endpoint ({status}); it said:\n{said}",
                    binary.display()
                )
            }
            Err(_) => panic!(
                "{} printed no DevTools endpoint within {} s",
                binary.display(),
                TIMEOUT.as_secs()
            ),
        };
        browser
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // The group's id is the browser's pid (process_group(0)).
        unsafe {
            libc::kill(-(self.child.id() as libc::pid_t), libc::SIGKILL);
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One DevTools connection, attached (flat sessions) to one page target.
struct Cdp<'a> {
    _browser: &'a Browser,
    socket: tungstenite::WebSocket<TcpStream>,
    next_id: u64,
    session: Option<String>,
    /// The page session's events, in order of arrival.
    events: Vec<Value>,
}

impl<'a> Cdp<'a> {
    fn connect(browser: &'a Browser) -> Cdp<'a> {
        let url = &browser.websocket_url;
        let address = url
            .strip_prefix("ws://")
            .and_then(|rest| rest.split('/').next())
            .unwrap_or_else(|| panic!("unexpected DevTools endpoint {url:?}"));
        let stream = TcpStream::connect(address)
            .unwrap_or_else(|e| panic!("cannot connect to Chromium's DevTools at {address}: {e}"));
        stream.set_read_timeout(Some(TIMEOUT)).unwrap();
        stream.set_write_timeout(Some(TIMEOUT)).unwrap();
        stream.set_nodelay(true).unwrap();
        let (socket, _) = tungstenite::client(url.as_str(), stream)
            .unwrap_or_else(|e| panic!("DevTools websocket handshake with {url} failed: {e}"));
        Cdp {
            _browser: browser,
            socket,
            next_id: 0,
            session: None,
            events: Vec::new(),
        }
    }

    fn check(&mut self, html: &Path, (width, height): (u32, u32)) -> PageCheck {
        let target = self.call("Target.createTarget", json!({ "url": "about:blank" }));
        let target_id = target["targetId"].as_str().expect("a target id").to_string();
        let attached = self.call(
            "Target.attachToTarget",
            json!({ "targetId": target_id, "flatten": true }),
        );
        self.session = Some(attached["sessionId"].as_str().expect("a session id").to_string());
        for domain in ["Page", "Runtime", "Log"] {
            self.call(&format!("{domain}.enable"), json!({}));
        }
        self.call(
            "Emulation.setDeviceMetricsOverride",
            json!({ "width": width, "height": height, "deviceScaleFactor": 1, "mobile": false }),
        );
        let url = format!("file://{}", html.display());
        let navigated = self.call("Page.navigate", json!({ "url": url }));
        if let Some(error) = navigated["errorText"].as_str() {
            panic!("Chromium cannot open {url}: {error}");
        }
        self.wait_for_load(&url);

        let title = self.evaluate("document.title");
        let title = title.as_str().unwrap_or_default().to_string();
        let images = self.evaluate(
            "JSON.stringify([...document.images].map(i => [i.getAttribute('src'), i.naturalWidth]))",
        );
        let images: Vec<(Option<String>, u32)> =
            serde_json::from_str(images.as_str().expect("a JSON string of images"))
                .expect("images as [src, naturalWidth] pairs");
        let images = images
            .into_iter()
            .map(|(src, width)| (src.unwrap_or_default(), width))
            .collect();
        let shot = self.call(
            "Page.captureScreenshot",
            json!({ "format": "png", "fromSurface": true }),
        );
        let screenshot_png = base64::engine::general_purpose::STANDARD
            .decode(shot["data"].as_str().expect("screenshot data"))
            .expect("screenshot in base64");
        let console_errors = self.events.iter().filter_map(error_of).collect();
        let _ = self.socket.close(None);
        PageCheck {
            console_errors,
            images,
            screenshot_png,
            title,
        }
    }

    /// `expression`'s value in the page (by value); panics on an exception.
    fn evaluate(&mut self, expression: &str) -> Value {
        let result = self.call(
            "Runtime.evaluate",
            json!({ "expression": expression, "returnByValue": true }),
        );
        if let Some(details) = result.get("exceptionDetails") {
            panic!("evaluating {expression} in the page threw: {details}");
        }
        result["result"]["value"].clone()
    }

    /// Sends a command (to the page session once attached) and gives its result, keeping the
    /// events that arrive meanwhile.
    fn call(&mut self, method: &str, params: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let mut message = json!({ "id": id, "method": method, "params": params });
        if let Some(session) = &self.session {
            message["sessionId"] = json!(session);
        }
        self.socket
            .send(tungstenite::Message::text(message.to_string()))
            .unwrap_or_else(|e| panic!("cannot send {method} to Chromium: {e}"));
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let message = self.receive(deadline, method);
            if message["id"] == id {
                if let Some(error) = message.get("error") {
                    panic!("Chromium refused {method}: {error}");
                }
                return message["result"].clone();
            }
        }
    }

    /// Waits for the top frame to navigate to `url` and then fire its load event.
    fn wait_for_load(&mut self, url: &str) {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let navigated = self.events.iter().position(|e| {
                e["method"] == "Page.frameNavigated"
                    && e["params"]["frame"]["parentId"].is_null()
                    && e["params"]["frame"]["url"]
                        .as_str()
                        .is_some_and(|u| u.starts_with("file://"))
            });
            if let Some(navigated) = navigated {
                if self.events[navigated..]
                    .iter()
                    .any(|e| e["method"] == "Page.loadEventFired")
                {
                    return;
                }
            }
            self.receive(deadline, &format!("the load event of {url}"));
        }
    }

    /// The next message; events of the page session are also kept in `events`.
    fn receive(&mut self, deadline: Instant, waiting_for: &str) -> Value {
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                panic!(
                    "Chromium did not answer {waiting_for} within {} s",
                    TIMEOUT.as_secs()
                );
            }
            self.socket.get_mut().set_read_timeout(Some(left)).unwrap();
            let text = match self.socket.read() {
                Ok(tungstenite::Message::Text(text)) => text,
                Ok(_) => continue,
                Err(tungstenite::Error::Io(e))
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    panic!(
                        "Chromium did not answer {waiting_for} within {} s",
                        TIMEOUT.as_secs()
                    )
                }
                Err(e) => panic!("DevTools connection lost waiting for {waiting_for}: {e}"),
            };
            let message: Value = serde_json::from_str(text.as_str())
                .unwrap_or_else(|e| panic!("DevTools sent invalid JSON ({e}): {text}"));
            if message.get("method").is_some()
                && self.session.is_some()
                && message["sessionId"].as_str() == self.session.as_deref()
            {
                self.events.push(message.clone());
            }
            return message;
        }
    }
}

/// The error line an event reports, if it reports one.
fn error_of(event: &Value) -> Option<String> {
    let params = &event["params"];
    match event["method"].as_str()? {
        "Runtime.exceptionThrown" => {
            // The exception's description carries its stack; a thrown non-Error has only text.
            let details = &params["exceptionDetails"];
            Some(match details["exception"]["description"].as_str() {
                Some(description) => format!("uncaught: {description}"),
                None => format!(
                    "uncaught: {}{}",
                    details["text"].as_str().unwrap_or("exception"),
                    location(details)
                ),
            })
        }
        "Runtime.consoleAPICalled" if params["type"] == "error" || params["type"] == "assert" => {
            let args: Vec<String> = params["args"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|arg| match &arg["value"] {
                    Value::String(s) => s.clone(),
                    Value::Null => arg["description"].as_str().unwrap_or("?").to_string(),
                    other => other.to_string(),
                })
                .collect();
            Some(format!(
                "console.{}: {}",
                params["type"].as_str()?,
                args.join(" ")
            ))
        }
        "Log.entryAdded" if params["entry"]["level"] == "error" => {
            let entry = &params["entry"];
            let url = entry["url"]
                .as_str()
                .map(|u| format!(" ({u})"))
                .unwrap_or_default();
            Some(format!(
                "{}: {}{url}",
                entry["source"].as_str().unwrap_or("log"),
                entry["text"].as_str().unwrap_or_default()
            ))
        }
        _ => None,
    }
}

fn location(details: &Value) -> String {
    match (details["url"].as_str(), details["lineNumber"].as_u64()) {
        (Some(url), Some(line)) if !url.is_empty() => format!(" at {url}:{}", line + 1),
        _ => String::new(),
    }
}
