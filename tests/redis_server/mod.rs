//! Real `redis-server` processes on loopback ports, for the DHT tests and bench.
//!
//! Each server gets a free port (bound to port 0, then released), no persistence
//! (`--save '' --appendonly no`) and its own directory. Readiness is awaited by
//! polling PING within a bounded time. Only the processes started here are ever
//! killed, by their own handles, at the latest when dropped.
//!
//! A server may require a password (`--requirepass`) and may listen for TLS on a
//! second port (`--tls-port`, with certificate files the caller made); its plain
//! port stays open on loopback for the readiness check and [`RedisServer::command`].
#![allow(dead_code, unreachable_pub)]

use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long a server may take to answer its first PING.
const READY_WITHIN: Duration = Duration::from_secs(20);

/// Whether `redis-server` can be run. Without it, callers skip loudly, unless
/// `MIGSTREAM_REQUIRE_REDIS=1`, which makes its absence a failure.
pub fn available(what: &str) -> bool {
    let found = Command::new("redis-server")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !found {
        if std::env::var("MIGSTREAM_REQUIRE_REDIS").as_deref() == Ok("1") {
            panic!(
                "{what}: redis-server is required (MIGSTREAM_REQUIRE_REDIS=1) but not installed"
            );
        }
        eprintln!(
            "*** SKIPPED {what}: redis-server not installed (apt-get install -y redis-server) ***"
        );
    }
    found
}

/// A port nothing listens on right now.
pub fn free_port() -> u16 {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind port 0");
    listener.local_addr().expect("local address").port()
}

/// The certificate files of a TLS server (PEM).
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// The server's certificate chain.
    pub cert: PathBuf,
    /// Its key.
    pub key: PathBuf,
    /// The CA that client certificates must chain to.
    pub ca: PathBuf,
    /// Whether a client must show a certificate (`--tls-auth-clients yes`).
    pub auth_clients: bool,
}

/// How a server is run, beyond the defaults.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// `--requirepass`: the password of the default user.
    pub password: Option<String>,
    /// TLS on a second port.
    pub tls: Option<TlsFiles>,
}

/// One redis-server process.
#[derive(Debug)]
pub struct RedisServer {
    child: Option<Child>,
    port: u16,
    tls_port: Option<u16>,
    options: Options,
    dir: PathBuf,
}

impl RedisServer {
    /// Starts a server on a free port, its files under `dir`.
    pub fn start(dir: &Path) -> Self {
        Self::start_with(dir, Options::default())
    }

    /// Starts a server run with `options`, on free ports, its files under `dir`.
    pub fn start_with(dir: &Path, options: Options) -> Self {
        let mut server = Self {
            child: None,
            port: free_port(),
            tls_port: options.tls.as_ref().map(|_| free_port()),
            options,
            dir: dir.to_path_buf(),
        };
        server.spawn();
        server
    }

    /// `n` servers, each in its own directory under `dir`.
    pub fn start_many(dir: &Path, n: usize) -> Vec<Self> {
        (0..n)
            .map(|i| Self::start(&dir.join(format!("node{i}"))))
            .collect()
    }

    /// The server's URL: `rediss://` to its TLS port if it has one, with its
    /// password if it has one.
    pub fn url(&self) -> String {
        let auth = match &self.options.password {
            Some(password) => format!(":{password}@"),
            None => String::new(),
        };
        match self.tls_port {
            Some(port) => format!("rediss://{auth}127.0.0.1:{port}"),
            None => format!("redis://{auth}127.0.0.1:{}", self.port),
        }
    }

    /// The URL of its plain port, without credentials.
    pub fn plain_url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// The TLS port, if it has one.
    pub fn tls_port(&self) -> Option<u16> {
        self.tls_port
    }

    /// The server's port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The process id, while running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Kills the server (SIGKILL) and reaps it: its data is gone.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port, empty.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    /// Sends one command line on the plain port (after `AUTH` if the server has a
    /// password) and returns the raw reply (for INFO and the like).
    pub fn command(&self, line: &str) -> String {
        let mut s = TcpStream::connect((Ipv4Addr::LOCALHOST, self.port)).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        if let Some(password) = &self.options.password {
            s.write_all(format!("AUTH {password}\r\n").as_bytes())
                .unwrap();
            let mut ok = [0u8; 5];
            s.read_exact(&mut ok).expect("AUTH reply");
            assert_eq!(&ok, b"+OK\r\n", "AUTH refused");
        }
        s.write_all(format!("{line}\r\n").as_bytes()).unwrap();
        let mut reply = Vec::new();
        let mut buf = [0u8; 65536];
        // a bulk reply: "$len\r\n" then len bytes and "\r\n"; a simple reply: one line
        loop {
            let n = s.read(&mut buf).expect("reply");
            reply.extend_from_slice(&buf[..n]);
            if n == 0 || complete(&reply) {
                break;
            }
        }
        String::from_utf8_lossy(&reply).into_owned()
    }

    /// `used_memory` from INFO memory.
    pub fn used_memory(&self) -> u64 {
        let info = self.command("INFO memory");
        info.lines()
            .find_map(|l| l.strip_prefix("used_memory:"))
            .and_then(|v| v.trim().parse().ok())
            .expect("used_memory in INFO")
    }

    fn spawn(&mut self) {
        std::fs::create_dir_all(&self.dir).expect("server directory");
        let mut command = Command::new("redis-server");
        command
            .args(["--port", &self.port.to_string()])
            .args(["--bind", "127.0.0.1"])
            .args(["--save", ""])
            .args(["--appendonly", "no"])
            .arg("--dir")
            .arg(&self.dir)
            .args(["--logfile", "redis.log"]);
        if let Some(password) = &self.options.password {
            command.args(["--requirepass", password]);
        }
        if let (Some(tls), Some(port)) = (&self.options.tls, self.tls_port) {
            let auth_clients = if tls.auth_clients { "yes" } else { "no" };
            command
                .args(["--tls-port", &port.to_string()])
                .arg("--tls-cert-file")
                .arg(&tls.cert)
                .arg("--tls-key-file")
                .arg(&tls.key)
                .arg("--tls-ca-cert-file")
                .arg(&tls.ca)
                .args(["--tls-auth-clients", auth_clients]);
        }
        let child = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server started");
        self.child = Some(child);
        self.wait_ready();
    }

    /// Polls PING until the server answers, it exits, or [`READY_WITHIN`] passes.
    fn wait_ready(&mut self) {
        let started = Instant::now();
        loop {
            if self.ping() {
                return;
            }
            let child = self.child.as_mut().expect("running");
            if let Some(status) = child.try_wait().expect("status") {
                let log = std::fs::read_to_string(self.dir.join("redis.log")).unwrap_or_default();
                panic!(
                    "redis-server on port {} exited ({status}):\n{log}",
                    self.port
                );
            }
            assert!(
                started.elapsed() < READY_WITHIN,
                "redis-server on port {} not ready within {READY_WITHIN:?}",
                self.port
            );
            // polling interval, not synchronisation: the loop ends on PONG
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn ping(&self) -> bool {
        let Ok(mut s) = TcpStream::connect((Ipv4Addr::LOCALHOST, self.port)) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
        let (line, expected): (String, &[u8]) = match &self.options.password {
            Some(password) => (format!("AUTH {password}\r\nPING\r\n"), b"+OK\r\n+PONG\r\n"),
            None => ("PING\r\n".to_string(), b"+PONG\r\n"),
        };
        let mut reply = vec![0u8; expected.len()];
        s.write_all(line.as_bytes()).is_ok()
            && s.read_exact(&mut reply).is_ok()
            && reply == expected
    }
}

/// Whether `reply` is one whole RESP reply (simple or bulk).
fn complete(reply: &[u8]) -> bool {
    let Some(eol) = reply.windows(2).position(|w| w == b"\r\n") else {
        return false;
    };
    match reply.first() {
        Some(b'$') => {
            let len: i64 = std::str::from_utf8(&reply[1..eol])
                .ok()
                .and_then(|s| s.parse().ok())
                .unwrap_or(0);
            len < 0 || reply.len() >= eol + 2 + len as usize + 2
        }
        _ => true,
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}
