//! Throughput of the QEMU codec on one core: decode only, and decode + re-encode.
//!
//! The input is a QEMU 10.0-like precopy stream of a `pc-i440fx-10.0` guest with
//! 400 MiB of RAM (about 275 MiB on the wire), built here with the encoder:
//! header, configuration, the RAM setup section (`MEM_SIZE` and the block list),
//! PART sections of a few thousand page records each with their footers, the END
//! section, then a FULL device section whose ~16 KiB of state pass through as
//! opaque bytes, EOF and a ~100 KiB JSON device description.
//!
//! The pages mix roughly like a real guest's first pass: about 35 % ZERO records,
//! the rest PAGE records holding code and data (pages of this bench binary and of
//! the system's shared libraries), random bytes (compressed or encrypted data), and
//! mostly-zero pages with a few non-zero bytes (page tables, sparse structures).
//! Classes come in runs, as they do in guest memory, and every page record but the
//! first of each block carries CONTINUE. A page that happens to be all zero is sent
//! as ZERO, as QEMU does.
//!
//! Set `MIGSTREAM_BENCH_STREAM` to a captured main-channel stream (for example
//! `migrate "exec:cat > vm.mig"`) to bench that file too, as the `capture` id.
//!
//! ```text
//! cargo bench --bench codec -- --noplot
//! ```

use std::hint::black_box;
use std::path::Path;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use criterion::{BatchSize, BenchmarkId, Criterion, SamplingMode, Throughput};
use migstream::qemu::{
    Configuration, MemSize, PageAddr, QemuDecoder, QemuEncoder, RamBlock, RamRecord, Record,
    SectionHeader,
};

const PAGE: usize = 4096;
const MIB: u64 = 1024 * 1024;
/// Bytes handed to the decoder per read in the socket-like benchmark.
const READ: usize = 64 * 1024;
/// The RAM section's id (QEMU registers `ram` early; never assumed by the decoder).
const RAM_SECTION: u32 = 2;

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

/// A tiny xorshift64 generator: deterministic, and no dependency.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    /// A value in `0..n`.
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// What a guest page holds.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Class {
    Zero,
    Code,
    Random,
    Sparse,
}

/// Page contents: pick a class per run of pages, then fill each page of the run.
struct PageSource {
    rng: XorShift,
    /// Code and data to cut pages from: this binary and shared libraries.
    corpus: Vec<u8>,
    corpus_pos: usize,
    class: Class,
    run_left: u64,
}

impl PageSource {
    fn new() -> Self {
        Self {
            rng: XorShift(0x9E37_79B9_7F4A_7C15),
            corpus: code_corpus(48 * MIB as usize),
            corpus_pos: 0,
            class: Class::Zero,
            run_left: 0,
        }
    }

    /// The next page's class, in runs: 35 % zero, 33 % code, 17 % sparse, 15 % random.
    fn class(&mut self) -> Class {
        if self.run_left == 0 {
            self.class = match self.rng.below(100) {
                0..35 => Class::Zero,
                35..68 => Class::Code,
                68..85 => Class::Sparse,
                _ => Class::Random,
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
            Class::Code => {
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
        (page.iter().any(|&b| b != 0)).then(|| Bytes::from(page))
    }
}

/// Up to `max` bytes of code and data, a whole number of pages: this bench binary,
/// then the shared libraries in `/usr/lib/x86_64-linux-gnu` (if any), in name order.
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
fn device_state(rng: &mut XorShift) -> Bytes {
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
#[derive(Default)]
struct Mix {
    zero: u64,
    page: u64,
    parts: u64,
}

/// Encodes the synthetic stream's records into one buffer.
struct Builder {
    enc: QemuEncoder,
    out: BytesMut,
    src: PageSource,
    names: Vec<Bytes>,
    mix: Mix,
}

impl Builder {
    fn put(&mut self, record: Record) {
        self.enc
            .encode(&record, &mut self.out)
            .expect("encodable record");
    }

    /// One page of block `block`: PAGE, or ZERO if its contents are all zero.
    fn page(&mut self, block: usize, offset: u64, continued: bool) {
        let addr = PageAddr {
            block: self.names[block].clone(),
            offset,
            continued,
        };
        let record = match self.src.page() {
            Some(data) => {
                self.mix.page += 1;
                RamRecord::Page { addr, data }
            }
            None => {
                self.mix.zero += 1;
                RamRecord::Zero { addr, fill: 0 }
            }
        };
        self.put(Record::Ram(record));
    }

    /// EOS and the section footer.
    fn end_ram_payload(&mut self) {
        self.put(Record::Ram(RamRecord::Eos));
        self.put(Record::Footer {
            section_id: RAM_SECTION,
        });
    }
}

/// Encodes the synthetic stream.
fn synthetic_stream() -> (Bytes, Mix) {
    let mut rng = XorShift(0xD1B5_4A32_D192_ED03);
    let mut b = Builder {
        enc: QemuEncoder::new(),
        out: BytesMut::with_capacity(300 * MIB as usize),
        src: PageSource::new(),
        names: BLOCKS
            .iter()
            .map(|(n, _)| Bytes::from_static(n.as_bytes()))
            .collect(),
        mix: Mix::default(),
    };

    b.put(Record::Header);
    b.put(Record::Configuration(Configuration {
        machine: Bytes::from_static(b"pc-i440fx-10.0"),
        subsections: Vec::new(),
    }));
    b.put(Record::SectionStart(SectionHeader {
        section_id: RAM_SECTION,
        idstr: Bytes::from_static(b"ram"),
        instance_id: 0,
        version_id: 4,
    }));
    let blocks: Vec<RamBlock> = BLOCKS
        .iter()
        .zip(&b.names)
        .map(|(&(_, len), name)| RamBlock {
            idstr: name.clone(),
            used_length: len,
            mr_addr: None,
        })
        .collect();
    let total = blocks.iter().map(|b| b.used_length).sum();
    b.put(Record::Ram(RamRecord::MemSize(MemSize { total, blocks })));
    b.end_ram_payload();

    // The first pass: every page of every block, in PART sections of a few
    // thousand records. As in QEMU, a page record names its block only when it
    // differs from the previous page record's: all others carry CONTINUE.
    let mut pages = BLOCKS
        .iter()
        .enumerate()
        .flat_map(|(i, &(_, len))| (0..len / PAGE as u64).map(move |p| (i, p * PAGE as u64)))
        .peekable();
    let mut last = None;
    while pages.peek().is_some() {
        b.mix.parts += 1;
        b.put(Record::SectionPart {
            section_id: RAM_SECTION,
        });
        for (block, offset) in pages.by_ref().take(2048 + rng.below(4096) as usize) {
            b.page(block, offset, last == Some(block));
            last = Some(block);
        }
        b.end_ram_payload();
    }
    // The END section: pages of pc.ram dirtied again during the last pass.
    b.put(Record::SectionEnd {
        section_id: RAM_SECTION,
    });
    let ram_pages = BLOCKS[0].1 / PAGE as u64;
    for _ in 0..512 {
        b.page(0, rng.below(ram_pages) * PAGE as u64, last == Some(0));
        last = Some(0);
    }
    b.end_ram_payload();

    b.put(Record::SectionFull(SectionHeader {
        section_id: 0,
        idstr: Bytes::from_static(b"timer"),
        instance_id: 0,
        version_id: 2,
    }));
    b.put(Record::Opaque(device_state(&mut rng)));
    b.put(Record::Eof);
    b.put(Record::VmDescription(vm_description()));
    (b.out.freeze(), b.mix)
}

/// Decodes all of `buf` (the whole stream), handing each record to `f`; returns
/// the emptied buffer so that freeing it is not timed.
fn decode_all(mut buf: BytesMut, mut f: impl FnMut(Record)) -> BytesMut {
    let mut dec = QemuDecoder::new();
    while let Some(record) = dec.decode(&mut buf).expect("valid stream") {
        f(record);
    }
    while let Some(record) = dec.decode_eof(&mut buf).expect("valid stream") {
        f(record);
    }
    buf
}

/// Decodes `stream` handed over in reads of [`READ`] bytes, as from a socket: each
/// read is copied into the decoder's buffer when it asks for more.
fn decode_reads(stream: &[u8], mut f: impl FnMut(Record)) {
    let mut dec = QemuDecoder::new();
    let mut buf = BytesMut::with_capacity(2 * READ);
    let mut reads = stream.chunks(READ);
    loop {
        match dec.decode(&mut buf).expect("valid stream") {
            Some(record) => f(record),
            None => match reads.next() {
                Some(read) => buf.extend_from_slice(read),
                None => break,
            },
        }
    }
    while let Some(record) = dec.decode_eof(&mut buf).expect("valid stream") {
        f(record);
    }
}

/// Decodes and re-encodes `stream` once per way of feeding it, outside any timing,
/// and checks that the output is the input byte for byte.
fn check_round_trip(name: &str, stream: &Bytes) {
    let mut enc = QemuEncoder::new();
    let mut out = BytesMut::with_capacity(stream.len());
    let mut records = 0u64;
    decode_all(BytesMut::from(&stream[..]), |r| {
        records += 1;
        enc.encode(&r, &mut out).expect("encodable record");
    });
    assert!(out[..] == stream[..], "{name}: re-encoded stream differs");
    // the same with 64 KiB reads (opaque chunks may then be cut differently)
    let mut enc = QemuEncoder::new();
    out.clear();
    decode_reads(stream, |r| {
        enc.encode(&r, &mut out).expect("encodable record")
    });
    assert!(
        out[..] == stream[..],
        "{name}: re-encoded stream differs (64 KiB reads)"
    );
    eprintln!(
        "{name}: {} bytes ({:.1} MiB), {records} records, round trip exact",
        stream.len(),
        stream.len() as f64 / MIB as f64
    );
}

fn bench(c: &mut Criterion, streams: &[(&str, Bytes)]) {
    let mut group = c.benchmark_group("decode");
    group
        .sample_size(10)
        .sampling_mode(SamplingMode::Flat)
        .warm_up_time(Duration::from_secs(2))
        .measurement_time(Duration::from_secs(12));
    for (name, stream) in streams {
        group.throughput(Throughput::Bytes(stream.len() as u64));
        group.bench_with_input(BenchmarkId::new("whole", name), stream, |b, s| {
            b.iter_batched(
                || BytesMut::from(&s[..]),
                |buf| decode_all(buf, |r| drop(black_box(r))),
                BatchSize::PerIteration,
            )
        });
        group.bench_with_input(BenchmarkId::new("64KiB-reads", name), stream, |b, s| {
            b.iter(|| decode_reads(s, |r| drop(black_box(r))))
        });
    }
    group.finish();

    let mut group = c.benchmark_group("decode_encode");
    group
        .sample_size(10)
        .sampling_mode(SamplingMode::Flat)
        .warm_up_time(Duration::from_secs(2))
        .measurement_time(Duration::from_secs(15));
    for (name, stream) in streams {
        group.throughput(Throughput::Bytes(stream.len() as u64));
        // reused across iterations: cleared, its capacity kept
        let mut out = BytesMut::with_capacity(stream.len());
        group.bench_with_input(BenchmarkId::new("whole", name), stream, |b, s| {
            b.iter_batched(
                || BytesMut::from(&s[..]),
                |buf| {
                    out.clear();
                    let mut enc = QemuEncoder::new();
                    let buf = decode_all(buf, |r| {
                        enc.encode(&r, &mut out).expect("encodable record");
                    });
                    assert_eq!(out.len(), s.len(), "output length differs from input");
                    buf
                },
                BatchSize::PerIteration,
            )
        });
    }
    group.finish();
}

fn main() {
    let mut streams = Vec::new();
    let (synthetic, mix) = synthetic_stream();
    eprintln!(
        "synthetic: {} PART sections, {} PAGE and {} ZERO records ({:.1} % zero)",
        mix.parts,
        mix.page,
        mix.zero,
        100.0 * mix.zero as f64 / (mix.page + mix.zero) as f64
    );
    check_round_trip("synthetic", &synthetic);
    streams.push(("synthetic", synthetic));
    if let Some(path) = std::env::var_os("MIGSTREAM_BENCH_STREAM") {
        let path = Path::new(&path);
        let capture = std::fs::read(path)
            .unwrap_or_else(|e| panic!("MIGSTREAM_BENCH_STREAM={}: {e}", path.display()));
        let capture = Bytes::from(capture);
        check_round_trip("capture", &capture);
        streams.push(("capture", capture));
    }

    let mut c = Criterion::default().configure_from_args();
    bench(&mut c, &streams);
    c.final_summary();
}
