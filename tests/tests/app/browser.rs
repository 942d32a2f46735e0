//! Headless Chromium (Debian's `chromium`, nothing downloaded) driven over
//! the DevTools protocol on a pipe (`--remote-debugging-pipe`: JSON messages
//! separated by NUL on file descriptors 3 and 4), as a voter and as the
//! admin would use the site. Screenshots go to
//! `$CARGO_TARGET_TMPDIR/app-browser/` (`target/tmp/app-browser/`).

use anyhow::{anyhow, bail, ensure, Context, Result};
use base64::Engine;
use jai_lab::lab_app::{admin_password, AppInfo};
use jai_lab::Lab;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const STEP: Duration = Duration::from_secs(20);

/// One Chromium process and one page (tab) in it.
struct Browser {
    pid: i32,
    commands: std::fs::File,
    messages: mpsc::Receiver<Value>,
    events: Vec<Value>,
    next_id: u64,
    session: String,
    _profile: tempfile::TempDir,
}

impl Drop for Browser {
    fn drop(&mut self) {
        jai_lab::process::terminate(self.pid, Duration::from_secs(5));
    }
}

fn pipe() -> Result<(OwnedFd, OwnedFd)> {
    Ok(nix::unistd::pipe()?)
}

impl Browser {
    fn launch() -> Result<Browser> {
        use std::os::unix::process::CommandExt;
        let profile = tempfile::tempdir()?;
        let (to_browser_read, to_browser_write) = pipe()?;
        let (from_browser_read, from_browser_write) = pipe()?;
        let (child_in, child_out) = (to_browser_read.as_raw_fd(), from_browser_write.as_raw_fd());
        let mut command = std::process::Command::new("chromium");
        command
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--no-default-browser-check",
                "--disable-extensions",
                "--disable-background-networking",
                "--remote-debugging-pipe",
                "--window-size=1000,800",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("about:blank")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        // SAFETY: only async-signal-safe calls (dup2) between fork and exec.
        unsafe {
            command.pre_exec(move || {
                if nix::libc::dup2(child_in, 3) < 0 || nix::libc::dup2(child_out, 4) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = command
            .spawn()
            .context("starting chromium (Debian package `chromium`, see scripts/setup.sh)")?;
        let pid = child.id() as i32;
        std::thread::spawn(move || {
            let _ = child.wait();
        });
        drop(to_browser_read);
        drop(from_browser_write);
        let (sender, messages) = mpsc::channel();
        let reader = std::fs::File::from(from_browser_read);
        std::thread::spawn(move || {
            let mut reader = BufReader::new(reader);
            let mut buffer = Vec::new();
            while reader.read_until(0, &mut buffer).unwrap_or(0) > 0 {
                buffer.pop_if(|byte| *byte == 0);
                if let Ok(message) = serde_json::from_slice::<Value>(&buffer) {
                    if sender.send(message).is_err() {
                        break;
                    }
                }
                buffer.clear();
            }
        });
        let mut browser = Browser {
            pid,
            commands: std::fs::File::from(to_browser_write),
            messages,
            events: Vec::new(),
            next_id: 0,
            session: String::new(),
            _profile: profile,
        };
        let target = browser.call("Target.createTarget", json!({"url": "about:blank"}))?;
        let target_id = target["targetId"]
            .as_str()
            .ok_or_else(|| anyhow!("no targetId"))?
            .to_owned();
        let attached = browser.call(
            "Target.attachToTarget",
            json!({"targetId": target_id, "flatten": true}),
        )?;
        browser.session = attached["sessionId"]
            .as_str()
            .ok_or_else(|| anyhow!("no sessionId"))?
            .to_owned();
        browser.call("Page.enable", json!({}))?;
        // Every page records what its Content-Security-Policy blocked (a
        // script DevTools injects is not subject to the policy).
        browser.call(
            "Page.addScriptToEvaluateOnNewDocument",
            json!({"source": "window.__csp = []; document.addEventListener(\
                'securitypolicyviolation', e => window.__csp.push(e.violatedDirective))"}),
        )?;
        Ok(browser)
    }

    fn receive(&mut self, deadline: Instant) -> Result<Value> {
        let left = deadline.saturating_duration_since(Instant::now());
        self.messages
            .recv_timeout(left)
            .map_err(|_| anyhow!("chromium did not answer in time"))
    }

    /// Sends a command (to the page once attached) and waits for its answer.
    fn call(&mut self, method: &str, params: Value) -> Result<Value> {
        self.next_id += 1;
        let id = self.next_id;
        let mut message = json!({"id": id, "method": method, "params": params});
        if !self.session.is_empty() {
            message["sessionId"] = json!(self.session);
        }
        let mut bytes = serde_json::to_vec(&message)?;
        bytes.push(0);
        self.commands.write_all(&bytes)?;
        let deadline = Instant::now() + STEP;
        loop {
            let message = self.receive(deadline)?;
            if message["id"].as_u64() == Some(id) {
                if let Some(error) = message.get("error") {
                    bail!("{method}: {error}");
                }
                return Ok(message["result"].clone());
            }
            if message.get("method").is_some() {
                self.events.push(message);
            }
        }
    }

    /// Waits for the page's next `load` event.
    fn wait_load(&mut self) -> Result<()> {
        let deadline = Instant::now() + STEP;
        loop {
            if let Some(at) = self
                .events
                .iter()
                .position(|event| event["method"] == "Page.loadEventFired")
            {
                self.events.drain(..=at);
                return Ok(());
            }
            let message = self.receive(deadline)?;
            if message.get("method").is_some() {
                self.events.push(message);
            }
        }
    }

    fn navigate(&mut self, url: &str) -> Result<()> {
        self.events.clear();
        self.call("Page.navigate", json!({"url": url}))?;
        self.wait_load()
    }

    /// Evaluates `expression` in the page and returns its value.
    fn eval(&mut self, expression: &str) -> Result<Value> {
        let result = self.call(
            "Runtime.evaluate",
            json!({"expression": expression, "returnByValue": true}),
        )?;
        if let Some(exception) = result.get("exceptionDetails") {
            bail!("{expression}: {exception}");
        }
        Ok(result["result"]["value"].clone())
    }

    /// Runs `script` (which submits a form) and waits for the next page.
    fn submit(&mut self, script: &str) -> Result<()> {
        self.events.clear();
        self.eval(script)?;
        self.wait_load()
    }

    /// Fails if the page's Content-Security-Policy blocked anything, or if
    /// its stylesheet did not apply (both are allowed by their hash only).
    fn check_policy(&mut self, what: &str) -> Result<()> {
        let blocked = self.eval("JSON.stringify(window.__csp)")?;
        ensure!(
            blocked.as_str() == Some("[]"),
            "{what}: the Content-Security-Policy blocked {blocked}"
        );
        let font = self.eval("getComputedStyle(document.body).fontFamily")?;
        ensure!(
            font.as_str().unwrap_or_default().contains("system-ui"),
            "{what}: the inline stylesheet did not apply (font {font})"
        );
        Ok(())
    }

    fn text(&mut self) -> Result<String> {
        Ok(self
            .eval("document.body.innerText")?
            .as_str()
            .unwrap_or_default()
            .to_owned())
    }

    fn screenshot(&mut self, dir: &Path, name: &str) -> Result<PathBuf> {
        let shot = self.call("Page.captureScreenshot", json!({"format": "png"}))?;
        let data = shot["data"]
            .as_str()
            .ok_or_else(|| anyhow!("no screenshot data"))?;
        let file = dir.join(name);
        std::fs::write(
            &file,
            base64::engine::general_purpose::STANDARD.decode(data)?,
        )?;
        Ok(file)
    }

    /// Reloads `url` until its text contains `needle` (caches expire within seconds).
    fn wait_for_text(&mut self, url: &str, needle: &str) -> Result<String> {
        let deadline = Instant::now() + STEP;
        loop {
            self.navigate(url)?;
            let text = self.text()?;
            if text.contains(needle) {
                return Ok(text);
            }
            ensure!(
                Instant::now() < deadline,
                "{url} never showed {needle:?}; last:\n{text}"
            );
        }
    }
}

fn vote_script(option_index: usize) -> String {
    format!(
        "document.querySelectorAll('input[name=option]')[{option_index}].checked = true; \
         document.querySelector('form[action$=\"/vote\"]').submit(); true"
    )
}

pub async fn run(lab: &Lab) -> Result<()> {
    let app = lab
        .desc
        .app
        .clone()
        .ok_or_else(|| anyhow!("lab without app"))?;
    let shots = Path::new(env!("CARGO_TARGET_TMPDIR")).join("app-browser");
    std::fs::create_dir_all(&shots)?;
    // The admin creates the poll in the browser first; then a voter uses it.
    tokio::task::spawn_blocking(move || browse(&app, &shots)).await?
}

fn browse(app: &AppInfo, shots: &Path) -> Result<()> {
    let mut browser = Browser::launch()?;

    // Admin: log in and create a poll.
    browser.navigate(&format!("{}/login", app.admin_url))?;
    let password = admin_password(app)?;
    browser.submit(&format!(
        "document.querySelector('input[name=username]').value = {user}; \
         document.querySelector('input[name=password]').value = {password}; \
         document.querySelector('form[action=\"/login\"]').submit(); true",
        user = json!(app.admin_user),
        password = json!(password),
    ))?;
    ensure!(
        browser.text()?.contains("Dashboard"),
        "login did not reach the dashboard"
    );
    browser.check_policy("the admin dashboard")?;
    browser.screenshot(shots, "01-admin-dashboard.png")?;
    browser.navigate(&format!("{}/polls/new", app.admin_url))?;
    browser.submit(
        "document.querySelector('input[name=title]').value = 'Browser poll: best season?'; \
         document.querySelector('textarea[name=options]').value = 'Spring\\nSummer\\nAutumn'; \
         document.querySelector('form[action=\"/polls\"]').submit(); true",
    )?;
    let location = browser
        .eval("location.pathname")?
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let poll: i64 = location
        .rsplit('/')
        .next()
        .and_then(|id| id.parse().ok())
        .ok_or_else(|| anyhow!("poll creation ended on {location}"))?;
    let text = browser.text()?;
    ensure!(
        text.contains("Spring"),
        "the new poll's page lacks its options:\n{text}"
    );
    browser.screenshot(shots, "02-admin-poll-created.png")?;

    // Voter: find the poll on the site, vote, see the result.
    browser.wait_for_text(&format!("{}/", app.url), "Browser poll: best season?")?;
    let poll_url = format!("{}/polls/{poll}", app.url);
    browser.navigate(&poll_url)?;
    browser.check_policy("the poll page")?;
    browser.screenshot(shots, "03-poll.png")?;
    browser.submit(&vote_script(0))?;
    let text = browser.text()?;
    ensure!(
        text.contains("your vote for “Spring” is counted"),
        "no confirmation after voting:\n{text}"
    );
    let results = format!("{}/polls/{poll}/results", app.url);
    browser.wait_for_text(&results, "Spring\t1\t100.0%")?;
    // The results page's inline script ran under the policy (it marks the
    // page, then reloads it every 10 s).
    let reload = browser.eval("document.documentElement.dataset.reload || 'blocked'")?;
    ensure!(
        reload.as_str() == Some("on"),
        "the results page's script did not run: {reload}"
    );
    browser.check_policy("the results page")?;
    browser.screenshot(shots, "04-voted.png")?;

    // Re-vote: the vote moves from Spring to Autumn.
    browser.navigate(&poll_url)?;
    browser.submit(&vote_script(2))?;
    ensure!(
        browser
            .text()?
            .contains("your vote for “Autumn” is counted"),
        "no confirmation after re-voting"
    );
    let text = browser.wait_for_text(&results, "Autumn\t1\t100.0%")?;
    ensure!(
        text.contains("Spring\t0\t0.0%"),
        "the re-vote did not move the vote:\n{text}"
    );
    browser.screenshot(shots, "05-revoted.png")?;

    // A forged post (tampered CSRF token) is refused with a clear page.
    browser.navigate(&poll_url)?;
    browser.submit(
        "document.querySelector('input[name=csrf]').value = 'forged'; \
         document.querySelector('input[name=option]').checked = true; \
         document.querySelector('form[action$=\"/vote\"]').submit(); true",
    )?;
    let text = browser.text()?;
    ensure!(
        text.contains("not sent from this site"),
        "forged post not refused:\n{text}"
    );
    browser.screenshot(shots, "06-csrf-refused.png")?;
    let text = browser.wait_for_text(&results, "Total\t1")?;
    ensure!(
        text.contains("Autumn\t1"),
        "the forged post changed the results:\n{text}"
    );
    eprintln!("browser screenshots in {}", shots.display());
    Ok(())
}
