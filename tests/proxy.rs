//! The proxy example as an operator runs it: two processes over loopback TCP serving
//! several migrations at once, each delivered byte-exact or failed on both sides.
//!
//! Uses the `proxy` example binary that `cargo test` builds next to the tests; the
//! proxies link over mutual TLS with certificates made in process.

mod support;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::thread;
use std::time::Duration;

use support::pki::Files;
use support::proxy::Proxy;

fn testdata(name: &str) -> Vec<u8> {
    std::fs::read(format!("{}/testdata/{name}", env!("CARGO_MANIFEST_DIR"))).unwrap()
}

/// A destination proxy (to the fake QEMU at `to`) and a source proxy linked to it
/// over mutual TLS, with these extra arguments each.
fn proxies(
    pki: &Files,
    to: &str,
    source_args: &[&str],
    destination_args: &[&str],
) -> (Proxy, Proxy) {
    let destination = Proxy::start(
        &[
            &["destination", "--to", to][..],
            &pki.destination_args()
                .iter()
                .map(String::as_str)
                .collect::<Vec<_>>(),
            destination_args,
        ]
        .concat(),
    );
    let source = Proxy::start(
        &[
            &["source", "--to", &destination.addr()][..],
            &pki.source_args("source-a")
                .iter()
                .map(String::as_str)
                .collect::<Vec<_>>(),
            source_args,
        ]
        .concat(),
    );
    (source, destination)
}

/// A fake QEMU that sends `stream`, then reads its return path to the end.
fn source_qemu(port: u16, stream: Vec<u8>, cut_after: Option<usize>) -> thread::JoinHandle<()> {
    thread::spawn(move || {
        let mut conn = TcpStream::connect(("127.0.0.1", port)).unwrap();
        conn.set_read_timeout(Some(Duration::from_secs(60)))
            .unwrap();
        let end = cut_after.unwrap_or(stream.len());
        // a write may fail once the proxies gave up on a cut stream
        let _ = conn.write_all(&stream[..end]);
        let _ = conn.shutdown(Shutdown::Write);
        let _ = conn.read_to_end(&mut Vec::new());
    })
}

#[test]
fn serves_several_migrations_at_once_and_fails_only_the_broken_one() {
    let streams = [
        testdata("qemu-7.2-pc-paused.mig"),
        testdata("qemu-10.0-q35-paused.mig"),
        testdata("qemu-7.2-pc-paused.mig"),
    ];
    // the fake destination QEMU: one connection per migration, answers on the return path
    let qemu = TcpListener::bind("127.0.0.1:0").unwrap();
    let qemu_port = qemu.local_addr().unwrap().port();
    let pki = Files::write("several");
    // several migrations through one source proxy: none of them multifd
    let (mut source, mut destination) = proxies(
        &pki,
        &format!("127.0.0.1:{qemu_port}"),
        &["--max-migrations", "4"],
        &["--max-migrations", "4"],
    );
    let received = thread::spawn(move || {
        let mut all = Vec::new();
        for _ in 0..3 {
            let (mut conn, _) = qemu.accept().unwrap();
            all.push(thread::spawn(move || {
                conn.set_read_timeout(Some(Duration::from_secs(60)))
                    .unwrap();
                let mut got = Vec::new();
                let complete = conn.read_to_end(&mut got).is_ok();
                let _ = conn.write_all(b"rp");
                (got, complete)
            }));
        }
        let received: Vec<_> = all.into_iter().map(|t| t.join().unwrap()).collect();
        (received, qemu)
    });
    let mut senders: Vec<_> = streams
        .iter()
        .map(|s| source_qemu(source.port, s.clone(), None))
        .collect();
    // a fourth migration whose source QEMU goes away before its stream's
    // configuration: the destination proxy never hears a HELLO, so its QEMU is never
    // connected
    senders.push(source_qemu(source.port, streams[0].clone(), Some(1_000)));
    senders.into_iter().for_each(|s| s.join().unwrap());

    let (received, qemu) = received.join().unwrap();
    for (got, complete) in &received {
        assert!(*complete && streams.contains(got), "delivered byte-exact");
    }
    let mut reports = source.reports(4);
    reports.sort_by_key(|r| r["ok"] == true);
    let failed = &reports[0];
    assert_eq!(failed["ok"], false, "{reports:?}");
    assert!(failed["error"].as_str().unwrap().len() > 5, "{failed}");
    for r in destination.reports(3).iter().chain(&reports[1..]) {
        assert_eq!(r["ok"], true, "{r}");
        let (wire, qemu) = (r["wire_bytes"].as_u64(), r["qemu_bytes"].as_u64());
        assert!(wire.unwrap() < qemu.unwrap(), "{r}");
    }
    // the cut one was refused before QEMU, and not counted as a migration
    destination.log_line("refused", Duration::from_secs(30));
    qemu.set_nonblocking(true).unwrap();
    assert!(qemu.accept().is_err(), "no fourth QEMU connection");
}

/// Starts a destination and a source proxy with these extra arguments, migrates
/// `stream` through them, checks that it arrived byte-exact and returns the proxies
/// (source first) for their reports.
fn migrate_once(
    source_args: &[&str],
    destination_args: &[&str],
    stream: Vec<u8>,
) -> (Proxy, Proxy) {
    let qemu = TcpListener::bind("127.0.0.1:0").unwrap();
    let to_qemu = format!("127.0.0.1:{}", qemu.local_addr().unwrap().port());
    let pki = Files::write("once");
    let (source, destination) = proxies(&pki, &to_qemu, source_args, destination_args);
    let sender = source_qemu(source.port, stream.clone(), None);
    let (mut conn, _) = qemu.accept().unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let mut got = Vec::new();
    conn.read_to_end(&mut got).unwrap();
    drop(conn);
    sender.join().unwrap();
    assert!(got == stream, "delivered byte-exact");
    (source, destination)
}

/// `--hold-catalog`: the source confirms template hits by comparing bytes with the
/// catalog it holds; the destination restores them from its own copy of the file.
#[test]
fn a_source_holding_the_catalog_sends_template_references() {
    use migstream::qemu::{QemuDecoder, RamRecord, Record};
    let stream = testdata("qemu-10.0-q35-paused.mig");
    let (mut decoder, mut input) = (QemuDecoder::new(), bytes::BytesMut::from(&stream[..]));
    let mut pages = Vec::new();
    while let Some(record) = decoder.decode_eof(&mut input).unwrap() {
        if let Record::Ram(RamRecord::Page { data, .. }) = record {
            pages.push(data);
        }
    }
    let catalog = migstream::template::Catalog::from_pages(4096, &pages).unwrap();
    let path = std::env::temp_dir().join(format!("migstream-proxy-{}.cat", std::process::id()));
    catalog.save(&path).unwrap();
    let path_arg = path.to_str().unwrap();

    let (mut source, mut destination) = migrate_once(
        &["--catalog", path_arg, "--hold-catalog"],
        &["--catalog", path_arg],
        stream,
    );
    std::fs::remove_file(&path).unwrap();
    let report = &source.reports(1)[0];
    assert_eq!(report["templates"], true, "{report}");
    let templates = report["pages"]["template"].as_u64().unwrap();
    assert!(templates > 0 && templates <= pages.len() as u64, "{report}");
    assert_eq!(destination.reports(1)[0]["ok"], true);
}

/// `--hold-seen`: the source keeps its seen-before window's pages and confirms a
/// repeat by comparing bytes; the destination restores the references as usual.
#[test]
fn a_source_holding_its_seen_pages_sends_references_for_repeats() {
    use migstream::qemu::{QemuDecoder, QemuEncoder, RamRecord, Record};
    // the paused stream, with every page replaced by one of 8 distinct pages
    let original = testdata("qemu-10.0-q35-paused.mig");
    let (mut decoder, mut input) = (QemuDecoder::new(), bytes::BytesMut::from(&original[..]));
    let (mut encoder, mut stream) = (QemuEncoder::new(), bytes::BytesMut::new());
    let mut n = 0u8;
    while let Some(mut record) = decoder.decode_eof(&mut input).unwrap() {
        if let Record::Ram(RamRecord::Page { data, .. }) = &mut record {
            n = n.wrapping_add(1);
            *data = bytes::Bytes::from([n % 8 + 1, 0].repeat(2048));
        }
        encoder.encode(&record, &mut stream).unwrap();
    }
    let (mut source, mut destination) = migrate_once(&["--hold-seen"], &[], stream.to_vec());
    let report = &source.reports(1)[0];
    let seen = report["pages"]["seen"].as_u64().unwrap();
    assert!(seen > 0, "{report}");
    assert_eq!(destination.reports(1)[0]["ok"], true);
}
