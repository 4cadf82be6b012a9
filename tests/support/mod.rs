//! Shared helpers of the integration tests: build streams from records, decode with
//! any read size, and compare record lists independent of opaque chunking.
#![allow(dead_code, unreachable_pub)]

#[cfg(feature = "relay")]
pub mod pki;
pub mod proxy;
pub mod synthetic;

#[allow(unused_imports)] // not every test uses it
pub use synthetic::random_pages;

use std::path::{Path, PathBuf};

use bytes::{Bytes, BytesMut};
use migstream::Error;
use migstream::qemu::{
    Command, ConfigSubsection, Configuration, MemSize, PageAddr, QemuDecoder, QemuEncoder,
    RamBlock, RamRecord, Record, SectionHeader,
};

/// The built example `name`, `target/<profile>/examples/<name>`: `cargo test` builds
/// the examples with the tests.
pub fn example_binary(name: &str) -> PathBuf {
    let deps = std::env::current_exe().unwrap();
    let bin = deps
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .join("examples")
        .join(name);
    assert!(
        bin.exists(),
        "{} missing: run through `cargo test`, or `cargo build --examples` first",
        bin.display()
    );
    bin
}

/// Encodes records into stream bytes.
pub fn encode(records: &[Record]) -> Vec<u8> {
    let mut enc = QemuEncoder::new();
    let mut out = BytesMut::new();
    for r in records {
        enc.encode(r, &mut out).expect("encodable record");
    }
    out.to_vec()
}

/// Decodes `bytes` fed in reads of `read` bytes; returns the records and, on
/// failure, the error.
pub fn decode_reads(bytes: &[u8], read: usize) -> (Vec<Record>, Option<Error>) {
    decode_with(QemuDecoder::new(), bytes, read)
}

pub fn decode_with(
    mut dec: QemuDecoder,
    bytes: &[u8],
    read: usize,
) -> (Vec<Record>, Option<Error>) {
    let mut buf = BytesMut::new();
    let mut records = Vec::new();
    let mut chunks = bytes.chunks(read.max(1));
    loop {
        match dec.decode(&mut buf) {
            Ok(Some(r)) => records.push(r),
            Ok(None) => match chunks.next() {
                Some(c) => buf.extend_from_slice(c),
                None => break,
            },
            Err(e) => return (records, Some(e)),
        }
    }
    loop {
        match dec.decode_eof(&mut buf) {
            Ok(Some(r)) => records.push(r),
            Ok(None) => return (records, None),
            Err(e) => return (records, Some(e)),
        }
    }
}

/// Decodes a stream that must be valid.
pub fn decode(bytes: &[u8], read: usize) -> Vec<Record> {
    let (records, err) = decode_reads(bytes, read);
    if let Some(e) = err {
        panic!("decode failed with reads of {read}: {e}");
    }
    records
}

/// Merges adjacent opaque chunks, whose boundaries depend on read sizes.
pub fn normalize(records: Vec<Record>) -> Vec<Record> {
    let mut out: Vec<Record> = Vec::new();
    for r in records {
        if let (Record::Opaque(next), Some(Record::Opaque(prev))) = (&r, out.last_mut()) {
            let mut joined = BytesMut::from(&prev[..]);
            joined.extend_from_slice(next);
            *prev = joined.freeze();
            continue;
        }
        out.push(r);
    }
    out
}

pub fn page_addr(block: &'static str, page: u64, continued: bool) -> PageAddr {
    PageAddr {
        block: Bytes::from_static(block.as_bytes()),
        offset: page * 4096,
        continued,
    }
}

pub fn page(block: &'static str, page: u64, continued: bool, byte: u8) -> Record {
    Record::Ram(RamRecord::Page {
        addr: page_addr(block, page, continued),
        data: Bytes::from(vec![byte; 4096]),
    })
}

pub fn zero(block: &'static str, page: u64, continued: bool) -> Record {
    Record::Ram(RamRecord::Zero {
        addr: page_addr(block, page, continued),
        fill: 0,
    })
}

pub fn section(id: u32, idstr: &'static str, instance: u32, version: u32) -> SectionHeader {
    SectionHeader {
        section_id: id,
        idstr: Bytes::from_static(idstr.as_bytes()),
        instance_id: instance,
        version_id: version,
    }
}

pub fn mem_size(blocks: &[(&'static str, u64)]) -> Record {
    let blocks: Vec<RamBlock> = blocks
        .iter()
        .map(|&(name, len)| RamBlock {
            idstr: Bytes::from_static(name.as_bytes()),
            used_length: len,
            mr_addr: None,
        })
        .collect();
    let total = blocks.iter().map(|b| b.used_length).sum();
    Record::Ram(RamRecord::MemSize(MemSize { total, blocks }))
}

pub fn command(cmd: u16, payload: &'static [u8]) -> Record {
    Record::Command(Command {
        cmd,
        payload: Bytes::from_static(payload),
    })
}

/// A small stream shaped like QEMU 10.0's: every kind of top-level record.
pub fn sample_records() -> Vec<Record> {
    let ram = 2;
    vec![
        Record::Header,
        Record::Configuration(Configuration {
            machine: Bytes::from_static(b"pc-i440fx-10.0"),
            subsections: vec![ConfigSubsection::Capabilities(vec![Bytes::from_static(
                b"validate-uuid",
            )])],
        }),
        Record::SectionStart(section(ram, "ram", 0, 4)),
        mem_size(&[("pc.ram", 16 * 4096), ("pc.bios", 2 * 4096)]),
        Record::Ram(RamRecord::MultifdFlush),
        Record::Ram(RamRecord::Eos),
        Record::Footer { section_id: ram },
        Record::SectionPart { section_id: ram },
        page("pc.ram", 0, false, 0xAB),
        zero("pc.ram", 1, true),
        page("pc.bios", 1, false, 0x11),
        page("pc.bios", 0, true, 0x22),
        Record::Ram(RamRecord::Eos),
        Record::Footer { section_id: ram },
        Record::SectionPart { section_id: ram },
        Record::Ram(RamRecord::Xbzrle {
            addr: page_addr("pc.bios", 1, true),
            data: Bytes::from_static(&[0x00, 0x02, 0xAA, 0xBB]),
        }),
        page("pc.ram", 15, false, 0x33),
        Record::Ram(RamRecord::Eos),
        Record::Footer { section_id: ram },
        command(11, b""),
        Record::SectionEnd { section_id: ram },
        zero("pc.ram", 2, true),
        Record::Ram(RamRecord::Eos),
        Record::Footer { section_id: ram },
        Record::SectionFull(section(0, "timer", 0, 2)),
        Record::Opaque(Bytes::from_static(
            b"\x00\x00\x00\x00\x00\x00\x00\x01\x7e\x00\x00\x00\x00",
        )),
        Record::Eof,
        Record::VmDescription(Bytes::from_static(br#"{"page_size": 4096, "devices": []}"#)),
    ]
}

/// A QEMU stream of `pages` pages of 4 KiB, each filled with one byte value (fill
/// pages: frames that stand for 16 MiB of QEMU bytes each, the most a frame does),
/// cheap to make at any size.
pub fn fill_pages_stream(pages: u64) -> Vec<u8> {
    let ram = 2;
    let mut records = vec![
        Record::Header,
        Record::Configuration(Configuration {
            machine: Bytes::from_static(b"pc-i440fx-10.0"),
            subsections: vec![],
        }),
        Record::SectionStart(section(ram, "ram", 0, 4)),
        mem_size(&[("pc.ram", pages * 4096)]),
        Record::Ram(RamRecord::Eos),
        Record::Footer { section_id: ram },
        Record::SectionPart { section_id: ram },
    ];
    records.extend((0..pages).map(|i| page("pc.ram", i, i > 0, (i % 250) as u8 + 1)));
    records.push(Record::Ram(RamRecord::Eos));
    records.push(Record::Footer { section_id: ram });
    records.push(Record::Eof);
    encode(&records)
}

/// Whether `MIGSTREAM_BLESS` is set: the tests rewrite the golden files and fuzz
/// seeds they make instead of checking them.
pub fn bless() -> bool {
    std::env::var_os("MIGSTREAM_BLESS").is_some()
}

/// Files the tests make, checked in under `dir`. With `MIGSTREAM_BLESS=1` they are
/// written, and any other file there is removed unless `keep` accepts its name;
/// otherwise every one must be on disk with exactly these bytes, and no other file
/// may be there but those `keep` accepts.
pub fn golden_files(dir: &Path, files: &[(String, Vec<u8>)], keep: impl Fn(&str) -> bool) {
    let made = |name: &str| files.iter().any(|(n, _)| n == name);
    if bless() {
        std::fs::create_dir_all(dir).unwrap();
        for entry in std::fs::read_dir(dir).unwrap() {
            let name = entry.unwrap().file_name().into_string().unwrap();
            if !made(&name) && !keep(&name) {
                std::fs::remove_file(dir.join(&name)).unwrap();
            }
        }
        for (name, bytes) in files {
            std::fs::write(dir.join(name), bytes).unwrap();
        }
    }
    for (name, bytes) in files {
        let path = dir.join(name);
        let on_disk = std::fs::read(&path)
            .unwrap_or_else(|e| panic!("{}: {e} (MIGSTREAM_BLESS=1 writes it)", path.display()));
        assert!(
            on_disk == *bytes,
            "{} is stale: MIGSTREAM_BLESS=1 rewrites it",
            path.display()
        );
    }
    let mut stale: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| !made(n) && !keep(n))
        .collect();
    stale.sort();
    assert!(
        stale.is_empty(),
        "{}: stale files {stale:?} (MIGSTREAM_BLESS=1 removes them)",
        dir.display()
    );
}

/// Golden errors: each case must fail, with the same error whether it is decoded
/// whole or byte by byte (`decode(bytes, read size)` gives the error), and its
/// `NAME.bin` (the input) and `NAME.err` (the error's kind and message) under `dir`
/// must be current ([`golden_files`]).
pub fn golden_errors(
    dir: &Path,
    cases: &[(&str, Vec<u8>)],
    decode: impl Fn(&[u8], usize) -> Option<Error>,
) {
    let mut files = Vec::new();
    for (name, bytes) in cases {
        let message = |e: Error| format!("{:?}: {e}", e.kind());
        let whole = decode(bytes, bytes.len().max(1))
            .map(message)
            .unwrap_or_else(|| panic!("{name}: decoded without error"));
        let bytewise = decode(bytes, 1).map(message);
        assert_eq!(bytewise.as_ref(), Some(&whole), "{name}: byte by byte");
        files.push((format!("{name}.bin"), bytes.clone()));
        files.push((format!("{name}.err"), format!("{whole}\n").into_bytes()));
    }
    golden_files(dir, &files, |_| false);
}
