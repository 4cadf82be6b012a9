//! The multifd channel codec (`qemu::multifd`): hand-built golden channels with the
//! quirks of QEMU 7.2 and 10.0 (`testdata/multifd/*.mfd`), golden malformed channels
//! with their exact error (`testdata/multifd/malformed/`), a property test over
//! generated packets, tokio-util framing, and (ignored unless captures are given)
//! byte-exact round trips of every channel of real multifd migrations.
//!
//! `MIGSTREAM_BLESS=1 cargo test --test multifd` rewrites the golden files.

mod support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use bytes::{Bytes, BytesMut};
use futures::{SinkExt, StreamExt};
use migstream::qemu::multifd::{
    ChannelGreeting, ChannelRecord, Compression, DeviceStatePacket, Limits, MultifdDecoder,
    MultifdEncoder, Packet, Payload, wire,
};
use migstream::{Error, ErrorKind};
use proptest::prelude::*;
use tokio::io::AsyncWriteExt;
use tokio_util::codec::{FramedRead, FramedWrite};

const PAGE: usize = 4096;
const SLOTS: usize = 128;

// ---------------------------------------------------------------- helpers

/// Decodes `bytes` in reads whose sizes cycle through `reads`; the records and the
/// error, if any.
fn decode_with(
    mut dec: MultifdDecoder,
    bytes: &[u8],
    reads: &[usize],
) -> (Vec<ChannelRecord>, Option<Error>) {
    let (mut buf, mut records) = (BytesMut::new(), Vec::new());
    let (mut fed, mut reads) = (0, reads.iter().cycle());
    loop {
        let at_end = fed == bytes.len();
        let step = match at_end {
            true => dec.decode_eof(&mut buf),
            false => dec.decode(&mut buf),
        };
        match step {
            Ok(Some(record)) => records.push(record),
            Ok(None) if at_end => return (records, None),
            Ok(None) => {
                let end = (fed + reads.next().unwrap().max(&1)).min(bytes.len());
                buf.extend_from_slice(&bytes[fed..end]);
                fed = end;
            }
            Err(e) => return (records, Some(e)),
        }
    }
}

fn decode(bytes: &[u8], reads: &[usize]) -> Vec<ChannelRecord> {
    let (records, err) = decode_with(MultifdDecoder::new(), bytes, reads);
    if let Some(e) = err {
        panic!(
            "decode failed with reads {:?}: {e}",
            &reads[..reads.len().min(4)]
        );
    }
    records
}

fn encode(records: &[ChannelRecord]) -> Vec<u8> {
    let mut enc = MultifdEncoder::new();
    let mut out = BytesMut::new();
    for r in records {
        enc.encode(r, &mut out).expect("encodable record");
    }
    out.to_vec()
}

fn packets(records: &[ChannelRecord]) -> Vec<&Packet> {
    records
        .iter()
        .filter_map(|r| match r {
            ChannelRecord::Packet(p) => Some(p),
            _ => None,
        })
        .collect()
}

fn testdata() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/multifd")
}

// ------------------------------------------- channels built byte by byte, by hand
// (not with the encoder under test)

fn greeting(id: u8) -> Vec<u8> {
    let mut g = Vec::new();
    g.extend(0x1122_3344u32.to_be_bytes());
    g.extend(1u32.to_be_bytes());
    g.extend([0; 16]);
    g.push(id);
    g.extend([0; 39]);
    g
}

/// One RAM packet header with its slots (`slots` padded with zeros to 128), then `data`.
#[derive(Clone)]
struct Raw<'a> {
    flags: u32,
    pages_alloc: u32,
    normal: u32,
    next: u32,
    num: u64,
    zero: u32,
    block: &'a str,
    slots: Vec<u64>,
    data: Vec<u8>,
}

impl Raw<'_> {
    /// A SYNC packet without pages as QEMU 10.0 sends it: nothing allocated, no
    /// block name, no offsets.
    fn sync(num: u64) -> Self {
        Raw {
            flags: 1,
            pages_alloc: 0,
            normal: 0,
            next: 0,
            num,
            zero: 0,
            block: "",
            slots: vec![],
            data: vec![],
        }
    }

    /// QEMU 10.0's packet of zero pages only, at these offsets, after this one.
    fn zero_pages(&self, num: u64, slots: Vec<u64>) -> Self {
        Raw {
            normal: 0,
            next: 0,
            num,
            zero: slots.len() as u32,
            slots,
            data: vec![],
            ..self.clone()
        }
    }

    fn bytes(&self) -> Vec<u8> {
        let mut p = Vec::new();
        for v in [
            0x1122_3344,
            1,
            self.flags,
            self.pages_alloc,
            self.normal,
            self.next,
        ] {
            p.extend(u32::to_be_bytes(v));
        }
        p.extend(self.num.to_be_bytes());
        p.extend(self.zero.to_be_bytes());
        p.extend([0; 28]);
        let mut name = self.block.as_bytes().to_vec();
        name.resize(256, 0);
        p.extend(name);
        let mut slots = self.slots.clone();
        slots.resize(SLOTS, 0);
        slots.iter().for_each(|s| p.extend(s.to_be_bytes()));
        p.extend(&self.data);
        p
    }
}

fn page(fill: u8) -> Vec<u8> {
    (0..PAGE).map(|i| fill ^ (i as u8)).collect()
}

fn pages(fills: &[u8]) -> Vec<u8> {
    fills.iter().flat_map(|&f| page(f)).collect()
}

/// QEMU 7.2 without compression: stale offsets past `normal_pages` (the packet buffer
/// is never cleared), SYNC on a packet with pages, and a SYNC packet without pages
/// whose `next_packet_size` and block name are the previous packet's.
fn qemu72_nocomp() -> Vec<u8> {
    let stale: Vec<u64> = (0..SLOTS as u64)
        .map(|i| 0x0400_0000 + i * 0x1000)
        .collect();
    let mut slots_a = stale.clone();
    slots_a[..3].copy_from_slice(&[0x1000, 0x5000, 0x9000]);
    let mut slots_b = slots_a.clone();
    slots_b[..2].copy_from_slice(&[0x20_0000, 0x20_1000]);
    let a = Raw {
        flags: 0,
        pages_alloc: 128,
        normal: 3,
        next: 3 * 4096,
        num: 4,
        zero: 0,
        block: "pc.ram",
        slots: slots_a,
        data: pages(&[1, 2, 3]),
    };
    let b = Raw {
        flags: 1,
        normal: 2,
        next: 2 * 4096,
        num: 9,
        slots: slots_b.clone(),
        data: pages(&[4, 5]),
        ..a.clone()
    };
    let c = Raw {
        flags: 1,
        normal: 0,
        next: 2 * 4096,
        num: 12,
        slots: slots_b.clone(),
        data: vec![],
        ..b.clone()
    };
    let mut slots_d = slots_b;
    slots_d[0] = 0x3_0000;
    let d = Raw {
        flags: 0,
        normal: 1,
        next: 4096,
        num: 13,
        block: "pc.bios",
        slots: slots_d,
        data: page(6),
        ..c.clone()
    };
    [greeting(1), a.bytes(), b.bytes(), c.bytes(), d.bytes()].concat()
}

/// QEMU 10.0 without compression: zero pages listed after the normal ones, a packet
/// of zero pages only, and a SYNC packet with pages_alloc 0 and still 128 slots.
fn qemu10_nocomp() -> Vec<u8> {
    let a = Raw {
        flags: 0,
        pages_alloc: 128,
        normal: 2,
        next: 2 * 4096,
        num: 0,
        zero: 3,
        block: "pc.ram",
        slots: vec![0x10_0000, 0x10_2000, 0x10_1000, 0x10_3000, 0x10_4000],
        data: pages(&[7, 8]),
    };
    let b = a.zero_pages(2, vec![0, 0x1000, 0x2000, 0x3000]);
    [greeting(0), a.bytes(), b.bytes(), Raw::sync(5).bytes()].concat()
}

/// QEMU 10.0 with zstd: the payload is `next_packet_size` opaque bytes of the
/// channel's one compression stream; no payload without normal pages.
fn qemu10_zstd() -> Vec<u8> {
    let mut stream = vec![0x28, 0xb5, 0x2f, 0xfd];
    stream.extend((0..53u8).map(|i| i.wrapping_mul(37)));
    let a = Raw {
        flags: 2 << 1,
        pages_alloc: 128,
        normal: 3,
        next: stream.len() as u32,
        num: 1,
        zero: 1,
        block: "pc.ram",
        slots: vec![0x7000, 0x8000, 0xa000, 0x9000],
        data: stream,
    };
    let b = a.zero_pages(3, vec![0xb000, 0xc000]);
    [greeting(1), a.bytes(), b.bytes(), Raw::sync(4).bytes()].concat()
}

/// QEMU 7.2 with zstd: SYNC on a compressed packet with pages, and a SYNC packet
/// without pages whose stale `next_packet_size` must not be read as a payload length.
fn qemu72_zstd() -> Vec<u8> {
    let stream: Vec<u8> = (0..200u8).map(|i| i.wrapping_mul(91) ^ 0x5a).collect();
    let a = Raw {
        flags: 1 | 2 << 1,
        pages_alloc: 128,
        normal: 4,
        next: 200,
        num: 20,
        zero: 0,
        block: "pc.ram",
        slots: vec![0x1000, 0x2000, 0x3000, 0x4000, 0xdead_0000],
        data: stream,
    };
    let b = Raw {
        flags: 1 | 2 << 1,
        normal: 0,
        num: 22,
        data: vec![],
        ..a.clone()
    };
    [greeting(0), a.bytes(), b.bytes()].concat()
}

/// QEMU 10.0 device state (VFIO): a 276-byte header and opaque data, then a SYNC.
fn qemu10_device_state() -> Vec<u8> {
    let mut dev = Vec::new();
    for v in [0x1122_3344u32, 1, 0x40] {
        dev.extend(v.to_be_bytes());
    }
    let mut idstr = b"0000:00:02.0/vfio".to_vec();
    idstr.resize(256, 0);
    dev.extend(idstr);
    dev.extend(0u32.to_be_bytes());
    dev.extend(300u32.to_be_bytes());
    dev.extend((0..300u32).map(|i| i as u8));
    [greeting(2), dev, Raw::sync(9).bytes()].concat()
}

fn goldens() -> Vec<(&'static str, Vec<u8>)> {
    vec![
        ("qemu-7.2-nocomp.mfd", qemu72_nocomp()),
        ("qemu-7.2-zstd.mfd", qemu72_zstd()),
        ("qemu-10.0-nocomp.mfd", qemu10_nocomp()),
        ("qemu-10.0-zstd.mfd", qemu10_zstd()),
        ("qemu-10.0-device-state.mfd", qemu10_device_state()),
    ]
}

/// The golden channel `name`, checked against what the builder above makes.
fn golden(name: &str) -> Vec<u8> {
    let built = goldens()
        .into_iter()
        .find(|(n, _)| *n == name)
        .expect("a golden")
        .1;
    let path = testdata().join(name);
    if support::bless() {
        std::fs::create_dir_all(testdata()).unwrap();
        std::fs::write(&path, &built).unwrap();
    }
    let file = std::fs::read(&path).expect("golden file (MIGSTREAM_BLESS=1?)");
    assert!(file == built, "{name} differs from its builder");
    file
}

// ---------------------------------------------------------------- goldens

#[test]
fn golden_channels_round_trip_whole_in_chunks_and_byte_by_byte() {
    let mut total = 0;
    for (name, _) in goldens() {
        let bytes = golden(name);
        total += bytes.len();
        let whole = decode(&bytes, &[bytes.len()]);
        assert_eq!(encode(&whole), bytes, "{name} whole");
        let bytewise = decode(&bytes, &[1]);
        assert_eq!(bytewise, whole, "{name} byte by byte");
        let chunks = decode(&bytes, &[7, 1344, 1, 4095, 64, 333]);
        assert_eq!(chunks, whole, "{name} in chunks");
    }
    let files = std::fs::read_dir(testdata())
        .unwrap()
        .filter(|e| e.as_ref().unwrap().path().extension() == Some("mfd".as_ref()))
        .count();
    assert_eq!(files, goldens().len() + REAL.len(), "stale golden channels");
    assert!(total < 1 << 20, "golden channels are {total} bytes");
}

/// Excerpts of real captures (`testdata/multifd/README.md`): a channel's greeting and
/// a few of its packets, byte for byte as QEMU wrote them.
const REAL: [&str; 4] = [
    "real-qemu-7.2-fill.mfd",
    "real-qemu-7.2-zstd.mfd",
    "real-qemu-10.0-q35.mfd",
    "real-qemu-10.0-zstd.mfd",
];

fn real(name: &str) -> (Vec<u8>, Vec<ChannelRecord>) {
    let bytes = std::fs::read(testdata().join(name)).unwrap();
    let records = decode(&bytes, &[bytes.len()]);
    assert_eq!(encode(&records), bytes, "{name} whole");
    assert_eq!(decode(&bytes, &[1]), records, "{name} byte by byte");
    assert_eq!(
        decode(&bytes, &[1000, 3, 5000]),
        records,
        "{name} in chunks"
    );
    (bytes, records)
}

#[test]
fn real_qemu72_packets() {
    let (_, records) = real("real-qemu-7.2-fill.mfd");
    let p = packets(&records);
    // a SYNC packet without pages: next_packet_size stale (a full packet's), every
    // slot stale, the block name the previous packet's
    assert!(p[0].is_sync());
    assert_eq!((p[0].pages_alloc, p[0].normal_pages), (128, 0));
    assert_eq!(p[0].next_packet_size, 524288);
    assert!(p[0].payload.is_empty());
    assert!(p[0].offsets.iter().all(|&o| o != 0));
    assert_eq!(&p[0].block[..], b"pc.ram");
    // packets of 2 and 1 pages: the other slots are stale
    assert_eq!((p[1].normal_pages, p[2].normal_pages), (2, 1));
    assert_eq!(p[2].offsets[1..].iter().filter(|&&o| o != 0).count(), 127);
    assert_eq!(p[2].pages().count(), 1);

    let (_, records) = real("real-qemu-7.2-zstd.mfd");
    let p = packets(&records);
    // SYNC on a compressed packet with 24 pages
    assert_eq!(p[0].flags, 1 | 2 << 1);
    assert_eq!((p[0].normal_pages, p[0].payload.len()), (24, 12198));
    // a SYNC packet without pages whose stale next_packet_size is not read
    assert_eq!((p[1].flags, p[1].next_packet_size), (1, 2774));
    assert!(p[1].payload.is_empty());
    assert_eq!(p[2].compression(), Some(Compression::Zstd));
}

#[test]
fn real_qemu10_packets() {
    let (_, records) = real("real-qemu-10.0-q35.mfd");
    let p = packets(&records);
    assert_eq!((p[0].normal_pages, p[0].zero_pages), (6, 122));
    assert_eq!(p[0].payload.len(), 6 * PAGE);
    assert_eq!(p[0].zero_offsets().len(), 122);
    assert_eq!(&p[0].block[..], b"pc.ram");
    // SYNC: pages_alloc 0, an empty name, and still 128 slots, all zero
    assert_eq!((p[1].flags, p[1].pages_alloc), (1, 0));
    assert!(p[1].block.is_empty() && p[1].offsets.iter().all(|&o| o == 0));

    let (_, records) = real("real-qemu-10.0-zstd.mfd");
    let p = packets(&records);
    // 128 pages of one repeated page: 16 bytes of the channel's zstd stream
    assert_eq!(
        (p[0].flags, p[0].normal_pages, p[0].next_packet_size),
        (2 << 1, 128, 16)
    );
    assert!(matches!(&p[0].payload, Payload::Compressed(d) if d.len() == 16));
    assert_eq!(p[1].flags, 1, "10.0 SYNC packets carry no compression bits");
}

#[test]
fn qemu72_stale_slots_stale_next_packet_size_and_sync_with_pages() {
    let records = decode(&golden("qemu-7.2-nocomp.mfd"), &[4096]);
    assert!(matches!(&records[0], ChannelRecord::Greeting(g) if g.channel_id == 1));
    let p = packets(&records);
    assert_eq!(p.len(), 4);
    // stale offsets past normal_pages are kept as they were
    assert_eq!(p[0].normal_offsets(), [0x1000, 0x5000, 0x9000]);
    assert_eq!(p[0].offsets[3], 0x0400_0000 + 3 * 0x1000);
    assert_eq!(p[0].offsets.len(), 128);
    let data: Vec<(u64, Vec<u8>)> = p[0].pages().map(|(o, d)| (o, d.to_vec())).collect();
    assert_eq!(
        data,
        [(0x1000, page(1)), (0x5000, page(2)), (0x9000, page(3))]
    );
    // SYNC on a packet that carries pages
    assert!(p[1].is_sync());
    assert_eq!(p[1].pages().count(), 2);
    // SYNC without pages: next_packet_size and the block name are stale, no payload
    assert!(p[2].is_sync());
    assert_eq!((p[2].normal_pages, p[2].next_packet_size), (0, 8192));
    assert_eq!(&p[2].block[..], b"pc.ram");
    assert_eq!(p[2].payload, Payload::Pages(vec![]));
    assert_eq!(&p[3].block[..], b"pc.bios");
    assert_eq!(p[3].pages().next().unwrap().1[..], page(6)[..]);
}

#[test]
fn qemu10_zero_pages_and_sync_with_128_slots() {
    let records = decode(&golden("qemu-10.0-nocomp.mfd"), &[100]);
    let p = packets(&records);
    assert_eq!(p[0].normal_offsets(), [0x10_0000, 0x10_2000]);
    assert_eq!(p[0].zero_offsets(), [0x10_1000, 0x10_3000, 0x10_4000]);
    assert_eq!(p[0].payload.len(), 2 * PAGE);
    assert_eq!((p[1].normal_pages, p[1].zero_pages), (0, 4));
    assert!(p[1].payload.is_empty());
    let sync = p[2];
    assert!(sync.is_sync());
    assert_eq!((sync.pages_alloc, sync.offsets.len()), (0, 128));
    assert!(sync.block.is_empty());
}

#[test]
fn compressed_payloads_are_opaque_and_sized_by_the_header() {
    let records = decode(&golden("qemu-10.0-zstd.mfd"), &[1]);
    let p = packets(&records);
    assert_eq!(p[0].compression(), Some(Compression::Zstd));
    assert!(
        matches!(&p[0].payload, Payload::Compressed(d) if d.len() == 57 && d.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]))
    );
    assert_eq!(
        p[0].pages().count(),
        0,
        "no raw pages in a compressed packet"
    );
    assert_eq!(p[1].payload, Payload::Compressed(Bytes::new()));
    assert_eq!(
        p[2].compression(),
        Some(Compression::None),
        "10.0 SYNC packets name no method"
    );

    let records = decode(&golden("qemu-7.2-zstd.mfd"), &[1]);
    let p = packets(&records);
    assert!(p[0].is_sync() && p[0].payload.len() == 200);
    // stale next_packet_size 200 without pages: no payload follows
    assert_eq!((p[1].next_packet_size, p[1].payload.len()), (200, 0));
}

#[test]
fn device_state_packets_are_carried() {
    let records = decode(&golden("qemu-10.0-device-state.mfd"), &[3]);
    let ChannelRecord::DeviceState(dev) = &records[1] else {
        panic!("not a device-state packet: {:?}", records[1]);
    };
    assert_eq!(&dev.idstr[..], b"0000:00:02.0/vfio");
    assert_eq!((dev.instance_id, dev.data.len()), (0, 300));
    assert!(matches!(&records[2], ChannelRecord::Packet(p) if p.is_sync()));
}

#[test]
fn pages_are_slices_of_the_input() {
    let bytes = Bytes::from(golden("qemu-7.2-nocomp.mfd"));
    let mut input = BytesMut::from(&bytes[..]);
    let start = input.as_ptr() as usize;
    let mut dec = MultifdDecoder::new();
    let mut seen = 0;
    while let Some(record) = dec.decode_eof(&mut input).unwrap() {
        if let ChannelRecord::Packet(p) = record {
            for (_, data) in p.pages() {
                let at = data.as_ptr() as usize - start;
                assert_eq!(&bytes[at..at + PAGE], &data[..], "a slice of the input");
                seen += 1;
            }
        }
    }
    assert_eq!(seen, 6);
}

#[tokio::test]
async fn framed_read_and_write_over_a_pipe() {
    let bytes = golden("qemu-10.0-nocomp.mfd");
    let (mut writer, reader) = tokio::io::duplex(1000);
    let input = bytes.clone();
    let feed = tokio::spawn(async move {
        writer.write_all(&input).await.unwrap();
    });
    let records: Vec<ChannelRecord> = FramedRead::new(reader, MultifdDecoder::new())
        .map(|r| r.unwrap())
        .collect()
        .await;
    feed.await.unwrap();
    let (tx, mut rx) = tokio::io::duplex(1 << 20);
    let mut sink = FramedWrite::new(tx, MultifdEncoder::new());
    for r in &records {
        sink.send(r).await.unwrap();
    }
    drop(sink);
    let mut out = Vec::new();
    tokio::io::AsyncReadExt::read_to_end(&mut rx, &mut out)
        .await
        .unwrap();
    assert_eq!(out, bytes);
}

#[test]
fn other_page_sizes_change_the_slot_count() {
    let slots = wire::offset_slots(64 * 1024);
    assert_eq!(slots, 8);
    let records = vec![
        ChannelRecord::Greeting(ChannelGreeting {
            uuid: [7; 16],
            channel_id: 3,
            reserved: [0; 39],
        }),
        ChannelRecord::Packet(Packet {
            flags: 0,
            pages_alloc: 8,
            normal_pages: 1,
            next_packet_size: 65536,
            packet_num: 1,
            zero_pages: 0,
            reserved: [0; 28],
            block: Bytes::from_static(b"mach-virt.ram"),
            offsets: vec![0x10000; 8],
            payload: Payload::Pages(vec![Bytes::from(vec![1; 65536])]),
        }),
    ];
    let mut out = BytesMut::new();
    let mut enc = MultifdEncoder::new().with_page_size(65536);
    records
        .iter()
        .for_each(|r| enc.encode(r, &mut out).unwrap());
    assert_eq!(out.len(), 64 + 320 + 8 * 8 + 65536);
    let dec = MultifdDecoder::new().with_page_size(65536);
    let (back, err) = decode_with(dec, &out, &[5000]);
    assert!(err.is_none(), "{err:?}");
    assert_eq!(back, records);
    // the default (4 KiB) decoder expects 128 slots: it reads the page as slots
    let (_, err) = decode_with(MultifdDecoder::new(), &out, &[out.len()]);
    assert!(err.is_some());
}

#[test]
fn limits_are_enforced_before_buffering() {
    let bytes = golden("qemu-7.2-nocomp.mfd");
    let mut limits = Limits::default();
    limits.max_pages_per_packet = 2;
    let (records, err) = decode_with(MultifdDecoder::with_limits(limits), &bytes, &[1 << 20]);
    assert_eq!(records.len(), 1, "the greeting only");
    let err = err.expect("3 pages, limit 2");
    assert_eq!(err.kind(), ErrorKind::LimitExceeded);
    assert_eq!(
        (err.offset(), err.field()),
        (Some(64 + 16), Some("normal_pages"))
    );

    let mut limits = Limits::default();
    limits.max_offset_slots = 64;
    let (_, err) = decode_with(MultifdDecoder::with_limits(limits), &bytes, &[1 << 20]);
    assert_eq!(err.unwrap().field(), Some("offset slots"));

    let mut limits = Limits::default();
    limits.max_compressed_len = 100;
    let zstd = golden("qemu-7.2-zstd.mfd");
    let (_, err) = decode_with(MultifdDecoder::with_limits(limits), &zstd, &[1 << 20]);
    let err = err.unwrap();
    assert_eq!(
        (err.kind(), err.field()),
        (ErrorKind::LimitExceeded, Some("next_packet_size"))
    );
}

#[test]
fn encoder_refuses_what_the_decoder_would_not_accept() {
    let records = decode(&golden("qemu-10.0-nocomp.mfd"), &[1 << 20]);
    let ChannelRecord::Packet(good) = records[1].clone() else {
        unreachable!()
    };
    type Break = Box<dyn Fn(&mut Packet)>;
    let cases: Vec<(&str, Break)> = vec![
        (
            "offset slots",
            Box::new(|p| p.offsets.pop().map(drop).unwrap()),
        ),
        (
            "page data",
            Box::new(|p| p.payload = Payload::Pages(vec![Bytes::from(vec![0; 4096])])),
        ),
        (
            "page data",
            Box::new(|p| {
                if let Payload::Pages(v) = &mut p.payload {
                    v[0] = v[0].slice(1..);
                }
            }),
        ),
        (
            "payload",
            Box::new(|p| p.payload = Payload::Compressed(Bytes::new())),
        ),
        ("packet flags", Box::new(|p| p.flags = 0x80)),
        ("packet flags", Box::new(|p| p.flags = 3 << 1)),
        ("packet flags", Box::new(|p| p.flags = 0x40)),
        ("normal_pages", Box::new(|p| p.pages_alloc = 1)),
        ("pages_alloc", Box::new(|p| p.pages_alloc = 129)),
        ("zero_pages", Box::new(|p| p.zero_pages = 127)),
        ("RAM block name", Box::new(|p| p.block = Bytes::new())),
        (
            "RAM block name",
            Box::new(|p| p.block = Bytes::from_static(b"pc\0ram")),
        ),
        (
            "RAM block name",
            Box::new(|p| p.block = Bytes::from(vec![b'x'; 256])),
        ),
    ];
    for (field, break_it) in cases {
        let mut enc = MultifdEncoder::new();
        let mut out = BytesMut::new();
        enc.encode(&records[0], &mut out).unwrap();
        let mut p = good.clone();
        break_it(&mut p);
        let before = out.len();
        let err = enc.encode(&ChannelRecord::Packet(p), &mut out).unwrap_err();
        assert_eq!(
            (err.kind(), err.field()),
            (ErrorKind::InvalidRecord, Some(field))
        );
        assert_eq!(out.len(), before, "nothing written for a refused record");
    }
    // compressed data must be what next_packet_size announces
    let zstd = decode(&golden("qemu-10.0-zstd.mfd"), &[1 << 20]);
    let ChannelRecord::Packet(mut p) = zstd[1].clone() else {
        unreachable!()
    };
    p.next_packet_size += 1;
    let mut enc = MultifdEncoder::new();
    let mut out = BytesMut::new();
    enc.encode(&zstd[0], &mut out).unwrap();
    let err = enc.encode(&ChannelRecord::Packet(p), &mut out).unwrap_err();
    assert_eq!(err.field(), Some("compressed payload"));
    // order: the greeting first, once
    let err = MultifdEncoder::new()
        .encode(&zstd[1], &mut out)
        .unwrap_err();
    assert_eq!(err.field(), Some("channel greeting"));
    let err = enc.encode(&zstd[0], &mut out).unwrap_err();
    assert_eq!(err.field(), Some("channel greeting"));
    // a device-state packet with no data
    let dev = ChannelRecord::DeviceState(DeviceStatePacket {
        flags: 0x40,
        idstr: Bytes::from_static(b"dev"),
        instance_id: 0,
        data: Bytes::new(),
    });
    assert_eq!(
        enc.encode(&dev, &mut out).unwrap_err().field(),
        Some("device-state data")
    );
}

// ---------------------------------------------------------------- malformed

fn malformed_cases() -> Vec<(&'static str, Vec<u8>)> {
    let g = greeting(0);
    let ok = Raw {
        flags: 0,
        pages_alloc: 128,
        normal: 1,
        next: 4096,
        num: 1,
        zero: 0,
        block: "pc.ram",
        slots: vec![0x1000],
        data: page(9),
    };
    let packet = |f: &dyn Fn(&mut Raw)| {
        let mut p = ok.clone();
        f(&mut p);
        [&g[..], &p.bytes()].concat()
    };
    let patch = |mut bytes: Vec<u8>, at: usize, with: &[u8]| {
        bytes[at..at + with.len()].copy_from_slice(with);
        bytes
    };
    let good = packet(&|_| {});
    let header = 64 + 1344;
    let device = |len: u32, name: &[u8]| {
        let mut d = g.clone();
        for v in [0x1122_3344u32, 1, 0x40] {
            d.extend(v.to_be_bytes());
        }
        let mut idstr = name.to_vec();
        idstr.resize(256, 0);
        d.extend(idstr);
        d.extend(0u32.to_be_bytes());
        d.extend(len.to_be_bytes());
        d
    };
    vec![
        ("empty", vec![]),
        ("main-channel", b"QEVM\0\0\0\x03\x07".to_vec()),
        (
            "bad-greeting-magic",
            patch(g.clone(), 0, &[0x11, 0x22, 0x33, 0x45]),
        ),
        (
            "greeting-version-2",
            patch(g.clone(), 4, &2u32.to_be_bytes()),
        ),
        ("truncated-greeting", g[..30].to_vec()),
        ("bad-packet-magic", patch(good.clone(), 64, b"QEVM")),
        (
            "packet-version-2",
            patch(good.clone(), 68, &2u32.to_be_bytes()),
        ),
        ("unknown-flag-bits", packet(&|p| p.flags = 0x80)),
        ("unknown-compression", packet(&|p| p.flags = 3 << 1)),
        ("sync-device-state", packet(&|p| p.flags = 0x41)),
        ("pages-alloc-129", packet(&|p| p.pages_alloc = 129)),
        ("normal-pages-over-alloc", packet(&|p| p.pages_alloc = 0)),
        ("zero-pages-over-alloc", packet(&|p| p.zero = 128)),
        (
            "block-name-not-terminated",
            patch(good.clone(), 64 + 64, &[b'x'; 256]),
        ),
        (
            "block-name-junk-after-nul",
            patch(good.clone(), 64 + 64 + 200, b"junk"),
        ),
        ("empty-block-name-with-pages", packet(&|p| p.block = "")),
        (
            "empty-block-name-with-zero-pages",
            packet(&|p| {
                (p.block, p.normal, p.zero, p.data) = ("", 0, 1, vec![]);
            }),
        ),
        (
            "compressed-beyond-limit",
            packet(&|p| (p.flags, p.next) = (2 << 1, 2 << 20)),
        ),
        ("truncated-packet-prefix", good[..64 + 10].to_vec()),
        ("truncated-packet-header", good[..header - 1].to_vec()),
        ("truncated-page-data", good[..header + 100].to_vec()),
        (
            "truncated-compressed-payload",
            packet(&|p| {
                (p.flags, p.next, p.data) = (2 << 1, 5000, vec![1; 4999]);
            }),
        ),
        ("device-state-empty", device(0, b"dev")),
        ("device-state-beyond-limit", device(17 << 20, b"dev")),
        ("device-state-empty-idstr", device(5, b"")),
        (
            "truncated-device-state",
            [&device(5, b"dev")[..], b"1234"].concat(),
        ),
    ]
}

#[test]
fn every_malformed_channel_fails_with_its_golden_error() {
    let decode = |bytes: &[u8], read| decode_with(MultifdDecoder::new(), bytes, &[read]).1;
    support::golden_errors(&testdata().join("malformed"), &malformed_cases(), decode);
}

#[test]
fn every_strict_prefix_is_a_prefix_of_the_records_then_a_truncation() {
    let small = [
        golden("qemu-7.2-zstd.mfd"),
        golden("qemu-10.0-device-state.mfd"),
        std::fs::read(testdata().join("real-qemu-10.0-zstd.mfd")).unwrap(),
    ];
    for bytes in small {
        let all = decode(&bytes, &[bytes.len()]);
        // where each record ends
        let boundaries: Vec<usize> = (1..=all.len()).map(|k| encode(&all[..k]).len()).collect();
        for cut in 0..bytes.len() {
            let mut dec = MultifdDecoder::new();
            let mut buf = BytesMut::from(&bytes[..cut]);
            let mut records = Vec::new();
            while let Some(r) = dec.decode(&mut buf).expect("a prefix is no error") {
                records.push(r);
            }
            assert_eq!(records[..], all[..records.len()], "cut at {cut}");
            match dec.decode_eof(&mut buf) {
                Ok(None) => assert!(boundaries.contains(&cut), "cut at {cut}"),
                Ok(Some(r)) => panic!("cut at {cut}: a record at the end: {r:?}"),
                Err(e) => {
                    assert_eq!(e.kind(), ErrorKind::Truncated, "cut at {cut}");
                    assert_eq!(e.offset(), Some(cut as u64), "cut at {cut}");
                }
            }
        }
    }
}

#[test]
fn limits_changed_mid_stream_apply_from_the_next_packet() {
    let bytes = golden("qemu-7.2-nocomp.mfd");
    let mut dec = MultifdDecoder::new();
    let mut buf = BytesMut::from(&bytes[..]);
    assert!(matches!(
        dec.decode(&mut buf),
        Ok(Some(ChannelRecord::Greeting(_)))
    ));
    assert!(
        matches!(dec.decode(&mut buf), Ok(Some(ChannelRecord::Packet(p))) if p.normal_pages == 3)
    );
    let mut limits = dec.limits().clone();
    limits.max_pages_per_packet = 1;
    dec.set_limits(limits);
    let err = dec.decode(&mut buf).unwrap_err();
    let at = 64 + 1344 + 3 * 4096 + 16;
    assert_eq!(
        (err.kind(), err.offset()),
        (ErrorKind::LimitExceeded, Some(at as u64))
    );
}

#[test]
fn a_failed_decoder_stays_failed() {
    let bytes = [&greeting(0)[..], b"QEVM\0\0\0\x01\0\0\0\0"].concat();
    let mut dec = MultifdDecoder::new();
    let mut buf = BytesMut::from(&bytes[..]);
    assert!(dec.decode(&mut buf).unwrap().is_some());
    assert!(dec.decode(&mut buf).is_err());
    let mut more = BytesMut::from(&golden("qemu-10.0-nocomp.mfd")[64..]);
    assert!(dec.decode(&mut more).is_err());
}

// ---------------------------------------------------------------- generated

fn arb_packet() -> impl Strategy<Value = Packet> {
    let compression = prop_oneof![
        3 => Just(Compression::None),
        1 => Just(Compression::Zstd),
        1 => Just(Compression::Zlib),
    ];
    (
        compression,
        any::<bool>(),
        prop_oneof![Just(0u32), Just(128u32), 0u32..=128],
        any::<u32>(),
        any::<u64>(),
        prop::collection::vec(any::<u64>(), SLOTS),
        "[a-z.]{1,12}",
        any::<(u8, u32, u32, u8)>(),
        any::<bool>(),
    )
        .prop_map(
            |(
                comp,
                sync,
                pages_alloc,
                next,
                num,
                offsets,
                name,
                (fill, n, z, stale),
                stale_next,
            )| {
                let normal = if pages_alloc == 0 {
                    0
                } else {
                    n % (pages_alloc.min(6) + 1)
                };
                let zero = z % (pages_alloc - normal + 1);
                let block = match (normal + zero, stale % 3) {
                    (0, 0) => Bytes::new(),
                    _ => Bytes::from(name),
                };
                let payload = match comp {
                    Compression::None => Payload::Pages(
                        (0..normal)
                            .map(|i| Bytes::from(vec![fill ^ i as u8; PAGE]))
                            .collect(),
                    ),
                    _ if normal == 0 => Payload::Compressed(Bytes::new()),
                    _ => Payload::Compressed(Bytes::from(vec![fill; (next % 3000) as usize])),
                };
                let next_packet_size = match (&payload, stale_next) {
                    (Payload::Compressed(d), _) if normal > 0 => d.len() as u32,
                    (_, true) => next,
                    _ => normal * PAGE as u32,
                };
                let mut reserved = [0; 28];
                reserved[0] = stale;
                Packet {
                    flags: comp.flag() | u32::from(sync),
                    pages_alloc,
                    normal_pages: normal,
                    next_packet_size,
                    packet_num: num,
                    zero_pages: zero,
                    reserved,
                    block,
                    offsets,
                    payload,
                }
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn generated_channels_round_trip(
        id in any::<u8>(),
        uuid in any::<[u8; 16]>(),
        packets in prop::collection::vec(arb_packet(), 0..6),
        reads in prop::collection::vec(1usize..9000, 1..16),
    ) {
        let mut records = vec![ChannelRecord::Greeting(ChannelGreeting { uuid, channel_id: id, reserved: [0; 39] })];
        records.extend(packets.into_iter().map(ChannelRecord::Packet));
        let bytes = encode(&records);
        let (back, err) = decode_with(MultifdDecoder::new(), &bytes, &reads);
        prop_assert!(err.is_none(), "{:?}", err);
        prop_assert_eq!(&back, &records);
        prop_assert_eq!(encode(&back), bytes);
    }

    #[test]
    fn golden_channels_round_trip_in_random_reads(
        which in 0usize..5,
        reads in prop::collection::vec(1usize..6000, 1..32),
    ) {
        let (name, _) = goldens()[which].clone();
        let bytes = golden(name);
        let records = decode(&bytes, &reads);
        prop_assert_eq!(encode(&records), bytes);
    }
}

// ---------------------------------------------------------------- real captures

/// Where `harness/capture-multifd.py` put its captures: `MIGSTREAM_MULTIFD_STREAMS`,
/// or `$MIGSTREAM_STREAMS/multifd`.
fn capture_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("MIGSTREAM_MULTIFD_STREAMS") {
        return dir.into();
    }
    let streams = std::env::var_os("MIGSTREAM_STREAMS").expect(
        "MIGSTREAM_MULTIFD_STREAMS (or MIGSTREAM_STREAMS with a multifd/ folder) must name \
         the captures of harness/capture-multifd.py",
    );
    Path::new(&streams).join("multifd")
}

#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct Counts {
    packets: u64,
    sync: u64,
    sync_with_pages: u64,
    normal_pages: u64,
    zero_pages: u64,
    compressed_packets: u64,
    stale_slots: u64,
    stale_next_packet_size: u64,
    sync_pages_alloc_0: u64,
    device_state: u64,
}

/// Decodes `bytes` in reads cycling through `reads`, re-encodes every record and
/// compares as it goes; counts what the channel carries.
fn channel_round_trip(bytes: &[u8], reads: &[usize]) -> (u8, Counts) {
    let (mut dec, mut enc) = (MultifdDecoder::new(), MultifdEncoder::new());
    let (mut buf, mut out) = (BytesMut::new(), BytesMut::new());
    let (mut fed, mut reads) = (0, reads.iter().cycle());
    let (mut compared, mut counts, mut id) = (0, Counts::default(), None);
    loop {
        let at_end = fed == bytes.len();
        let step = match at_end {
            true => dec.decode_eof(&mut buf),
            false => dec.decode(&mut buf),
        };
        let Some(record) = step.unwrap_or_else(|e| panic!("decode failed: {e}")) else {
            if at_end {
                break;
            }
            let end = (fed + reads.next().unwrap()).min(bytes.len());
            buf.extend_from_slice(&bytes[fed..end]);
            fed = end;
            continue;
        };
        match &record {
            ChannelRecord::Greeting(g) => id = Some(g.channel_id),
            ChannelRecord::Packet(p) => {
                counts.packets += 1;
                counts.sync += u64::from(p.is_sync());
                counts.sync_with_pages += u64::from(p.is_sync() && p.normal_pages > 0);
                counts.sync_pages_alloc_0 += u64::from(p.is_sync() && p.pages_alloc == 0);
                counts.normal_pages += u64::from(p.normal_pages);
                counts.zero_pages += u64::from(p.zero_pages);
                counts.compressed_packets += u64::from(matches!(p.payload, Payload::Compressed(_)));
                let used = (p.normal_pages + p.zero_pages) as usize;
                counts.stale_slots += p.offsets[used..].iter().filter(|&&o| o != 0).count() as u64;
                counts.stale_next_packet_size +=
                    u64::from(p.normal_pages == 0 && p.next_packet_size != 0);
            }
            ChannelRecord::DeviceState(_) => counts.device_state += 1,
            _ => {}
        }
        enc.encode(&record, &mut out).unwrap();
        if out.len() > 1 << 20 {
            assert!(
                out[..] == bytes[compared..compared + out.len()],
                "differs near byte {compared}"
            );
            compared += out.len();
            out.clear();
        }
    }
    assert!(out[..] == bytes[compared..], "differs near byte {compared}");
    assert_eq!(compared + out.len(), bytes.len());
    (id.expect("a greeting"), counts)
}

/// A read-size sequence drawn from `seed`: socket-like, from 1 byte to 200 KB.
fn random_reads(seed: u64) -> Vec<usize> {
    let mut rng = support::synthetic::Rng::new(seed);
    (0..997)
        .map(|_| {
            let max = [16, 4096, 65536, 200_000][rng.below(4) as usize];
            1 + rng.below(max) as usize
        })
        .collect()
}

#[test]
#[ignore = "needs real multifd captures: harness/capture-multifd.py, MIGSTREAM_MULTIFD_STREAMS"]
fn real_multifd_channels_round_trip_byte_exact() {
    use migstream::qemu::{QemuDecoder, QemuEncoder, RamRecord, Record};
    let dir = capture_dir();
    let mut metas: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension() == Some("json".as_ref()))
        .collect();
    metas.sort();
    let mut versions = BTreeMap::new();
    for meta_path in &metas {
        let meta: serde_json::Value =
            serde_json::from_slice(&std::fs::read(meta_path).unwrap()).unwrap();
        if meta["kind"] != "multifd-live" {
            continue;
        }
        assert_eq!(
            meta["ok"],
            true,
            "{}: a failed capture",
            meta_path.display()
        );
        let (src, dst) = (
            meta["src_qemu"].as_str().unwrap(),
            meta["dst_qemu"].as_str().unwrap(),
        );
        let params = &meta["params"];
        let compressed = params["multifd-compression"]
            .as_str()
            .is_some_and(|c| c != "none");
        let legacy_zero = src == "7.2" || params["zero-page-detection"] == "legacy";
        let mut channels = Vec::new();
        for file in meta["files"].as_array().unwrap() {
            let path = dir.join(file["file"].as_str().unwrap());
            let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            assert_eq!(
                bytes.len() as u64,
                file["bytes"].as_u64().unwrap(),
                "{}",
                path.display()
            );
            if file["kind"] == "main" {
                // the main channel of a multifd migration: no page data, ZERO records
                // only with legacy zero-page detection
                let (mut dec, mut enc) = (QemuDecoder::new(), QemuEncoder::new());
                let (mut input, mut out) = (BytesMut::from(&bytes[..]), BytesMut::new());
                let (mut pages, mut zeros, mut flushes) = (0, 0, 0);
                while let Some(r) = dec.decode_eof(&mut input).unwrap() {
                    match &r {
                        Record::Ram(RamRecord::Page { .. }) => pages += 1,
                        Record::Ram(RamRecord::Zero { .. }) => zeros += 1,
                        Record::Ram(RamRecord::MultifdFlush) => flushes += 1,
                        _ => {}
                    }
                    enc.encode(&r, &mut out).unwrap();
                }
                assert!(
                    out[..] == bytes[..],
                    "{}: main channel differs",
                    path.display()
                );
                assert_eq!(
                    pages,
                    0,
                    "{}: page data on the main channel",
                    path.display()
                );
                assert_eq!(zeros > 0, legacy_zero, "{}: ZERO records", path.display());
                eprintln!(
                    "{}: main channel, {zeros} ZERO records, {flushes} flushes",
                    path.display()
                );
                continue;
            }
            let (id, whole) = channel_round_trip(&bytes, &[bytes.len()]);
            let (_, socket_like) = channel_round_trip(&bytes, &random_reads(bytes.len() as u64));
            assert_eq!(
                whole,
                socket_like,
                "{}: records depend on read sizes",
                path.display()
            );
            assert_eq!(
                u64::from(id),
                file["channel_id"].as_u64().unwrap(),
                "{}",
                path.display()
            );
            let c = &whole;
            assert!(c.packets > 0 && c.sync > 0, "{}: {c:?}", path.display());
            assert_eq!(
                c.device_state,
                0,
                "{}: no VFIO, no device state",
                path.display()
            );
            assert_eq!(
                c.compressed_packets > 0,
                compressed,
                "{}: {c:?}",
                path.display()
            );
            if legacy_zero {
                assert_eq!(
                    c.zero_pages,
                    0,
                    "{}: zero pages go to the main channel",
                    path.display()
                );
            }
            match src {
                // 7.2 sends SYNC packets with pages_alloc 128; 10.0 with 0
                "7.2" => assert_eq!(c.sync_pages_alloc_0, 0, "{}", path.display()),
                _ => assert_eq!(c.sync_pages_alloc_0, c.sync, "{}: {c:?}", path.display()),
            }
            if src == "10" {
                assert_eq!(
                    c.stale_slots,
                    0,
                    "{}: 10.0 clears its packets",
                    path.display()
                );
                assert_eq!(c.stale_next_packet_size, 0, "{}", path.display());
                assert_eq!(c.sync_with_pages, 0, "{}", path.display());
            }
            eprintln!(
                "{}: channel {id}, {} bytes: {c:?}",
                path.display(),
                bytes.len()
            );
            channels.push(id);
        }
        channels.sort();
        let expected: Vec<u8> = (0..meta["channels"].as_u64().unwrap() as u8).collect();
        assert_eq!(channels, expected, "{}: channels", meta_path.display());
        *versions.entry(format!("{src}->{dst}")).or_insert(0) += 1;
    }
    eprintln!("captures by version: {versions:?}");
    assert!(
        versions.keys().any(|v| v.starts_with("7.2"))
            && versions.keys().any(|v| v.starts_with("10")),
        "multifd captures of both QEMU 7.2 and 10.0 expected in {}, got {versions:?}",
        dir.display()
    );
}
