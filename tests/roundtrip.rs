//! Round trips of hand-built streams: every record kind, every read size, every prefix.

mod support;

use bytes::Bytes;
use migstream::ErrorKind;
use migstream::qemu::{RamRecord, Record};
use proptest::prelude::*;
use support::*;

#[test]
fn sample_stream_round_trips_with_every_read_size() {
    let records = sample_records();
    let bytes = encode(&records);
    for read in 1..=bytes.len() {
        let decoded = decode(&bytes, read);
        assert_eq!(encode(&decoded), bytes, "read size {read}");
        assert_eq!(normalize(decoded), records, "read size {read}");
    }
}

#[test]
fn every_strict_prefix_is_truncated_never_malformed() {
    let bytes = encode(&sample_records());
    for cut in 0..bytes.len() {
        let (records, err) = decode_reads(&bytes[..cut], 7);
        match err {
            Some(err) => {
                assert_eq!(err.kind(), ErrorKind::Truncated, "prefix {cut}: {err}");
                assert_eq!(err.offset(), Some(cut as u64), "prefix {cut}");
            }
            // a stream may end right after EOF: the device description is optional,
            // and a device-state byte 00 at the very end reads as that EOF
            None => assert_eq!(
                records.last(),
                Some(&Record::Eof),
                "prefix {cut} complete without EOF"
            ),
        }
        // what was decoded re-encodes to a prefix of the input
        let out = encode(&records);
        assert_eq!(&bytes[..out.len()], &out[..], "prefix {cut}");
    }
}

#[test]
fn page_payloads_are_slices_of_the_input() {
    let bytes = Bytes::from(encode(&sample_records()));
    let mut buf = bytes::BytesMut::from(&bytes[..]);
    let base = buf.as_ptr() as usize;
    let mut dec = migstream::qemu::QemuDecoder::new();
    let mut seen = 0;
    while let Some(r) = dec.decode_eof(&mut buf).unwrap() {
        if let Record::Ram(RamRecord::Page { data, .. }) = r {
            let at = data.as_ptr() as usize - base;
            assert_eq!(
                &bytes[at..at + data.len()],
                &data[..],
                "payload points into the input buffer"
            );
            seen += 1;
        }
    }
    assert_eq!(seen, 4);
}

#[test]
fn stream_without_configuration_footers_or_vmdesc() {
    let records = vec![
        Record::Header,
        Record::SectionStart(section(7, "ram", 0, 4)),
        mem_size(&[("pc.ram", 4096)]),
        Record::Ram(RamRecord::Eos),
        Record::SectionEnd { section_id: 7 },
        page("pc.ram", 0, false, 1),
        Record::Ram(RamRecord::Eos),
        Record::Eof,
    ];
    let bytes = encode(&records);
    for read in [1, 3, bytes.len()] {
        assert_eq!(decode(&bytes, read), records);
    }
}

#[test]
fn device_state_ending_in_bare_eof() {
    let mut records = sample_records();
    records.pop(); // no vmdesc
    let bytes = encode(&records);
    assert_eq!(normalize(decode(&bytes, 5)), records);
}

#[test]
fn packaged_command_data_passes_through() {
    let mut inner = encode(&[
        command(4, b""),
        Record::SectionFull(section(3, "cpu", 0, 12)),
    ]);
    inner.extend_from_slice(b"opaque cpu state");
    let len = (inner.len() as u32).to_be_bytes();
    let records = vec![
        Record::Header,
        command(1, b""),
        command(2, b"\0\0\0\x01"),
        Record::Command(migstream::qemu::Command {
            cmd: 7,
            payload: Bytes::copy_from_slice(&len),
        }),
        Record::Opaque(Bytes::from(inner)),
        command(2, b"\0\0\0\x04"),
        Record::Eof,
    ];
    let bytes = encode(&records);
    for read in [1, 2, 64] {
        assert_eq!(normalize(decode(&bytes, read)), records, "read {read}");
    }
}

#[test]
fn vmdesc_lookalike_inside_device_state_is_device_state() {
    // `00 06 <len> {` inside device data, followed by more data than it announces
    let mut records = sample_records();
    let fake = Bytes::from_static(b"\x00\x06\x00\x00\x00\x02{}MORE-DEVICE-DATA");
    records[25] = Record::Opaque(fake);
    let bytes = encode(&records);
    for read in [1, 4, 9, bytes.len()] {
        assert_eq!(normalize(decode(&bytes, read)), records, "read {read}");
    }
}

/// A generated RAM section body: pages over a few blocks, with CONTINUE set exactly
/// when QEMU would set it.
fn ram_body() -> impl Strategy<Value = Vec<Record>> {
    let op = (
        0u8..4,
        0usize..3,
        0u64..8,
        any::<u8>(),
        prop::collection::vec(any::<u8>(), 0..64),
    );
    prop::collection::vec(op, 0..40).prop_map(|ops| {
        const BLOCKS: [&str; 3] = ["pc.ram", "/rom@etc/acpi/tables", "pc.bios"];
        let mut last = None;
        let mut out = Vec::new();
        for (kind, block, pg, byte, delta) in ops {
            let name = BLOCKS[block];
            let cont = last == Some(block);
            if kind < 3 {
                last = Some(block);
            }
            out.push(match kind {
                0 => page(name, pg, cont, byte),
                1 => Record::Ram(RamRecord::Zero {
                    addr: page_addr(name, pg, cont),
                    fill: byte,
                }),
                2 => Record::Ram(RamRecord::Xbzrle {
                    addr: page_addr(name, pg, cont),
                    data: Bytes::from(delta),
                }),
                _ => Record::Ram(RamRecord::MultifdFlush),
            });
        }
        out
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn generated_streams_round_trip(sections in prop::collection::vec(ram_body(), 1..4), read in 1usize..9000) {
        let mut records = vec![
            Record::Header,
            Record::SectionStart(section(1, "ram", 0, 4)),
            mem_size(&[("pc.ram", 8 * 4096), ("/rom@etc/acpi/tables", 8 * 4096), ("pc.bios", 8 * 4096)]),
            Record::Ram(RamRecord::Eos),
            Record::Footer { section_id: 1 },
        ];
        let n = sections.len();
        for (i, body) in sections.into_iter().enumerate() {
            records.push(match i + 1 == n {
                true => Record::SectionEnd { section_id: 1 },
                false => Record::SectionPart { section_id: 1 },
            });
            records.extend(body);
            records.push(Record::Ram(RamRecord::Eos));
            records.push(Record::Footer { section_id: 1 });
        }
        records.push(Record::SectionFull(section(0, "timer", 0, 2)));
        records.push(Record::Opaque(Bytes::from_static(b"\x01\x02\x03")));
        records.push(Record::Eof);
        let bytes = encode(&records);
        let decoded = decode(&bytes, read);
        prop_assert_eq!(encode(&decoded), bytes);
        prop_assert_eq!(normalize(decoded), records);
    }
}

#[test]
fn limits_changed_mid_stream_apply_to_the_next_record() {
    let bytes = encode(&sample_records());
    let mut dec = migstream::qemu::QemuDecoder::new();
    let mut buf = bytes::BytesMut::from(&bytes[..]);
    // decode up to EOF with the defaults, then shrink the description limit
    while dec
        .decode_eof(&mut buf)
        .unwrap()
        .expect("a record before EOF")
        != Record::Eof
    {}
    let mut limits = dec.limits().clone();
    limits.max_vmdesc_len = 8;
    dec.set_limits(limits);
    let err = dec.decode_eof(&mut buf).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::LimitExceeded, "{err}");
    assert_eq!(err.field(), Some("device description length"));
}

#[test]
fn typed_errors_survive_an_io_error_boundary() {
    let (_, err) = decode_reads(b"QEVX\0\0\0\x03", 8);
    let io: std::io::Error = err.unwrap().into();
    assert_eq!(io.kind(), std::io::ErrorKind::InvalidData);
    let inner = io
        .get_ref()
        .and_then(|e| e.downcast_ref::<migstream::Error>())
        .unwrap();
    assert_eq!(
        (inner.kind(), inner.offset(), inner.field()),
        (ErrorKind::Malformed, Some(0), Some("file magic"))
    );
}

#[test]
fn configuration_directly_followed_by_a_final_eof() {
    // one byte after the configuration is enough to see that no subsection follows
    let records = vec![Record::Header, sample_records()[1].clone(), Record::Eof];
    let bytes = encode(&records);
    assert_eq!(decode(&bytes, 1), records);
}
