//! Round trips of the real QEMU streams bundled in `testdata/` (paused 16 MiB guests
//! from QEMU 7.2 and 10.0): whole, in random reads, byte by byte, and through
//! tokio-util's `FramedRead`/`FramedWrite` over a byte pipe.

mod support;

use futures::{SinkExt, StreamExt};
use migstream::qemu::{QemuDecoder, QemuEncoder, RamRecord, Record};
use proptest::prelude::*;
use support::*;
use tokio::io::AsyncWriteExt;
use tokio_util::codec::{FramedRead, FramedWrite};

const STREAMS: [&str; 2] = ["qemu-7.2-pc-paused.mig", "qemu-10.0-q35-paused.mig"];

fn stream(name: &str) -> Vec<u8> {
    std::fs::read(format!("{}/testdata/{name}", env!("CARGO_MANIFEST_DIR"))).unwrap()
}

#[test]
fn real_streams_round_trip_whole_and_byte_by_byte() {
    for name in STREAMS {
        let bytes = stream(name);
        let whole = decode(&bytes, bytes.len());
        assert_eq!(encode(&whole), bytes, "{name} whole");
        let bytewise = decode(&bytes, 1);
        assert_eq!(encode(&bytewise), bytes, "{name} byte by byte");
        assert_eq!(
            normalize(bytewise),
            normalize(whole),
            "{name}: same records"
        );
    }
}

#[test]
fn real_streams_have_the_expected_shape() {
    for name in STREAMS {
        let records = normalize(decode(&stream(name), 1 << 16));
        let count = |f: &dyn Fn(&Record) -> bool| records.iter().filter(|r| f(r)).count();
        assert_eq!(records[0], Record::Header);
        assert!(matches!(&records[1], Record::Configuration(c) if c.machine.starts_with(b"pc-")));
        assert_eq!(
            count(&|r| matches!(r, Record::Ram(RamRecord::MemSize(m)) if m.blocks.len() == 6)),
            1
        );
        assert!(
            count(&|r| matches!(r, Record::Ram(RamRecord::Zero { .. }))) > 4000,
            "{name}"
        );
        assert!(
            count(&|r| matches!(r, Record::Ram(RamRecord::Page { .. }))) > 40,
            "{name}"
        );
        assert_eq!(
            count(&|r| matches!(r, Record::SectionFull(_))),
            1,
            "device state starts once"
        );
        let switchover = count(&|r| matches!(r, Record::Command(c) if c.cmd == 11));
        assert_eq!(
            switchover,
            usize::from(name.contains("10.0")),
            "{name}: SWITCHOVER_START"
        );
        let n = records.len();
        assert_eq!(records[n - 2], Record::Eof, "{name}");
        assert!(
            matches!(&records[n - 1], Record::VmDescription(j) if j.starts_with(b"{")),
            "{name}"
        );
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[test]
    fn real_streams_round_trip_in_random_reads(which in 0usize..2, reads in prop::collection::vec(1usize..20000, 1..64)) {
        let bytes = stream(STREAMS[which]);
        let mut dec = QemuDecoder::new();
        let mut enc = QemuEncoder::new();
        let (mut buf, mut out) = (bytes::BytesMut::new(), bytes::BytesMut::new());
        let mut fed = 0;
        for read in reads.iter().cycle() {
            while let Some(r) = dec.decode(&mut buf).unwrap() {
                enc.encode(&r, &mut out).unwrap();
            }
            if fed == bytes.len() {
                break;
            }
            let end = (fed + read).min(bytes.len());
            buf.extend_from_slice(&bytes[fed..end]);
            fed = end;
        }
        while let Some(r) = dec.decode_eof(&mut buf).unwrap() {
            enc.encode(&r, &mut out).unwrap();
        }
        prop_assert!(out[..] == bytes[..]);
    }
}

#[tokio::test]
async fn framed_read_and_write_over_a_pipe() {
    for name in STREAMS {
        let bytes = stream(name);
        // a 4 KiB pipe: the decoder sees reads of every size up to 4 KiB
        let (mut tx, rx) = tokio::io::duplex(4096);
        let src = bytes.clone();
        let writer = tokio::spawn(async move {
            tx.write_all(&src).await.unwrap();
            tx.shutdown().await.unwrap();
        });
        let mut records = FramedRead::new(rx, QemuDecoder::new());
        let mut sink = FramedWrite::new(Vec::new(), QemuEncoder::new());
        while let Some(record) = records.next().await {
            sink.send(record.unwrap()).await.unwrap();
        }
        writer.await.unwrap();
        assert!(sink.get_ref()[..] == bytes[..], "{name}");
    }
}

#[tokio::test]
async fn a_truncated_stream_is_an_error_through_framed_read() {
    let bytes = stream(STREAMS[0]);
    let cut = &bytes[..bytes.len() / 2];
    let mut records = FramedRead::new(cut, QemuDecoder::new());
    let mut last = None;
    while let Some(r) = records.next().await {
        last = Some(r);
    }
    let err = last.unwrap().unwrap_err();
    assert_eq!(err.kind(), migstream::ErrorKind::Truncated);
    assert_eq!(err.offset(), Some(cut.len() as u64));
}
