//! What a source QEMU 10.0 sends to migrate a guest (precopy, no capabilities), as
//! [`Record`]s made as they are consumed, and as the bytes [`QemuEncoder`] makes of
//! them. The stream's layout is the one of the tests and benches
//! (`tests/support/synthetic.rs`, [`Layout`]); the guest's pages are the demo's own.

use bytes::{Bytes, BytesMut};
use migstream::qemu::{Command, QemuEncoder, RamRecord, Record, wire};

use super::guest::{Guest, PAGE, PASSES, Rng};
use super::synthetic::Layout;

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
    let layout = Layout::new(guest.blocks.iter().map(|b| (b.name, b.bytes())));
    let first_pass: Vec<(usize, u32)> = sent_in(guest, 0).collect();
    let parts = first_pass
        .chunks(PAGES_PER_PART)
        .map(<[_]>::to_vec)
        .collect::<Vec<_>>();
    let pages = |pass: u8, list: Vec<(usize, u32)>| {
        // each section names the block of its first page record
        let mut layout = layout.clone();
        list.into_iter().map(move |(b, n)| {
            let mut data = [0; PAGE];
            guest.page(b, n, pass, &mut data);
            layout.page_copied(b, u64::from(n) * PAGE as u64, &data)
        })
    };
    let mut stream: Vec<Box<dyn Iterator<Item = Record> + Send + '_>> =
        vec![Box::new(layout.setup().into_iter())];
    for list in parts {
        stream.push(Box::new(
            std::iter::once(Layout::part())
                .chain(pages(0, list))
                .chain(Layout::end_of_payload()),
        ));
    }
    stream.push(Box::new(
        std::iter::once(Layout::part())
            .chain(pages(1, sent_in(guest, 1).collect()))
            .chain(Layout::end_of_payload()),
    ));
    let switchover = Record::Command(Command {
        cmd: wire::command::SWITCHOVER_START,
        payload: Bytes::new(),
    });
    stream.push(Box::new(
        [switchover, Layout::end()]
            .into_iter()
            .chain(pages(PASSES - 1, sent_in(guest, PASSES - 1).collect()))
            .chain(Layout::end_of_payload())
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

/// The non-RAM device state (opaque to everyone but QEMU), EOF, and the JSON device
/// description.
fn device_state(guest: &Guest) -> impl Iterator<Item = Record> {
    let mut state = vec![0u8; 24 << 10];
    let mut rng = Rng::new(guest.name.len() as u64);
    state
        .iter_mut()
        .step_by(3)
        .for_each(|byte| *byte = rng.next() as u8 & 0x3F);
    let description = format!(
        r#"{{"page_size": {PAGE}, "devices": [{{"name": "timer", "instance_id": 0, "vmsd_name": "timer", "version": 2}}]}}"#
    );
    Layout::device_tail(Bytes::from(state), Bytes::from(description)).into_iter()
}
