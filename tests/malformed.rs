//! Hostile and malformed input: one golden file per case under `testdata/malformed/`
//! (`NAME.bin` the stream, `NAME.err` the exact error), checked whole and byte by byte.
//!
//! `MIGSTREAM_BLESS=1 cargo test --test malformed` rewrites the golden files.

mod support;

use std::path::PathBuf;

use bytes::Bytes;
use migstream::qemu::{ConfigSubsection, Configuration, RamRecord, Record};
use support::*;

/// Header, configuration, RAM setup for `pc.ram` (16 pages) and `pc.bios` (2 pages),
/// then a PART section header: what follows is a RAM record.
fn in_ram_part() -> Vec<u8> {
    encode(&[
        Record::Header,
        config(vec![]),
        Record::SectionStart(section(2, "ram", 0, 4)),
        mem_size(&[("pc.ram", 16 * 4096), ("pc.bios", 2 * 4096)]),
        Record::Ram(RamRecord::Eos),
        Record::Footer { section_id: 2 },
        Record::SectionPart { section_id: 2 },
    ])
}

fn config(subsections: Vec<ConfigSubsection>) -> Record {
    Record::Configuration(Configuration {
        machine: Bytes::from_static(b"pc-i440fx-7.2"),
        subsections,
    })
}

fn cat(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

fn word(offset: u64, flags: u64) -> [u8; 8] {
    (offset | flags).to_be_bytes()
}

/// A whole stream up to its device state (after RAM END and a FULL header).
fn in_device_state() -> Vec<u8> {
    let mut s = in_ram_part();
    s.extend(encode(&[
        Record::Ram(RamRecord::Eos),
        Record::Footer { section_id: 2 },
        Record::SectionEnd { section_id: 2 },
        Record::Ram(RamRecord::Eos),
        Record::Footer { section_id: 2 },
        Record::SectionFull(section(0, "timer", 0, 2)),
    ]));
    s
}

fn cases() -> Vec<(&'static str, Vec<u8>)> {
    let header = encode(&[Record::Header]);
    let ram = in_ram_part();
    let page = vec![0x5A; 4096];
    let mut many_blocks = cat(&[
        &header,
        &encode(&[Record::SectionStart(section(2, "ram", 0, 4))]),
    ]);
    many_blocks.extend(word(600 * 4096, 0x04));
    for i in 0..600 {
        let name = format!("b{i}");
        many_blocks.push(name.len() as u8);
        many_blocks.extend(name.as_bytes());
        many_blocks.extend(4096u64.to_be_bytes());
    }
    let caps = |names: &[&'static str]| {
        config(vec![ConfigSubsection::Capabilities(
            names
                .iter()
                .map(|n| Bytes::from_static(n.as_bytes()))
                .collect(),
        )])
    };
    let ram_start = encode(&[Record::SectionStart(section(2, "ram", 0, 4))]);
    vec![
        ("empty", vec![]),
        ("bad-magic", b"QEVX\0\0\0\x03".to_vec()),
        ("obsolete-version-2", b"QEVM\0\0\0\x02".to_vec()),
        ("unknown-version", b"QEVM\0\0\0\x04".to_vec()),
        (
            "config-machine-too-long",
            cat(&[&header, b"\x07\x00\x10\x00\x00pc"]),
        ),
        (
            "config-unknown-subsection",
            cat(&[
                &header,
                b"\x07\0\0\0\x02pc\x05\x13configuration/bogus\0\0\0\x01",
            ]),
        ),
        (
            "config-subsection-version-2",
            cat(&[
                &header,
                b"\x07\0\0\0\x02pc\x05\x12configuration/uuid\0\0\0\x020123456789abcdef\x01",
            ]),
        ),
        (
            "config-too-many-capabilities",
            cat(&[
                &header,
                b"\x07\0\0\0\x02pc\x05\x1aconfiguration/capabilities\0\0\0\x01\0\0\x10\0",
            ]),
        ),
        (
            "config-after-section",
            cat(&[&ram[..ram.len() - 5], b"\x07\0\0\0\x02pc"]),
        ),
        ("unknown-record-type", cat(&[&header, b"\x09"])),
        (
            "config-twice",
            cat(&[&header, &encode(&[config(vec![]), config(vec![])])]),
        ),
        (
            "config-target-page-bits-20",
            cat(&[
                &header,
                b"\x07\0\0\0\x02pc\x05\x1econfiguration/target-page-bits\0\0\0\x01\0\0\0\x14\0",
            ]),
        ),
        ("footer-outside-section", cat(&[&header, b"\x7e\0\0\0\x02"])),
        ("vmdesc-before-eof", cat(&[&header, b"\x06\0\0\0\x02{}"])),
        (
            "part-of-unknown-section",
            cat(&[&header, b"\x02\0\0\0\x63"]),
        ),
        (
            "second-ram-start",
            cat(&[&ram[..ram.len() - 5], &ram_start]),
        ),
        (
            "ram-section-version-3",
            cat(&[&header, b"\x01\0\0\0\x02\x03ram\0\0\0\0\0\0\0\x03"]),
        ),
        (
            "mem-size-blocks-exceed-total",
            cat(&[
                &header,
                &ram_start,
                &word(4096, 0x04),
                b"\x06pc.ram",
                &8192u64.to_be_bytes(),
            ]),
        ),
        (
            "mem-size-duplicate-block",
            cat(&[
                &header,
                &ram_start,
                &word(8192, 0x04),
                b"\x01a",
                &4096u64.to_be_bytes(),
                b"\x01a",
                &4096u64.to_be_bytes(),
            ]),
        ),
        (
            "mem-size-empty-block-name",
            cat(&[
                &header,
                &ram_start,
                &word(8192, 0x04),
                b"\x00",
                &4096u64.to_be_bytes(),
            ]),
        ),
        ("mem-size-too-many-blocks", many_blocks),
        ("second-mem-size", cat(&[&ram, &word(4096, 0x04)])),
        (
            "mapped-ram-stream",
            cat(&[
                &header,
                &encode(&[caps(&["mapped-ram"])]),
                &ram_start,
                &word(4096, 0x04),
            ]),
        ),
        (
            "postcopy-huge-page-blocks",
            cat(&[
                &header,
                b"\x08\0\x03\0\x10",
                &(2u64 << 20 | 4096).to_be_bytes(),
                &4096u64.to_be_bytes(),
                &ram_start,
                &word(4096, 0x04),
            ]),
        ),
        (
            "continue-before-any-block",
            cat(&[
                &header,
                &ram_start,
                &word(4096, 0x04),
                b"\x06pc.ram",
                &4096u64.to_be_bytes(),
                &word(0, 0x28),
            ]),
        ),
        (
            "unknown-block-name",
            cat(&[&ram, &word(0, 0x08), b"\x04nope"]),
        ),
        (
            "page-beyond-block",
            cat(&[&ram, &word(2 * 4096, 0x08), b"\x07pc.bios"]),
        ),
        (
            "zero-and-page-flags",
            cat(&[&ram, &word(0, 0x0A), b"\x06pc.ram"]),
        ),
        (
            "unknown-flag-0x400",
            cat(&[&ram, &word(0, 0x408), b"\x06pc.ram"]),
        ),
        ("rdma-hook", cat(&[&ram, &word(0, 0x80)])),
        ("ram-flag-full", cat(&[&ram, &word(0, 0x01)])),
        ("continue-on-eos", cat(&[&ram, &word(0, 0x30)])),
        ("eos-with-offset", cat(&[&ram, &word(4096, 0x10)])),
        (
            "xbzrle-bad-encoding",
            cat(&[&ram, &word(0, 0x40), b"\x06pc.ram\x02\x00\x04"]),
        ),
        (
            "xbzrle-longer-than-page",
            cat(&[&ram, &word(0, 0x40), b"\x06pc.ram\x01\x10\x01"]),
        ),
        (
            "compressed-beyond-bound",
            cat(&[&ram, &word(0, 0x100), b"\x06pc.ram\0\0\x10\x0f"]),
        ),
        (
            "footer-wrong-section-id",
            cat(&[&ram, &word(0, 0x10), b"\x7e\0\0\0\x03"]),
        ),
        ("command-zero", cat(&[&header, b"\x08\0\0\0\0"])),
        ("command-unknown", cat(&[&header, b"\x08\0\x0c\0\0"])),
        (
            "command-ping-length-3",
            cat(&[&header, b"\x08\0\x02\0\x03abc"]),
        ),
        (
            "command-advise-length-8",
            cat(&[&header, b"\x08\0\x03\0\x0812345678"]),
        ),
        (
            "truncated-page",
            cat(&[&ram, &word(0, 0x08), b"\x06pc.ram", &page[..100]]),
        ),
        (
            "truncated-packaged",
            cat(&[&header, b"\x08\0\x07\0\x04\0\0\x01\0", &[1; 100]]),
        ),
        (
            "device-state-without-eof",
            cat(&[&in_device_state(), b"device bytes"]),
        ),
        ("junk-after-eof", cat(&[&header, b"\x00\x01"])),
        (
            "vmdesc-too-long",
            cat(&[&header, b"\x00\x06\x7f\xff\xff\xff{"]),
        ),
        (
            "bytes-after-vmdesc",
            cat(&[&header, b"\x00\x06\0\0\0\x02{}X"]),
        ),
    ]
}

fn golden_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("testdata/malformed")
}

#[test]
fn every_malformed_case_fails_with_its_golden_error() {
    golden_errors(&golden_dir(), &cases(), |bytes, read| {
        decode_reads(bytes, read).1
    });
}
