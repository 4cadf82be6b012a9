//! Shared helpers of the integration tests: build streams from records, decode with
//! any read size, and compare record lists independent of opaque chunking.
#![allow(dead_code, unreachable_pub)]

#[cfg(feature = "relay")]
pub mod pki;
pub mod proxy;

use bytes::{Bytes, BytesMut};
use migstream::Error;
use migstream::qemu::{
    Command, ConfigSubsection, Configuration, MemSize, PageAddr, QemuDecoder, QemuEncoder,
    RamBlock, RamRecord, Record, SectionHeader,
};

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

/// `n` distinct pseudo-random pages of `size` bytes (xorshift from `seed`).
pub fn random_pages(n: usize, size: usize, seed: u64) -> Vec<Vec<u8>> {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            (0..size / 8)
                .flat_map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x.to_le_bytes()
                })
                .collect()
        })
        .collect()
}
