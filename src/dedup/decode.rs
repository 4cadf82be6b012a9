//! The destination side: dedup frames in, the exact QEMU bytes out.

use bytes::{Bytes, BytesMut};
use twox_hash::XxHash3_128;

use super::compress::Decompressor;
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
    /// The batch of the DATA frame being restored, decompressed.
    raw: Vec<u8>,
    decompressor: Decompressor,
    /// The block of the last page entry, which PAGE_SAME_BLOCK refers to.
    block: Option<Bytes>,
    /// Where QEMU bytes are rebuilt.
    out: BytesMut,
    /// QEMU bytes of HOLD frames, released when END confirms the stream.
    held: BytesMut,
    hold_started: bool,
    hasher: XxHash3_128,
    stats: Stats,
}

/// The highest HELLO channel: QEMU numbers multifd channels with a byte.
const MAX_CHANNEL: u16 = 256;

/// Where a [`DedupDecoder`] is in its stream.
enum Phase {
    /// Before the HELLO.
    Hello,
    /// Between frames.
    Frames,
    /// A DATA frame decompressed into `DedupDecoder::raw` whose pages are not
    /// restored yet: its resolvers may wait for pages to be fetched. Holds the
    /// frame's header and stored batch, which its digest covers.
    Restoring { header: DataHeader, stored: Bytes },
    /// After the END frame verified the stream.
    Done,
    /// After an error: every call fails.
    Failed,
}

/// What one call of [`DedupDecoder::decode`] gives.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Decoded {
    /// Verified QEMU bytes: write them out, in order, then call again.
    Qemu(Bytes),
    /// The input holds no whole frame: read more, then call again.
    NeedInput,
    /// A resolver waits for pages of the current frame ([`Restore::prepare`]): have
    /// its [`Fetch`](crate::resolve::Fetch) fetch them, then call again (no input
    /// is needed for that).
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
            raw: Vec::new(),
            decompressor: Decompressor::default(),
            block: None,
            out: BytesMut::new(),
            held: BytesMut::new(),
            hold_started: false,
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
                Phase::Restoring { .. } => match self.restore_staged()? {
                    Some(bytes) => return Ok(Decoded::Qemu(bytes)),
                    None if matches!(self.phase, Phase::Restoring { .. }) => {
                        return Ok(Decoded::Fetch);
                    }
                    None => continue,
                },
                Phase::Hello | Phase::Frames => {}
            }
            let Some((kind, payload)) = self.take_frame(src)? else {
                return Ok(Decoded::NeedInput);
            };
            match (kind, &self.phase) {
                (frame::HELLO, Phase::Hello) => {
                    self.on_hello(&payload)?;
                    self.phase = Phase::Frames;
                }
                (frame::DATA, Phase::Frames) => self.on_data(payload)?,
                (frame::END, Phase::Frames) => {
                    self.on_end(&payload)?;
                    self.phase = Phase::Done;
                    let held = self.held.split().freeze();
                    if !held.is_empty() {
                        return Ok(Decoded::Qemu(held));
                    }
                }
                (frame::HELLO | frame::DATA | frame::END, _) => {
                    return Err(self.malformed(0, "frame type", "out of order"));
                }
                _ => return Err(self.malformed(0, "frame type", "unknown")),
            }
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
            Ok(Some((_, payload))) => self.on_hello(&payload).map(|()| self.hello),
            other => other.map(|_| None),
        };
        self.phase = match &result {
            Ok(Some(_)) => Phase::Frames,
            Ok(None) => Phase::Hello,
            Err(_) => Phase::Failed,
        };
        result
    }

    /// Takes the next whole frame off `src`: its type and payload.
    fn take_frame(&mut self, src: &mut BytesMut) -> Result<Option<(u8, Bytes)>> {
        let Some((kind, len)) = wire::frame_header(src) else {
            return Ok(None);
        };
        self.frame_at = self.offset;
        if matches!(self.phase, Phase::Hello) && kind != frame::HELLO {
            return Err(self.malformed(0, "first frame", "not a migstream dedup stream"));
        }
        if kind == frame::HELLO && len != wire::HELLO_LEN {
            return Err(self.malformed(1, "hello length", "not the length of a HELLO"));
        }
        if len > self.limits.max_frame {
            return Err(self.limit(1, "frame length", len, self.limits.max_frame));
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
        Ok(Some((kind, payload)))
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
            self.restores
                .iter_mut()
                .for_each(|r| r.on_multifd_channel());
        }
        self.hello = Some(hello);
        Ok(())
    }

    /// Checks a DATA frame's header and decompresses its batch into `self.raw`; the
    /// pages are restored by [`restore_staged`](Self::restore_staged).
    fn on_data(&mut self, payload: Bytes) -> Result<()> {
        let Some(header) = DataHeader::parse(&payload) else {
            return Err(self.malformed(5, "data frame", "shorter than its header"));
        };
        let hold = header.flags & wire::FLAG_HOLD != 0;
        if header.flags & !wire::FLAG_HOLD != 0 || (self.hold_started && !hold) {
            return Err(self.malformed(6, "data frame flags", "unknown, or HOLD cleared once set"));
        }
        let raw_len = header.raw_len as usize;
        if raw_len > self.limits.max_batch {
            return Err(self.limit(7, "batch length", raw_len, self.limits.max_batch));
        }
        self.raw.resize(raw_len, 0);
        let stored = payload.slice(wire::DATA_HEADER..);
        if !self
            .decompressor
            .decompress(header.codec, &stored, &mut self.raw)?
        {
            return Err(self.malformed(
                5 + wire::DATA_HEADER,
                "data frame",
                "batch does not decompress to its length",
            ));
        }
        self.phase = Phase::Restoring { header, stored };
        Ok(())
    }

    /// Offers the staged frame's page bodies to their resolvers. When every page can
    /// be restored now, returns at least how many QEMU bytes the frame stands for,
    /// so that the output grows once instead of doubling (and copying) its way up
    /// to frames of many small page entries (fill pages, templates: up to 16 MiB).
    fn prepare(&mut self) -> Result<Option<usize>> {
        let mut r = EntryReader::new(&self.raw);
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
                            .map_err(|e| e.in_frame(self.frame_at))?;
                    }
                    qemu_bytes += self.page_record_len(continued);
                }
                Ok(Some(Entry::Qemu(bytes))) => qemu_bytes += bytes.len(),
                // restore_staged reports it, at its place among the pages
                Ok(None) | Err(_) => return Ok(ready.then_some(qemu_bytes)),
            }
        }
    }

    /// Restores the staged frame's pages once its resolvers are ready (else leaves
    /// it staged and gives `None`), and checks the frame's digest before its QEMU
    /// bytes go anywhere. `None` also for a frame whose bytes are held until END.
    fn restore_staged(&mut self) -> Result<Option<Bytes>> {
        let Some(qemu_bytes) = self.prepare()? else {
            return Ok(None);
        };
        let Phase::Restoring { header, stored } = std::mem::replace(&mut self.phase, Phase::Frames)
        else {
            unreachable!("restore_staged runs on a staged frame");
        };
        let out = self.entries(qemu_bytes)?;
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
            self.hold_started = true;
            return Ok(None);
        }
        Ok(Some(out.freeze()).filter(|bytes| !bytes.is_empty()))
    }

    /// Rebuilds the QEMU bytes of the batch in `self.raw`, about `qemu_bytes` of them.
    fn entries(&mut self, qemu_bytes: usize) -> Result<BytesMut> {
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
        let raw = std::mem::take(&mut self.raw);
        let mut r = EntryReader::new(&raw);
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
        self.raw = raw;
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
        Error::Malformed {
            offset: self.frame_at + at as u64,
            field,
            reason,
        }
    }

    fn limit(&self, at: usize, field: &'static str, value: usize, limit: usize) -> Error {
        Error::LimitExceeded {
            offset: self.frame_at + at as u64,
            field,
            value: value as u64,
            limit: limit as u64,
        }
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
        let mut out = BytesMut::new();
        Hello::new(4096, None)
            .in_session([1; 16], channel)
            .put(&mut out);
        let mut hasher = XxHash3_128::new();
        hasher.write(&out[wire::FRAME_HEADER..]);
        let mut batch = Vec::new();
        for entry in entries {
            entry.put(&mut batch);
            match *entry {
                Entry::Qemu(bytes) => hasher.write(bytes),
                Entry::Page { body, .. } => hasher.write(body),
            }
        }
        let mut header = DataHeader {
            codec: wire::codec::STORED,
            flags,
            raw_len: batch.len() as u32,
            digest: [0; 16],
        };
        hasher.write(&header.covered());
        hasher.write(&batch);
        header.digest = wire::digest_bytes(&hasher);
        header.put(&mut out, batch.len());
        out.put_slice(&batch);
        out
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
}
