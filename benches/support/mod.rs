//! The synthetic QEMU streams the benches run on, shared by `codec` and `dedup`.
//!
//! A QEMU 10.0-like precopy stream of a `pc-i440fx-10.0` guest with 400 MiB of RAM,
//! built with the crate's encoder in the layout of the tests' and the demo's
//! synthetic streams (`tests/support/synthetic.rs`): header, configuration, the RAM
//! setup section (`MEM_SIZE` and the block list), PART sections of a few thousand
//! page records each with their footers, the END section with pages dirtied again,
//! then a FULL device section whose ~16 KiB of state pass through as opaque bytes,
//! EOF and a ~100 KiB JSON device description. Every page record but the first of
//! each block carries CONTINUE; a page that happens to be all zero is sent as ZERO,
//! as QEMU does. Page classes come in runs, as they do in guest memory; the random
//! draws come from the same generator ([`Rng`]).
//!
//! - [`Shape::Codec`] (the `codec` bench, unchanged since it was written): about
//!   35 % ZERO records, the rest code and data cut in turn from a 48 MiB corpus
//!   (pages of the bench binary and of the system's shared libraries, so they repeat
//!   about three times), random bytes (compressed or encrypted data) and mostly-zero
//!   pages with a few non-zero bytes (page tables, sparse structures); the END
//!   section re-sends 512 pages with new contents.
//! - [`Shape::Dedup`] (the `dedup` bench): the same 35 % zero, 33 % code and data
//!   from a 160 MiB corpus (so that it hardly repeats: the pages nothing claims are
//!   the expensive ones), 17 % sparse, 10 % random, and 5 % copies of one of the last
//!   4096 non-zero pages (what seen-before finds). The first [`IMAGE_PAGES`] code
//!   pages are the "shared OS image" other guests also hold: the pages a template
//!   catalog is built from ([`Stream::image`]). The END section re-sends 2048 pages
//!   of the first pass with a few bytes changed (what XBZRLE finds, when the cache
//!   still holds them).

#![allow(dead_code)]

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use criterion::measurement::Measurement;
use criterion::{BenchmarkGroup, Criterion, SamplingMode};
use migstream::qemu::{QemuEncoder, RamRecord, Record};

#[path = "../../tests/support/synthetic.rs"]
pub(crate) mod synthetic;

use synthetic::{Layout, Rng};

pub(crate) const PAGE: usize = 4096;
pub(crate) const MIB: u64 = 1024 * 1024;
/// Pages of the shared OS image in [`Shape::Dedup`] (48 MiB).
pub(crate) const IMAGE_PAGES: usize = 12288;

/// The RAM blocks of a `pc-i440fx-10.0` guest with `-m 400M`, std VGA and an e1000,
/// in QEMU's block-list order (descending maximum length).
const BLOCKS: &[(&str, u64)] = &[
    ("pc.ram", 400 * MIB),
    ("0000:00:02.0/vga.vram", 16 * MIB),
    ("/rom@etc/acpi/tables", 128 * 1024),
    ("pc.bios", 256 * 1024),
    ("0000:00:03.0/e1000.rom", 256 * 1024),
    ("pc.rom", 128 * 1024),
    ("/rom@etc/table-loader", 4 * 1024),
    ("/rom@etc/acpi/rsdp", 4 * 1024),
];

/// Which synthetic stream to build.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Shape {
    /// The `codec` bench's stream.
    Codec,
    /// The `dedup` bench's stream: fewer repeats, copies, a shared image, a dirty pass.
    Dedup,
}

/// What a guest page holds.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Class {
    Zero,
    Code,
    Random,
    Sparse,
    /// A copy of a recent page.
    Copy,
}

/// Non-zero pages a [`Class::Copy`] page may copy.
const RECENT: usize = 4096;

/// Page contents: pick a class per run of pages, then fill each page of the run.
struct PageSource {
    shape: Shape,
    rng: Rng,
    /// Code and data to cut pages from: this binary and shared libraries.
    corpus: Vec<u8>,
    corpus_pos: usize,
    class: Class,
    run_left: u64,
    /// The last non-zero pages ([`Shape::Dedup`] only), a ring.
    recent: Vec<Bytes>,
    recent_at: usize,
}

impl PageSource {
    fn new(shape: Shape) -> Self {
        let corpus = match shape {
            Shape::Codec => 48,
            Shape::Dedup => 160,
        };
        Self {
            shape,
            rng: Rng::new(0x9E37_79B9_7F4A_7C15),
            corpus: code_corpus(corpus * MIB as usize),
            corpus_pos: 0,
            class: Class::Zero,
            run_left: 0,
            recent: Vec::new(),
            recent_at: 0,
        }
    }

    /// The next page's class, in runs.
    fn class(&mut self) -> Class {
        if self.run_left == 0 {
            let roll = self.rng.below(100);
            self.class = match self.shape {
                // 35 % zero, 33 % code, 17 % sparse, 15 % random
                Shape::Codec => match roll {
                    0..35 => Class::Zero,
                    35..68 => Class::Code,
                    68..85 => Class::Sparse,
                    _ => Class::Random,
                },
                // 35 % zero, 33 % code, 17 % sparse, 10 % random, 5 % copies
                Shape::Dedup => match roll {
                    0..35 => Class::Zero,
                    35..68 => Class::Code,
                    68..85 => Class::Sparse,
                    85..95 => Class::Random,
                    _ => Class::Copy,
                },
            };
            self.run_left = 1 + self.rng.below(48);
        }
        self.run_left -= 1;
        self.class
    }

    /// The next page's bytes; `None` for a page that is all zero.
    fn page(&mut self) -> Option<Bytes> {
        let mut page = vec![0u8; PAGE];
        match self.class() {
            Class::Zero => return None,
            Class::Copy if !self.recent.is_empty() => {
                let n = self.rng.below(self.recent.len() as u64) as usize;
                return Some(self.recent[n].clone());
            }
            Class::Code | Class::Copy => {
                page.copy_from_slice(&self.corpus[self.corpus_pos..self.corpus_pos + PAGE]);
                self.corpus_pos = (self.corpus_pos + PAGE) % self.corpus.len();
            }
            Class::Random => {
                for word in page.chunks_exact_mut(8) {
                    word.copy_from_slice(&self.rng.next().to_le_bytes());
                }
            }
            Class::Sparse => {
                // a few kernel-pointer-like words and stray bytes in a zero page
                for _ in 0..1 + self.rng.below(6) {
                    let at = self.rng.below(PAGE as u64 / 8) as usize * 8;
                    let ptr = 0xFFFF_8880_0000_0000 | (self.rng.next() & 0x0FFF_FFF8);
                    page[at..at + 8].copy_from_slice(&ptr.to_le_bytes());
                }
                for _ in 0..self.rng.below(12) {
                    let at = self.rng.below(PAGE as u64) as usize;
                    page[at] = self.rng.next() as u8;
                }
            }
        }
        // QEMU sends a page that is all zero as a ZERO record, whatever it was
        let page = (page.iter().any(|&b| b != 0)).then(|| Bytes::from(page))?;
        if self.shape == Shape::Dedup {
            match self.recent.len() < RECENT {
                true => self.recent.push(page.clone()),
                false => self.recent[self.recent_at] = page.clone(),
            }
            self.recent_at = (self.recent_at + 1) % RECENT;
        }
        Some(page)
    }

    /// `page` with a few short runs of bytes changed (a page dirtied again).
    fn dirtied(&mut self, page: &[u8]) -> Bytes {
        let mut page = page.to_vec();
        for _ in 0..1 + self.rng.below(8) {
            let at = self.rng.below(PAGE as u64 - 16) as usize;
            for b in &mut page[at..at + 1 + self.rng.below(16) as usize] {
                *b = b.wrapping_add(1 + self.rng.below(255) as u8);
            }
        }
        Bytes::from(page)
    }
}

/// Up to `max` bytes of code and data, a whole number of pages: this bench binary,
/// then the shared libraries in `/usr/lib/x86_64-linux-gnu` (if any), in name order,
/// at most 4 MiB of each.
fn code_corpus(max: usize) -> Vec<u8> {
    const PER_FILE: usize = 4 * MIB as usize;
    let exe = std::env::current_exe().expect("path of the bench binary");
    let mut files = vec![exe];
    if let Ok(dir) = std::fs::read_dir("/usr/lib/x86_64-linux-gnu") {
        let mut libs: Vec<_> = dir
            .filter_map(|e| e.ok())
            .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
            .map(|e| e.path())
            .filter(|p| p.to_string_lossy().contains(".so"))
            .collect();
        libs.sort();
        files.extend(libs);
    }
    let mut corpus = Vec::with_capacity(max);
    for path in files {
        if corpus.len() >= max {
            break;
        }
        if let Ok(bytes) = std::fs::read(&path) {
            let n = bytes.len().min(PER_FILE).min(max - corpus.len());
            corpus.extend_from_slice(&bytes[..n]);
        }
    }
    corpus.truncate(corpus.len() / PAGE * PAGE);
    assert!(!corpus.is_empty(), "no code to build pages from");
    corpus
}

/// The device state after the first FULL section header: more FULL sections with
/// footers, their payloads mostly zero with some small values, about 16 KiB.
fn device_state(rng: &mut Rng) -> Bytes {
    const DEVICES: &[(&str, u32, usize)] = &[
        ("cpu_common", 1, 16),
        ("cpu", 12, 6000),
        ("apic", 3, 1100),
        ("kvmclock", 1, 24),
        ("fw_cfg", 2, 12),
        ("PCIBUS", 1, 64),
        ("I440FX", 3, 600),
        ("PIIX3", 3, 600),
        ("0000:00:02.0/vga", 2, 2800),
        ("0000:00:03.0/e1000", 2, 2400),
        ("0000:00:01.1/ide", 3, 1500),
        ("i8259", 3, 80),
        ("hpet", 2, 180),
        ("mc146818rtc", 3, 160),
        ("ps2kbd", 2, 300),
    ];
    let mut out = Vec::with_capacity(20 * 1024);
    // the timer section's payload and footer (its header is the SectionFull record)
    out.extend_from_slice(&rng.next().to_be_bytes());
    out.extend_from_slice(&[0; 8]);
    out.extend_from_slice(&rng.next().to_be_bytes());
    out.extend_from_slice(&[0x7E, 0, 0, 0, 0]);
    for (id, &(name, version, len)) in (3u32..).zip(DEVICES) {
        out.push(0x04);
        out.extend_from_slice(&id.to_be_bytes());
        out.push(name.len() as u8);
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(&0u32.to_be_bytes());
        out.extend_from_slice(&version.to_be_bytes());
        let start = out.len();
        out.resize(start + len, 0);
        for _ in 0..len / 16 {
            let at = start + rng.below(len as u64) as usize;
            out[at] = 1 + rng.below(255) as u8;
        }
        out.push(0x7E);
        out.extend_from_slice(&id.to_be_bytes());
    }
    Bytes::from(out)
}

/// A JSON device description shaped like QEMU's, about 100 KiB.
fn vm_description() -> Bytes {
    const FIELDS: &[(&str, &str, u32)] = &[
        ("parent_obj", "struct", 0),
        ("config", "buffer", 256),
        ("irq_state", "int32", 4),
        ("regs", "uint32", 4),
        ("mac_reg", "uint32", 4),
        ("eecd_state.val_in", "uint16", 2),
        ("tx.props.ipcss", "uint8", 1),
        ("rx_desc_count", "uint64", 8),
    ];
    let mut json = String::from(r#"{"page_size":4096,"devices":["#);
    let mut i = 0;
    while json.len() < 100 * 1024 {
        if i > 0 {
            json.push(',');
        }
        json.push_str(&format!(
            r#"{{"name":"dev{i}","instance_id":0,"vmsd_name":"dev{i}","version":{v},"fields":["#,
            v = 1 + i % 4
        ));
        for (j, (name, kind, size)) in FIELDS.iter().enumerate() {
            if j > 0 {
                json.push(',');
            }
            json.push_str(&format!(
                r#"{{"name":"{name}","type":"{kind}","size":{size}}}"#
            ));
        }
        json.push_str("]}");
        i += 1;
    }
    json.push_str("]}");
    Bytes::from(json)
}

/// Counts of what the synthetic stream holds, for the log.
#[derive(Default, Debug)]
pub(crate) struct Mix {
    pub(crate) zero: u64,
    pub(crate) page: u64,
    pub(crate) parts: u64,
}

/// A synthetic stream and what went into it.
pub(crate) struct Stream {
    /// The QEMU stream.
    pub(crate) bytes: Bytes,
    pub(crate) mix: Mix,
    /// [`Shape::Dedup`]: the pages of the shared OS image, for a template catalog.
    pub(crate) image: Vec<Bytes>,
}

/// An all-zero page, for the pages [`PageSource::page`] says are zero.
static ZERO_PAGE: [u8; PAGE] = [0; PAGE];

/// Encodes the synthetic stream's records into one buffer.
struct Builder {
    enc: QemuEncoder,
    out: BytesMut,
    src: PageSource,
    layout: Layout,
    mix: Mix,
    /// [`Shape::Dedup`]: every 32nd page of `pc.ram` of the first pass, with its offset.
    kept: Vec<(u64, Bytes)>,
}

impl Builder {
    fn put(&mut self, record: Record) {
        self.enc
            .encode(&record, &mut self.out)
            .expect("encodable record");
    }

    /// One page of block `block`: PAGE, or ZERO if its contents are all zero.
    fn page(&mut self, block: usize, offset: u64) {
        let data = self.src.page();
        self.put_page(block, offset, data);
    }

    fn put_page(&mut self, block: usize, offset: u64, data: Option<Bytes>) {
        let data = data.unwrap_or_else(|| Bytes::from_static(&ZERO_PAGE));
        let record = self.layout.page(block, offset, data);
        match &record {
            Record::Ram(RamRecord::Page { data, .. }) => {
                self.mix.page += 1;
                if self.src.shape == Shape::Dedup && block == 0 && self.mix.page % 32 == 0 {
                    self.kept.push((offset, data.clone()));
                }
            }
            _ => self.mix.zero += 1,
        }
        self.put(record);
    }

    /// EOS and the section footer.
    fn end_ram_payload(&mut self) {
        Layout::end_of_payload()
            .into_iter()
            .for_each(|r| self.put(r));
    }
}

/// Encodes the synthetic stream of `shape`.
pub(crate) fn synthetic_stream(shape: Shape) -> Stream {
    let mut rng = Rng::new(0xD1B5_4A32_D192_ED03);
    let mut b = Builder {
        enc: QemuEncoder::new(),
        out: BytesMut::with_capacity(300 * MIB as usize),
        src: PageSource::new(shape),
        layout: Layout::new(BLOCKS.iter().copied()),
        mix: Mix::default(),
        kept: Vec::new(),
    };
    for record in b.layout.setup() {
        b.put(record);
    }

    // The first pass: every page of every block, in PART sections of a few
    // thousand records. As in QEMU, a page record names its block only when it
    // differs from the previous page record's: all others carry CONTINUE.
    let mut pages = BLOCKS
        .iter()
        .enumerate()
        .flat_map(|(i, &(_, len))| (0..len / PAGE as u64).map(move |p| (i, p * PAGE as u64)))
        .peekable();
    while pages.peek().is_some() {
        b.mix.parts += 1;
        b.put(Layout::part());
        for (block, offset) in pages.by_ref().take(2048 + rng.below(4096) as usize) {
            b.page(block, offset);
        }
        b.end_ram_payload();
    }
    // The END section: pages of pc.ram dirtied again during the last pass.
    b.put(Layout::end());
    match shape {
        Shape::Codec => {
            let ram_pages = BLOCKS[0].1 / PAGE as u64;
            for _ in 0..512 {
                b.page(0, rng.below(ram_pages) * PAGE as u64);
            }
        }
        Shape::Dedup => {
            let kept = std::mem::take(&mut b.kept);
            for _ in 0..2048 {
                let (offset, old) = &kept[rng.below(kept.len() as u64) as usize];
                let data = b.src.dirtied(old);
                b.put_page(0, *offset, Some(data));
            }
        }
    }
    b.end_ram_payload();
    for record in Layout::device_tail(device_state(&mut rng), vm_description()) {
        b.put(record);
    }
    let image = match shape {
        Shape::Codec => Vec::new(),
        Shape::Dedup => {
            let n = (IMAGE_PAGES * PAGE).min(b.src.corpus.len());
            b.src.corpus[..n]
                .chunks_exact(PAGE)
                .map(Bytes::copy_from_slice)
                .collect()
        }
    };
    Stream {
        bytes: b.out.freeze(),
        mix: b.mix,
        image,
    }
}

/// A benchmark group of 10 flat samples, each iteration a whole stream (a fraction of
/// a second), with `warm_up` and `measure` seconds.
pub(crate) fn flat_group<'a, M: Measurement>(
    c: &'a mut Criterion<M>,
    name: &str,
    warm_up: u64,
    measure: u64,
) -> BenchmarkGroup<'a, M> {
    let mut group = c.benchmark_group(name);
    group
        .sample_size(10)
        .sampling_mode(SamplingMode::Flat)
        .warm_up_time(Duration::from_secs(warm_up))
        .measurement_time(Duration::from_secs(measure));
    group
}
