//! Test harness: the real `contextd` binary on a temp data dir, over HTTP.
#![allow(dead_code)]

use serde_json::Value;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_contextd"))
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub struct Server {
    pub child: Option<Child>,
    pub base: String,
    pub addr: String,
    pub data_dir: PathBuf,
    pub log: PathBuf,
}

/// A contextd command with no CONTEXTD_* variables from the environment.
pub fn command(args: &[&str]) -> Command {
    let mut c = Command::new(bin());
    for (k, _) in std::env::vars() {
        if k.starts_with("CONTEXTD_") {
            c.env_remove(k);
        }
    }
    c.args(args);
    c
}

impl Server {
    pub fn start(data_dir: &Path, extra: &[&str]) -> Server {
        let addr = format!("127.0.0.1:{}", free_port());
        Self::start_at(data_dir, &addr, extra)
    }

    pub fn start_at(data_dir: &Path, addr: &str, extra: &[&str]) -> Server {
        let addr = addr.to_string();
        let log = data_dir.with_extension(format!("{}.log", addr.replace([':', '.'], "_")));
        let out = std::fs::File::create(&log).unwrap();
        let mut args = vec![
            "run",
            "--data-dir",
            data_dir.to_str().unwrap(),
            "--http-addr",
            addr.as_str(),
        ];
        args.extend_from_slice(extra);
        let child = command(&args)
            .stdout(Stdio::null())
            .stderr(out)
            .spawn()
            .expect("start contextd");
        let s = Server {
            child: Some(child),
            base: format!("http://{addr}"),
            addr,
            data_dir: data_dir.to_path_buf(),
            log,
        };
        s.wait_ready(Duration::from_secs(60));
        s
    }

    pub fn wait_ready(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok((200, _)) = self.try_get("/readyz") {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "contextd not ready; log:\n{}",
                self.log_tail()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn log_tail(&self) -> String {
        let t = std::fs::read_to_string(&self.log).unwrap_or_default();
        t.lines()
            .rev()
            .take(30)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect::<Vec<_>>()
            .join("\n")
    }

    fn call(&self, method: &str, path: &str, body: Option<&str>) -> Result<(u16, Value), String> {
        let req = ureq::request(method, &format!("{}{}", self.base, path))
            .timeout(Duration::from_secs(15));
        let res = match body {
            Some(b) => req.set("Content-Type", "application/json").send_string(b),
            None => req.call(),
        };
        let resp = match res {
            Ok(r) => r,
            Err(ureq::Error::Status(_, r)) => r,
            Err(e) => return Err(e.to_string()),
        };
        let status = resp.status();
        let text = resp.into_string().map_err(|e| e.to_string())?;
        Ok((
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        ))
    }

    /// Any method, any body (not necessarily JSON).
    pub fn raw(&self, method: &str, path: &str, body: Option<&str>) -> (u16, Value) {
        self.call(method, path, body).unwrap()
    }
    pub fn try_get(&self, path: &str) -> Result<(u16, Value), String> {
        self.call("GET", path, None)
    }
    pub fn get(&self, path: &str) -> (u16, Value) {
        self.call("GET", path, None).unwrap()
    }
    /// The sum of a metric's samples in `/metrics` (every label set).
    pub fn metric(&self, name: &str) -> f64 {
        let (_, m) = self.get("/metrics");
        m.as_str()
            .unwrap_or_default()
            .lines()
            .filter(|l| l.split(['{', ' ']).next() == Some(name))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }
    pub fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        self.call("POST", path, Some(&body.to_string())).unwrap()
    }
    pub fn post_raw(&self, path: &str, body: &str) -> Result<(u16, Value), String> {
        self.call("POST", path, Some(body))
    }
    pub fn put(&self, path: &str, body: &Value) -> (u16, Value) {
        self.call("PUT", path, Some(&body.to_string())).unwrap()
    }
    pub fn patch(&self, path: &str, body: &Value) -> (u16, Value) {
        self.call("PATCH", path, Some(&body.to_string())).unwrap()
    }
    pub fn delete(&self, path: &str) -> (u16, Value) {
        self.call("DELETE", path, None).unwrap()
    }

    /// Polls until `f` returns Some, or panics after `secs`.
    pub fn wait_for<T>(&self, secs: u64, what: &str, mut f: impl FnMut(&Server) -> Option<T>) -> T {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            if let Some(v) = f(self) {
                return v;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; log:\n{}",
                self.log_tail()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }

    /// SIGTERM; returns the exit code.
    pub fn stop(&mut self) -> Option<i32> {
        let mut c = self.child.take()?;
        Command::new("kill")
            .args(["-TERM", &c.id().to_string()])
            .status()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(st) = c.try_wait().unwrap() {
                return st.code();
            }
            if Instant::now() > deadline {
                c.kill().unwrap();
                panic!("contextd did not stop within 15 s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn set_visibility(&self, v: &Value) {
        let (st, body) = self.put("/api/admin/visibility", v);
        assert_eq!(st, 202, "{body}");
        self.wait_for(20, "visibility applied", |s| {
            let (_, got) = s.get("/api/admin/visibility");
            (got["shown_event_types"].as_array().map(|a| a.len())
                == v["shown_event_types"].as_array().map(|a| a.len())
                && got["zendesk_events"] == v["zendesk_events"])
                .then_some(())
        });
    }

    /// Every event of a user's timeline (all pages).
    pub fn all_events(&self, user: &str) -> Option<Vec<Value>> {
        let mut out = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let mut path = format!("/api/v2/users/{}/events?page[size]=1000", enc(user));
            if let Some(a) = &after {
                path.push_str(&format!("&page[after]={a}"));
            }
            let (st, body) = self.get(&path);
            if st != 200 {
                return None;
            }
            out.extend(body["events"].as_array().unwrap().iter().cloned());
            if !body["meta"]["has_more"].as_bool().unwrap() {
                return Some(out);
            }
            after = Some(body["meta"]["after_cursor"].as_str().unwrap().to_string());
        }
    }

    pub fn dead_letters(&self) -> Vec<Value> {
        let (_, body) = self.get("/api/admin/dead_letters?limit=10000");
        body["dead_letters"].as_array().cloned().unwrap_or_default()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub fn enc(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string()
}

/// Runs a one-shot contextd command, returning (status ok, stdout, stderr).
pub fn run_cli(args: &[&str]) -> (bool, String, String) {
    let out = command(args).output().expect("run contextd");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}
