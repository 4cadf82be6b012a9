//! The destination side: dedup frames in, the exact QEMU bytes out.

use bytes::{Bytes, BytesMut};
use twox_hash::XxHash3_128;

use super::ahead::{Ahead, Batch, Decompressed, Frame, Taken};
use super::entry::{Entry, EntryReader};
use super::wire::{self, DataHeader, End, Hello, frame};
use super::{Limits, Stats};
use crate::error::{Error, Result};
use crate::qemu::wire::ram_flag;
use crate::qemu::{DEFAULT_PAGE_SIZE, put_page_header};
use crate::resolve::{Page, PageAt, PageOut, Restore, tag};
use crate::template::CatalogId;

/// Turns the dedup stream back into the QEMU stream.
///
/// [`decode`](Self::decode) hands out the QEMU bytes of one DATA frame at a time,
/// and only after checking them against the running digest the source computed over
/// the same bytes: a corrupted, reordered or dropped frame, a wrong page from a store,
/// a resolver bug, all fail here before a byte of the frame is released.
/// [`decode_eof`](Self::decode_eof) fails unless the END frame confirmed the total.
///
/// It takes whole frames off its input ahead of the one it restores: to decompress
/// their batches on other threads ([`with_threads`](Self::with_threads)), and so that
/// the pages the next frame lacks are fetched while this one is restored
/// ([`Decoded::Fetch`]). Restoring, the digest and every check stay in stream
/// order on the caller's thread: the QEMU bytes, and the error and its offset on a
/// bad stream, are the same whatever the threads and however the input is split.
pub struct DedupDecoder {
    limits: Limits,
    page_size: usize,
    restores: Vec<Box<dyn Restore>>,
    /// Resolver index per entry tag.
    by_tag: [Option<u8>; 256],
    /// Where the decoder is in the stream.
    phase: Phase,
    hello: Option<Hello>,
    /// The catalog this end holds.
    catalog: Option<CatalogId>,
    /// Stream offset of the first byte of `src` not yet consumed.
    offset: u64,
    /// Stream offset of the frame being decoded.
    frame_at: u64,
    /// Frames taken off the input, not yet staged.
    ahead: Ahead,
    /// The DATA frame to restore next.
    current: Option<Staged>,
    /// The DATA frame after it, prepared ahead so that its pages are fetched while
    /// `current` is restored.
    next: Option<Staged>,
    /// A resolver waited for pages in this stream: the next frame's batch is worth
    /// waiting for, to prepare it ahead.
    fetching: bool,
    /// The block of the last page entry, which PAGE_SAME_BLOCK refers to.
    block: Option<Bytes>,
    /// Where QEMU bytes are rebuilt.
    out: BytesMut,
    /// QEMU bytes of HOLD frames, released when END confirms the stream.
    held: BytesMut,
    /// A DATA frame taken had HOLD set: every later one must.
    hold_taken: bool,
    hasher: XxHash3_128,
    stats: Stats,
}

/// The highest HELLO channel: QEMU numbers multifd channels with a byte.
const MAX_CHANNEL: u16 = 256;

/// Where a [`DedupDecoder`] is in its stream.
enum Phase {
    /// Before the HELLO.
    Hello,
    /// Between the HELLO and the END frame.
    Frames,
    /// After the END frame verified the stream.
    Done,
    /// After an error: every call fails.
    Failed,
}

/// A DATA frame taken off the input and decompressed, staged to be restored.
struct Staged {
    at: u64,
    header: DataHeader,
    /// The stored batch, which the frame's digest covers.
    stored: Bytes,
    /// The batch decompressed.
    raw: Vec<u8>,
    /// Once every resolver is ready for its pages: at least the QEMU bytes it stands
    /// for ([`DedupDecoder::prepare`]).
    ready: Option<usize>,
}

/// What one call of [`DedupDecoder::decode`] gives.
///
/// A driver with a resolver that fetches pages (a DHT store) has its
/// [`Fetch`](crate::resolve::Fetch) fetch them whenever the decoder gives
/// [`Fetch`](Self::Fetch). The decoder never restores a frame whose pages are not
/// all in (its resolvers' [`Restore::prepare`] says so): a driver that fetches late
/// gets [`Fetch`](Self::Fetch) again rather than wrong bytes, and one that never
/// fetches gets no further. See `relay::decode_stream` for a driver that overlaps
/// fetching with restoring and writing out.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Decoded {
    /// Verified QEMU bytes: write them out, in order, then call again.
    Qemu(Bytes),
    /// The input holds no whole frame: read more, then call again.
    NeedInput,
    /// A resolver waits for pages ([`Restore::prepare`]), of the frame to restore
    /// next or of the one after it: have its [`Fetch`](crate::resolve::Fetch) fetch
    /// them (no input is needed for that). Either await the fetch and call again, or
    /// while the fetch runs keep calling [`decode`](DedupDecoder::decode) and
    /// writing out the [`Qemu`](Self::Qemu) bytes it gives, while
    /// [`is_waiting`](DedupDecoder::is_waiting) is false and until it gives anything
    /// else: the frames before the one that waits are restored meanwhile. Then
    /// await the fetch and call again.
    Fetch,
    /// The END frame verified the whole stream: nothing more comes.
    Done,
}

impl std::fmt::Debug for DedupDecoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DedupDecoder")
            .field("hello", &self.hello)
            .field("stats", &self.stats)
            .finish()
    }
}

impl DedupDecoder {
    /// A decoder with these resolvers (raw pages and verbatim QEMU bytes need
    /// none). Fails with [`Error::Config`] if two resolvers share a tag or one has a
    /// reserved tag.
    pub fn new(restores: Vec<Box<dyn Restore>>) -> Result<Self> {
        crate::resolve::check_tags(restores.iter().map(|r| r.tag()))?;
        let mut by_tag = [None; 256];
        for (i, r) in restores.iter().enumerate() {
            by_tag[usize::from(r.tag())] = Some(i as u8);
        }
        Ok(Self {
            limits: Limits::default(),
            page_size: DEFAULT_PAGE_SIZE,
            restores,
            by_tag,
            phase: Phase::Hello,
            hello: None,
            catalog: None,
            offset: 0,
            frame_at: 0,
            ahead: Ahead::new(1),
            current: None,
            next: None,
            fetching: false,
            block: None,
            out: BytesMut::new(),
            held: BytesMut::new(),
            hold_taken: false,
            hasher: XxHash3_128::new(),
            stats: Stats::default(),
        })
    }

    /// The identity of the template catalog this end holds: a stream naming another
    /// catalog is refused at its HELLO.
    pub fn with_catalog_id(mut self, id: CatalogId) -> Self {
        self.catalog = Some(id);
        self
    }

    /// Sets the limits.
    pub fn with_limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    /// Decompresses batches on `threads` threads, the caller's among them (at most
    /// [`MAX_THREADS`](super::MAX_THREADS); `threads - 1` of its own), taking whole frames
    /// off the input ahead of the one it restores, up to a few MiB per thread
    /// (stored and decompressed; one frame more at most). 1, the default,
    /// decompresses on the caller's thread and starts none. The output, and the
    /// errors and their offsets, are the same for any number. Set before decoding.
    /// A multifd channel's stream keeps to the caller's thread (its HELLO says so):
    /// QEMU already spreads the pages over the channels.
    pub fn with_threads(mut self, threads: usize) -> Self {
        self.ahead = Ahead::new(threads.clamp(1, super::MAX_THREADS));
        self
    }

    /// The source's HELLO, once received.
    pub fn hello(&self) -> Option<&Hello> {
        self.hello.as_ref()
    }

    /// Counters so far.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// The running digest so far; once the END frame verified, the END digest, which
    /// a destination confirms to its source in [`Reply::Done`](super::Reply::Done).
    pub fn digest(&self) -> [u8; wire::FRAME_DIGEST] {
        wire::digest_bytes(&self.hasher)
    }

    /// Whether the END frame arrived and confirmed the whole stream.
    pub fn is_complete(&self) -> bool {
        matches!(self.phase, Phase::Done)
    }

    /// Whether the frame to restore next waits for pages to be fetched: decoding
    /// again before the fetch completed gives [`Decoded::Fetch`] again. After a
    /// [`Decoded::Fetch`] false if the pages are wanted by the frame after it, whose
    /// fetch can overlap restoring this one.
    pub fn is_waiting(&self) -> bool {
        self.current
            .as_ref()
            .is_some_and(|frame| frame.ready.is_none())
    }

    /// Decodes what `src` holds up to the next thing the caller must do: write out
    /// verified QEMU bytes of one DATA frame ([`Decoded::Qemu`]), read more input
    /// ([`Decoded::NeedInput`]), fetch pages a resolver waits for
    /// ([`Decoded::Fetch`]), or nothing, the stream is complete ([`Decoded::Done`]).
    /// After an error every call fails.
    pub fn decode(&mut self, src: &mut BytesMut) -> Result<Decoded> {
        let result = self.next(src);
        if result.is_err() {
            self.phase = Phase::Failed;
        }
        result
    }

    /// Like [`decode`](Self::decode) at the end of the input: fails where more input
    /// would be needed, that is unless the stream ended right after its END frame.
    pub fn decode_eof(&mut self, src: &mut BytesMut) -> Result<Decoded> {
        match self.decode(src)? {
            Decoded::NeedInput => {
                self.phase = Phase::Failed;
                Err(Error::Truncated {
                    offset: self.offset + src.len() as u64,
                    field: "dedup stream before its END frame",
                })
            }
            decoded => Ok(decoded),
        }
    }

    fn next(&mut self, src: &mut BytesMut) -> Result<Decoded> {
        loop {
            match self.phase {
                Phase::Failed => {
                    return Err(self.malformed(0, "stream", "the decoder failed earlier"));
                }
                Phase::Done if src.is_empty() => return Ok(Decoded::Done),
                Phase::Done => {
                    return Err(Error::Malformed {
                        offset: self.offset,
                        field: "trailing bytes",
                        reason: "bytes after the END frame",
                    });
                }
                Phase::Hello => {
                    let Some((at, _, payload)) = self.take_frame(src)? else {
                        return Ok(Decoded::NeedInput);
                    };
                    self.frame_at = at;
                    self.on_hello(&payload)?;
                    self.phase = Phase::Frames;
                    continue;
                }
                Phase::Frames => {}
            }
            self.take_ahead(src);
            let mut frame = match self.current.take() {
                Some(frame) => frame,
                None => match self.ahead.pop() {
                    None => return Ok(Decoded::NeedInput),
                    Some(Taken { at, frame }) => {
                        self.frame_at = at;
                        match frame {
                            Frame::Data {
                                header,
                                stored,
                                batch,
                            } => self.stage(at, header, stored, batch)?,
                            Frame::End(payload) => {
                                self.on_end(&payload)?;
                                self.phase = Phase::Done;
                                let held = self.held.split().freeze();
                                if !held.is_empty() {
                                    return Ok(Decoded::Qemu(held));
                                }
                                continue;
                            }
                            Frame::Failed(e) => return Err(e),
                        }
                    }
                },
            };
            self.frame_at = frame.at;
            if frame.ready.is_none() {
                frame.ready = self.prepare(&frame)?;
                if frame.ready.is_none() {
                    self.fetching = true;
                    self.current = Some(frame);
                    return Ok(Decoded::Fetch);
                }
            }
            if self.next.is_none() && self.prepare_next(src) {
                // fetched while `frame` is restored and written out
                self.current = Some(frame);
                return Ok(Decoded::Fetch);
            }
            let out = self.restore(frame)?;
            self.current = self.next.take();
            if let Some(bytes) = out {
                return Ok(Decoded::Qemu(bytes));
            }
        }
    }

    /// Takes whole frames off `src` while the look-ahead has room, checking each
    /// as far as can be done before its turn. What is wrong is queued, to be
    /// reported after the frames before it are delivered.
    fn take_ahead(&mut self, src: &mut BytesMut) {
        while self.ahead.has_room() {
            let (at, kind, payload) = match self.take_frame(src) {
                Ok(Some(frame)) => frame,
                Ok(None) => return,
                Err(e) => return self.ahead.push_last(self.offset, Frame::Failed(e)),
            };
            let last = match kind {
                frame::DATA => match self.check_data(at, &payload) {
                    Ok(header) => {
                        let stored = payload.slice(wire::DATA_HEADER..);
                        self.ahead.push_data(at, header, stored);
                        continue;
                    }
                    Err(e) => Frame::Failed(e),
                },
                frame::END => Frame::End(payload),
                frame::HELLO => Frame::Failed(malformed(at, "frame type", "out of order")),
                _ => Frame::Failed(malformed(at, "frame type", "unknown")),
            };
            self.ahead.push_last(at, last);
        }
    }

    /// Reads the HELLO frame alone: `Ok(Some(hello))` once it is in, `Ok(None)` while
    /// `src` does not hold it whole. Whatever follows stays in `src` for
    /// [`decode`](Self::decode). For an end that checks its peer before it acts on
    /// the stream: a destination proxy connects to its QEMU only after a valid HELLO.
    pub fn decode_hello(&mut self, src: &mut BytesMut) -> Result<Option<Hello>> {
        if !matches!(self.phase, Phase::Hello) {
            return match self.hello {
                Some(hello) => Ok(Some(hello)),
                None => Err(self.malformed(0, "stream", "the decoder failed earlier")),
            };
        }
        let result = match self.take_frame(src) {
            Ok(Some((at, _, payload))) => {
                self.frame_at = at;
                self.on_hello(&payload).map(|()| self.hello)
            }
            other => other.map(|_| None),
        };
        self.phase = match &result {
            Ok(Some(_)) => Phase::Frames,
            Ok(None) => Phase::Hello,
            Err(_) => Phase::Failed,
        };
        result
    }

    /// Takes the next whole frame off `src`: its stream offset, type and payload.
    fn take_frame(&mut self, src: &mut BytesMut) -> Result<Option<(u64, u8, Bytes)>> {
        let Some((kind, len)) = wire::frame_header(src) else {
            return Ok(None);
        };
        let at = self.offset;
        if matches!(self.phase, Phase::Hello) && kind != frame::HELLO {
            return Err(malformed(at, "first frame", "not a migstream dedup stream"));
        }
        if kind == frame::HELLO && len != wire::HELLO_LEN {
            return Err(malformed(
                at + 1,
                "hello length",
                "not the length of a HELLO",
            ));
        }
        if len > self.limits.max_frame {
            return Err(limit(at + 1, "frame length", len, self.limits.max_frame));
        }
        if src.len() < wire::FRAME_HEADER + len {
            src.reserve(wire::FRAME_HEADER + len - src.len());
            return Ok(None);
        }
        let payload = src
            .split_to(wire::FRAME_HEADER + len)
            .freeze()
            .slice(wire::FRAME_HEADER..);
        self.offset += (wire::FRAME_HEADER + len) as u64;
        self.stats.wire_bytes += (wire::FRAME_HEADER + len) as u64;
        Ok(Some((at, kind, payload)))
    }

    fn on_hello(&mut self, p: &[u8]) -> Result<()> {
        let hello = Hello::parse(p, self.frame_at + wire::FRAME_HEADER as u64)?;
        // the HELLO is covered by every frame digest: the running hash starts with it
        self.hasher.write(p);
        if hello.channel > MAX_CHANNEL {
            return Err(self.malformed(
                5 + 60,
                "hello channel",
                "beyond QEMU's 255 multifd channels",
            ));
        }
        if let Some(wanted) = hello.catalog.filter(|id| Some(*id) != self.catalog) {
            return Err(Error::CatalogMismatch {
                wanted,
                held: self.catalog,
            });
        }
        self.page_size = hello.page_size as usize;
        if hello.channel > 0 {
            self.limits = self.limits.for_multifd_channel();
            // QEMU spreads its pages over the channels: one thread each is enough
            self.ahead = Ahead::new(1);
            self.restores
                .iter_mut()
                .for_each(|r| r.on_multifd_channel());
        }
        self.hello = Some(hello);
        Ok(())
    }

    /// Checks the header of the DATA frame at `at`, as it is taken off the input.
    fn check_data(&mut self, at: u64, payload: &[u8]) -> Result<DataHeader> {
        let Some(header) = DataHeader::parse(payload) else {
            return Err(malformed(at + 5, "data frame", "shorter than its header"));
        };
        let hold = header.flags & wire::FLAG_HOLD != 0;
        if header.flags & !wire::FLAG_HOLD != 0 || (self.hold_taken && !hold) {
            let reason = "unknown, or HOLD cleared once set";
            return Err(malformed(at + 6, "data frame flags", reason));
        }
        self.hold_taken = hold;
        let raw_len = header.raw_len as usize;
        if raw_len > self.limits.max_batch {
            return Err(limit(
                at + 7,
                "batch length",
                raw_len,
                self.limits.max_batch,
            ));
        }
        Ok(header)
    }

    /// A DATA frame whose turn came, once its batch is known to decompress to its
    /// length. Its resolvers hear of it ([`Restore::begin_frame`]).
    fn stage(
        &mut self,
        at: u64,
        header: DataHeader,
        stored: Bytes,
        batch: Batch,
    ) -> Result<Staged> {
        let Batch::Done(Decompressed { raw, outcome }) = batch else {
            unreachable!("the look-ahead gives frames decompressed");
        };
        match outcome {
            Ok(true) => {}
            Ok(false) => {
                let reason = "batch does not decompress to its length";
                return Err(malformed(
                    at + 5 + wire::DATA_HEADER as u64,
                    "data frame",
                    reason,
                ));
            }
            Err(Error::Unsupported { field, reason, .. }) => {
                return Err(Error::Unsupported {
                    offset: at + 5,
                    field,
                    reason,
                });
            }
            Err(e) => return Err(e),
        }
        self.restores.iter_mut().for_each(|r| r.begin_frame());
        Ok(Staged {
            at,
            header,
            stored,
            raw,
            ready: None,
        })
    }

    /// Stages the frame after the current one if it is in and decompressed, and
    /// prepares it: true if it waits for pages, which can then be fetched while the
    /// current frame is restored. A resolver's error here is left to the frame's
    /// turn, when it is prepared again and reports it after the frames before it.
    /// Until a resolver waited for pages, a batch still being decompressed is not
    /// waited for: restoring the current frame overlaps its decompression then.
    fn prepare_next(&mut self, src: &mut BytesMut) -> bool {
        self.take_ahead(src);
        let Some(Taken { at, frame }) = self.ahead.pop_ready(self.fetching) else {
            return false;
        };
        let Frame::Data {
            header,
            stored,
            batch,
        } = frame
        else {
            unreachable!("pop_ready gives DATA frames");
        };
        let Ok(mut next) = self.stage(at, header, stored, batch) else {
            unreachable!("pop_ready gives batches that decompressed");
        };
        let prepared = self.prepare(&next);
        next.ready = prepared.as_ref().ok().copied().flatten();
        self.next = Some(next);
        let waits = matches!(prepared, Ok(None));
        self.fetching |= waits;
        waits
    }

    /// Offers a frame's page bodies to their resolvers. When every page can be
    /// restored now, returns at least how many QEMU bytes the frame stands for,
    /// so that the output grows once instead of doubling (and copying) its way up
    /// to frames of many small page entries (fill pages, templates: up to 16 MiB).
    fn prepare(&mut self, frame: &Staged) -> Result<Option<usize>> {
        let mut r = EntryReader::new(&frame.raw);
        let mut ready = true;
        let mut qemu_bytes = 0;
        loop {
            match r.entry() {
                Ok(Some(Entry::Page {
                    tag,
                    continued,
                    body,
                    ..
                })) => {
                    if let Some(i) = self.by_tag[usize::from(tag)] {
                        ready &= self.restores[usize::from(i)]
                            .prepare(body)
                            .map_err(|e| e.in_frame(frame.at))?;
                    }
                    qemu_bytes += self.page_record_len(continued);
                }
                Ok(Some(Entry::Qemu(bytes))) => qemu_bytes += bytes.len(),
                // `entries` reports it, at its place among the pages
                Ok(None) | Err(_) => return Ok(ready.then_some(qemu_bytes)),
            }
        }
    }

    /// Restores a prepared frame's pages, and checks the frame's digest before its
    /// QEMU bytes go anywhere. `None` for a frame whose bytes are held until END.
    fn restore(&mut self, frame: Staged) -> Result<Option<Bytes>> {
        let Staged {
            header,
            stored,
            raw,
            ready,
            ..
        } = frame;
        let out = self.entries(&raw, ready.expect("restore runs on a prepared frame"))?;
        self.restores.iter_mut().for_each(|r| r.end_frame());
        self.ahead.done(raw, stored.len());
        self.hasher.write(&header.covered());
        self.hasher.write(&stored);
        if wire::digest_bytes(&self.hasher) != header.digest {
            return Err(self.malformed(
                11,
                "data frame digest",
                "the QEMU bytes differ from the source's",
            ));
        }
        self.stats.qemu_bytes += out.len() as u64;
        if header.flags & wire::FLAG_HOLD != 0 {
            if self.held.len() + out.len() > self.limits.max_held {
                return Err(self.limit(
                    5,
                    "held bytes after EOF",
                    self.held.len() + out.len(),
                    self.limits.max_held,
                ));
            }
            self.held.extend_from_slice(&out);
            return Ok(None);
        }
        Ok(Some(out.freeze()).filter(|bytes| !bytes.is_empty()))
    }

    /// Rebuilds the QEMU bytes of the decompressed batch `raw`, about `qemu_bytes`
    /// of them.
    fn entries(&mut self, raw: &[u8], qemu_bytes: usize) -> Result<BytesMut> {
        let offset = self.frame_at;
        let bad = |reason| Error::Malformed {
            offset,
            field: "batch entry",
            reason,
        };
        // reuses the allocation once the caller has dropped the previous frame's bytes
        let mut out = std::mem::take(&mut self.out);
        // a peer's frame reserves no more than the limit lets it have
        out.reserve(qemu_bytes.min(self.limits.max_output));
        let mut r = EntryReader::new(raw);
        let frame_start = out.len();
        while let Some(entry) = r.entry().map_err(bad)? {
            // checked before the entry grows the output: the cap holds to the byte
            let grows = match entry {
                Entry::Qemu(bytes) => bytes.len(),
                Entry::Page { continued, .. } => self.page_record_len(continued),
            };
            let produced = out.len() - frame_start;
            if produced + grows > self.limits.max_output {
                return Err(Error::LimitExceeded {
                    offset,
                    field: "QEMU bytes of one frame",
                    value: (produced + grows) as u64,
                    limit: self.limits.max_output as u64,
                });
            }
            let (tag, page, continued, block, body) = match entry {
                Entry::Qemu(bytes) => {
                    out.extend_from_slice(bytes);
                    self.hasher.write(bytes);
                    continue;
                }
                Entry::Page {
                    tag,
                    page,
                    continued,
                    block,
                    body,
                } => (tag, page, continued, block, body),
            };
            if let Some(name) = block {
                if self.block.as_deref() != Some(name) {
                    self.block = Some(Bytes::copy_from_slice(name));
                }
            }
            let block = self
                .block
                .clone()
                .ok_or_else(|| bad("same block as no earlier page"))?;
            let offset = page
                .checked_mul(self.page_size as u64)
                .ok_or_else(|| bad("page number too large"))?;
            let header = out.len();
            match self.is_channel() {
                // a multifd packet's pages follow its header and offsets, data alone
                true if continued => return Err(bad("CONTINUE on a multifd channel")),
                true => {}
                // the source's QEMU encoder checked CONTINUE against every record; here
                // it may refer to a ZERO record that travelled as verbatim bytes
                false => put_page_header(&mut out, offset, ram_flag::PAGE, continued, &block),
            }
            let at = PageAt {
                block: &block,
                offset,
            };
            let start = out.len();
            if tag == tag::RAW {
                if body.len() != self.page_size {
                    return Err(bad("raw page of the wrong size"));
                }
                out.extend_from_slice(body);
            } else {
                let Some(i) = self.by_tag[usize::from(tag)] else {
                    return Err(bad("no resolver for this tag"));
                };
                let mut page = PageOut::new(&mut out, self.page_size);
                self.restores[usize::from(i)]
                    .restore(at, body, &mut page)
                    .map_err(|e| e.in_frame(self.frame_at))?;
                if !page.is_written() {
                    return Err(bad("the resolver of its tag wrote no page"));
                }
            }
            let page = Page::new(at, &out[start..]).delivered_as(tag);
            for r in &mut self.restores {
                r.delivered(&page);
            }
            // hashed while in the cache: the frame's digest is checked at its end
            self.hasher.write(&out[header..]);
            self.stats.count_page(tag);
        }
        let bytes = out.split();
        self.out = out;
        Ok(bytes)
    }

    /// The most QEMU bytes a page entry produces: on the main channel QEMU's record
    /// header (be64 word, and a block name of up to 255 bytes unless CONTINUE) and
    /// the page; on a multifd channel the page alone.
    fn page_record_len(&self, continued: bool) -> usize {
        let header = match (self.is_channel(), continued) {
            (true, _) => 0,
            (false, true) => 8,
            (false, false) => 8 + 1 + 255,
        };
        header + self.page_size
    }

    /// Whether the stream carries a multifd channel rather than the main channel.
    fn is_channel(&self) -> bool {
        self.hello.is_some_and(|hello| hello.channel > 0)
    }

    fn on_end(&mut self, p: &[u8]) -> Result<()> {
        let Some(end) = End::parse(p) else {
            return Err(self.malformed(5, "end frame", "wrong length"));
        };
        if end.qemu_bytes != self.stats.qemu_bytes || end.digest != wire::digest_bytes(&self.hasher)
        {
            return Err(self.malformed(
                5,
                "end frame",
                "total or digest differs from the QEMU bytes delivered",
            ));
        }
        Ok(())
    }

    /// An error `at` bytes into the current frame.
    fn malformed(&self, at: usize, field: &'static str, reason: &'static str) -> Error {
        malformed(self.frame_at + at as u64, field, reason)
    }

    fn limit(&self, at: usize, field: &'static str, value: usize, cap: usize) -> Error {
        limit(self.frame_at + at as u64, field, value, cap)
    }
}

/// A malformed field at stream offset `offset`.
fn malformed(offset: u64, field: &'static str, reason: &'static str) -> Error {
    Error::Malformed {
        offset,
        field,
        reason,
    }
}

/// A field at stream offset `offset` beyond its limit.
fn limit(offset: u64, field: &'static str, value: usize, limit: usize) -> Error {
    Error::LimitExceeded {
        offset,
        field,
        value: value as u64,
        limit: limit as u64,
    }
}

#[cfg(test)]
mod tests {
    use bytes::BufMut;

    use super::*;
    use crate::resolve::tag;

    /// A dedup stream of channel `channel`: HELLO, one DATA frame of `entries` with
    /// `flags` (its digest right for what the entries produce on a channel), no END.
    fn channel_stream(channel: u16, flags: u8, entries: &[Entry<'_>]) -> BytesMut {
        let (mut out, mut hasher) = hello(channel);
        data_frame(&mut out, &mut hasher, flags, entries);
        out
    }

    /// A HELLO of channel `channel`, and the running digest after it.
    fn hello(channel: u16) -> (BytesMut, XxHash3_128) {
        let mut out = BytesMut::new();
        Hello::new(4096, None)
            .in_session([1; 16], channel)
            .put(&mut out);
        let mut hasher = XxHash3_128::new();
        hasher.write(&out[wire::FRAME_HEADER..]);
        (out, hasher)
    }

    /// Appends a stored DATA frame of `entries` to a channel's stream (pages of tag
    /// RAW or 0x81 have their body as their bytes); returns its QEMU bytes.
    fn data_frame(
        out: &mut BytesMut,
        hasher: &mut XxHash3_128,
        flags: u8,
        entries: &[Entry<'_>],
    ) -> Vec<u8> {
        let mut batch = Vec::new();
        let mut qemu = Vec::new();
        for entry in entries {
            entry.put(&mut batch);
            match *entry {
                Entry::Qemu(bytes) => qemu.extend_from_slice(bytes),
                Entry::Page { body, .. } => qemu.extend_from_slice(body),
            }
        }
        hasher.write(&qemu);
        let mut header = DataHeader {
            codec: wire::codec::STORED,
            flags,
            raw_len: batch.len() as u32,
            digest: [0; 16],
        };
        hasher.write(&header.covered());
        hasher.write(&batch);
        header.digest = wire::digest_bytes(hasher);
        header.put(out, batch.len());
        out.put_slice(&batch);
        qemu
    }

    /// Appends the END frame of a stream of `qemu_bytes`.
    fn end_frame(out: &mut BytesMut, hasher: &XxHash3_128, qemu_bytes: usize) {
        End {
            qemu_bytes: qemu_bytes as u64,
            digest: wire::digest_bytes(hasher),
        }
        .put(out);
    }

    fn first_error(mut stream: BytesMut) -> Error {
        let mut dec = DedupDecoder::new(crate::dedup::default_restores(None)).unwrap();
        loop {
            match dec.decode(&mut stream) {
                Ok(Decoded::NeedInput) => panic!("no error: {:?}", dec.stats()),
                Ok(_) => continue,
                Err(e) => return e,
            }
        }
    }

    const PAGE: [u8; 4096] = [7; 4096];

    fn raw_page(continued: bool) -> Entry<'static> {
        Entry::Page {
            tag: tag::RAW,
            page: 3,
            continued,
            block: Some(b"pc.ram"),
            body: &PAGE,
        }
    }

    /// What a channel's stream may not do: hold bytes (QEMU's EOF is on the main
    /// channel), carry CONTINUE, name a channel QEMU cannot have, send big frames.
    #[test]
    fn a_channel_stream_is_held_to_its_own_rules() {
        let ok = channel_stream(2, 0, &[Entry::Qemu(b"packet header"), raw_page(false)]);
        let mut dec = DedupDecoder::new(crate::dedup::default_restores(None)).unwrap();
        let mut input = ok.clone();
        let Decoded::Qemu(out) = dec.decode(&mut input).unwrap() else {
            panic!("a frame's bytes")
        };
        // the page alone after the verbatim bytes: no record header on a channel
        assert_eq!(out.len(), 13 + 4096);

        let held = first_error(channel_stream(2, wire::FLAG_HOLD, &[raw_page(false)]));
        assert!(
            matches!(
                held,
                Error::LimitExceeded {
                    field: "held bytes after EOF",
                    limit: 0,
                    ..
                }
            ),
            "{held}"
        );

        let continued = first_error(channel_stream(1, 0, &[raw_page(true)]));
        assert!(
            continued
                .to_string()
                .contains("CONTINUE on a multifd channel"),
            "{continued}"
        );

        let beyond = first_error(channel_stream(257, 0, &[]));
        assert!(
            beyond.to_string().contains("255 multifd channels"),
            "{beyond}"
        );

        // one frame's output is capped to the byte, its last entry included: pages
        // of one byte value, then verbatim bytes that would pass the cap
        let fill = Entry::Page {
            tag: tag::FILL,
            page: 0,
            continued: false,
            block: Some(b"pc.ram"),
            body: &[0x11],
        };
        let mut entries = vec![fill; 1100];
        let verbatim = vec![0; 20 << 20];
        entries.push(Entry::Qemu(&verbatim));
        let over = first_error(channel_stream(1, 0, &entries));
        assert!(
            matches!(over, Error::LimitExceeded { field: "QEMU bytes of one frame", value, .. } if value > 24 << 20),
            "{over}"
        );

        let mut big = channel_stream(1, 0, &[]);
        let data = big.len() - (wire::FRAME_HEADER + wire::DATA_HEADER);
        big.truncate(data);
        wire::put_frame_header(&mut big, frame::DATA, 25 << 20);
        let big = first_error(big);
        assert!(
            matches!(big, Error::LimitExceeded { field: "frame length", limit, .. } if limit == 24 << 20),
            "{big}"
        );
    }

    /// The dedup stream of a QEMU capture in frames of 8 KiB batches, and the
    /// capture.
    fn capture() -> (Vec<u8>, &'static [u8]) {
        static WIRE: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
        let qemu = include_bytes!(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/testdata/qemu-7.2-pc-paused.mig"
        ));
        let wire = WIRE.get_or_init(|| {
            let mut records = crate::qemu::QemuDecoder::new();
            let mut enc =
                crate::dedup::DedupEncoder::with_default_resolvers().with_batch_size(8 << 10);
            let (mut input, mut wire) = (BytesMut::from(&qemu[..]), BytesMut::new());
            while let Some(record) = records.decode_eof(&mut input).unwrap() {
                enc.encode(&record, &mut wire).unwrap();
            }
            enc.finish(&mut wire).unwrap();
            wire.to_vec()
        });
        (wire.clone(), qemu)
    }

    /// What a decoder of `threads` threads gives for `wire` fed in pieces of the
    /// sizes `steps` (in turn, again and again): the QEMU bytes, then the error, if
    /// any, as printed with its offset.
    fn run(threads: usize, wire: &[u8], steps: &[usize]) -> (Vec<u8>, Option<String>) {
        let mut dec = DedupDecoder::with_default_resolvers().with_threads(threads);
        let (mut src, mut out, mut fed) = (BytesMut::new(), Vec::new(), 0);
        let mut steps = steps.iter().cycle();
        loop {
            let decoded = match fed == wire.len() {
                true => dec.decode_eof(&mut src),
                false => dec.decode(&mut src),
            };
            match decoded {
                Ok(Decoded::Qemu(bytes)) => out.extend_from_slice(&bytes),
                Ok(Decoded::NeedInput) => {
                    let n = (*steps.next().unwrap()).min(wire.len() - fed);
                    src.extend_from_slice(&wire[fed..fed + n]);
                    fed += n;
                }
                Ok(Decoded::Done) => return (out, None),
                Ok(Decoded::Fetch) => panic!("no resolver fetches"),
                Err(e) => return (out, Some(format!("{e:?}"))),
            }
        }
    }

    const THREADS: [usize; 3] = [1, 2, 4];

    /// The same bytes for any number of threads, the input whole or split at
    /// every byte boundary.
    #[test]
    fn any_threads_and_any_split_give_the_same_bytes() {
        let (wire, qemu) = capture();
        assert!(wire.len() > 20 << 10, "several frames: {}", wire.len());
        for threads in THREADS {
            for step in [wire.len(), 1, 4093] {
                let (out, error) = run(threads, &wire, &[step]);
                assert_eq!(error, None, "{threads} threads, step {step}");
                assert!(out == qemu, "{threads} threads, step {step}");
            }
        }
    }

    /// A corrupted or truncated stream fails alike for any number of threads: the
    /// same bytes delivered first, the same error at the same offset.
    #[test]
    fn any_threads_fail_alike() {
        let (wire, _) = capture();
        let positions = (0..wire.len()).step_by(wire.len() / 150 + 1);
        for at in positions {
            let mut corrupted = wire.clone();
            corrupted[at] ^= 0x55;
            let expected = run(1, &corrupted, &[corrupted.len()]);
            assert!(expected.1.is_some(), "a flip at {at} goes unseen");
            for threads in THREADS {
                for step in [corrupted.len(), 4093] {
                    let got = run(threads, &corrupted, &[step]);
                    assert_eq!(
                        got.1, expected.1,
                        "flip at {at}, {threads} threads, step {step}"
                    );
                    assert!(got.0 == expected.0, "flip at {at}, {threads} threads");
                }
            }
            let truncated = &wire[..at];
            let expected = run(1, truncated, &[truncated.len()]);
            assert!(
                expected.1.as_ref().is_some_and(|e| e.contains("Truncated")),
                "{at}"
            );
            for threads in THREADS {
                assert_eq!(run(threads, truncated, &[4093]), expected, "cut at {at}");
            }
        }
    }

    /// A batch that does not decompress is reported at its own frame, after the
    /// frames before it are delivered, whatever the threads.
    #[test]
    fn a_bad_batch_fails_at_its_frame_after_the_frames_before() {
        let (mut wire, _) = capture();
        let mut frames = Vec::new();
        let mut at = 0;
        while at < wire.len() {
            let (kind, len) = wire::frame_header(&wire[at..]).unwrap();
            frames.push((at, kind));
            at += wire::FRAME_HEADER + len;
        }
        let data: Vec<usize> = frames
            .iter()
            .filter(|(_, kind)| *kind == frame::DATA)
            .map(|(at, _)| *at)
            .collect();
        let bad = data[data.len() / 2];
        assert_eq!(wire[bad + 5], wire::codec::LZ4);
        // an LZ4 literal run longer than the batch
        wire[bad + 5 + wire::DATA_HEADER] = 0xff;
        let reached = run(1, &wire[..bad], &[bad]).0;
        for threads in THREADS {
            let (out, error) = run(threads, &wire, &[wire.len()]);
            let error = error.expect("the bad batch");
            let offset = bad + 5 + wire::DATA_HEADER;
            assert!(error.contains(&format!("offset: {offset}")), "{error}");
            assert!(error.contains("does not decompress"), "{error}");
            assert!(
                out == reached,
                "{threads} threads: the frames before it delivered"
            );
        }
    }

    /// A main channel's stream of `frames` DATA frames of `pages` pages of QEMU bytes
    /// each, and its QEMU bytes.
    fn raw_stream(frames: usize, pages: usize) -> (BytesMut, Vec<u8>) {
        // the main channel's (a channel's decoder keeps to one thread), QEMU bytes
        let (mut out, mut hasher) = hello(0);
        let mut qemu = Vec::new();
        let pages: Vec<[u8; 4096]> = (0..pages).map(|i| [i as u8 | 1; 4096]).collect();
        for _ in 0..frames {
            let entries: Vec<Entry<'_>> = pages.iter().map(|page| Entry::Qemu(page)).collect();
            qemu.extend(data_frame(&mut out, &mut hasher, 0, &entries));
        }
        end_frame(&mut out, &hasher, qemu.len());
        (out, qemu)
    }

    /// A multifd channel's stream keeps to the caller's thread whatever was asked:
    /// QEMU already spreads the pages over its channels.
    #[test]
    fn a_channel_decodes_on_one_thread() {
        for (channel, budget) in [(0, 4), (1, 1)] {
            let (mut wire, hasher) = hello(channel);
            end_frame(&mut wire, &hasher, 0);
            let mut dec = DedupDecoder::with_default_resolvers().with_threads(4);
            assert_eq!(dec.decode_eof(&mut wire).unwrap(), Decoded::Done);
            let one = DedupDecoder::with_default_resolvers().ahead.budget();
            assert_eq!(dec.ahead.budget(), budget * one, "channel {channel}");
        }
    }

    /// Frames taken ahead pass the byte budget by one frame at most, however much
    /// input is there.
    #[test]
    fn the_look_ahead_is_bounded_in_bytes() {
        // frames of 256 KiB and 2 MiB of pages, stored and decompressed
        for pages in [32, 256] {
            let (wire, qemu) = raw_stream(24, pages);
            let frame = 2 * pages * (4096 + 16);
            for threads in THREADS {
                let mut dec = DedupDecoder::with_default_resolvers().with_threads(threads);
                let (mut src, mut out, mut most) = (wire.clone(), Vec::new(), 0);
                while let Decoded::Qemu(bytes) = dec.decode_eof(&mut src).unwrap() {
                    out.extend_from_slice(&bytes);
                    most = most.max(dec.ahead.bytes());
                }
                assert!(out == qemu);
                let budget = dec.ahead.budget();
                assert!(most <= budget + frame, "{threads} threads: {most} ahead");
                // it does look ahead: the next frame is in when this one is handed
                // out, and several once it has threads to use
                assert!(most >= frame / 2, "{threads} threads: {most}");
                assert!(
                    threads == 1 || most > 2 * frame,
                    "{threads} threads: {most}"
                );
            }
        }
    }

    /// Pages of tag 0x81 can be restored only once fetched: the decoder's half.
    #[derive(Clone, Default)]
    struct Remote(std::sync::Arc<std::sync::Mutex<RemoteState>>);

    #[derive(Default)]
    struct RemoteState {
        wanted: Vec<Vec<u8>>,
        fetched: Vec<Vec<u8>>,
        /// begin_frame and end_frame calls, as +1 and -1.
        frames: Vec<i8>,
    }

    impl Remote {
        fn fetch(&self) {
            let mut state = self.0.lock().unwrap();
            let wanted = std::mem::take(&mut state.wanted);
            state.fetched.extend(wanted);
        }
    }

    impl Restore for Remote {
        fn tag(&self) -> u8 {
            0x81
        }
        fn prepare(&mut self, body: &[u8]) -> Result<bool> {
            let mut state = self.0.lock().unwrap();
            let have = state.fetched.iter().any(|page| page == body);
            if !have {
                state.wanted.push(body.to_vec());
            }
            Ok(have)
        }
        fn begin_frame(&mut self) {
            self.0.lock().unwrap().frames.push(1);
        }
        fn end_frame(&mut self) {
            self.0.lock().unwrap().frames.push(-1);
        }
        fn restore(&mut self, _: PageAt<'_>, body: &[u8], out: &mut PageOut<'_>) -> Result<()> {
            let fetched = self.0.lock().unwrap().fetched.iter().any(|p| p == body);
            assert!(fetched, "restored before fetched");
            out.copy_from_slice(body)
        }
    }

    /// The frame after the current one is prepared before the current one is
    /// restored, so that its pages are fetched meanwhile; a frame whose pages are
    /// not in is never restored, whether the driver fetches or not.
    #[test]
    fn the_next_frame_waits_for_its_pages_while_this_one_is_restored() {
        let (mut wire, mut hasher) = hello(1);
        let remote_page = [0x42; 4096];
        let page = |tag, body| Entry::Page {
            tag,
            page: 0,
            continued: false,
            block: Some(b"pc.ram"),
            body,
        };
        let first_remote = [0x41; 4096];
        let a = data_frame(&mut wire, &mut hasher, 0, &[page(0x81, &first_remote)]);
        let b = data_frame(&mut wire, &mut hasher, 0, &[page(0x81, &remote_page)]);
        let c = data_frame(&mut wire, &mut hasher, 0, &[page(tag::RAW, &PAGE)]);
        end_frame(&mut wire, &hasher, a.len() + b.len() + c.len());

        let remote = Remote::default();
        let mut dec = DedupDecoder::new(vec![Box::new(remote.clone())]).unwrap();
        let mut src = wire.clone();
        let mut next = |dec: &mut DedupDecoder| dec.decode_eof(&mut src).unwrap();
        // A waits for its page
        assert_eq!(next(&mut dec), Decoded::Fetch);
        assert!(dec.is_waiting());
        remote.fetch();
        // now that a resolver fetches, B's pages are wanted before A is restored, and
        // A does not wait for them
        assert_eq!(next(&mut dec), Decoded::Fetch);
        assert!(!dec.is_waiting());
        // the driver did not fetch: A comes, B does not
        assert_eq!(next(&mut dec), Decoded::Qemu(a.clone().into()));
        assert!(dec.is_waiting());
        assert_eq!(next(&mut dec), Decoded::Fetch);
        assert_eq!(next(&mut dec), Decoded::Fetch);
        remote.fetch();
        assert_eq!(next(&mut dec), Decoded::Qemu(b.clone().into()));
        assert_eq!(next(&mut dec), Decoded::Qemu(c.clone().into()));
        assert_eq!(next(&mut dec), Decoded::Done);

        // with threads, whether B is prepared before A is restored depends on when its
        // batch is in: the bytes and the frames' bracketing do not
        for threads in THREADS {
            let remote = Remote::default();
            let mut dec = DedupDecoder::new(vec![Box::new(remote.clone())])
                .unwrap()
                .with_threads(threads);
            let (mut src, mut out) = (wire.clone(), Vec::new());
            for _ in 0..10 {
                match dec.decode_eof(&mut src).unwrap() {
                    Decoded::Qemu(bytes) => out.extend_from_slice(&bytes),
                    Decoded::Fetch => remote.fetch(),
                    _ => break,
                }
            }
            assert!(dec.is_complete(), "{threads} threads");
            assert!(out == [&a[..], &b, &c].concat());
            // every frame begun before it was prepared and ended once restored, at most
            // two at once
            let frames = remote.0.lock().unwrap().frames.clone();
            let open: Vec<i8> = frames
                .iter()
                .scan(0, |open, step| {
                    *open += step;
                    Some(*open)
                })
                .collect();
            assert_eq!(frames.len(), 6, "{frames:?}");
            assert_eq!(frames[..2], [1, 1], "B begun before A ended: {frames:?}");
            assert!(open.iter().all(|&n| (0..=2).contains(&n)), "{frames:?}");
            assert_eq!(open.last(), Some(&0));
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(24))]

        /// Any split of the input, any number of threads, a flipped byte or none: the
        /// same bytes and the same error as one thread given the input whole.
        #[test]
        fn any_split_and_threads_decode_alike(
            steps in proptest::collection::vec(1usize..20_000, 1..64),
            threads in 1usize..=4,
            flip in proptest::option::of(proptest::prelude::any::<proptest::sample::Index>()),
        ) {
            let (mut wire, _) = capture();
            if let Some(at) = flip {
                let at = at.index(wire.len());
                wire[at] ^= 0x20;
            }
            let expected = run(1, &wire, &[wire.len()]);
            let got = run(threads, &wire, &steps);
            proptest::prop_assert_eq!(&got.1, &expected.1);
            proptest::prop_assert!(got.0 == expected.0);
        }
    }
}
