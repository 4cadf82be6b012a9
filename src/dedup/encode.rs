//! The source side: QEMU records in, dedup frames out.

use bytes::{BufMut, Bytes, BytesMut};
use twox_hash::XxHash3_128;

use super::Stats;
use super::compress::{Compression, Compressor};
use super::entry::Entry;
use super::wire::{self, DataHeader, End, Hello, codec};
use super::workers::Workers;
use crate::error::{Error, Result};
use crate::qemu::multifd::{ChannelRecord, MultifdEncoder, Payload};
use crate::qemu::{
    ConfigSubsection, Configuration, DEFAULT_PAGE_SIZE, QemuEncoder, RamRecord, Record,
};
use crate::resolve::{Claim, Page, PageAt, tag};
use crate::template::CatalogId;

/// Turns QEMU [`Record`]s (the main channel) or [`ChannelRecord`]s (a multifd
/// channel) into the dedup stream.
///
/// Every byte of the QEMU stream is accounted for: page payloads travel as resolver
/// entries (or raw), everything else as verbatim QEMU bytes, all batched into DATA
/// frames compressed with LZ4. Each DATA frame carries the running digest of the QEMU
/// bytes so far, and [`finish`](Self::finish) writes the END frame with the total.
/// One encoder carries one QEMU connection: its first record says which
/// ([`encode`](Self::encode) or [`encode_channel`](Self::encode_channel)).
///
/// Batches can be compressed on several threads ([`with_threads`](Self::with_threads));
/// the frames are the same bytes whatever the number.
pub struct DedupEncoder {
    page_size: usize,
    catalog: Option<CatalogId>,
    session: [u8; 16],
    /// The HELLO's channel once the first record said which: 0 the main channel,
    /// `n` the multifd channel `n - 1`.
    channel: Option<u16>,
    qemu: QemuEncoder,
    multifd: MultifdEncoder,
    claims: Vec<Box<dyn Claim>>,
    /// The batch being built.
    batch: Batch,
    /// QEMU bytes not yet put in an entry of `batch`.
    verbatim: BytesMut,
    /// Where page record headers are written, each split off into the batch's QEMU
    /// bytes: one allocation of [`PAGE_HEADERS_ROOM`] for thousands of them.
    page_headers: BytesMut,
    /// Scratch for a resolver's body.
    body: Vec<u8>,
    compression: Compression,
    /// Compress the batches, once the first one is sent: on the caller's thread
    /// alone, or on others too.
    workers: Option<Workers<Batch, Result<Compressed>, Compressor>>,
    threads: usize,
    /// Buffers of frames gone out (the raw one cleared), for the next batches.
    spare: Vec<(Vec<u8>, Vec<u8>)>,
    batch_target: usize,
    /// QEMU bytes the batch being built stands for.
    batch_qemu: usize,
    hasher: XxHash3_128,
    started: bool,
    /// QEMU's EOF has been taken in: the frames from here on are held until END.
    hold: bool,
    /// The block of the last page entry, which PAGE_SAME_BLOCK refers to.
    last_block: Option<Vec<u8>>,
    stats: Stats,
}

impl std::fmt::Debug for DedupEncoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let tags: Vec<u8> = self.claims.iter().map(|c| c.tag()).collect();
        f.debug_struct("DedupEncoder")
            .field("resolver_tags", &tags)
            .field("stats", &self.stats)
            .finish()
    }
}

/// QEMU bytes at which a batch is sent whatever its size: with a record of at most
/// 16 MiB on top, a frame's output stays within the decoder's default `max_output`.
pub const MAX_FRAME_QEMU_BYTES: usize = 16 << 20;

/// The same for a multifd channel: its frames stay small (a packet is 512 KiB of
/// pages), so that a destination's channels hold little each
/// ([`Limits::for_multifd_channel`](super::Limits::for_multifd_channel)).
pub const MAX_CHANNEL_FRAME_QEMU_BYTES: usize = 4 << 20;

/// Default size at which a batch is compressed and sent.
pub const DEFAULT_BATCH: usize = 256 * 1024;

/// Room reserved at once for page record headers: a header split off a shared
/// buffer costs no allocation of its own.
const PAGE_HEADERS_ROOM: usize = 64 << 10;

/// The longest page record header: address and flags, then a block name's length
/// and its at most 255 bytes.
const MAX_PAGE_HEADER: usize = 8 + 1 + 255;

/// A batch on its way to becoming a DATA frame.
#[derive(Debug, Default)]
struct Batch {
    /// Its entries, uncompressed.
    raw: Vec<u8>,
    /// The QEMU bytes it stands for, in stream order, as they came: the running
    /// digest takes them in when the frame is written, after the frames before it,
    /// which may still be compressing on another thread.
    qemu: Vec<Bytes>,
    /// Whether it came after QEMU's EOF (FLAG_HOLD).
    hold: bool,
    /// A buffer for the compressed entries.
    compressed: Vec<u8>,
}

/// A batch compressed: `compressed[..len]` with `codec`, or its raw entries stored.
#[derive(Debug)]
struct Compressed {
    batch: Batch,
    codec: u8,
    len: usize,
}

/// Compresses a batch, keeping it stored where compression does not pay.
fn compress(compressor: &mut Compressor, mut batch: Batch) -> Result<Compressed> {
    let (codec, len) = compressor.compress(&batch.raw, &mut batch.compressed)?;
    Ok(match len < batch.raw.len() {
        true => Compressed { batch, codec, len },
        false => Compressed {
            len: batch.raw.len(),
            batch,
            codec: codec::STORED,
        },
    })
}

impl Compressed {
    /// The frame's body.
    fn body(&self) -> &[u8] {
        match self.codec {
            codec::STORED => &self.batch.raw,
            _ => &self.batch.compressed[..self.len],
        }
    }
}

/// The most threads [`DedupEncoder::with_threads`] and
/// [`DedupDecoder::with_threads`](super::DedupDecoder::with_threads) start, and the
/// default of the proxies and the `dedup` tool: past four, the caller's own
/// thread (resolvers, parsing, the digest) is the bottleneck.
pub const MAX_THREADS: usize = 4;

/// The cores this process may run on, at most [`MAX_THREADS`]: the proxies' and the
/// `dedup` tool's default `--threads`.
pub fn available_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get().min(MAX_THREADS))
}

impl DedupEncoder {
    /// An encoder whose resolvers are tried in the order given; pages none of them
    /// claims travel raw. Fails with [`Error::Config`](crate::Error::Config) if two
    /// resolvers share a tag or one has a reserved tag.
    pub fn new(claims: Vec<Box<dyn Claim>>) -> Result<Self> {
        crate::resolve::check_tags(claims.iter().map(|c| c.tag()))?;
        Ok(Self {
            page_size: DEFAULT_PAGE_SIZE,
            catalog: None,
            session: [0; 16],
            channel: None,
            qemu: QemuEncoder::new(),
            multifd: MultifdEncoder::new(),
            claims,
            batch: Batch::default(),
            verbatim: BytesMut::new(),
            page_headers: BytesMut::new(),
            body: Vec::new(),
            compression: Compression::Lz4,
            workers: None,
            threads: 1,
            spare: Vec::new(),
            batch_target: DEFAULT_BATCH,
            batch_qemu: 0,
            hasher: XxHash3_128::new(),
            started: false,
            hold: false,
            last_block: None,
            stats: Stats::default(),
        })
    }

    /// Names the migration this stream is part of in its HELLO (see
    /// [`Hello::session`]): a source relaying several QEMU connections of one
    /// migration gives each the same.
    pub fn with_session(mut self, session: [u8; 16]) -> Self {
        self.session = session;
        self
    }

    /// Sets the target page size of a multifd channel's pages (default 4 KiB). A
    /// main channel's comes from its configuration section instead; a multifd
    /// channel's is the main channel's (see
    /// [`MultifdDecoder::with_page_size`](crate::qemu::multifd::MultifdDecoder::with_page_size)).
    ///
    /// # Panics
    ///
    /// If `page_size` is not a power of two from 1 KiB to 64 KiB.
    pub fn with_page_size(mut self, page_size: usize) -> Self {
        self.multifd = MultifdEncoder::new().with_page_size(page_size);
        self.page_size = page_size;
        self
    }

    /// Announces the identity of the template catalog the resolvers refer to.
    pub fn with_catalog_id(mut self, id: CatalogId) -> Self {
        self.catalog = Some(id);
        self
    }

    /// Sets how batches are compressed (default LZ4).
    pub fn with_compression(mut self, compression: Compression) -> Self {
        self.compression = compression;
        self
    }

    /// Compresses batches on `threads` threads, the caller's among them (1, the
    /// default: the caller's alone; at most [`MAX_THREADS`]): `threads - 1` of the
    /// encoder's own take batches in turn, and the caller compresses one itself when
    /// they all have their next one waiting. Resolvers, the running digest and the
    /// frames' order stay on the caller's thread, and the frames are the same bytes
    /// whatever the number. With more than one, a batch's frame is appended to `dst`
    /// by a later call, once compressed ([`flush`](Self::flush) and
    /// [`finish`](Self::finish) wait for every batch); up to two batches per thread
    /// are in flight, each keeping its QEMU bytes (at most [`MAX_FRAME_QEMU_BYTES`]
    /// and a record) until its frame is written. A multifd channel's stream keeps to
    /// the caller's thread: QEMU already spreads the pages over the channels.
    pub fn with_threads(mut self, threads: usize) -> Self {
        self.threads = threads.clamp(1, MAX_THREADS);
        self
    }

    /// Sets the batch size at which a DATA frame is sent (bounded by the decoder's
    /// `max_batch`; default 256 KiB).
    pub fn with_batch_size(mut self, bytes: usize) -> Self {
        self.batch_target = bytes.max(1);
        self
    }

    /// Counters so far.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// The running digest so far; after [`finish`](Self::finish), the END frame's,
    /// which a destination's [`Reply::Done`](super::Reply::Done) must repeat.
    pub fn digest(&self) -> [u8; wire::FRAME_DIGEST] {
        wire::digest_bytes(&self.hasher)
    }

    /// The target page size: the default or given one, or what the main channel's
    /// configuration said.
    pub fn page_size(&self) -> usize {
        self.page_size
    }

    /// Takes in one record of QEMU's main channel; appends any frames that became
    /// ready to `dst`.
    pub fn encode(&mut self, record: &Record, dst: &mut BytesMut) -> Result<()> {
        if *self.channel.get_or_insert(0) != 0 {
            return Err(Error::InvalidRecord {
                field: "main channel record",
                reason: "on a multifd channel's stream",
            });
        }
        match record {
            Record::Ram(RamRecord::Page { addr, data }) => {
                self.start(dst);
                self.put_verbatim();
                // the destination rebuilds the record header from the entry's address
                if self.page_headers.capacity() < MAX_PAGE_HEADER {
                    self.page_headers.reserve(PAGE_HEADERS_ROOM);
                }
                self.qemu.encode_page_header(addr, &mut self.page_headers)?;
                let header = self.page_headers.split().freeze();
                self.stats.qemu_bytes += header.len() as u64;
                self.batch.qemu.push(header);
                let at = PageAt {
                    block: &addr.block,
                    offset: addr.offset,
                };
                self.put_page(at, data, addr.continued);
            }
            other => {
                self.hold |= matches!(other, Record::Eof);
                if let Record::Configuration(config) = other {
                    self.learn_page_size(config);
                }
                self.qemu.encode(other, &mut self.verbatim)?;
            }
        }
        self.flush_when_due(dst)
    }

    /// Takes in one record of a QEMU multifd channel, the greeting first; appends any
    /// frames that became ready to `dst`. The greeting, packet headers and offset
    /// slots travel as QEMU bytes and each page of a packet as a page entry, which
    /// the destination rebuilds as the page's bytes alone (see
    /// `docs/wire-format.md`). Packets QEMU compressed itself (`multifd-compression`)
    /// and device state travel as QEMU bytes, unchanged
    /// ([`Stats::opaque_bytes`](super::Stats::opaque_bytes)). The HELLO names the
    /// greeting's channel; resolvers keep a channel's share of their memory
    /// ([`Claim::on_multifd_channel`](crate::resolve::Claim::on_multifd_channel)).
    pub fn encode_channel(&mut self, record: &ChannelRecord, dst: &mut BytesMut) -> Result<()> {
        match record {
            ChannelRecord::Greeting(greeting) => {
                if self.channel.is_some() {
                    return Err(Error::InvalidRecord {
                        field: "channel greeting",
                        reason: "not the first record of the stream",
                    });
                }
                self.multifd.encode(record, &mut self.verbatim)?;
                self.channel = Some(u16::from(greeting.channel_id) + 1);
            }
            ChannelRecord::Packet(packet) if matches!(packet.payload, Payload::Pages(_)) => {
                self.multifd
                    .encode_packet_header(packet, &mut self.verbatim)?;
                self.start(dst);
                self.put_verbatim();
                for (offset, data) in packet.pages() {
                    let at = PageAt {
                        block: &packet.block,
                        offset,
                    };
                    self.put_page(at, data, false);
                }
            }
            other => {
                let before = self.verbatim.len();
                self.multifd.encode(other, &mut self.verbatim)?;
                self.stats.opaque_bytes += match other {
                    ChannelRecord::Packet(packet) => packet.payload.len() as u64,
                    _ => (self.verbatim.len() - before) as u64,
                };
            }
        }
        self.flush_when_due(dst)
    }

    /// Sends the batch once it is large enough, or stands for enough QEMU bytes:
    /// pages claimed in a few bytes make small batches of much QEMU output.
    fn flush_when_due(&mut self, dst: &mut BytesMut) -> Result<()> {
        let max_qemu = match self.channel {
            Some(0) | None => MAX_FRAME_QEMU_BYTES,
            Some(_) => MAX_CHANNEL_FRAME_QEMU_BYTES,
        };
        if self.batch.raw.len() + self.verbatim.len() >= self.batch_target
            || self.batch_qemu + self.verbatim.len() >= max_qemu
        {
            self.send_pending(dst)?;
        }
        Ok(())
    }

    /// Sends what is pending as a DATA frame (e.g. when the QEMU side goes quiet),
    /// after every batch still compressing. Nothing before the first record: the
    /// HELLO says what the records are.
    pub fn flush(&mut self, dst: &mut BytesMut) -> Result<()> {
        if self.channel.is_none() {
            return Ok(());
        }
        self.send_pending(dst)?;
        while let Some(compressed) = self.workers.as_mut().and_then(Workers::next) {
            self.put_frame(compressed?, dst);
        }
        Ok(())
    }

    /// Sends what is pending as a batch, without waiting for the batches still
    /// compressing.
    fn send_pending(&mut self, dst: &mut BytesMut) -> Result<()> {
        self.start(dst);
        self.put_verbatim();
        self.send_batch(dst)
    }

    /// Compresses the batch being built, if any, or queues it for another thread,
    /// and appends the frames of the batches compressed by now to `dst`.
    fn send_batch(&mut self, dst: &mut BytesMut) -> Result<()> {
        if self.batch.raw.is_empty() {
            return Ok(());
        }
        let (raw, compressed) = self.spare.pop().unwrap_or_default();
        let next = Batch {
            raw,
            compressed,
            ..Batch::default()
        };
        let mut batch = std::mem::replace(&mut self.batch, next);
        batch.hold = self.hold;
        self.batch_qemu = 0;
        let compression = self.compression;
        let workers = self.workers.get_or_insert_with(|| {
            Workers::new(self.threads, move || Compressor::new(compression), compress)
        });
        if workers.is_full() {
            let oldest = workers.next().expect("a full queue has an oldest job");
            self.put_frame(oldest?, dst);
        }
        self.workers.as_mut().expect("started above").submit(batch);
        while let Some(compressed) = self.workers.as_mut().and_then(Workers::try_next) {
            self.put_frame(compressed?, dst);
        }
        Ok(())
    }

    /// Appends a compressed batch's DATA frame to `dst`: its QEMU bytes, then its
    /// header and body, enter the running digest the frame carries.
    fn put_frame(&mut self, compressed: Compressed, dst: &mut BytesMut) {
        let body = compressed.body();
        let batch = &compressed.batch;
        batch.qemu.iter().for_each(|bytes| self.hasher.write(bytes));
        let before = dst.len();
        let mut header = DataHeader {
            codec: compressed.codec,
            flags: if batch.hold { wire::FLAG_HOLD } else { 0 },
            raw_len: u32::try_from(batch.raw.len()).expect("batches are a few MiB"),
            digest: [0; wire::FRAME_DIGEST],
        };
        self.hasher.write(&header.covered());
        self.hasher.write(body);
        header.digest = wire::digest_bytes(&self.hasher);
        header.put(dst, body.len());
        dst.put_slice(body);
        self.stats.wire_bytes += (dst.len() - before) as u64;
        let Batch {
            mut raw,
            compressed,
            ..
        } = compressed.batch;
        raw.clear();
        // kept at its length: the next batch's compressor writes over it
        self.spare.push((raw, compressed));
    }

    /// Sends what is pending and the END frame. Call once, after the last record.
    pub fn finish(&mut self, dst: &mut BytesMut) -> Result<()> {
        self.start(dst);
        self.flush(dst)?;
        let end = End {
            qemu_bytes: self.stats.qemu_bytes,
            digest: wire::digest_bytes(&self.hasher),
        };
        end.put(dst);
        self.stats.wire_bytes += (wire::FRAME_HEADER + wire::END_LEN) as u64;
        Ok(())
    }

    /// Targets other than x86 announce their page size in the configuration.
    fn learn_page_size(&mut self, config: &Configuration) {
        for sub in &config.subsections {
            if let ConfigSubsection::TargetPageBits(bits @ 10..=16) = sub {
                self.page_size = 1 << bits;
            }
        }
    }

    /// Writes the HELLO frame, once, before the first DATA frame: by then the page
    /// size is known, and no QEMU byte has entered the running digest yet (they do
    /// when they join a batch).
    fn start(&mut self, dst: &mut BytesMut) {
        if self.started {
            return;
        }
        self.started = true;
        let channel = self.channel.unwrap_or(0);
        if channel > 0 {
            self.claims.iter_mut().for_each(|c| c.on_multifd_channel());
            // QEMU spreads its pages over the channels: one thread each is enough
            self.threads = 1;
        }
        let hello =
            Hello::new(self.page_size as u32, self.catalog).in_session(self.session, channel);
        let at = dst.len();
        hello.put(dst);
        // every frame digest covers the HELLO too
        self.hasher.write(&dst[at + wire::FRAME_HEADER..]);
        self.stats.wire_bytes += (dst.len() - at) as u64;
    }

    /// Moves pending verbatim QEMU bytes into the batch as one entry.
    fn put_verbatim(&mut self) {
        if self.verbatim.is_empty() {
            return;
        }
        self.stats.qemu_bytes += self.verbatim.len() as u64;
        self.batch_qemu += self.verbatim.len();
        Entry::Qemu(&self.verbatim).put(&mut self.batch.raw);
        self.batch.qemu.push(self.verbatim.split().freeze());
    }

    /// Appends a page entry: tag, address, body (see `docs/wire-format.md`).
    fn put_page(&mut self, at: PageAt<'_>, data: &Bytes, continued: bool) {
        let page = Page::new(at, data);
        let mut claimed = None;
        for c in &mut self.claims {
            self.body.clear();
            if c.claim(&page, &mut self.body) {
                claimed = Some(c.tag());
                break;
            }
        }
        let (tag, body) = match claimed {
            Some(tag) => (tag, &self.body[..]),
            None => (tag::RAW, page.data),
        };
        let same_block = self.last_block.as_deref() == Some(page.at.block);
        let entry = Entry::Page {
            tag,
            page: page.at.offset / self.page_size as u64,
            continued,
            block: (!same_block).then_some(page.at.block),
            body,
        };
        entry.put(&mut self.batch.raw);
        if !same_block {
            self.last_block = Some(page.at.block.to_vec());
        }
        self.stats.count_page(tag);
        let page = page.delivered_as(tag);
        for c in &mut self.claims {
            c.delivered(&page);
        }
        self.batch.qemu.push(data.clone());
        self.stats.qemu_bytes += data.len() as u64;
        self.batch_qemu += data.len();
    }
}
