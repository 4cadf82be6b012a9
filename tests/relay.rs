//! The two ends of a dedup link (`migstream::relay`): byte-exact delivery, the
//! return path, the catalog handshake, waiting resolvers, and failures that close
//! the link before the destination QEMU sees a complete stream.

mod support;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use bytes::BytesMut;
use migstream::ErrorKind;
use migstream::dedup::{DedupDecoder, DedupEncoder, Resolvers};
use migstream::dedup::{Reply, ReplyDecoder};
use migstream::qemu::{QemuDecoder, RamRecord, Record};
use migstream::relay::{self, DestinationConfig, Progress, Report, SourceConfig, Timeouts};
use migstream::resolve::{Fetch, PageAt, PageOut, Restore, TemplateRestore, tag};
use migstream::template::{Catalog, TemplateIndex};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt, DuplexStream};

fn testdata(name: &str) -> Vec<u8> {
    std::fs::read(format!("{}/testdata/{name}", env!("CARGO_MANIFEST_DIR"))).unwrap()
}

/// What the destination QEMU's return path says in these tests.
const RETURN_PATH: &[u8] = b"return path bytes from the destination QEMU";

/// Both QEMUs' outcomes and both ends' outcomes of one migration.
struct Run {
    source: migstream::Result<Report>,
    destination: migstream::Result<Report>,
    /// What the destination QEMU received.
    delivered: Vec<u8>,
    /// What the source QEMU received on its return path.
    returned: Vec<u8>,
}

/// Migrates `qemu` from a fake source QEMU to a fake destination QEMU through the two
/// ends of a link; `tamper` sits on the link between them.
async fn migrate<F, T>(
    qemu: &[u8],
    source: SourceConfig,
    destination: DestinationConfig,
    tamper: F,
) -> Run
where
    F: FnOnce(DuplexStream, DuplexStream) -> T,
    T: Future<Output = ()> + Send + 'static,
{
    let (src_qemu, src_qemu_proxy) = tokio::io::duplex(64 << 10);
    let (dst_qemu_proxy, dst_qemu) = tokio::io::duplex(64 << 10);
    let (src_link, link_a) = tokio::io::duplex(64 << 10);
    let (link_b, dst_link) = tokio::io::duplex(64 << 10);
    let middle = tokio::spawn(tamper(link_a, link_b));
    let stream = qemu.to_vec();
    let source_qemu = tokio::spawn(async move {
        let (mut read, mut write) = tokio::io::split(src_qemu);
        // the writes fail once a broken link closes this side
        let (_, returned) = tokio::join!(
            async {
                let _ = write.write_all(&stream).await;
                let _ = write.shutdown().await;
            },
            read_all(&mut read)
        );
        returned
    });
    let destination_qemu = tokio::spawn(async move {
        let (mut read, mut write) = tokio::io::split(dst_qemu);
        let delivered = read_all(&mut read).await;
        // like QEMU, it answers on the return path once the stream is loaded
        let _ = write.write_all(RETURN_PATH).await;
        let _ = write.shutdown().await;
        delivered
    });
    let (progress_a, progress_b) = (Progress::default(), Progress::default());
    let (source, destination) = tokio::join!(
        relay::source(
            tokio::io::split(src_qemu_proxy),
            tokio::io::split(src_link),
            &source,
            &progress_a,
        ),
        relay::destination(
            tokio::io::split(dst_link),
            tokio::io::split(dst_qemu_proxy),
            &destination,
            &progress_b,
        ),
    );
    middle.abort();
    Run {
        source,
        destination,
        delivered: destination_qemu.await.unwrap(),
        returned: source_qemu.await.unwrap(),
    }
}

/// Reads to EOF or the first error.
async fn read_all(r: &mut (impl AsyncRead + Unpin)) -> Vec<u8> {
    let mut all = Vec::new();
    let _ = r.read_to_end(&mut all).await;
    all
}

/// A link that passes bytes unchanged both ways.
async fn wire(a: DuplexStream, b: DuplexStream) {
    tamper_at(a, b, u64::MAX).await
}

/// A link that flips one byte of the dedup stream, at offset `at`.
async fn tamper_at(a: DuplexStream, b: DuplexStream, at: u64) {
    let ((mut a_read, mut a_write), (mut b_read, mut b_write)) =
        (tokio::io::split(a), tokio::io::split(b));
    let forward = async {
        let (mut buf, mut seen) = (vec![0; 8192], 0u64);
        loop {
            let n = match a_read.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            if (seen..seen + n as u64).contains(&at) {
                buf[(at - seen) as usize] ^= 0x40;
            }
            seen += n as u64;
            if b_write.write_all(&buf[..n]).await.is_err() {
                break;
            }
        }
        let _ = b_write.shutdown().await;
    };
    let back = async {
        let _ = tokio::io::copy(&mut b_read, &mut a_write).await;
        let _ = a_write.shutdown().await;
    };
    tokio::join!(forward, back);
}

#[tokio::test]
async fn delivers_the_exact_bytes_and_passes_the_return_path() {
    for name in ["qemu-7.2-pc-paused.mig", "qemu-10.0-q35-paused.mig"] {
        let qemu = testdata(name);
        let run = migrate(
            &qemu,
            SourceConfig::default(),
            DestinationConfig::default(),
            wire,
        )
        .await;
        let (sent, received) = (run.source.unwrap(), run.destination.unwrap());
        assert!(
            run.delivered == qemu,
            "{name}: destination QEMU got other bytes"
        );
        assert_eq!(run.returned, RETURN_PATH);
        assert_eq!(sent.stats.qemu_bytes, qemu.len() as u64);
        assert_eq!(sent.stats.wire_bytes, received.stats.wire_bytes);
        assert!(
            sent.stats.wire_bytes < qemu.len() as u64,
            "{name}: no compression?"
        );
        assert!(!sent.templates && !received.templates);
    }
}

/// A catalog of the stream's own non-zero pages (so every one is a template).
fn catalog_of(qemu: &[u8]) -> Catalog {
    let pages: Vec<Vec<u8>> = support::decode(qemu, 1 << 20)
        .into_iter()
        .filter_map(|r| match r {
            Record::Ram(RamRecord::Page { data, .. }) if data.iter().any(|&b| b != 0) => {
                Some(data.to_vec())
            }
            _ => None,
        })
        .collect();
    Catalog::from_pages(4096, &pages).unwrap()
}

#[tokio::test]
async fn templates_are_used_only_when_both_ends_hold_the_catalog() {
    let qemu = testdata("qemu-10.0-q35-paused.mig");
    let catalog = Arc::new(catalog_of(&qemu));
    let other = Arc::new(Catalog::from_pages(4096, [[7u8; 4096]]).unwrap());
    let source = || {
        SourceConfig::default().with_resolvers(
            Resolvers::default().with_templates(Some(Arc::new(TemplateIndex::new(&catalog)))),
        )
    };
    let holding = |c: &Arc<Catalog>| {
        DestinationConfig::default().with_templates(Arc::new(TemplateRestore::new(c.clone())))
    };
    for (destination, expect_templates) in [
        (holding(&catalog), true),
        (holding(&other), false),
        (DestinationConfig::default(), false),
    ] {
        let run = migrate(&qemu, source(), destination, wire).await;
        let (sent, received) = (run.source.unwrap(), run.destination.unwrap());
        assert!(run.delivered == qemu);
        assert_eq!(sent.templates, expect_templates);
        assert_eq!(received.templates, expect_templates);
        let templated = sent.stats.pages(tag::TEMPLATE);
        assert_eq!(
            templated > 0,
            expect_templates,
            "{templated} template pages"
        );
    }
}

#[tokio::test]
async fn a_flipped_byte_on_the_link_fails_before_the_stream_is_complete() {
    let qemu = testdata("qemu-7.2-pc-paused.mig");
    let clean = migrate(
        &qemu,
        SourceConfig::default(),
        DestinationConfig::default(),
        wire,
    )
    .await;
    let wire_len = clean.source.unwrap().stats.wire_bytes;
    // the greeting's and HELLO's first bytes, the middle, the END frame's last byte
    for at in [0, 3, 50, wire_len / 2, wire_len - 1] {
        let run = migrate(
            &qemu,
            SourceConfig::default(),
            DestinationConfig::default(),
            move |a, b| tamper_at(a, b, at),
        )
        .await;
        assert!(run.destination.is_err(), "flip at {at} not detected");
        let err = run
            .source
            .expect_err("the source reports the destination's failure");
        // and says why: the destination's own error, not a broken pipe
        assert_eq!(err.kind(), ErrorKind::Remote, "flip at {at}: {err}");
        assert!(
            run.delivered.len() < qemu.len() && qemu.starts_with(&run.delivered),
            "flip at {at}: the destination QEMU got {} bytes, not a strict prefix",
            run.delivered.len()
        );
    }
}

#[tokio::test]
async fn the_source_fails_when_the_destination_goes_away() {
    let qemu = testdata("qemu-7.2-pc-paused.mig");
    // the destination end greets, then the link breaks
    let run = migrate(
        &qemu,
        SourceConfig::default(),
        DestinationConfig::default(),
        |a, b| async move {
            let (mut a_read, mut a_write) = tokio::io::split(a);
            let (mut b_read, _b_write) = tokio::io::split(b);
            let mut greeting = vec![0; greeting_len()];
            b_read.read_exact(&mut greeting).await.unwrap();
            a_write.write_all(&greeting).await.unwrap();
            let mut some = [0; 1000];
            a_read.read_exact(&mut some).await.unwrap();
        },
    )
    .await;
    assert!(run.source.is_err());
    assert!(run.destination.is_err());
    assert!(run.delivered.is_empty());
}

/// Bytes of the destination's greeting on the wire.
fn greeting_len() -> usize {
    let mut greeting = BytesMut::new();
    Reply::Greeting { catalog: None }.encode(&mut greeting);
    greeting.len()
}

/// A link that carries the whole dedup stream but, after the greeting, loses the
/// return direction: reset (`reset`) or black-holed (nothing more arrives, nothing
/// closes). The source must not report success: the destination's confirmation
/// never reaches it.
async fn return_direction_lost(a: DuplexStream, b: DuplexStream, reset: bool) {
    let ((mut a_read, mut a_write), (mut b_read, mut b_write)) =
        (tokio::io::split(a), tokio::io::split(b));
    let mut greeting = vec![0; greeting_len()];
    b_read.read_exact(&mut greeting).await.unwrap();
    a_write.write_all(&greeting).await.unwrap();
    let forward = async {
        let _ = tokio::io::copy(&mut a_read, &mut b_write).await;
        let _ = b_write.shutdown().await;
    };
    let back = async {
        match reset {
            true => drop(a_write),
            // read and drop what the destination says, hold the source's side open
            false => {
                let _ = tokio::io::copy(&mut b_read, &mut tokio::io::sink()).await;
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::join!(forward, back);
}

#[tokio::test]
async fn the_source_fails_when_the_confirmation_is_lost() {
    let qemu = testdata("qemu-7.2-pc-paused.mig");
    let quick = SourceConfig::default()
        .with_timeouts(Timeouts::default().with_idle(std::time::Duration::from_secs(1)));
    for reset in [true, false] {
        let bound = std::time::Duration::from_secs(60);
        let run = tokio::time::timeout(
            bound,
            migrate(
                &qemu,
                quick.clone(),
                DestinationConfig::default(),
                move |a, b| return_direction_lost(a, b, reset),
            ),
        )
        .await
        .expect("the source gives up within its idle timeout");
        assert!(run.delivered == qemu, "the stream itself went through");
        let err = run.source.expect_err("no success without the confirmation");
        let expected = match reset {
            true => ErrorKind::PeerClosed,
            false => ErrorKind::Timeout,
        };
        assert_eq!(err.kind(), expected, "reset {reset}: {err}");
    }
}

/// Pages of this tag can be restored only once a [`Fetch`] has fetched them, like
/// templates from a ring of store nodes.
#[derive(Clone, Default)]
struct Remote {
    state: Arc<Mutex<RemoteState>>,
}

#[derive(Default)]
struct RemoteState {
    wanted: Vec<Vec<u8>>,
    fetched: HashSet<Vec<u8>>,
    fetches: u64,
}

impl Restore for Remote {
    fn tag(&self) -> u8 {
        0x81
    }
    fn prepare(&mut self, body: &[u8]) -> migstream::Result<bool> {
        let mut state = self.state.lock().unwrap();
        let have = state.fetched.contains(body);
        if !have {
            state.wanted.push(body.to_vec());
        }
        Ok(have)
    }
    fn restore(
        &mut self,
        _at: PageAt<'_>,
        body: &[u8],
        out: &mut PageOut<'_>,
    ) -> migstream::Result<()> {
        assert!(
            self.state.lock().unwrap().fetched.contains(body),
            "restored before fetched"
        );
        out.copy_from_slice(body)
    }
}

impl Fetch for Remote {
    fn fetch(
        &mut self,
    ) -> std::pin::Pin<Box<dyn Future<Output = migstream::Result<()>> + Send + '_>> {
        Box::pin(async {
            let mut state = self.state.lock().unwrap();
            state.fetches += 1;
            let wanted = std::mem::take(&mut state.wanted);
            state.fetched.extend(wanted);
            Ok(())
        })
    }
}

/// Claims every page as tag 0x81, its body the page itself.
struct RemoteClaim;

impl migstream::resolve::Claim for RemoteClaim {
    fn tag(&self) -> u8 {
        0x81
    }
    fn claim(&mut self, page: &migstream::resolve::Page<'_>, body: &mut Vec<u8>) -> bool {
        body.extend_from_slice(page.data);
        true
    }
}

#[tokio::test]
async fn restore_fetches_what_a_waiting_resolver_needs() {
    let qemu = testdata("qemu-10.0-q35-paused.mig");
    let mut encoder = DedupEncoder::new(vec![Box::new(RemoteClaim)])
        .unwrap()
        .with_batch_size(16 << 10);
    let (mut input, mut wire) = (BytesMut::from(&qemu[..]), BytesMut::new());
    let mut records = QemuDecoder::new();
    while let Some(record) = records.decode_eof(&mut input).unwrap() {
        encoder.encode(&record, &mut wire).unwrap();
    }
    encoder.finish(&mut wire).unwrap();
    let claimed = encoder.stats().pages(0x81);
    assert!(claimed > 10);

    let remote = Remote::default();
    let mut decoder = DedupDecoder::new(vec![Box::new(remote.clone())]).unwrap();
    let mut fetch = remote.clone();
    let mut out = Vec::new();
    relay::decode_stream(
        &wire[..],
        &mut out,
        &mut decoder,
        Some(&mut fetch),
        &Progress::default(),
    )
    .await
    .unwrap();
    assert!(out == qemu);
    assert_eq!(decoder.stats().pages(0x81), claimed);
    let fetches = remote.state.lock().unwrap().fetches;
    assert!(
        fetches >= 2 && fetches < claimed,
        "{fetches} fetches of {claimed} pages"
    );

    // without a fetcher the destination fails instead of stalling
    let mut decoder = DedupDecoder::new(vec![Box::new(Remote::default())]).unwrap();
    let mut out = Vec::new();
    let err = relay::decode_stream(
        &wire[..],
        &mut out,
        &mut decoder,
        None,
        &Progress::default(),
    )
    .await;
    assert!(err.is_err());
    assert!(out.len() < qemu.len());

    // nor can a FramedRead fetch: it says so at the first waiting frame, instead of
    // buffering to the end and blaming a truncated stream
    use futures::StreamExt;
    let decoder = DedupDecoder::new(vec![Box::new(Remote::default())]).unwrap();
    let mut frames = tokio_util::codec::FramedRead::new(&wire[..], decoder);
    let err = loop {
        match frames.next().await {
            Some(Ok(_)) => continue,
            Some(Err(e)) => break e,
            None => panic!("a waiting frame must not pass"),
        }
    };
    assert_eq!(err.kind(), ErrorKind::Config, "{err}");
}

/// The relays over real loopback TCP, as the proxies run them.
#[tokio::test]
async fn over_loopback_tcp() {
    use tokio::net::{TcpListener, TcpStream};
    let qemu = testdata("qemu-10.0-q35-paused.mig");
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let destination = tokio::spawn(async move {
        let (link, _) = listener.accept().await.unwrap();
        let (to_qemu, mut dest_qemu) = tokio::io::duplex(1 << 16);
        let qemu_side = tokio::spawn(async move {
            let mut got = Vec::new();
            dest_qemu.read_to_end(&mut got).await.unwrap();
            dest_qemu.shutdown().await.unwrap();
            got
        });
        let report = relay::destination(
            link.into_split(),
            tokio::io::split(to_qemu),
            &DestinationConfig::default(),
            &Progress::default(),
        )
        .await
        .unwrap();
        (report, qemu_side.await.unwrap())
    });
    let link = TcpStream::connect(addr).await.unwrap();
    let sent = relay::source(
        (&qemu[..], tokio::io::sink()),
        link.into_split(),
        &SourceConfig::default(),
        &Progress::default(),
    )
    .await
    .unwrap();
    let (received, delivered) = destination.await.unwrap();
    assert!(delivered == qemu);
    assert_eq!(sent.stats.wire_bytes, received.stats.wire_bytes);
}

/// A custom resolver from outside the crate, both halves: a page travels with its
/// bits inverted.
struct Inverted;

const INVERTED: u8 = 0x90;

impl migstream::resolve::Claim for Inverted {
    fn tag(&self) -> u8 {
        INVERTED
    }
    fn claim(&mut self, page: &migstream::resolve::Page<'_>, body: &mut Vec<u8>) -> bool {
        body.extend(page.data.iter().map(|b| !b));
        true
    }
}

impl Restore for Inverted {
    fn tag(&self) -> u8 {
        INVERTED
    }
    fn restore(
        &mut self,
        _: PageAt<'_>,
        body: &[u8],
        out: &mut PageOut<'_>,
    ) -> migstream::Result<()> {
        if body.len() != out.page_size() {
            return Err(migstream::Error::resolver(INVERTED, "not a whole page"));
        }
        let page = out.as_mut_slice();
        page.iter_mut().zip(body).for_each(|(b, &inv)| *b = !inv);
        Ok(())
    }
}

#[tokio::test]
async fn custom_resolvers_plug_into_both_ends_of_a_link() {
    let qemu = testdata("qemu-10.0-q35-paused.mig");
    let source = SourceConfig::default()
        .with_resolvers(Resolvers::none().with_custom(|| Box::new(Inverted)));
    let destination = DestinationConfig::default().with_restore(|| Box::new(Inverted));
    let run = migrate(&qemu, source.clone(), destination, wire).await;
    let (sent, received) = (run.source.unwrap(), run.destination.unwrap());
    assert!(run.delivered == qemu);
    assert!(sent.stats.pages(INVERTED) > 10, "{:?}", sent.stats);
    assert_eq!(received.stats.pages(INVERTED), sent.stats.pages(INVERTED));
    // a destination without the restoring half refuses, and the source hears why
    let run = migrate(&qemu, source, DestinationConfig::default(), wire).await;
    let err = run
        .source
        .expect_err("no resolver for the tag at the destination");
    assert_eq!(err.kind(), ErrorKind::Remote, "{err}");
    assert!(run.delivered.len() < qemu.len());
}

/// A destination QEMU that loads the whole stream but never closes its side of the
/// connection: once DONE went out, only its return path is left, and the idle
/// timeout ends that without failing a migration both ends completed.
#[tokio::test]
async fn a_silent_return_path_after_the_confirmation_fails_nothing() {
    let qemu = testdata("qemu-7.2-pc-paused.mig");
    let (src_link, dst_link) = tokio::io::duplex(64 << 10);
    // read from, never written to nor closed while the test runs
    let (silent_qemu, _held_open) = tokio::io::duplex(1024);
    let mut delivered = Vec::new();
    let quick = Timeouts::default().with_idle(std::time::Duration::from_secs(1));
    let destination = DestinationConfig::default().with_timeouts(quick);
    let source = SourceConfig::default();
    let (src_progress, dst_progress) = (Progress::default(), Progress::default());
    let ends = async {
        tokio::join!(
            relay::source(
                (&qemu[..], tokio::io::sink()),
                tokio::io::split(src_link),
                &source,
                &src_progress,
            ),
            relay::destination(
                tokio::io::split(dst_link),
                (silent_qemu, &mut delivered),
                &destination,
                &dst_progress,
            ),
        )
    };
    let (sent, received) = tokio::time::timeout(std::time::Duration::from_secs(30), ends)
        .await
        .expect("both ends finish");
    sent.expect("the source had its confirmation");
    received.expect("a confirmed migration is not failed by a silent return path");
    assert!(delivered == qemu);
}

/// A destination that greets, sends `replies`, then reads everything and says
/// nothing more: it returns its side of the return direction, open.
async fn deaf_destination(
    link: tokio::io::DuplexStream,
    replies: &[Reply],
) -> tokio::io::WriteHalf<tokio::io::DuplexStream> {
    let (mut from_source, mut to_source) = tokio::io::split(link);
    let mut out = BytesMut::new();
    Reply::Greeting { catalog: None }.encode(&mut out);
    for reply in replies {
        reply.encode(&mut out);
    }
    to_source.write_all(&out).await.unwrap();
    tokio::io::copy(&mut from_source, &mut tokio::io::sink())
        .await
        .unwrap();
    to_source
}

/// A source migrating `qemu` to a [`deaf_destination`] that sends `replies`: the
/// source's error (it must fail) and the QEMU bytes it took in.
async fn against_a_deaf_destination(
    qemu: &[u8],
    source: &SourceConfig,
    replies: &[Reply],
) -> (migstream::Error, u64) {
    let (src_link, dst_link) = tokio::io::duplex(1 << 20);
    let deaf = deaf_destination(dst_link, replies);
    let progress = Progress::default();
    let sent = relay::source(
        (qemu, tokio::io::sink()),
        tokio::io::split(src_link),
        source,
        &progress,
    );
    let ends = async { tokio::join!(sent, deaf) };
    let (sent, _open) = tokio::time::timeout(std::time::Duration::from_secs(30), ends)
        .await
        .expect("the source gives up at its idle timeout");
    (sent.unwrap_err(), progress.snapshot().qemu_bytes)
}

/// A destination acknowledging more QEMU bytes than there are (the largest count)
/// gives the source no limit on what it takes in, and no overflow: it sends the
/// stream whole, then waits for a verdict that never comes until its idle timeout.
#[tokio::test]
async fn an_acknowledgement_beyond_the_stream_overflows_nothing() {
    let qemu = support::fill_pages_stream(4 << 10); // 16 MiB
    let quick = Timeouts::default().with_idle(std::time::Duration::from_secs(1));
    let source = SourceConfig::default().with_timeouts(quick);
    let ack_all = Reply::Ack {
        qemu_bytes: u64::MAX,
    };
    let (e, taken) = against_a_deaf_destination(&qemu, &source, &[ack_all]).await;
    assert_eq!(e.kind(), ErrorKind::Timeout, "{e}");
    assert_eq!(taken, qemu.len() as u64);
}

/// The source takes in at most its credit window (plus one frame) of QEMU bytes
/// beyond what the destination acknowledged: against a destination that reads
/// everything and acknowledges nothing, it stops reading QEMU (and gives up at the
/// idle timeout); against a real destination, a window much smaller than the stream
/// delivers it whole.
#[tokio::test]
async fn the_source_takes_in_no_more_than_its_credit_window() {
    const WINDOW: u64 = 4 << 20;
    let qemu = support::fill_pages_stream(16 << 10); // 64 MiB
    let quick = Timeouts::default().with_idle(std::time::Duration::from_secs(1));
    let source = SourceConfig::default()
        .with_credit_window(WINDOW)
        .with_timeouts(quick.clone());

    let (e, taken) = against_a_deaf_destination(&qemu, &source, &[]).await;
    assert_eq!(e.kind(), ErrorKind::Timeout, "{e}");
    let most = WINDOW + migstream::dedup::MAX_FRAME_QEMU_BYTES as u64 + 4096;
    assert!(
        (WINDOW..=most).contains(&taken),
        "took in {taken} bytes, window {WINDOW}"
    );

    let destination = DestinationConfig::default().with_timeouts(quick);
    let run = migrate(&qemu, source, destination, wire).await;
    run.source.unwrap();
    run.destination.unwrap();
    assert!(run.delivered == qemu, "delivered whole");
}

/// A link that carries everything but the destination's acknowledgements of more
/// than `above` QEMU bytes: as when its last ACK comes after its DONE.
async fn late_acks_lost(a: DuplexStream, b: DuplexStream, above: u64) {
    use futures::StreamExt;
    let ((mut a_read, mut a_write), (b_read, mut b_write)) =
        (tokio::io::split(a), tokio::io::split(b));
    let forward = async {
        let _ = tokio::io::copy(&mut a_read, &mut b_write).await;
        let _ = b_write.shutdown().await;
    };
    let back = async {
        let mut replies = tokio_util::codec::FramedRead::new(b_read, ReplyDecoder::new());
        while let Some(Ok(reply)) = replies.next().await {
            if matches!(reply, Reply::Ack { qemu_bytes } if qemu_bytes > above) {
                continue;
            }
            let mut out = BytesMut::new();
            reply.encode(&mut out);
            if a_write.write_all(&out).await.is_err() {
                break;
            }
        }
        let _ = a_write.shutdown().await;
    };
    tokio::join!(forward, back);
}

/// The destination's DONE ends the migration even when the source still waits for
/// credit: its last ACK may come after the DONE (the two race at the destination),
/// or be lost. Here the source QEMU's stream is read at once (a source proxy reading
/// a QEMU far ahead of the link takes megabytes at a time), so the source takes far
/// more than its window in before it waits, and the acknowledgement of the last
/// frame never arrives.
#[tokio::test]
async fn the_verdict_ends_a_source_waiting_for_credit() {
    let qemu = support::fill_pages_stream((16 << 10) - 100); // 64 MiB, four frames
    let quick = Timeouts::default().with_idle(std::time::Duration::from_secs(2));
    let source = SourceConfig::default()
        .with_credit_window(2 << 20)
        .with_timeouts(quick.clone());
    let destination = DestinationConfig::default().with_timeouts(quick);
    let (src_link, link_a) = tokio::io::duplex(64 << 10);
    let (link_b, dst_link) = tokio::io::duplex(64 << 10);
    let (dst_qemu_proxy, dst_qemu) = tokio::io::duplex(64 << 10);
    let above = qemu.len() as u64 - (8 << 20);
    let middle = tokio::spawn(late_acks_lost(link_a, link_b, above));
    let destination_qemu = tokio::spawn(async move {
        let (mut read, mut write) = tokio::io::split(dst_qemu);
        let delivered = read_all(&mut read).await;
        let _ = write.shutdown().await;
        delivered
    });
    let (progress_a, progress_b) = (Progress::default(), Progress::default());
    let ends = async {
        tokio::join!(
            relay::source(
                (&qemu[..], tokio::io::sink()),
                tokio::io::split(src_link),
                &source,
                &progress_a,
            ),
            relay::destination(
                tokio::io::split(dst_link),
                tokio::io::split(dst_qemu_proxy),
                &destination,
                &progress_b,
            ),
        )
    };
    let (sent, received) = tokio::time::timeout(std::time::Duration::from_secs(30), ends)
        .await
        .expect("both ends finish");
    middle.abort();
    received.unwrap();
    sent.expect("the DONE confirms the migration");
    assert!(destination_qemu.await.unwrap() == qemu, "delivered whole");
}
