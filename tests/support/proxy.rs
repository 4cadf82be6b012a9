//! The `proxy` example as a process, as an operator runs it: started with its
//! arguments, its address read from its first line, its JSON reports and log lines
//! collected, killed (by PID) when dropped.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError, channel};
use std::thread;
use std::time::{Duration, Instant};

/// The built `proxy` example.
pub fn proxy_binary() -> PathBuf {
    super::example_binary("proxy")
}

/// A proxy process, killed when dropped.
pub struct Proxy {
    pub child: Child,
    pub port: u16,
    /// Its stderr lines after the first, as they come.
    pub log: Receiver<String>,
    reports: Option<Receiver<serde_json::Value>>,
}

impl Proxy {
    /// Starts `proxy ARGS --listen 127.0.0.1:0 --json --quiet`.
    pub fn start<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> Proxy {
        Self::start_with(Command::new(proxy_binary()).args(args))
    }

    /// Starts `command` (the proxy binary, perhaps behind `prlimit`) with
    /// `--listen 127.0.0.1:0 --json --quiet` added.
    pub fn start_with(command: &mut Command) -> Proxy {
        let mut child = command
            .args(["--listen", "127.0.0.1:0", "--json", "--quiet"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stderr = BufReader::new(child.stderr.take().unwrap());
        let mut line = String::new();
        stderr.read_line(&mut line).unwrap();
        let port = line
            .split_whitespace()
            .nth(2)
            .and_then(|addr| addr.strip_prefix("127.0.0.1:"))
            .unwrap_or_else(|| panic!("first line {line:?}"))
            .parse()
            .unwrap();
        // keep draining both pipes so the proxy never blocks on them
        let (log_tx, log) = channel();
        thread::spawn(move || {
            for line in stderr.lines().map_while(Result::ok) {
                let _ = log_tx.send(line);
            }
        });
        let (report_tx, reports) = channel();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        thread::spawn(move || {
            for line in stdout.lines().map_while(Result::ok) {
                let _ = report_tx.send(serde_json::from_str(&line).unwrap());
            }
        });
        Proxy {
            child,
            port,
            log,
            reports: Some(reports),
        }
    }

    /// `127.0.0.1:PORT`.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The JSON reports of the next `n` migrations (60 s at most each).
    pub fn reports(&mut self, n: usize) -> Vec<serde_json::Value> {
        let reports = self.reports.as_ref().unwrap();
        (0..n)
            .map(|i| {
                reports
                    .recv_timeout(Duration::from_secs(60))
                    .unwrap_or_else(|e| panic!("report {i} of {n}: {e}"))
            })
            .collect()
    }

    /// Whether a report arrives within `wait` (none should, for a refused link).
    pub fn report_within(&mut self, wait: Duration) -> Option<serde_json::Value> {
        match self.reports.as_ref().unwrap().recv_timeout(wait) {
            Ok(report) => Some(report),
            Err(RecvTimeoutError::Timeout) => None,
            Err(RecvTimeoutError::Disconnected) => panic!("the proxy exited"),
        }
    }

    /// Waits (`wait` at most) for a log line containing `needle`; returns it.
    pub fn log_line(&self, needle: &str, wait: Duration) -> String {
        let deadline = Instant::now() + wait;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.log.recv_timeout(left) {
                Ok(line) if line.contains(needle) => return line,
                Ok(_) => {}
                Err(e) => panic!("no log line with {needle:?} within {wait:?}: {e}"),
            }
        }
    }

    /// Resident memory of the process, in bytes (Linux).
    pub fn rss(&self) -> u64 {
        self.status_bytes("VmRSS:")
    }

    /// The most resident memory the process has had so far, in bytes (Linux's
    /// high-water mark: a peak between two looks at [`rss`](Self::rss) counts too).
    pub fn rss_peak(&self) -> u64 {
        self.status_bytes("VmHWM:")
    }

    /// A size field of `/proc/PID/status` (`VmRSS:`, `VmHWM:`...), in bytes.
    fn status_bytes(&self, field: &str) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        let kib: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{field} in /proc/PID/status"));
        kib * 1024
    }

    /// Whether the process is still running.
    pub fn running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
