//! What a source QEMU 10.0 sends to migrate a guest (precopy, no capabilities), as
//! [`Record`]s made as they are consumed, and as the bytes [`QemuEncoder`] makes of
//! them.

use bytes::{Bytes, BytesMut};
use migstream::qemu::{
    Command, Configuration, MemSize, PageAddr, QemuEncoder, RamBlock, RamRecord, Record,
    SectionHeader, wire,
};

use super::guest::{Guest, PAGE, PASSES, Rng};

/// QEMU's section ids come from its registration order; these are a `pc` machine's.
const TIMER_SECTION: u32 = 0;
const RAM_SECTION: u32 = 2;

/// Pages per PART section of the first pass (QEMU cuts its iterations by time; the
/// exact size does not matter).
const PAGES_PER_PART: usize = 8192;

/// Bytes per chunk written to the socket or file.
const CHUNK: usize = 256 << 10;

/// The whole stream, in chunks of about [`CHUNK`] bytes, counting pages as it goes.
pub(crate) struct QemuStream<'a> {
    records: Box<dyn Iterator<Item = Record> + Send + 'a>,
    encoder: QemuEncoder,
    /// PAGE records so far.
    pub(crate) pages: u64,
    /// ZERO records so far.
    pub(crate) zero_pages: u64,
}

impl<'a> QemuStream<'a> {
    pub(crate) fn new(guest: &'a Guest) -> Self {
        Self {
            records: Box::new(records(guest)),
            encoder: QemuEncoder::new(),
            pages: 0,
            zero_pages: 0,
        }
    }
}

impl Iterator for QemuStream<'_> {
    type Item = BytesMut;

    fn next(&mut self) -> Option<BytesMut> {
        let mut chunk = BytesMut::with_capacity(CHUNK + 2 * PAGE);
        for record in self.records.by_ref() {
            match &record {
                Record::Ram(RamRecord::Page { .. }) => self.pages += 1,
                Record::Ram(RamRecord::Zero { .. }) => self.zero_pages += 1,
                _ => {}
            }
            self.encoder
                .encode(&record, &mut chunk)
                .expect("a valid record");
            if chunk.len() >= CHUNK {
                break;
            }
        }
        (!chunk.is_empty()).then_some(chunk)
    }
}

/// The records, in stream order:
///
/// ```text
/// Header Configuration
/// START(ram) MEM_SIZE(blocks) EOS Footer                      setup
/// { PART(ram) page* EOS Footer }*                             pass 1: every page
/// PART(ram) page* EOS Footer                                  pass 2: dirtied pages
/// COMMAND(switchover-start) END(ram) page* EOS Footer         pass 3, VM stopped
/// FULL(timer) device state... EOF device-description
/// ```
fn records(guest: &Guest) -> impl Iterator<Item = Record> + Send + '_ {
    let part = || Record::SectionPart {
        section_id: RAM_SECTION,
    };
    let end_of_section = || {
        [
            Record::Ram(RamRecord::Eos),
            Record::Footer {
                section_id: RAM_SECTION,
            },
        ]
    };
    let first_pass: Vec<(usize, u32)> = sent_in(guest, 0).collect();
    let parts = first_pass
        .chunks(PAGES_PER_PART)
        .map(<[_]>::to_vec)
        .collect::<Vec<_>>();
    let pages = |pass: u8, list: Vec<(usize, u32)>| {
        let mut last_block = None;
        list.into_iter().map(move |(b, n)| {
            let continued = last_block == Some(b);
            last_block = Some(b);
            page_record(guest, b, n, pass, continued)
        })
    };
    let mut stream: Vec<Box<dyn Iterator<Item = Record> + Send + '_>> = vec![Box::new(
        [
            Record::Header,
            configuration(),
            Record::SectionStart(ram_section()),
            mem_size(guest),
        ]
        .into_iter()
        .chain(end_of_section()),
    )];
    for list in parts {
        stream.push(Box::new(
            std::iter::once(part())
                .chain(pages(0, list))
                .chain(end_of_section()),
        ));
    }
    stream.push(Box::new(
        std::iter::once(part())
            .chain(pages(1, sent_in(guest, 1).collect()))
            .chain(end_of_section()),
    ));
    let switchover = Record::Command(Command {
        cmd: wire::command::SWITCHOVER_START,
        payload: Bytes::new(),
    });
    stream.push(Box::new(
        [
            switchover,
            Record::SectionEnd {
                section_id: RAM_SECTION,
            },
        ]
        .into_iter()
        .chain(pages(PASSES - 1, sent_in(guest, PASSES - 1).collect()))
        .chain(end_of_section())
        .chain(device_state(guest)),
    ));
    stream.into_iter().flatten()
}

/// The pages pass `pass` sends: all in the first, the dirtied ones later.
fn sent_in(guest: &Guest, pass: u8) -> impl Iterator<Item = (usize, u32)> + '_ {
    guest.blocks.iter().enumerate().flat_map(move |(b, block)| {
        (0..block.pages())
            .filter(move |&n| pass == 0 || guest.dirtied(b, n, pass))
            .map(move |n| (b, n))
    })
}

/// A ZERO record for a zero page (as QEMU does), a PAGE record otherwise.
fn page_record(guest: &Guest, b: usize, n: u32, pass: u8, continued: bool) -> Record {
    let mut data = [0; PAGE];
    guest.page(b, n, pass, &mut data);
    let addr = PageAddr {
        block: Bytes::from_static(guest.blocks[b].name.as_bytes()),
        offset: u64::from(n) * PAGE as u64,
        continued,
    };
    Record::Ram(match migstream::page::is_zero(&data) {
        true => RamRecord::Zero { addr, fill: 0 },
        false => RamRecord::Page {
            addr,
            data: Bytes::copy_from_slice(&data),
        },
    })
}

fn configuration() -> Record {
    Record::Configuration(Configuration {
        machine: Bytes::from_static(b"pc-i440fx-10.0"),
        subsections: Vec::new(),
    })
}

fn ram_section() -> SectionHeader {
    SectionHeader {
        section_id: RAM_SECTION,
        idstr: Bytes::from_static(wire::RAM_IDSTR),
        instance_id: 0,
        version_id: wire::RAM_VERSION,
    }
}

fn mem_size(guest: &Guest) -> Record {
    let blocks: Vec<RamBlock> = guest
        .blocks
        .iter()
        .map(|b| RamBlock {
            idstr: Bytes::from_static(b.name.as_bytes()),
            used_length: b.bytes(),
            mr_addr: None,
        })
        .collect();
    Record::Ram(RamRecord::MemSize(MemSize {
        total: guest.ram_bytes(),
        blocks,
    }))
}

/// The non-RAM device state (opaque to everyone but QEMU), EOF, and the JSON device
/// description.
fn device_state(guest: &Guest) -> impl Iterator<Item = Record> {
    let timer = SectionHeader {
        section_id: TIMER_SECTION,
        idstr: Bytes::from_static(b"timer"),
        instance_id: 0,
        version_id: 2,
    };
    let mut state = vec![0u8; 24 << 10];
    let mut rng = Rng::new(guest.name.len() as u64);
    state
        .iter_mut()
        .step_by(3)
        .for_each(|byte| *byte = rng.next() as u8 & 0x3F);
    let description = format!(
        r#"{{"page_size": {PAGE}, "devices": [{{"name": "timer", "instance_id": 0, "vmsd_name": "timer", "version": 2}}]}}"#
    );
    [
        Record::SectionFull(timer),
        Record::Opaque(Bytes::from(state)),
        Record::Eof,
        Record::VmDescription(Bytes::from(description)),
    ]
    .into_iter()
}
