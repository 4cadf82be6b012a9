//! The seed corpora of the fuzz targets (`fuzz/corpus/TARGET/`), made here with the
//! crate's own encoders and the golden files of the other tests, never by a second
//! encoder: each test checks that its target's checked-in seeds are exactly what it
//! makes (and that no stale seed is left), and `MIGSTREAM_BLESS=1 cargo test --test
//! fuzz_seeds` rewrites them. The malformed seeds are the golden cases of
//! `tests/malformed.rs` and `tests/multifd.rs` (`testdata/malformed/`,
//! `testdata/multifd/malformed/`). `catalog_load`'s seeds are made by
//! `tests/template.rs`, and `dht_manifest`'s here from them.
//!
//! Kept as they are, never made nor removed: `crash-*` and `regress-*` (inputs that
//! once failed) and the `real-*` seeds cut from lab captures that are not in the
//! repository (see fuzz/README.md).
//!
//! The unit test `fuzzing::tests::every_fuzz_corpus_replays` (`cargo test --lib
//! fuzzing`) runs every seed through its target's entry point.

mod support;

use std::path::{Path, PathBuf};

use bytes::{Bytes, BytesMut};
use migstream::qemu::multifd::MultifdDecoder;
use migstream::qemu::{
    Command, ConfigSubsection, Configuration, MemSize, QemuDecoder, RamBlock, RamRecord, Record,
    SectionHeader,
};
use support::synthetic::Rng;
use support::{encode, golden_files, page_addr, sample_records, section};

/// A seed file: its name and bytes.
type Seed = (String, Vec<u8>);

/// The largest seed of `qemu_decode` (the README's promise: each under 64 KiB).
const MAX_QEMU_SEED: usize = 64 * 1024 - 1;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn corpus(target: &str) -> PathBuf {
    root().join("fuzz/corpus").join(target)
}

/// Seeds nobody makes: inputs that once failed, and cuts of lab captures.
fn kept(name: &str) -> bool {
    name.starts_with("crash-") || name.starts_with("regress-") || lab_capture(name)
}

/// `real-*` seeds of `qemu_decode` cut from lab captures (`harness/lab.py`) that are
/// not in the repository; those of `testdata/*.mig` are made here.
fn lab_capture(name: &str) -> bool {
    name.contains("real-") && (name.ends_with("-t-idle") || name.ends_with("-x72"))
}

/// A seed of `qemu_decode`/`dedup_decode`: the read-size byte, then the stream.
fn seed(name: impl Into<String>, read: u8, stream: &[u8]) -> Seed {
    (name.into(), [&[read][..], stream].concat())
}

/// The sorted file names of `dir` ending in `.ext`.
fn files(dir: &Path, ext: &str) -> Vec<PathBuf> {
    let mut paths: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension() == Some(ext.as_ref()))
        .collect();
    paths.sort();
    paths
}

fn stem(path: &Path) -> String {
    path.file_stem().unwrap().to_string_lossy().into_owned()
}

// ------------------------------------------------------------------ qemu_decode

fn bytes(b: &'static [u8]) -> Bytes {
    Bytes::from_static(b)
}

fn config(machine: &'static [u8], subsections: Vec<ConfigSubsection>) -> Record {
    Record::Configuration(Configuration {
        machine: bytes(machine),
        subsections,
    })
}

fn caps(names: &[&'static [u8]]) -> ConfigSubsection {
    ConfigSubsection::Capabilities(names.iter().map(|n| bytes(n)).collect())
}

fn ram(record: RamRecord) -> Record {
    Record::Ram(record)
}

fn mem_size(blocks: &[(&'static [u8], u64)], mr_addr: Option<&[u64]>) -> Record {
    let blocks: Vec<RamBlock> = blocks
        .iter()
        .enumerate()
        .map(|(i, &(name, len))| RamBlock {
            idstr: bytes(name),
            used_length: len,
            mr_addr: mr_addr.map(|a| a[i]),
        })
        .collect();
    let total = blocks.iter().map(|b| b.used_length).sum();
    ram(RamRecord::MemSize(MemSize { total, blocks }))
}

fn command(cmd: u16, payload: &[u8]) -> Record {
    Record::Command(Command {
        cmd,
        payload: Bytes::copy_from_slice(payload),
    })
}

fn eos_footer(section_id: u32) -> [Record; 2] {
    [ram(RamRecord::Eos), Record::Footer { section_id }]
}

/// START of the RAM section (id 2), its block list of `page`-byte pages, EOS, footer.
fn ram_setup(page: u64) -> Vec<Record> {
    let blocks = [(&b"pc.ram"[..], 16 * page), (b"pc.bios", 4 * page)];
    let mut r = vec![
        Record::SectionStart(section(2, "ram", 0, 4)),
        mem_size(&blocks, None),
        ram(RamRecord::MultifdFlush),
    ];
    r.extend(eos_footer(2));
    r
}

/// A few device sections (their state opaque), EOF and the device description.
fn device_tail() -> Vec<Record> {
    let mut state = vec![0, 0, 0, 8, 0x19, 0xb2, 0x3a, 0xc8];
    state.extend([0; 8]);
    state.extend([0x7e, 0, 0, 0, 0]);
    state.extend([0x04, 0, 0, 0, 4, 10]);
    state.extend(b"cpu_common\0\0\0\0\0\0\0\x01\0\0\0\0\x7e\0\0\0\x04");
    vec![
        Record::SectionFull(section(0, "timer", 0, 2)),
        Record::Opaque(Bytes::from(state)),
        Record::Eof,
        Record::VmDescription(bytes(
            br#"{"page_size": 4096, "devices": [{"name": "timer"}]}"#,
        )),
    ]
}

fn page_record(block: &'static str, n: u64, continued: bool, data: Vec<u8>) -> Record {
    let mut addr = page_addr(block, 0, continued);
    addr.offset = n * data.len() as u64;
    ram(RamRecord::Page {
        addr,
        data: Bytes::from(data),
    })
}

/// A stream of the header, `records` and, if `tail`, the device tail.
fn stream(records: Vec<Record>, tail: bool) -> Vec<u8> {
    let mut all = vec![Record::Header];
    all.extend(records);
    if tail {
        all.extend(device_tail());
    }
    encode(&all)
}

/// A stream with its configuration and RAM setup, one PART section of `records`.
fn ram_stream(records: Vec<Record>) -> Vec<u8> {
    let mut all = vec![config(b"pc-i440fx-10.0", vec![])];
    all.extend(ram_setup(4096));
    all.push(Record::SectionPart { section_id: 2 });
    all.extend(records);
    all.extend(eos_footer(2));
    stream(all, true)
}

/// One feature each: every RAM record kind, configurations, commands, device state.
fn feature_seeds() -> Vec<Seed> {
    let mut rng = Rng::new(0x5eed);
    let mut page = |size: usize| {
        let mut p = vec![0; size];
        rng.fill(&mut p);
        p
    };
    let xbz_addr = page_addr("pc.bios", 1, false);
    let mut seeds = vec![
        seed("header-eof", 0, &stream(vec![Record::Eof], false)),
        seed(
            "header-eof-vmdesc",
            0,
            &stream(
                vec![Record::Eof, Record::VmDescription(bytes(b"{}"))],
                false,
            ),
        ),
        seed(
            "header-config-eof-vmdesc",
            0,
            &stream(
                vec![
                    config(b"pc-q35-10.0", vec![]),
                    Record::Eof,
                    Record::VmDescription(bytes(b"{\"devices\": []}")),
                ],
                false,
            ),
        ),
        seed(
            "ram-page",
            0,
            &ram_stream(vec![
                page_record("pc.ram", 3, false, page(4096)),
                page_record("pc.ram", 4, true, page(4096)),
            ]),
        ),
        seed(
            "ram-zero",
            0,
            &ram_stream(vec![
                ram(RamRecord::Zero {
                    addr: page_addr("pc.ram", 0, false),
                    fill: 0,
                }),
                ram(RamRecord::Zero {
                    addr: page_addr("pc.ram", 1, true),
                    fill: 0x5a,
                }),
            ]),
        ),
        seed(
            "ram-xbzrle",
            0,
            &ram_stream(vec![ram(RamRecord::Xbzrle {
                addr: xbz_addr,
                data: bytes(&[0x00, 0x02, 0xaa, 0xbb, 0x64, 0x04, 1, 2, 3, 4]),
            })]),
        ),
        seed(
            "ram-compress",
            0,
            &ram_stream(vec![ram(RamRecord::Compressed {
                addr: page_addr("pc.ram", 2, false),
                data: bytes(b"\x78\x9c\xed\xc1\x01\x0d\x00\x00\x00\xc2\xa0\xf7\x4f\x6d\x0e"),
            })]),
        ),
        seed(
            "ram-multifd-flush",
            0,
            &ram_stream(vec![ram(RamRecord::MultifdFlush)]),
        ),
        seed(
            "ram-eos-no-footer",
            0,
            &stream(
                vec![
                    Record::SectionStart(section(2, "ram", 0, 4)),
                    mem_size(&[(b"pc.ram", 4096)], None),
                    ram(RamRecord::Eos),
                ],
                true,
            ),
        ),
    ];
    for bits in [10, 14] {
        let size = 1 << bits;
        let mut records = vec![config(
            b"pc-i440fx-10.0",
            vec![ConfigSubsection::TargetPageBits(bits)],
        )];
        records.extend(ram_setup(size));
        records.push(Record::SectionPart { section_id: 2 });
        records.push(page_record("pc.ram", 1, false, page(size as usize)));
        records.extend(eos_footer(2));
        seeds.push(seed(
            format!("config-page-bits-{bits}"),
            0,
            &stream(records, true),
        ));
    }
    let mut records = vec![config(
        b"pc-q35-10.0",
        vec![
            caps(&[b"validate-uuid", b"xbzrle"]),
            ConfigSubsection::Uuid(*b"0123456789abcdef"),
            ConfigSubsection::TargetPageBits(12),
        ],
    )];
    records.extend(ram_setup(4096));
    seeds.push(seed("config-caps-uuid-pagebits", 0, &stream(records, true)));
    let ignore_shared = |read: u8| {
        let records = vec![
            config(
                b"pc-q35-7.2",
                vec![
                    caps(&[b"x-ignore-shared", b"validate-uuid"]),
                    ConfigSubsection::Uuid([0x10; 16]),
                ],
            ),
            Record::SectionStart(section(2, "ram", 0, 4)),
            mem_size(
                &[(b"pc.ram", 16 * 4096), (b"pc.bios", 4 * 4096)],
                Some(&[0x1_0000_0000, 0xfffe_0000]),
            ),
            ram(RamRecord::Eos),
            Record::Footer { section_id: 2 },
        ];
        (read, stream(records, true))
    };
    for (name, (read, s)) in [
        ("config-x-ignore-shared", ignore_shared(0)),
        ("config-x-ignore-shared-reads-3", ignore_shared(3)),
    ] {
        seeds.push(seed(name, read, &s));
    }
    let mut records = vec![config(b"pc-q35-10.0", vec![caps(&[b"mapped-ram"])])];
    records.extend(ram_setup(4096));
    seeds.push(seed("config-mapped-ram", 0, &stream(records, true)));

    // every command, PACKAGED with a device stream inside, postcopy with huge pages
    let mut records = vec![
        config(b"pc-i440fx-10.0", vec![]),
        command(1, b""),
        command(2, &1u32.to_be_bytes()),
        command(3, b""),
        command(3, &[4096u64.to_be_bytes(), 4096u64.to_be_bytes()].concat()),
    ];
    records.extend(ram_setup(4096));
    records.extend([
        command(4, b""),
        command(
            6,
            &[&b"\x00\x06pc.ram"[..], &[0; 8], &4096u64.to_be_bytes()].concat(),
        ),
        command(8, b""),
        command(9, b""),
        command(10, b"\x06pc.ram"),
        command(11, b""),
        command(5, b""),
    ]);
    seeds.push(seed("commands-all", 0, &stream(records, true)));
    let inner = encode(&device_tail()[..3]);
    let packaged = |read: u8| {
        let mut records = vec![command(7, &(inner.len() as u32).to_be_bytes())];
        records.push(Record::Opaque(Bytes::from(inner.clone())));
        records.push(command(2, &2u32.to_be_bytes()));
        records.push(Record::Eof);
        (read, stream(records, false))
    };
    for (name, (read, s)) in [
        ("command-packaged", packaged(0)),
        ("command-packaged-reads-2", packaged(2)),
    ] {
        seeds.push(seed(name, read, &s));
    }
    let mut records = vec![
        config(b"pc-i440fx-10.0", vec![]),
        command(
            3,
            &[(2u64 << 20).to_be_bytes(), 4096u64.to_be_bytes()].concat(),
        ),
    ];
    records.extend(ram_setup(4096));
    seeds.push(seed(
        "command-postcopy-huge-pages",
        0,
        &stream(records, true),
    ));

    // device state the decoder cannot delimit, with look-alikes of the EOF tail inside
    let fake_tail = |read: u8, extra: &[u8]| {
        let mut state = b"\x00\x06\x00\x00\x00\x10{not the end}".to_vec();
        state.extend(b"\x00\x06\x00\x00\x00\x02{}\x01");
        state.extend(extra);
        let records = vec![
            Record::SectionFull(section(0, "timer", 0, 2)),
            Record::Opaque(Bytes::from(state)),
            Record::Eof,
            Record::VmDescription(bytes(b"{}")),
        ];
        (read, stream(records, false))
    };
    for (name, (read, s)) in [
        (
            "device-fake-tails",
            fake_tail(0, b"\x7e\0\0\0\0\x04\0\0\0\x01\x01x"),
        ),
        ("device-fake-tails-reads-13", fake_tail(13, b"\x00")),
    ] {
        seeds.push(seed(name, read, &s));
    }
    let mut records = ram_setup(4096);
    records.extend(device_tail().into_iter().take(3));
    seeds.push(seed("device-bare-eof", 6, &stream(records, false)));
    let mut records = ram_setup(4096);
    records.push(Record::SectionStart(SectionHeader {
        section_id: 3,
        idstr: bytes(b"dirty-bitmap"),
        instance_id: 0,
        version_id: 1,
    }));
    let mut rest = vec![0, 0, 0, 4];
    rest.extend(0x10u64.to_be_bytes());
    rest.extend([0x7e, 0, 0, 0, 3, 0x03, 0, 0, 0, 2]);
    rest.extend(0x10u64.to_be_bytes());
    rest.extend([0x7e, 0, 0, 0, 2]);
    records.push(Record::Opaque(Bytes::from(rest)));
    records.extend(device_tail());
    seeds.push(seed("device-live-non-ram", 0, &stream(records, false)));
    let long = format!("{{{}}}", " ".repeat(5000));
    let records = vec![Record::Eof, Record::VmDescription(Bytes::from(long))];
    seeds.push(seed("device-vmdesc-over-limit", 6, &stream(records, false)));
    seeds
}

/// `support::sample_records` in several read sizes, and prefixes of it.
fn sample_seeds() -> Vec<Seed> {
    let sample = encode(&sample_records());
    let mut seeds = vec![seed("sample-whole", 0, &sample)];
    for read in [1, 7, 100, 255] {
        seeds.push(seed(format!("sample-reads-{read}"), read, &sample));
    }
    let (_, err) = support::decode_reads(&sample, sample.len());
    assert!(err.is_none(), "the sample decodes");
    // cut in each phase: header, configuration, block list, a page, the description
    for (name, at) in [
        ("in-header", 5),
        ("in-config", 20),
        ("in-mem-size", 60),
        ("in-page", 300),
        ("in-vmdesc", sample.len() - 10),
    ] {
        seeds.push(seed(format!("trunc-{name}"), 0, &sample[..at]));
    }
    seeds.push(seed("trunc-in-page-reads-64", 64, &sample[..5000]));
    seeds
}

/// The golden malformed streams of `tests/malformed.rs`, as they are.
fn malformed_seeds() -> Vec<Seed> {
    files(&root().join("testdata/malformed"), "bin")
        .iter()
        .map(|path| {
            seed(
                format!("bad-{}", stem(path)),
                0,
                &std::fs::read(path).unwrap(),
            )
        })
        .collect()
}

/// Cuts of the real streams in `testdata/`: the first 20 KiB, and the RAM setup
/// followed by the real device state, EOF and a device description cut to a few
/// devices.
fn real_seeds() -> Vec<Seed> {
    let mut seeds = Vec::new();
    for path in files(&root().join("testdata"), "mig") {
        let bytes = std::fs::read(&path).unwrap();
        let records = support::normalize(support::decode(&bytes, bytes.len()));
        let Some(Record::Configuration(c)) = records.get(1) else {
            panic!("{}: no configuration", path.display());
        };
        let tag = format!("{}-{}", String::from_utf8_lossy(&c.machine), stem(&path));
        seeds.push(seed(format!("real-start-{tag}"), 0, &bytes[..20 * 1024]));
        let setup_end = records
            .iter()
            .position(|r| matches!(r, Record::Footer { .. }))
            .expect("a RAM setup section");
        let Some(Record::SectionStart(ram_section)) = records.get(2) else {
            panic!("{}: no RAM section first", path.display());
        };
        let sid = ram_section.section_id;
        let device = records
            .iter()
            .position(|r| matches!(r, Record::SectionFull(_)))
            .expect("device state");
        let Some(Record::VmDescription(json)) = records.last() else {
            panic!("{}: no device description", path.display());
        };
        let mut doc: serde_json::Value = serde_json::from_slice(json).unwrap();
        let devices = |doc: &serde_json::Value| doc["devices"].as_array().map_or(0, Vec::len);
        while serde_json::to_vec(&doc).unwrap().len() > 3000 && devices(&doc) > 1 {
            doc["devices"].as_array_mut().unwrap().pop();
        }
        let mut tail = records[..=setup_end].to_vec();
        tail.push(Record::SectionEnd { section_id: sid });
        tail.extend(eos_footer(sid));
        tail.extend_from_slice(&records[device..records.len() - 1]);
        tail.push(Record::VmDescription(Bytes::from(
            serde_json::to_vec(&doc).unwrap(),
        )));
        let tail = encode(&tail);
        // reads of 216 bytes and 601-byte opaque chunks: with 1-byte chunks the
        // device-state scan makes this input slow (quadratic in its length)
        let cut = &tail[..tail.len().min(MAX_QEMU_SEED - 1)];
        seeds.push(seed(format!("real-device-tail-{tag}"), 216, cut));
    }
    seeds
}

fn qemu_decode_seeds() -> Vec<Seed> {
    let mut seeds = sample_seeds();
    seeds.extend(feature_seeds());
    seeds.extend(malformed_seeds());
    seeds.extend(real_seeds());
    for (name, data) in &seeds {
        assert!(data.len() <= MAX_QEMU_SEED, "{name}: {} bytes", data.len());
    }
    seeds
}

#[test]
fn qemu_decode_seeds_are_current() {
    let seeds = qemu_decode_seeds();
    // the valid ones decode (with the default limits) and re-encode exactly
    let refused = ["config-mapped-ram", "command-postcopy-huge-pages"];
    for (name, data) in &seeds {
        let cut = name.starts_with("trunc-") || name.starts_with("real-");
        if name.starts_with("bad-") || cut || refused.contains(&&name[..]) {
            continue;
        }
        let records = support::decode(&data[1..], data.len());
        assert!(
            encode(&records) == data[1..],
            "{name} re-encodes differently"
        );
    }
    golden_files(&corpus("qemu_decode"), &seeds, kept);
}

// ----------------------------------------------------------------- dedup_decode

/// Each valid seed of `qemu_decode` (those made here and the lab ones) as a QEMU
/// stream (even mode byte) and as its dedup stream (odd mode byte).
#[test]
fn dedup_decode_seeds_are_current() {
    use migstream::dedup::DedupEncoder;
    let mut streams = qemu_decode_seeds();
    let lab = corpus("qemu_decode");
    for entry in std::fs::read_dir(&lab).unwrap() {
        let name = entry.unwrap().file_name().into_string().unwrap();
        if lab_capture(&name) {
            streams.push((name.clone(), std::fs::read(lab.join(&name)).unwrap()));
        }
    }
    streams.retain(|(n, _)| !n.starts_with("bad-") && !n.starts_with("trunc-"));
    streams.sort();
    let mut seeds = Vec::new();
    for (i, (name, data)) in streams.iter().enumerate() {
        let stream = &data[1..];
        let mode = (2 * i) as u8;
        seeds.push(seed(format!("qemu-{name}"), mode, stream));
        let (mut records, mut input) = (QemuDecoder::new(), BytesMut::from(stream));
        let mut enc = DedupEncoder::with_default_resolvers().with_batch_size(512);
        let mut wire = BytesMut::new();
        while let Ok(Some(r)) = records.decode_eof(&mut input) {
            enc.encode(&r, &mut wire).unwrap();
        }
        enc.finish(&mut wire).unwrap();
        seeds.push(seed(format!("wire-{name}"), mode + 1, &wire));
    }
    // the bundled multifd channels, and their dedup streams
    let channels = files(&root().join("testdata/multifd"), "mfd");
    for (i, path) in channels.iter().enumerate() {
        let channel = std::fs::read(path).unwrap();
        let mode = (2 * i) as u8;
        seeds.push(seed(format!("channel-{}", stem(path)), mode, &channel));
        let (mut records, mut input) = (MultifdDecoder::new(), BytesMut::from(&channel[..]));
        let mut enc = DedupEncoder::with_default_resolvers().with_batch_size(512);
        let mut wire = BytesMut::new();
        while let Some(r) = records.decode_eof(&mut input).unwrap() {
            enc.encode_channel(&r, &mut wire).unwrap();
        }
        enc.finish(&mut wire).unwrap();
        seeds.push(seed(
            format!("channel-wire-{}", stem(path)),
            mode + 1,
            &wire,
        ));
    }
    golden_files(&corpus("dedup_decode"), &seeds, kept);
}

// ----------------------------------------------------------------- reply_decode

/// The return directions a destination sends (greeting with and without a catalog,
/// return path, ACK, DONE, FAILED) in reads of several sizes, and a few that break the
/// rules.
#[test]
fn reply_decode_seeds_are_current() {
    use migstream::dedup::Reply;
    use migstream::template::CatalogId;
    let bytes = |replies: &[Reply]| {
        let mut b = BytesMut::new();
        replies.iter().for_each(|r| r.encode(&mut b));
        b.to_vec()
    };
    let greeting = Reply::Greeting { catalog: None };
    let catalog = Reply::Greeting {
        catalog: Some(CatalogId([0xab; 32])),
    };
    let qemu = Reply::Qemu(Bytes::from_static(b"\x00\x01\x00\x04\x00\x00\x00\x01"));
    let done = Reply::Done {
        qemu_bytes: 1 << 30,
        digest: [0x5a; 16],
    };
    let ack = Reply::Ack {
        qemu_bytes: 3 << 20,
    };
    let failed = Reply::Failed {
        reason: "dht cannot restore page 00ff: every node holding it is down".into(),
    };
    let mut messages = vec![
        ("greeting", bytes(std::slice::from_ref(&greeting))),
        (
            "catalog-return-done",
            bytes(&[catalog.clone(), qemu.clone(), done.clone(), qemu.clone()]),
        ),
        (
            "acks-done",
            bytes(&[
                greeting.clone(),
                ack.clone(),
                qemu.clone(),
                ack.clone(),
                done.clone(),
            ]),
        ),
        (
            "ack-after-done",
            bytes(&[greeting.clone(), done.clone(), ack]),
        ),
        (
            "return-failed",
            bytes(&[greeting.clone(), qemu.clone(), failed.clone()]),
        ),
        ("done-twice", bytes(&[greeting.clone(), done.clone(), done])),
        ("after-failed", bytes(&[greeting.clone(), failed, qemu])),
        ("greeting-twice", bytes(&[greeting.clone(), catalog])),
    ];
    let mut v2 = bytes(std::slice::from_ref(&greeting));
    v2[10] = 2;
    messages.push(("greeting-v2", v2));
    let mut huge = bytes(&[greeting]);
    huge.extend_from_slice(&[0x12, 0xff, 0xff, 0xff, 0xff]);
    messages.push(("huge-return-chunk", huge));
    let mut seeds = Vec::new();
    for (i, (name, data)) in messages.into_iter().enumerate() {
        for read in [0u8, 6, 255] {
            let read = read.wrapping_add(i as u8);
            let file = format!("{name}-reads-{}", u16::from(read) + 1);
            seeds.push(seed(file, read, &data));
        }
    }
    golden_files(&corpus("reply_decode"), &seeds, kept);
}

// --------------------------------------------------------------- multifd_decode

/// The golden channels of `tests/multifd.rs` (`testdata/multifd/*.mfd`: each whole
/// in reads of several sizes, cut inside its last packet, and with a flipped header
/// byte) and its malformed channels.
#[test]
fn multifd_decode_seeds_are_current() {
    let testdata = root().join("testdata/multifd");
    let mut seeds = Vec::new();
    for (i, path) in files(&testdata, "mfd").iter().enumerate() {
        let bytes = std::fs::read(path).unwrap();
        let mut flipped = bytes.clone();
        flipped[64 + 8 + i] ^= 0x10;
        let variants = [
            ("whole", bytes.clone()),
            ("cut", bytes[..bytes.len() - 100].to_vec()),
            ("flipped", flipped),
        ];
        for (variant, data) in variants {
            let reads: &[u8] = match variant {
                "whole" => &[0, 1, 37, 255],
                _ => &[(i as u8).wrapping_mul(50).wrapping_add(3)],
            };
            for &read in reads {
                let file = format!("{}-{variant}-reads-{read}", stem(path));
                seeds.push(seed(file, read, &data));
            }
        }
    }
    for path in files(&testdata.join("malformed"), "bin") {
        seeds.push(seed(
            format!("bad-{}", stem(&path)),
            3,
            &std::fs::read(&path).unwrap(),
        ));
    }
    golden_files(&corpus("multifd_decode"), &seeds, kept);
}

// ------------------------------------------------------------------------ xbzrle

/// Valid deltas (made by `xbzrle::encode`) of random page pairs, the format's edge
/// cases and broken deltas; byte 0 picks the page size (`64 << (b % 7)`).
#[test]
fn xbzrle_seeds_are_current() {
    use migstream::xbzrle::{self, Delta};
    let mut rng = Rng::new(7);
    let mut seeds = Vec::new();
    for (k, size_byte) in [0u8, 1, 3, 6, 6, 6, 6, 6].into_iter().enumerate() {
        let size = 64 << (size_byte % 7);
        let mut old = vec![0; size];
        rng.fill(&mut old);
        let mut new = old.clone();
        for _ in 0..1 + rng.below(12) {
            let at = rng.below(size as u64) as usize;
            let end = (at + 1 + rng.below(40) as usize).min(size);
            new[at..end].iter_mut().for_each(|b| *b ^= 0x5a);
        }
        let mut out = vec![0; size];
        let Delta::Encoded(n) = xbzrle::encode(&old, &new, &mut out) else {
            panic!("valid-{k}: no delta");
        };
        seeds.push(seed(format!("valid-{k}"), size_byte, &out[..n]));
    }
    let whole: Vec<u8> = (0..16).flat_map(|_| 0..=255u8).collect();
    // ULEB128 lengths written out: 4095 = ff 1f, 4096 = 80 20, 100 = 64
    let edges: [(&str, u8, Vec<u8>); 10] = [
        ("empty-delta", 6, vec![]),
        ("last-byte", 6, vec![0xff, 0x1f, 0x01, 0x09]),
        ("whole-page", 6, [&[0x00, 0x80, 0x20][..], &whole].concat()),
        ("bad-uleb", 6, vec![0x80, 0x80, 0x01, 0x01]),
        ("empty-changed-run", 6, vec![0, 0, 0]),
        (
            "second-empty-unchanged-run",
            6,
            vec![0, 1, 0xaa, 0, 1, 0xbb],
        ),
        ("beyond-page", 0, vec![0x64, 0x01, b'x']),
        ("beyond-data", 6, vec![0, 5, 0xaa]),
        ("one-byte-left", 6, vec![0, 1, 0xaa, 0x05]),
        ("non-canonical-uleb", 6, vec![0, 0x81, 0x00, 0xaa]),
    ];
    for (name, size_byte, delta) in edges {
        seeds.push(seed(name, size_byte, &delta));
    }
    golden_files(&corpus("xbzrle"), &seeds, kept);
}

// -------------------------------------------------------------------- lz4_encode

/// Inputs of migstream's LZ4 encoder; byte 0 is the acceleration (`b % 9`): short
/// and 13-byte inputs (the block-size edges), zeros, text, random bytes, runs,
/// repeated words, a sparse page.
#[test]
fn lz4_encode_seeds_are_current() {
    let mut rng = Rng::new(0x1a4);
    let mut random = vec![0; 2048];
    rng.fill(&mut random);
    let text: Vec<u8> = (0..60)
        .flat_map(|i| {
            format!(
                "2025-06-01T12:{:02}:00Z GET /api/v1/orders 200 id={i}\n",
                i % 60
            )
            .into_bytes()
        })
        .collect();
    let runs: Vec<u8> = (0..64u8)
        .flat_map(|i| std::iter::repeat_n(i, 1 + usize::from(i) % 40))
        .collect();
    let words: Vec<u8> = ["alpha ", "beta ", "gamma ", "delta "]
        .iter()
        .cycle()
        .take(400)
        .flat_map(|w| w.bytes())
        .collect();
    let mut sparse = vec![0; 4096];
    for at in (0..4096).step_by(509) {
        sparse[at] = at as u8 | 1;
    }
    let mut long = vec![0; 300];
    rng.fill(&mut long);
    let again = long[..100].to_vec();
    long.extend(again);
    let inputs: [(&str, u8, Vec<u8>); 12] = [
        ("empty-a1", 1, vec![]),
        ("short-a4", 4, b"abcabc".to_vec()),
        ("thirteen-a1", 1, b"abcdabcdabcda".to_vec()),
        ("zeros-4k-a1", 1, vec![0; 4096]),
        ("zeros-4k-a4", 4, vec![0; 4096]),
        ("text-a1", 1, text.clone()),
        ("text-a8", 8, text),
        ("random-2k-a1", 1, random),
        ("runs-a2", 2, runs),
        ("words-a3", 3, words),
        ("sparse-page-a4", 4, sparse),
        ("long-literals-then-match-a1", 1, long),
    ];
    let seeds: Vec<Seed> = inputs
        .into_iter()
        .map(|(name, accel, input)| seed(name, accel, &input))
        .collect();
    golden_files(&corpus("lz4_encode"), &seeds, kept);
}

// ------------------------------------------------------------------ dht_manifest

/// The manifest part (header and table: `56 + 16 × count` bytes) of each
/// `catalog_load` seed, and manifests damaged in ways a catalog file cannot be.
#[cfg(feature = "dht")]
#[test]
fn dht_manifest_seeds_are_current() {
    let catalogs = corpus("catalog_load");
    let mut names: Vec<String> = std::fs::read_dir(&catalogs)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    let mut seeds = Vec::new();
    for name in names {
        let file = std::fs::read(catalogs.join(&name)).unwrap();
        let count = file
            .get(16..24)
            .map(|c| u64::from_be_bytes(c.try_into().unwrap()));
        let len = count
            .and_then(|n| n.checked_mul(16)?.checked_add(56))
            .map_or(file.len() as u64, |n| n.min(file.len() as u64));
        seeds.push((name, file[..len as usize].to_vec()));
    }
    let three = seeds
        .iter()
        .find(|(n, _)| n == "ok-three")
        .expect("the catalog_load seed ok-three")
        .1
        .clone();
    let mut other_id = three.clone();
    other_id[30] ^= 0x01;
    let mut table_flip = three.clone();
    table_flip[56 + 20] ^= 0x80;
    let trailing_byte = [&three[..], &[0]].concat();
    seeds.extend([
        ("other-id".to_string(), other_id),
        ("table-flip".to_string(), table_flip),
        ("trailing-byte".to_string(), trailing_byte),
    ]);
    golden_files(&corpus("dht_manifest"), &seeds, kept);
}
