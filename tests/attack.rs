//! Hostile peers against the proxies, as processes over loopback: injected streams,
//! port scans, stalls, memory and file-descriptor exhaustion, a link that loses or
//! damages the return direction, a template store that serves a wrong page.
//!
//! Each test runs the `proxy` example binary over mutual TLS with certificates made in
//! process (`support::pki`), in front of a fake destination QEMU: a `TcpListener` whose
//! connections are counted, so that "QEMU never connected" is asserted, not assumed.
//! Every wait is bounded; states are awaited by polling with a deadline.

mod redis_server;
mod support;

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::sync_channel;
use std::thread;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use migstream::dedup::{DedupEncoder, Reply, ReplyDecoder};
use rustls::pki_types::ServerName;
use support::pki::{Files, Leaf, PKI};
use support::proxy::{Proxy, proxy_binary};

/// The bound on any one wait.
const BOUND: Duration = Duration::from_secs(30);
/// Between two looks at a state awaited (polling interval, not synchronisation).
const POLL: Duration = Duration::from_millis(5);
const MIB: u64 = 1 << 20;

/// Held by the tests that fill a destination's memory: one at a time, each has the
/// CPU its idle timeout assumes and the RSS it measures to itself.
static MEMORY_ATTACK: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn memory_attack() -> std::sync::MutexGuard<'static, ()> {
    // a test that failed holding it poisoned it; the next one runs all the same
    MEMORY_ATTACK
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn testdata(name: &str) -> Vec<u8> {
    std::fs::read(format!("{}/testdata/{name}", env!("CARGO_MANIFEST_DIR"))).unwrap()
}

fn strs(args: &[String]) -> Vec<&str> {
    args.iter().map(String::as_str).collect()
}

/// A destination proxy restoring into `qemu`, allowing `source-a.example` only.
fn destination(pki: &Files, qemu: &FakeQemu, extra: &[&str]) -> Proxy {
    Proxy::start(&destination_args(pki, qemu, extra))
}

fn destination_args(pki: &Files, qemu: &FakeQemu, extra: &[&str]) -> Vec<String> {
    let args = pki.destination_args();
    [
        &["destination", "--to", &qemu.addr()][..],
        &strs(&args),
        extra,
    ]
    .concat()
    .into_iter()
    .map(String::from)
    .collect()
}

/// A source proxy (certificate `source-a`) linking to `to`.
fn source(pki: &Files, to: &str, extra: &[&str]) -> Proxy {
    let args = pki.source_args("source-a");
    Proxy::start(&[&["source", "--to", to][..], &strs(&args), extra].concat())
}

/// The fake destination QEMU: a listener whose every connection the test takes
/// itself, so a connection the proxy should not have made shows.
struct FakeQemu {
    listener: TcpListener,
}

impl FakeQemu {
    fn new() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        Self { listener }
    }

    fn addr(&self) -> String {
        self.listener.local_addr().unwrap().to_string()
    }

    /// The next connection, within [`BOUND`].
    fn accept(&self) -> TcpStream {
        let deadline = Instant::now() + BOUND;
        loop {
            match self.listener.accept() {
                Ok((conn, _)) => {
                    conn.set_nonblocking(false).unwrap();
                    conn.set_read_timeout(Some(BOUND)).unwrap();
                    conn.set_write_timeout(Some(BOUND)).unwrap();
                    return conn;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    assert!(Instant::now() < deadline, "QEMU not connected in {BOUND:?}");
                    thread::sleep(POLL);
                }
                Err(e) => panic!("accept: {e}"),
            }
        }
    }

    /// Asserts that no connection is waiting.
    fn assert_unconnected(&self, when: &str) {
        match self.listener.accept() {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Ok((_, peer)) => panic!("{when}: the destination QEMU was connected (from {peer})"),
            Err(e) => panic!("accept: {e}"),
        }
    }
}

/// A fake source QEMU that sends `stream` to the source proxy, then reads its return
/// path to the end.
fn source_qemu(port: u16, stream: Vec<u8>) -> thread::JoinHandle<()> {
    thread::spawn(move || {
        let mut conn = TcpStream::connect(("127.0.0.1", port)).unwrap();
        conn.set_read_timeout(Some(BOUND)).unwrap();
        conn.set_write_timeout(Some(BOUND)).unwrap();
        // a write may fail once the proxies gave up
        let _ = conn.write_all(&stream);
        let _ = conn.shutdown(Shutdown::Write);
        let _ = conn.read_to_end(&mut Vec::new());
    })
}

/// What the destination QEMU read until the proxy closed its connection, and
/// whether that was a clean end.
fn read_all(conn: &mut TcpStream) -> (Vec<u8>, bool) {
    let mut got = Vec::new();
    let clean = conn.read_to_end(&mut got).is_ok();
    (got, clean)
}

/// Runs one migration of `stream` from a fake source QEMU through `source` into the
/// next connection to `qemu`; returns what that QEMU received.
fn run_migration(source: &Proxy, qemu: &FakeQemu, stream: &[u8]) -> Vec<u8> {
    let sender = source_qemu(source.port, stream.to_vec());
    let mut conn = qemu.accept();
    let (got, _) = read_all(&mut conn);
    drop(conn);
    sender.join().unwrap();
    got
}

/// A real migration through `source` and `destination` that must go through
/// byte-exact; returns both reports (source's first).
fn migrate_ok(
    source: &mut Proxy,
    destination: &mut Proxy,
    qemu: &FakeQemu,
    stream: &[u8],
) -> (serde_json::Value, serde_json::Value) {
    let got = run_migration(source, qemu, stream);
    assert!(got == stream, "delivered byte-exact");
    let (s, d) = (
        source.reports(1).remove(0),
        destination.reports(1).remove(0),
    );
    assert_eq!(s["ok"], true, "{s}");
    assert_eq!(d["ok"], true, "{d}");
    (s, d)
}

/// The dedup stream of the QEMU stream `qemu`, as a source proxy would send it.
fn dedup_stream(qemu: &[u8]) -> Vec<u8> {
    dedup_stream_with(qemu, migstream::dedup::DEFAULT_BATCH)
}

/// [`dedup_stream`] in frames of `batch` bytes of batch.
fn dedup_stream_with(qemu: &[u8], batch: usize) -> Vec<u8> {
    let mut enc = DedupEncoder::with_default_resolvers().with_batch_size(batch);
    let mut wire = BytesMut::new();
    for record in support::decode(qemu, 1 << 20) {
        enc.encode(&record, &mut wire).unwrap();
    }
    enc.finish(&mut wire).unwrap();
    wire.to_vec()
}

/// A TLS client speaking the link's protocol (TLS 1.3, ALPN `migstream/3`) with
/// `leaf`'s certificate, or none; trusts the test CA.
fn tls_config(leaf: Option<&Leaf>) -> Arc<rustls::ClientConfig> {
    support::pki::raw_client_config(leaf, &[migstream::relay::tls::ALPN])
}

type Tls = rustls::StreamOwned<rustls::ClientConnection, TcpStream>;

/// A TLS connection to `addr` whose handshake is over, as far as the client can
/// tell (in TLS 1.3 the server checks the client's certificate after that).
fn tls_connect(addr: &str, leaf: Option<&Leaf>) -> io::Result<Tls> {
    let mut sock = TcpStream::connect(addr)?;
    sock.set_read_timeout(Some(BOUND))?;
    sock.set_write_timeout(Some(BOUND))?;
    let name = ServerName::try_from("127.0.0.1").unwrap();
    let mut conn =
        rustls::ClientConnection::new(tls_config(leaf), name).map_err(io::Error::other)?;
    while conn.is_handshaking() {
        conn.complete_io(&mut sock)?;
    }
    // the client's last handshake flight
    while conn.wants_write() {
        conn.write_tls(&mut sock)?;
    }
    Ok(rustls::StreamOwned::new(conn, sock))
}

/// Whether `sock` was closed by its peer, reading (and dropping) what arrived.
fn peer_closed(sock: &mut TcpStream) -> bool {
    sock.set_nonblocking(true).unwrap();
    let mut buf = [0u8; 4096];
    loop {
        match sock.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return false,
            Err(_) => return true,
        }
    }
}

/// How long after `start` each socket was closed by the proxy, waiting `bound` at
/// most; `None` for one still open then.
fn closing_times(
    socks: &mut [TcpStream],
    start: Instant,
    bound: Duration,
) -> Vec<Option<Duration>> {
    let mut closed = vec![None; socks.len()];
    while closed.iter().any(Option::is_none) && start.elapsed() < bound {
        for (sock, closed) in socks.iter_mut().zip(&mut closed) {
            if closed.is_none() && peer_closed(sock) {
                *closed = Some(start.elapsed());
            }
        }
        thread::sleep(POLL);
    }
    closed
}

/// Waits for the destination's log line of a refused connection, and returns it.
fn refusal(destination: &Proxy) -> String {
    destination.log_line("refused:", BOUND)
}

/// (1) An attacker who can reach the destination proxy's port injects a valid dedup
/// stream: over plain TCP, over TLS without a certificate, with a certificate of
/// another CA, and with a certificate of the right CA for a name not allowed. Each
/// is refused before the destination QEMU is connected and counts as no migration;
/// a real migration goes through after them.
///
/// Old design: the destination connected to QEMU on accept and fed it whatever came.
#[test]
fn injected_streams_are_refused_before_qemu_is_connected() {
    let qemu = FakeQemu::new();
    let pki = Files::write("attack-inject");
    let mut dst = destination(&pki, &qemu, &["--handshake-timeout", "5"]);
    let stream = testdata("qemu-7.2-pc-paused.mig");
    let wire = dedup_stream(&stream);

    // (a) plain TCP: not TLS at all
    let mut plain = TcpStream::connect(dst.addr()).unwrap();
    plain.set_read_timeout(Some(BOUND)).unwrap();
    plain.set_write_timeout(Some(BOUND)).unwrap();
    let _ = plain.write_all(&wire);
    let _ = plain.read_to_end(&mut Vec::new());
    let line = refusal(&dst);
    assert!(line.contains("tls"), "{line}");

    // (b), (c), (d): TLS without a certificate, of another CA, of a name not allowed
    for (leaf, what) in [
        (None, "no certificate"),
        (Some(&PKI.stranger), "another CA"),
        (Some(&PKI.source_b), "a name not allowed"),
    ] {
        match tls_connect(&dst.addr(), leaf) {
            // refused in the handshake (the server checks the certificate last)
            Err(_) => {}
            Ok(mut tls) => {
                let _ = tls.write_all(&wire);
                let mut sink = Vec::new();
                let read = tls.read_to_end(&mut sink);
                assert!(read.is_err() || sink.is_empty(), "{what}: read {read:?}");
            }
        }
        if what == "a name not allowed" {
            let line = dst.log_line("not for an allowed client name", BOUND);
            assert!(line.contains("source-b.example"), "{line}");
        }
        let line = refusal(&dst);
        assert!(line.contains("tls"), "{what}: {line}");
    }
    qemu.assert_unconnected("after four injections");
    assert!(dst.running());

    let mut src = source(&pki, &dst.addr(), &[]);
    let (_, d) = migrate_ok(&mut src, &mut dst, &qemu, &stream);
    assert_eq!(d["migration"], 1, "no migration counted before: {d}");
    qemu.assert_unconnected("after the real migration");
}

/// (2) A port scan: 50 connections opened and closed. None reaches QEMU, the proxy
/// stays up, and a real migration goes through after.
///
/// Old design: every connection was a migration (QEMU connected, then failed).
#[test]
fn a_port_scan_reaches_no_qemu() {
    let qemu = FakeQemu::new();
    let pki = Files::write("attack-scan");
    let mut dst = destination(&pki, &qemu, &[]);
    for _ in 0..50 {
        drop(TcpStream::connect(dst.addr()).unwrap());
    }
    for i in 0..50 {
        let line = refusal(&dst);
        assert!(!line.contains("accept failed"), "scan {i}: {line}");
    }
    assert!(dst.running());
    qemu.assert_unconnected("after the scan");

    let mut src = source(&pki, &dst.addr(), &[]);
    let stream = testdata("qemu-10.0-q35-paused.mig");
    let (_, d) = migrate_ok(&mut src, &mut dst, &qemu, &stream);
    assert_eq!(d["migration"], 1, "{d}");
    qemu.assert_unconnected("after the real migration");
}

/// (3) Connections that stall in their handshake: 16 that send nothing, then 16 that
/// complete TLS and never send a HELLO, against `--max-handshakes 8
/// --handshake-timeout 1`. At most 8 are held; the others are closed at once; the
/// held ones are closed at the timeout; QEMU is never connected; a real migration
/// goes through after.
///
/// Old design: no cap and no timeout: each stalled connection held a task, a file
/// descriptor (and a QEMU connection) forever.
#[test]
fn stalled_handshakes_are_capped_and_timed_out() {
    let qemu = FakeQemu::new();
    let pki = Files::write("attack-stall");
    let mut dst = destination(
        &pki,
        &qemu,
        &["--max-handshakes", "8", "--handshake-timeout", "1"],
    );
    let timeout = Duration::from_secs(1);

    // 16 silent TCP connections: 8 take the slots until the timeout, 8 are closed at once
    let start = Instant::now();
    let mut silent: Vec<TcpStream> = (0..16)
        .map(|_| TcpStream::connect(dst.addr()).unwrap())
        .collect();
    let closed = closing_times(&mut silent, start, BOUND);
    eprintln!("silent connections closed after {closed:?}");
    assert!(closed.iter().all(Option::is_some), "{closed:?}");
    // a held one cannot close before the timeout; 8 are held
    let early = closed.iter().flatten().filter(|&&t| t < timeout).count();
    assert_eq!(early, 8, "closed at once: {closed:?}");
    assert!(
        closed.iter().flatten().all(|&t| t < timeout * 5),
        "{closed:?}"
    );

    // 16 authenticated connections at once that complete TLS and send no HELLO
    let start = Instant::now();
    let addr = dst.addr();
    let attempts: Vec<_> = (0..16)
        .map(|_| {
            let addr = addr.clone();
            thread::spawn(move || {
                let tls = tls_connect(&addr, Some(&PKI.source_a));
                (tls, start.elapsed())
            })
        })
        .collect();
    let mut held = Vec::new();
    let mut refused = Vec::new();
    for attempt in attempts {
        match attempt.join().unwrap() {
            (Ok(tls), _) => held.push(tls.sock),
            (Err(e), after) => refused.push((e.kind(), after)),
        }
    }
    eprintln!("TLS stallers: {} held, refused {refused:?}", held.len());
    assert_eq!(held.len(), 8, "refused: {refused:?}");
    assert!(
        refused.iter().all(|&(_, after)| after < timeout),
        "refused at once: {refused:?}"
    );
    let closed = closing_times(&mut held, start, BOUND);
    eprintln!("TLS stallers closed after {closed:?}");
    assert!(
        closed.iter().all(|t| t.is_some_and(|t| t < timeout * 6)),
        "{closed:?}"
    );
    qemu.assert_unconnected("after the stalls");
    assert!(dst.running());

    let mut src = source(&pki, &dst.addr(), &[]);
    let stream = testdata("qemu-7.2-pc-paused.mig");
    let (_, d) = migrate_ok(&mut src, &mut dst, &qemu, &stream);
    assert_eq!(d["migration"], 1, "{d}");
}

/// (3a) A connection closed because every handshake slot is taken is logged as that:
/// an operator reading "N migrations in progress" while none is would look for the
/// wrong cause.
///
/// `DestinationProxy::handshake` (src/relay/proxy.rs) takes its handshake slot with
/// `slot(&self.handshakes, ...)`, which fails with `Error::Busy`, whose message
/// (src/error.rs) is "busy: {limit} migrations in progress already".
#[test]
fn a_full_handshake_cap_is_not_reported_as_migrations_in_progress() {
    let qemu = FakeQemu::new();
    let pki = Files::write("attack-busy-message");
    let dst = destination(&pki, &qemu, &["--max-handshakes", "1"]);
    // one of the two takes the slot, the other is closed at once
    let _two = [0, 1].map(|_| TcpStream::connect(dst.addr()).unwrap());
    let line = refusal(&dst);
    assert!(line.contains("busy"), "{line}");
    assert!(!line.contains("migrations in progress"), "{line}");
}

/// (3b) An authenticated source that sends its HELLO and part of the stream, then
/// stalls: the destination gives up after `--idle-timeout`, closes its QEMU
/// connection before the stream is complete, reports the failure, and serves the
/// next migration.
///
/// Old design: no idle timeout: the migration (and the destination QEMU) waited
/// forever.
#[test]
fn an_authenticated_peer_that_stalls_mid_stream_is_cut_at_the_idle_timeout() {
    let qemu = FakeQemu::new();
    let pki = Files::write("attack-idle");
    let mut dst = destination(&pki, &qemu, &["--idle-timeout", "2"]);
    let stream = testdata("qemu-10.0-q35-paused.mig");
    // small frames, so that half the stream is several whole frames
    let wire = dedup_stream_with(&stream, 16 << 10);

    let mut tls = tls_connect(&dst.addr(), Some(&PKI.source_a)).unwrap();
    tls.write_all(&wire[..wire.len() / 2]).unwrap();
    tls.flush().unwrap();
    let mut conn = qemu.accept();
    let connected = Instant::now();
    let (got, _) = read_all(&mut conn);
    let cut_after = connected.elapsed();
    eprintln!(
        "QEMU connection closed {cut_after:?} after it was made, {} bytes",
        got.len()
    );
    assert!(!got.is_empty(), "frames before the stall were delivered");
    assert!(got.len() < stream.len() && stream.starts_with(&got));
    assert!(
        cut_after >= Duration::from_millis(1500) && cut_after < Duration::from_secs(15),
        "{cut_after:?}"
    );
    let report = dst.reports(1).remove(0);
    assert_eq!(report["ok"], false, "{report}");
    assert!(
        report["error"].as_str().unwrap().contains("idle"),
        "{report}"
    );
    // the link is closed too
    let mut rest = Vec::new();
    let _ = tls.read_to_end(&mut rest);
    drop(tls);

    let mut src = source(&pki, &dst.addr(), &[]);
    let (_, d) = migrate_ok(&mut src, &mut dst, &qemu, &stream);
    assert_eq!(d["migration"], 2, "{d}");
}

/// Frames of a hostile source, forged from `docs/wire-format.md`: a HELLO naming a
/// page size, a session and a channel, then DATA frames of RAW, FILL or unchanged
/// XBZRLE pages (one block) stored as they are, each with the running digest the destination checks.
/// On a multifd channel (HELLO channel `n > 0`) a page entry
/// stands for the page's bytes alone, and CONTINUE is never set.
struct Forger {
    page_size: usize,
    /// The HELLO's channel: 0 the main channel.
    channel: u16,
    hasher: twox_hash::XxHash3_128,
    /// QEMU bytes the frames stand for so far, and of those not held.
    qemu_bytes: u64,
    released: u64,
    pages: u64,
}

enum Forged<'a> {
    Raw(&'a [u8]),
    Fill(u8),
    /// Page `page` again, unchanged since its last version (`data`): an empty
    /// XBZRLE delta, a page numbered in the seen-before window all the same.
    Unchanged {
        page: u64,
        data: &'a [u8],
    },
}

/// The session the forged main-channel streams name.
const SESSION: [u8; 16] = [0x5e; 16];

impl Forger {
    /// The main channel of migration [`SESSION`]; its HELLO is appended to `hello`.
    fn new(page_size: usize, hello: &mut Vec<u8>) -> Self {
        Self::in_session(page_size, SESSION, 0, hello)
    }

    /// HELLO channel `channel` (0 the main channel, `n` multifd channel `n - 1`) of
    /// migration `session`; its HELLO is appended to `hello`.
    fn in_session(page_size: usize, session: [u8; 16], channel: u16, hello: &mut Vec<u8>) -> Self {
        let mut payload = Vec::new();
        payload.extend_from_slice(b"MGSD");
        payload.extend_from_slice(&migstream::dedup::VERSION.to_be_bytes());
        payload.extend_from_slice(&0u16.to_be_bytes());
        payload.extend_from_slice(&(page_size as u32).to_be_bytes());
        payload.extend_from_slice(&[0; 32]); // no catalog
        payload.extend_from_slice(&session);
        payload.extend_from_slice(&channel.to_be_bytes());
        payload.extend_from_slice(&0u16.to_be_bytes()); // reserved
        hello.push(0x01);
        hello.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        hello.extend_from_slice(&payload);
        let mut hasher = twox_hash::XxHash3_128::new();
        hasher.write(&payload);
        Self {
            page_size,
            channel,
            hasher,
            qemu_bytes: 0,
            released: 0,
            pages: 0,
        }
    }

    /// A DATA frame of these entries, pages at the next page numbers of block `ram0`.
    fn data(&mut self, entries: &[Forged<'_>], hold: bool) -> Vec<u8> {
        const BLOCK: &[u8] = b"ram0";
        let mut batch = Vec::with_capacity(entries.len() * (self.page_size + 16));
        let mut qemu_bytes = 0;
        for entry in entries {
            let (tag, body, number) = match entry {
                Forged::Raw(data) => (0x01, *data, self.pages),
                Forged::Fill(b) => (0x02, std::slice::from_ref(b), self.pages),
                Forged::Unchanged { page, .. } => (0x05, &[][..], *page),
            };
            let first = self.pages == 0;
            batch.push(tag);
            put_varint(&mut batch, number);
            // after the first page: SAME_BLOCK, and on the main channel CONTINUE
            batch.push(match (first, self.channel) {
                (true, _) => 0,
                (false, 0) => 0x03,
                (false, _) => 0x02,
            });
            if first {
                batch.push(BLOCK.len() as u8);
                batch.extend_from_slice(BLOCK);
            }
            put_varint(&mut batch, body.len() as u64);
            batch.extend_from_slice(body);
            // the QEMU bytes the destination rebuilds: on the main channel a PAGE
            // record's header, then the page
            let offset = number * self.page_size as u64;
            let mut header = Vec::new();
            match (first, self.channel) {
                (_, 1..) => {}
                (true, 0) => {
                    header.extend_from_slice(&(offset | 0x08).to_be_bytes());
                    header.push(BLOCK.len() as u8);
                    header.extend_from_slice(BLOCK);
                }
                (false, 0) => header.extend_from_slice(&(offset | 0x08 | 0x20).to_be_bytes()),
            }
            self.hasher.write(&header);
            match entry {
                Forged::Raw(data) | Forged::Unchanged { data, .. } => self.hasher.write(data),
                Forged::Fill(b) => self.hasher.write(&vec![*b; self.page_size]),
            }
            qemu_bytes += (header.len() + self.page_size) as u64;
            self.pages += 1;
        }
        let (codec, flags) = (0u8, u8::from(hold));
        let raw_len = (batch.len() as u32).to_be_bytes();
        self.hasher.write(&[codec, flags]);
        self.hasher.write(&raw_len);
        self.hasher.write(&batch);
        let mut frame = Vec::with_capacity(5 + 22 + batch.len());
        frame.push(0x02);
        frame.extend_from_slice(&((22 + batch.len()) as u32).to_be_bytes());
        frame.extend_from_slice(&[codec, flags]);
        frame.extend_from_slice(&raw_len);
        frame.extend_from_slice(&self.hasher.finish_128().to_be_bytes());
        frame.extend_from_slice(&batch);
        self.qemu_bytes += qemu_bytes;
        if !hold {
            self.released += qemu_bytes;
        }
        frame
    }
}

fn put_varint(dst: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        dst.push(v as u8 | 0x80);
        v >>= 7;
    }
    dst.push(v as u8);
}

/// (4) An authenticated but hostile source names 64 KiB pages and sends what fills
/// every cache the destination keeps for a migration: 4096 distinct pages (the whole
/// 256 MiB seen-before window, and every slot of the 64 MiB XBZRLE cache) in frames
/// of 32 MiB (frame and batch buffers at their limit), then a HOLD frame of 64 MiB
/// of fill pages (the output buffer and the held tail at once), then stalls. The
/// destination's resident memory stays within 600 MiB over idle, and comes back to
/// within 64 MiB of idle once the idle timeout ended the migration.
///
/// Old design: the window was counted in pages (65536 pages of 64 KiB: 4 GiB), and a
/// closed migration's buffers were kept for the next.
#[test]
fn hostile_memory_is_bounded_and_given_back() {
    const PAGE: usize = 64 << 10;
    let _alone = memory_attack();
    let qemu = FakeQemu::new();
    let pki = Files::write("attack-memory");
    // a debug build takes about a second per 32 MiB frame: the idle timeout leaves
    // room for a frame's work without progress on either side
    let mut dst = destination(&pki, &qemu, &["--idle-timeout", "5"]);
    let idle = dst.rss();

    // frames made while earlier ones are sent: the digest costs the test as much
    // as the destination
    let (frames, forged) = sync_channel::<Vec<u8>>(1);
    let released = Arc::new(AtomicU64::new(u64::MAX));
    let producer = {
        let released = released.clone();
        thread::spawn(move || {
            let mut hello = Vec::new();
            let mut forger = Forger::new(PAGE, &mut hello);
            frames.send(hello).unwrap();
            let mut page = support::random_pages(1, PAGE, 0xbad).remove(0);
            // just under max_frame (32 MiB of payload) and max_batch
            let per_frame = 511;
            let mut sent = 0u64;
            while sent < 4096 {
                let n = per_frame.min(4096 - sent);
                let batch: Vec<Vec<u8>> = (sent..sent + n)
                    .map(|i| {
                        page[..8].copy_from_slice(&i.to_le_bytes());
                        page.clone()
                    })
                    .collect();
                let pages: Vec<Forged<'_>> = batch.iter().map(|p| Forged::Raw(p)).collect();
                frames.send(forger.data(&pages, false)).unwrap();
                sent += n;
            }
            released.store(forger.released, Ordering::SeqCst);
            // just under max_held and max_output (64 MiB): held until an END that
            // never comes
            let fill: Vec<Forged<'_>> = (0..1023).map(|i| Forged::Fill(i as u8 | 1)).collect();
            frames.send(forger.data(&fill, true)).unwrap();
            (forger.qemu_bytes, forger.released)
        })
    };

    // the destination QEMU reads whatever it is given
    let received = Arc::new(AtomicU64::new(0));
    let reader = {
        let received = received.clone();
        thread::spawn(move || {
            let mut conn = qemu.accept();
            let mut buf = vec![0u8; 1 << 20];
            loop {
                match conn.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => received.fetch_add(n as u64, Ordering::SeqCst),
                };
            }
            qemu
        })
    };

    // resident memory while the attack goes on
    let sampler = RssSampler::start(dst.child.id());

    let started = Instant::now();
    let mut tls = tls_connect(&dst.addr(), Some(&PKI.source_a)).unwrap();
    for frame in forged {
        if let Err(e) = tls.write_all(&frame) {
            let report = dst.report_within(BOUND);
            panic!("the destination closed the link ({e}): {report:?}");
        }
    }
    tls.flush().unwrap();
    let (qemu_bytes, released_bytes) = producer.join().unwrap();
    assert_eq!(released.load(Ordering::SeqCst), released_bytes);
    eprintln!(
        "hostile stream sent in {:?}: {} MiB of QEMU bytes, {} MiB released",
        started.elapsed(),
        qemu_bytes / MIB,
        released_bytes / MIB
    );

    // the stalled migration ends at the idle timeout
    let report = dst.reports(1).remove(0);
    let stalled_rss = dst.rss();
    let hwm = dst.rss_peak();
    let sampled = sampler.peak();
    assert_eq!(report["ok"], false, "{report}");
    assert!(
        report["error"].as_str().unwrap().contains("idle"),
        "{report}"
    );
    let qemu = reader.join().unwrap();
    assert_eq!(
        received.load(Ordering::SeqCst),
        released_bytes,
        "every frame before the held one reached QEMU, nothing after"
    );

    let after = rss_back_to_idle(&dst, idle);
    eprintln!(
        "destination RSS: idle {} MiB, peak sampled {} MiB, peak (VmHWM) {} MiB, \
         when the failure was reported {} MiB, after close {} MiB",
        idle / MIB,
        sampled / MIB,
        hwm / MIB,
        stalled_rss / MIB,
        after / MIB
    );
    let peak = hwm.max(sampled);
    // the attack did fill the window, the XBZRLE cache and the held tail
    assert!(
        peak >= idle + 300 * MIB,
        "the caches were not filled: {peak}"
    );
    assert!(
        peak <= idle + 600 * MIB,
        "peak {} MiB over idle {} MiB",
        peak / MIB,
        idle / MIB
    );
    drop(tls);

    let mut src = source(&pki, &dst.addr(), &[]);
    let stream = testdata("qemu-7.2-pc-paused.mig");
    migrate_ok(&mut src, &mut dst, &qemu, &stream);
}

/// The peak resident memory of a process, sampled every [`POLL`] on a thread until
/// [`peak`](Self::peak) is asked for.
struct RssSampler {
    stop: Arc<AtomicBool>,
    sampler: thread::JoinHandle<u64>,
}

impl RssSampler {
    fn start(pid: u32) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let sampler = {
            let stop = stop.clone();
            thread::spawn(move || {
                let mut peak = 0;
                while !stop.load(Ordering::SeqCst) {
                    peak = peak.max(status_bytes(pid, "VmRSS:").unwrap_or(0));
                    thread::sleep(POLL);
                }
                peak
            })
        };
        Self { stop, sampler }
    }

    /// Stops sampling: the highest resident memory seen.
    fn peak(self) -> u64 {
        self.stop.store(true, Ordering::SeqCst);
        self.sampler.join().unwrap()
    }
}

/// The resident memory of `dst` once the migration's memory is given back: asserts
/// that it comes back within 64 MiB of `idle` (waiting up to 10 s).
#[track_caller]
fn rss_back_to_idle(dst: &Proxy, idle: u64) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut after = dst.rss();
    while after > idle + 64 * MIB && Instant::now() < deadline {
        thread::sleep(POLL * 10);
        after = dst.rss();
    }
    assert!(
        after <= idle + 64 * MIB,
        "after close {} MiB, idle {} MiB",
        after / MIB,
        idle / MIB
    );
    after
}

/// A size field of `/proc/PID/status`, in bytes.
fn status_bytes(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix(field))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    Some(kib * 1024)
}

/// (5) The destination proxy runs out of file descriptors (`prlimit --nofile=40:40`,
/// 50 idle connections, handshakes capped above that): `accept` fails with EMFILE,
/// the proxy logs it and stays up, and once the connections are gone a real
/// migration goes through.
///
/// Old design: a failed accept ended the proxy's accept loop (and the process).
#[test]
fn file_descriptor_exhaustion_is_survived() {
    let qemu = FakeQemu::new();
    let pki = Files::write("attack-fds");
    let mut dst = Proxy::start_with(
        Command::new("prlimit")
            .arg("--nofile=40:40")
            .arg(proxy_binary())
            .args(destination_args(
                &pki,
                &qemu,
                &["--max-handshakes", "100", "--handshake-timeout", "30"],
            )),
    );
    let fds_at_idle = open_fds(dst.child.id());
    let idle: Vec<TcpStream> = (0..50)
        .map(|_| TcpStream::connect(dst.addr()).unwrap())
        .collect();
    let line = dst.log_line("accept failed", BOUND);
    let fds_full = open_fds(dst.child.id());
    eprintln!("fds at idle {fds_at_idle}, when accept failed {fds_full}: {line}");
    assert!(line.contains("Too many open files"), "{line}");
    assert!(dst.running());
    qemu.assert_unconnected("with every descriptor taken");

    drop(idle);
    let mut src = source(&pki, &dst.addr(), &[]);
    let stream = testdata("qemu-10.0-q35-paused.mig");
    let (_, d) = migrate_ok(&mut src, &mut dst, &qemu, &stream);
    assert_eq!(d["migration"], 1, "{d}");
    assert!(dst.running());
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// What the relay between the two proxies does to the link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tamper {
    /// Pass every byte both ways.
    Nothing,
    /// Once the source has sent its last byte, reset the source's side: the
    /// destination's confirmation never arrives.
    ResetAfterLastByte,
    /// Stop passing the return direction once the stream flows, closing nothing.
    BlackHole,
    /// Flip one byte of the forward direction (inside TLS: the session dies).
    Flip(u64),
}

/// Forward-direction bytes past which the source has its greeting (the TLS
/// handshake is about 1.5 KiB; the source sends its HELLO only once greeted).
const PAST_GREETING: u64 = 8 << 10;

/// A TCP relay between the source proxy and the destination proxy, for one link;
/// TLS passes through it untouched, unless `tamper` says otherwise.
struct Relay {
    port: u16,
    /// Every byte it passed, both directions.
    seen: std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
    /// Dropped to end the relay.
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl Relay {
    fn start(to: String, tamper: Tamper) -> Relay {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        listener.set_nonblocking(true).unwrap();
        let (stop_tx, stop) = tokio::sync::oneshot::channel();
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let tap = seen.clone();
        thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                tokio::select! {
                    _ = relay(listener, &to, tamper, &tap) => {}
                    _ = stop => {}
                }
            });
        });
        Relay {
            port,
            seen,
            _stop: stop_tx,
        }
    }

    fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

async fn relay(
    listener: tokio::net::TcpListener,
    to: &str,
    tamper: Tamper,
    seen: &std::sync::Mutex<Vec<u8>>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (mut src, _) = listener.accept().await.unwrap();
    let mut dst = tokio::net::TcpStream::connect(to).await.unwrap();
    let (mut forwarded, mut fwd_open, mut back_open) = (0u64, true, true);
    let (mut fbuf, mut bbuf) = (vec![0u8; 64 << 10], vec![0u8; 64 << 10]);
    {
        let (mut sr, mut sw) = src.split();
        let (mut dr, mut dw) = dst.split();
        loop {
            tokio::select! {
                n = sr.read(&mut fbuf), if fwd_open => {
                    let n = n.unwrap_or(0);
                    if n == 0 {
                        if tamper == Tamper::ResetAfterLastByte {
                            break;
                        }
                        fwd_open = false;
                        let _ = dw.shutdown().await;
                        continue;
                    }
                    if let Tamper::Flip(at) = tamper {
                        if (forwarded..forwarded + n as u64).contains(&at) {
                            fbuf[(at - forwarded) as usize] ^= 0x40;
                        }
                    }
                    forwarded += n as u64;
                    seen.lock().unwrap().extend_from_slice(&fbuf[..n]);
                    if dw.write_all(&fbuf[..n]).await.is_err() {
                        fwd_open = false;
                    }
                }
                n = dr.read(&mut bbuf), if back_open => {
                    let n = n.unwrap_or(0);
                    let swallow = matches!(tamper, Tamper::ResetAfterLastByte | Tamper::BlackHole)
                        && forwarded > PAST_GREETING;
                    if n == 0 {
                        back_open = false;
                        if !swallow {
                            let _ = sw.shutdown().await;
                        }
                    } else if !swallow && {
                        seen.lock().unwrap().extend_from_slice(&bbuf[..n]);
                        sw.write_all(&bbuf[..n]).await.is_err()
                    } {
                        back_open = false;
                    }
                }
                // both directions over: hold the sockets open until stopped
                () = std::future::pending::<()>(), if !fwd_open && !back_open => {}
            }
        }
    }
    // ResetAfterLastByte: a reset, not a clean close
    socket2::SockRef::from(&src)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    drop(src);
    std::future::pending::<()>().await;
}

/// The proxies of a relayed link: (source, destination, relay, QEMU).
fn relayed(
    test: &str,
    tamper: Tamper,
    source_args: &[&str],
) -> (Proxy, Proxy, Relay, FakeQemu, Files) {
    let qemu = FakeQemu::new();
    let pki = Files::write(test);
    let dst = destination(&pki, &qemu, &[]);
    let relay = Relay::start(dst.addr(), tamper);
    let src = source(&pki, &relay.addr(), source_args);
    (src, dst, relay, qemu, pki)
}

/// (0) What crosses the network between the proxies is TLS: none of the QEMU
/// stream's telling bytes (its magic, a RAM block name, the device description)
/// nor the dedup stream's or the greeting's magic can be read on the link.
///
/// Old design: the link was plain text, every page readable.
#[test]
fn the_link_shows_nothing_in_the_clear() {
    let (src, _dst, relay, qemu, _pki) = relayed("attack-clear", Tamper::Nothing, &[]);
    let stream = testdata("qemu-7.2-pc-paused.mig");
    let got = run_migration(&src, &qemu, &stream);
    assert!(got == stream, "delivered byte-exact through the relay");
    let seen = relay.seen.lock().unwrap().clone();
    assert!(
        seen.len() > 10_000,
        "the relay saw the link: {} bytes",
        seen.len()
    );
    let has = |bytes: &[u8], needle: &[u8]| bytes.windows(needle.len()).any(|w| w == needle);
    for clear in [&b"QEVM"[..], b"pc.ram", b"\"devices\""] {
        assert!(has(&stream, clear), "the QEMU stream has {clear:?}");
        assert!(
            !has(&seen, clear),
            "{:?} in the clear",
            String::from_utf8_lossy(clear)
        );
    }
    // the dedup stream's and the greeting's magics
    for clear in [&b"MGSD"[..], b"MGSR"] {
        assert!(
            !has(&seen, clear),
            "{:?} in the clear",
            String::from_utf8_lossy(clear)
        );
    }
}

/// (6a) The link resets the return direction once the source has sent its last
/// byte: the destination delivered everything, but its confirmation is lost, so
/// the source reports failure (at once, not after a timeout).
///
/// Old design: the source reported success once it had written the stream.
#[test]
fn a_reset_after_the_last_byte_fails_the_source() {
    let (mut src, _dst, _relay, qemu, _pki) =
        relayed("attack-reset", Tamper::ResetAfterLastByte, &[]);
    let stream = testdata("qemu-7.2-pc-paused.mig");
    let started = Instant::now();
    run_migration(&src, &qemu, &stream);
    let report = src.reports(1).remove(0);
    eprintln!("source after {:?}: {report}", started.elapsed());
    assert_eq!(report["ok"], false, "{report}");
    assert!(started.elapsed() < Duration::from_secs(20));
}

/// (6b) The link black-holes the return direction (nothing arrives, nothing closes):
/// with `--idle-timeout 2`, the source reports failure within a bounded time, while
/// the destination, whose confirmation was swallowed, reports success.
///
/// Old design: the source reported success, or waited for the kernel's ~15 min.
#[test]
fn a_black_holed_confirmation_fails_the_source_at_its_idle_timeout() {
    let (mut src, mut dst, _relay, qemu, _pki) = relayed(
        "attack-blackhole",
        Tamper::BlackHole,
        &["--idle-timeout", "2"],
    );
    let stream = testdata("qemu-7.2-pc-paused.mig");
    let started = Instant::now();
    let got = run_migration(&src, &qemu, &stream);
    assert!(got == stream, "the destination delivered the stream");
    let report = src.reports(1).remove(0);
    let took = started.elapsed();
    eprintln!("source after {took:?}: {report}");
    assert_eq!(report["ok"], false, "{report}");
    assert!(
        report["error"].as_str().unwrap().contains("idle"),
        "{report}"
    );
    assert!(took < Duration::from_secs(15), "{took:?}");
    assert_eq!(dst.reports(1)[0]["ok"], true);
}

/// (6c) The destination fails: a byte of the link flipped (TLS dies at the
/// destination), or the destination QEMU closing its socket early. The source
/// reports failure with an error, and QEMU never received a complete stream.
///
/// Old design: the source reported success; a flipped byte could reach QEMU.
#[test]
fn a_failing_destination_fails_the_source() {
    let stream = testdata("qemu-10.0-q35-paused.mig");

    let (mut src, mut dst, _relay, qemu, _pki) = relayed("attack-flip", Tamper::Flip(60_000), &[]);
    let got = run_migration(&src, &qemu, &stream);
    assert!(got.len() < stream.len() && stream.starts_with(&got));
    let report = src.reports(1).remove(0);
    eprintln!("flipped byte: {report}");
    assert_eq!(report["ok"], false, "{report}");
    assert!(report["error"].as_str().unwrap().len() > 5, "{report}");
    assert_eq!(dst.reports(1)[0]["ok"], false);

    // the destination QEMU goes away after 1000 bytes, of a stream larger than the
    // sockets between them hold (64 MiB): its proxy cannot have written it all
    // before, and it fails writing (a small stream could fit, and go through)
    let qemu = FakeQemu::new();
    let pki = Files::write("attack-qemu-gone");
    let mut dst = destination(&pki, &qemu, &[]);
    let mut src = source(&pki, &dst.addr(), &[]);
    let sender = source_qemu(src.port, support::fill_pages_stream(16 << 10));
    let mut conn = qemu.accept();
    let mut first = vec![0u8; 1000];
    conn.read_exact(&mut first).unwrap();
    drop(conn);
    sender.join().unwrap();
    let report = src.reports(1).remove(0);
    eprintln!("QEMU gone: {report}");
    assert_eq!(report["ok"], false, "{report}");
    let error = report["error"].as_str().unwrap();
    assert!(error.starts_with("the destination failed: "), "{report}");
    assert_eq!(dst.reports(1)[0]["ok"], false);
}

/// (7) The template store serves a wrong page (one template overwritten with other
/// bytes on both its owners): the first migration fails at the source, and the
/// destination stops offering its catalog for `--template-cooldown`; QEMU's retry,
/// through the same proxies, goes through without templates, byte-exact.
///
/// Old design: every retry named the catalog again and failed the same way.
#[test]
fn a_retry_after_a_template_store_failure_goes_through_without_templates() {
    use migstream::dht::{Cluster, DhtOptions, layout, push};
    use migstream::page::Fingerprint;
    use migstream::qemu::{QemuDecoder, RamRecord, Record};

    if !redis_server::available("a_retry_after_a_template_store_failure") {
        return;
    }
    let stream = testdata("qemu-10.0-q35-paused.mig");
    let (mut decoder, mut input) = (QemuDecoder::new(), BytesMut::from(&stream[..]));
    let mut pages = Vec::new();
    while let Some(record) = decoder.decode_eof(&mut input).unwrap() {
        if let Record::Ram(RamRecord::Page { data, .. }) = record {
            pages.push(data);
        }
    }
    let catalog = migstream::template::Catalog::from_pages(4096, &pages).unwrap();
    // a page that travels as a template (not one byte value, which travels as FILL)
    let spoiled = pages.iter().find(|p| p.iter().any(|&b| b != p[0])).unwrap();

    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("attack-dht");
    let _ = std::fs::remove_dir_all(&dir);
    let servers = redis_server::RedisServer::start_many(&dir, 3);
    let urls: Vec<String> = servers.iter().map(|s| s.url()).collect();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let cluster = Arc::new(Cluster::redis(&urls, 2, DhtOptions::default()).unwrap());
        push(&cluster, &catalog).await.unwrap();
        let fp = Fingerprint::of(spoiled);
        let wrong = bytes::Bytes::from(spoiled.iter().map(|b| !b).collect::<Vec<u8>>());
        let owners = cluster.owners(&fp);
        assert_eq!(owners.len(), 2);
        for i in owners {
            cluster.nodes()[i]
                .set_many(&[(layout::template_key(&fp), wrong.clone())])
                .await
                .unwrap();
        }
    });
    let catalog_file = dir.join("catalog.cat");
    catalog.save(&catalog_file).unwrap();

    let qemu = FakeQemu::new();
    let pki = Files::write("attack-cooldown");
    let dht = urls.join(",");
    let mut dst = destination(&pki, &qemu, &["--dht", &dht, "--template-cooldown", "60"]);
    let mut src = source(
        &pki,
        &dst.addr(),
        &["--catalog", catalog_file.to_str().unwrap()],
    );

    let got = run_migration(&src, &qemu, &stream);
    assert!(got.len() < stream.len() && stream.starts_with(&got));
    let first = src.reports(1).remove(0);
    eprintln!("first: {first}");
    assert_eq!(first["ok"], false, "{first}");
    let line = dst.log_line("cool-down", BOUND);
    eprintln!("{line}");
    assert_eq!(dst.reports(1)[0]["ok"], false);

    let (second, _) = migrate_ok(&mut src, &mut dst, &qemu, &stream);
    assert_eq!(second["templates"], false, "{second}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// One link connection of an authenticated hostile source (the test CA's
/// `source-a` certificate) that sent a forged HELLO: its frames forged by `forger`,
/// the destination's replies read as the link protocol frames them.
struct HostileLink {
    tls: Tls,
    forger: Forger,
    replies: BytesMut,
    decoder: ReplyDecoder,
}

impl HostileLink {
    /// Opens a link to `addr` and sends the HELLO of channel `channel` (0: the main
    /// channel) of migration `session`.
    fn open(addr: &str, page_size: usize, session: [u8; 16], channel: u16) -> Self {
        let mut tls = tls_connect(addr, Some(&PKI.source_a)).unwrap();
        let mut hello = Vec::new();
        let forger = Forger::in_session(page_size, session, channel, &mut hello);
        tls.write_all(&hello).unwrap();
        tls.flush().unwrap();
        Self {
            tls,
            forger,
            replies: BytesMut::new(),
            decoder: ReplyDecoder::new(),
        }
    }

    /// Sends a forged frame.
    fn send(&mut self, frame: &[u8]) {
        if let Err(e) = self.tls.write_all(frame).and_then(|()| self.tls.flush()) {
            let channel = self.forger.channel;
            let why = self.closed();
            panic!("channel {channel}: the destination closed the link ({e}): {why:?}");
        }
    }

    /// Sends `raw.0` distinct RAW pages (one random page numbered in its first
    /// bytes) in frames of `raw.1`, then `again.0` pages again, unchanged, in frames
    /// of `again.1`: the last `cached` RAW pages in turn (those the XBZRLE cache
    /// holds). Each frame is forged while the one before is sent. Every page takes a
    /// place in the seen-before window.
    fn fill(&mut self, raw: (u64, u64), again: (u64, u64), cached: u64, seed: u64) {
        let page_size = self.forger.page_size;
        let (frames, forged) = sync_channel::<Vec<u8>>(1);
        let Self { tls, forger, .. } = self;
        let sent = thread::scope(|s| {
            s.spawn(move || {
                let page = support::random_pages(1, page_size, seed).remove(0);
                let numbered = |i: u64| {
                    let mut page = page.clone();
                    page[..8].copy_from_slice(&i.to_le_bytes());
                    page
                };
                let (total, mut sent) = (raw.0 + again.0, 0);
                while sent < total {
                    // a frame of either kind, not both
                    let end = match sent < raw.0 {
                        true => raw.0.min(sent + raw.1),
                        false => total.min(sent + again.1),
                    };
                    let pages: Vec<(u64, Vec<u8>)> = (sent..end)
                        .map(|i| match i < raw.0 {
                            true => (i, numbered(i)),
                            false => {
                                let page = raw.0 - cached + (i - raw.0) % cached;
                                (page, numbered(page))
                            }
                        })
                        .collect();
                    let entries: Vec<Forged<'_>> = (sent..end)
                        .zip(&pages)
                        .map(|(i, (page, data))| match i < raw.0 {
                            true => Forged::Raw(data),
                            false => Forged::Unchanged { page: *page, data },
                        })
                        .collect();
                    // the sender gone (the link failed): stop
                    if frames.send(forger.data(&entries, false)).is_err() {
                        return;
                    }
                    sent = end;
                }
            });
            forged
                .into_iter()
                .try_for_each(|frame| tls.write_all(&frame).and_then(|()| tls.flush()))
        });
        if let Err(e) = sent {
            let channel = self.forger.channel;
            let why = self.closed();
            panic!("channel {channel}: the destination closed the link ({e}): {why:?}");
        }
    }

    /// The destination's next reply; `None` once it closed the link. Panics if
    /// nothing comes within [`BOUND`].
    fn reply(&mut self) -> Option<Reply> {
        let mut buf = vec![0u8; 16 << 10];
        loop {
            if let Some(reply) = self.decoder.decode(&mut self.replies).unwrap() {
                return Some(reply);
            }
            match self.tls.read(&mut buf) {
                Ok(0) => return None,
                Ok(n) => self.replies.extend_from_slice(&buf[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    panic!("channel {}: no reply within {BOUND:?}", self.forger.channel)
                }
                // closed without TLS's close_notify, or reset
                Err(_) => return None,
            }
        }
    }

    /// The FAILED reply's reason, after which the destination closes the link.
    fn failed(&mut self) -> String {
        let reason = loop {
            match self.reply() {
                Some(Reply::Failed { reason }) => break reason,
                Some(Reply::Done { .. }) => panic!("DONE for a forged stream"),
                None => panic!("the link closed without a verdict"),
                Some(_) => {}
            }
        };
        assert!(self.reply().is_none(), "nothing follows FAILED");
        reason
    }

    /// Waits for the destination to acknowledge every QEMU byte forged so far
    /// (written to its QEMU, or held).
    fn acked(&mut self) {
        let wanted = self.forger.qemu_bytes;
        loop {
            match self.reply() {
                Some(Reply::Ack { qemu_bytes }) if qemu_bytes >= wanted => return,
                Some(Reply::Failed { reason }) => panic!("FAILED: {reason}"),
                None => panic!("the link closed with {wanted} QEMU bytes forged"),
                Some(_) => {}
            }
        }
    }

    /// Waits for the destination to close the link, within [`BOUND`]; returns its
    /// FAILED reason if it sent one.
    fn closed(&mut self) -> Option<String> {
        let mut failed = None;
        while let Some(reply) = self.reply() {
            if let Reply::Failed { reason } = reply {
                failed = Some(reason);
            }
        }
        failed
    }
}

/// (8) A multifd channel's link whose migration has no main channel at the
/// destination (none in progress, or only another session's) waits for it in its
/// handshake slot for the handshake timeout, then is refused with FAILED naming the
/// main channel: the destination QEMU is never connected for it, and the other
/// migration goes on.
#[test]
fn a_channel_without_its_main_channel_never_reaches_qemu() {
    let qemu = FakeQemu::new();
    let pki = Files::write("attack-lone-channel");
    let timeout = Duration::from_secs(2);
    let mut dst = destination(&pki, &qemu, &["--handshake-timeout", "2"]);
    let lone_session = [0xa1; 16];

    // no migration in progress
    let started = Instant::now();
    let mut lone = HostileLink::open(&dst.addr(), 4096, lone_session, 1);
    let reason = lone.failed();
    let after = started.elapsed();
    eprintln!("lone channel refused after {after:?}: {reason}");
    assert!(reason.contains("main channel"), "{reason}");
    assert!(after >= timeout && after < BOUND, "{after:?}");
    let line = refusal(&dst);
    assert!(line.contains("main channel"), "{line}");
    qemu.assert_unconnected("for a lone channel");

    // another migration's main channel is in progress
    let mut main = HostileLink::open(&dst.addr(), 4096, [0xb2; 16], 0);
    let mut main_qemu = qemu.accept();
    let started = Instant::now();
    let mut stranger = HostileLink::open(&dst.addr(), 4096, lone_session, 1);
    let reason = stranger.failed();
    let after = started.elapsed();
    eprintln!("another session's channel refused after {after:?}: {reason}");
    assert!(reason.contains("main channel"), "{reason}");
    assert!(after >= timeout && after < BOUND, "{after:?}");
    qemu.assert_unconnected("for another session's channel");

    // the migration in progress is untouched: its next frame reaches its QEMU
    let page = support::random_pages(1, 4096, 0x1a).remove(0);
    let frame = main.forger.data(&[Forged::Raw(&page)], false);
    main.send(&frame);
    let mut got = vec![0u8; main.forger.released as usize];
    main_qemu.read_exact(&mut got).unwrap();
    assert!(
        got.ends_with(&page),
        "the page reached the main channel's QEMU"
    );
    assert!(dst.report_within(Duration::ZERO).is_none());
    assert!(dst.running());
}

/// The main channel of migration `session` and multifd channels `1..=channels` at
/// the destination at `dst`, each with its QEMU connection accepted (the main
/// channel's first).
/// A frame of one raw page (drawn from `seed`) on `part`'s link reaches its QEMU
/// connection: the page alone, as on a multifd channel.
fn page_reaches_its_qemu((link, qemu): &mut (HostileLink, TcpStream), seed: u64) {
    let page = support::random_pages(1, 4096, seed).remove(0);
    let frame = link.forger.data(&[Forged::Raw(&page)], false);
    link.send(&frame);
    let mut got = vec![0u8; 4096];
    qemu.read_exact(&mut got).unwrap();
    assert!(got == page, "the page, alone");
}

/// The source drops the main link of `parts` (the first): the destination reports
/// the migration failed and closes every channel's link and QEMU connection. What
/// each channel's QEMU connection received after this, in order.
fn source_gives_up(dst: &mut Proxy, mut parts: Vec<(HostileLink, TcpStream)>) -> Vec<Vec<u8>> {
    let (main, _) = parts.remove(0);
    drop(main);
    let report = dst.reports(1).remove(0);
    assert_eq!(report["ok"], false, "{report}");
    let rest = parts.into_iter().map(|(mut link, mut conn)| {
        link.closed();
        read_all(&mut conn).0
    });
    rest.collect()
}

fn hostile_migration(
    dst: &Proxy,
    qemu: &FakeQemu,
    session: [u8; 16],
    channels: u16,
) -> Vec<(HostileLink, TcpStream)> {
    let main = HostileLink::open(&dst.addr(), 4096, session, 0);
    let mut parts = vec![(main, qemu.accept())];
    for n in 1..=channels {
        let channel = HostileLink::open(&dst.addr(), 4096, session, n);
        parts.push((channel, qemu.accept()));
    }
    parts
}

/// (9) A migration takes at most `--max-channels` multifd channels: with 2, a third
/// channel's link is refused with FAILED naming the limit, and the destination QEMU
/// gets no connection for it.
#[test]
fn a_channel_beyond_max_channels_is_refused() {
    let qemu = FakeQemu::new();
    let pki = Files::write("attack-max-channels");
    let mut dst = destination(&pki, &qemu, &["--max-channels", "2"]);
    let session = [0xc3; 16];
    let mut parts = hostile_migration(&dst, &qemu, session, 2);

    let mut third = HostileLink::open(&dst.addr(), 4096, session, 3);
    let reason = third.failed();
    eprintln!("a third channel: {reason}");
    assert!(
        reason.contains("multifd channels") && reason.contains(" 2 "),
        "{reason}"
    );
    let line = refusal(&dst);
    assert!(line.contains("multifd channels"), "{line}");
    qemu.assert_unconnected("for a channel beyond --max-channels");

    // the migration's own channels go on: a frame of channel 2 reaches its QEMU
    page_reaches_its_qemu(&mut parts[2], 0x2b);

    // the source goes away: the migration fails, every QEMU connection is closed
    source_gives_up(&mut dst, parts);
    qemu.assert_unconnected("after the migration");
    assert!(dst.running());
}

/// (10) A multifd channel id twice in one migration (the same HELLO channel on two
/// links of one session): the second link is refused with FAILED naming the
/// channel, and the destination QEMU gets no connection for it; its frames reach
/// no QEMU connection.
#[test]
fn a_channel_id_repeated_in_one_migration_is_refused() {
    let qemu = FakeQemu::new();
    let pki = Files::write("attack-repeated-channel");
    let mut dst = destination(&pki, &qemu, &[]);
    let session = [0xd4; 16];
    let mut parts = hostile_migration(&dst, &qemu, session, 1);

    let mut again = HostileLink::open(&dst.addr(), 4096, session, 1);
    let page = support::random_pages(1, 4096, 0x3c).remove(0);
    let frame = again.forger.data(&[Forged::Raw(&page)], false);
    // the refusal may close the link before these bytes arrive
    let _ = again.tls.write_all(&frame);
    let reason = again.failed();
    eprintln!("channel 1 again: {reason}");
    assert!(
        reason.contains("channel 0 joined this migration already"),
        "{reason}"
    );
    let line = refusal(&dst);
    assert!(line.contains("joined this migration already"), "{line}");
    qemu.assert_unconnected("for a repeated channel id");

    // what the first channel 0 link sends reaches its QEMU connection, and nothing else
    page_reaches_its_qemu(&mut parts[1], 0x4d);

    // the source gives up: the migration fails, every QEMU connection closes with
    // nothing more than it was sent
    for rest in source_gives_up(&mut dst, parts) {
        assert!(rest.is_empty(), "{} more bytes", rest.len());
    }
    qemu.assert_unconnected("after the migration");
    assert!(dst.running());
}

/// (11) Hostile memory with multifd channels: an authenticated source names 64 KiB
/// pages and opens a migration's main channel and `--max-channels` (8) multifd
/// channels, link after link, each filling what the destination keeps for it, then
/// stalls. The main channel: its XBZRLE cache (1024 RAW pages in frames of 32 MiB,
/// max_frame and max_batch), the rest of its 256 MiB seen-before window (3072 pages
/// again as empty XBZRLE deltas, frames of 64 MiB of output), then a HOLD frame of
/// 64 MiB of fill pages (516 MiB measured alone, in (4)). Each channel: a RAW frame
/// of 383 pages (near its 24 MiB frame and batch caps) filling its 16 MiB XBZRLE
/// cache, then 641 pages again in frames of 24 MiB of output: its 64 MiB window.
/// (Unchanged pages cost the link nothing; every QEMU byte still costs both ends a
/// digest, about 830 MiB in all: a minute in a debug build.) The destination's
/// resident memory, everything held at once, stays within what
/// `docs/wire-format.md` bounds (600 MiB for the main channel as in (4), 152 MiB
/// per channel); once the main channel's link goes, the destination fails the
/// migration, closes the channels' links, and gives the memory back.
#[test]
fn hostile_channels_memory_is_bounded_and_given_back() {
    const PAGE: usize = 64 << 10;
    const CHANNELS: u16 = 8;
    let _alone = memory_attack();
    let qemu = FakeQemu::new();
    let pki = Files::write("attack-channel-memory");
    // links stall while others are still sent: the idle timeout must not end this
    const IDLE: Duration = Duration::from_secs(600);
    let mut dst = destination(&pki, &qemu, &["--idle-timeout", "600"]);
    let idle = dst.rss();
    let session = [0xe5; 16];

    // the destination QEMU: each of the migration's connections drained, its bytes
    // counted until the proxy closes it, and all of them as they come
    let drained = Arc::new(AtomicU64::new(0));
    let all = Arc::clone(&drained);
    let drains = thread::spawn(move || {
        let conns: Vec<_> = (0..=CHANNELS)
            .map(|_| {
                let mut conn = qemu.accept();
                // idle while the other links are filled
                conn.set_read_timeout(Some(IDLE)).unwrap();
                let all = Arc::clone(&all);
                thread::spawn(move || {
                    let (mut total, mut buf) = (0u64, vec![0u8; 1 << 20]);
                    while let Ok(n @ 1..) = conn.read(&mut buf) {
                        total += n as u64;
                        all.fetch_add(n as u64, Ordering::Relaxed);
                    }
                    total
                })
            })
            .collect();
        (qemu, conns)
    });

    // resident memory while the attack goes on
    let sampler = RssSampler::start(dst.child.id());

    // the main channel and every channel join; then link after link sends what
    // fills its part, waits until the destination acknowledged all of it
    // (restored, and written to QEMU or held), and stalls
    let started = Instant::now();
    let mut links: Vec<HostileLink> = (0..=CHANNELS)
        .map(|channel| HostileLink::open(&dst.addr(), PAGE, session, channel))
        .collect();
    for (link, channel) in links.iter_mut().zip(0u16..) {
        let begun = Instant::now();
        match channel {
            0 => {
                // RAW frames of 32 MiB (max_frame, max_batch) fill the 64 MiB XBZRLE
                // cache, then frames of 1023 unchanged pages (64 MiB of output,
                // max_output) the rest of the 256 MiB window
                link.fill((1024, 511), (3072, 1023), 1024, 0xbad);
                // just under max_held and max_output (64 MiB): held until an END
                // that never comes
                let fill: Vec<Forged<'_>> = (0..1023).map(|i| Forged::Fill(i as u8 | 1)).collect();
                let frame = link.forger.data(&fill, true);
                link.send(&frame);
            }
            // a RAW frame near the 24 MiB caps of frame and batch fills the 16 MiB
            // XBZRLE cache, then frames of as many unchanged pages (24 MiB of output)
            // the rest of the 64 MiB window
            _ => link.fill((383, 383), (641, 383), 256, 0xbad + u64::from(channel)),
        }
        link.acked();
        eprintln!(
            "link {channel}: {} MiB of QEMU bytes acknowledged in {:?}",
            link.forger.qemu_bytes / MIB,
            begun.elapsed()
        );
    }
    let filled = started.elapsed();
    let stalled_rss = dst.rss();
    let hwm = dst.rss_peak();
    let forged: u64 = links.iter().map(|l| l.forger.qemu_bytes).sum();
    eprintln!(
        "{} links filled in {filled:?}: {} MiB of QEMU bytes",
        links.len(),
        forged / MIB
    );

    // what a link's acknowledgement counts (verified) reaches QEMU a moment later:
    // written before the main channel's link goes, so the failure cuts nothing
    let released = links[0].forger.released;
    let channels: u64 = links[1..].iter().map(|l| l.forger.qemu_bytes).sum();
    let deadline = Instant::now() + BOUND;
    while drained.load(Ordering::Relaxed) < released + channels {
        assert!(
            Instant::now() < deadline,
            "acknowledged bytes not written in {BOUND:?}"
        );
        thread::sleep(POLL);
    }

    // the main channel's link goes: the migration fails, and with it every channel
    let main = links.remove(0);
    drop(main);
    let report = dst.reports(1).remove(0);
    eprintln!("{report}");
    assert_eq!(report["ok"], false, "{report}");
    for link in &mut links {
        link.closed();
    }
    let (qemu, conns) = drains.join().unwrap();
    let mut delivered: Vec<u64> = conns.into_iter().map(|c| c.join().unwrap()).collect();
    let mut expected: Vec<u64> = links.iter().map(|l| l.forger.qemu_bytes).collect();
    expected.push(released);
    delivered.sort_unstable();
    expected.sort_unstable();
    assert_eq!(
        delivered, expected,
        "each QEMU connection got its link's released bytes, nothing held"
    );
    qemu.assert_unconnected("after the migration");

    let after = rss_back_to_idle(&dst, idle);
    let sampled = sampler.peak();
    let peak = hwm.max(sampled);
    eprintln!(
        "destination RSS: idle {} MiB, peak sampled {} MiB, peak (VmHWM) {} MiB, \
         all links stalled {} MiB, after close {} MiB",
        idle / MIB,
        sampled / MIB,
        hwm / MIB,
        stalled_rss / MIB,
        after / MIB
    );
    let channels = u64::from(CHANNELS);
    // every page was restored: the caches, windows and frame buffers were filled
    assert_eq!(report["pages"]["raw"], 1024 + channels * 383, "{report}");
    assert_eq!(report["pages"]["xbzrle"], 3072 + channels * 641, "{report}");
    assert!(
        stalled_rss >= idle + (400 + channels * 120) * MIB,
        "the caches were not filled: {} MiB",
        stalled_rss / MIB
    );
    let bound = idle + (600 + channels * 152) * MIB;
    assert!(
        peak <= bound,
        "peak {} MiB over idle {} MiB, bound {} MiB",
        peak / MIB,
        idle / MIB,
        bound / MIB
    );
    drop(links);

    let mut src = source(&pki, &dst.addr(), &[]);
    let stream = testdata("qemu-7.2-pc-paused.mig");
    migrate_ok(&mut src, &mut dst, &qemu, &stream);
}
