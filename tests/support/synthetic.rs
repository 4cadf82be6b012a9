//! Synthetic guest memory and the QEMU streams that carry it: the one generator of
//! the integration tests (`support::synthetic`), the benches
//! (`benches/support/mod.rs`) and the demo example (`examples/demo/stream.rs`), each
//! of which includes this file with `#[path]`.
//!
//! - [`Rng`]: a small deterministic generator (SplitMix64), so that every run makes
//!   the same bytes; [`mix`] combines numbers into a seed; [`random_pages`].
//! - [`Layout`]: the records of a QEMU 10.0 precopy stream of a `pc-i440fx-10.0`
//!   guest (no capabilities): header, configuration, the RAM setup section (its
//!   block list), PART sections of page records, the END section, then device state
//!   that passes through as opaque bytes, EOF and the JSON device description. As
//!   QEMU does, a page record names its block only when the previous page record
//!   was of another block (all others carry CONTINUE), and a page that is all zero
//!   is sent as ZERO.
//!
//! What the pages hold (which mix of code, text, random and sparse pages) is up to
//! the caller: the benches and the demo model guests differently.

#![allow(dead_code, unreachable_pub)]

use bytes::Bytes;
use migstream::qemu::{
    Configuration, MemSize, PageAddr, RamBlock, RamRecord, Record, SectionHeader, wire,
};

/// SplitMix64: deterministic, any seed (0 included) gives a good sequence.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A number below `n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next()) * u128::from(n)) >> 64) as u64
    }

    /// True with `percent` % probability.
    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }

    /// Fills `out` with random bytes.
    pub fn fill(&mut self, out: &mut [u8]) {
        let mut words = out.chunks_exact_mut(8);
        for w in &mut words {
            w.copy_from_slice(&self.next().to_le_bytes());
        }
        let tail = words.into_remainder();
        let last = self.next().to_le_bytes();
        tail.copy_from_slice(&last[..tail.len()]);
    }
}

/// Combines two numbers into a seed.
pub fn mix(a: u64, b: u64) -> u64 {
    Rng::new(a ^ b.rotate_left(32).wrapping_mul(0x9E37_79B9_7F4A_7C15)).next()
}

/// `n` pseudo-random pages of `size` bytes (distinct in practice), from `seed`.
pub fn random_pages(n: usize, size: usize, seed: u64) -> Vec<Vec<u8>> {
    let mut rng = Rng::new(seed);
    (0..n)
        .map(|_| {
            let mut page = vec![0; size];
            rng.fill(&mut page);
            page
        })
        .collect()
}

/// QEMU registers the RAM section early: a `pc` machine's id (never assumed by the
/// decoder).
pub const RAM_SECTION: u32 = 2;
/// The timer's section, the first device section of a `pc` machine.
pub const TIMER_SECTION: u32 = 0;

/// The records of one synthetic QEMU stream, in the order QEMU sends them; see the
/// module's documentation. A clone starts afresh: its first page record names its
/// block.
#[derive(Debug, Clone)]
pub struct Layout {
    /// The RAM blocks' names and lengths, in QEMU's block-list order.
    blocks: Vec<(Bytes, u64)>,
    /// The block of the last page record, which CONTINUE refers to.
    last: Option<usize>,
}

impl Layout {
    /// A stream of a guest with these RAM blocks (name, bytes).
    pub fn new<'a>(blocks: impl IntoIterator<Item = (&'a str, u64)>) -> Self {
        let blocks = blocks
            .into_iter()
            .map(|(name, len)| (Bytes::copy_from_slice(name.as_bytes()), len))
            .collect();
        Self { blocks, last: None }
    }

    /// The RAM blocks: name and bytes.
    pub fn blocks(&self) -> &[(Bytes, u64)] {
        &self.blocks
    }

    /// Header, configuration, and the RAM setup section (START, the block list,
    /// EOS, footer).
    pub fn setup(&self) -> Vec<Record> {
        let blocks: Vec<RamBlock> = self
            .blocks
            .iter()
            .map(|(name, len)| RamBlock {
                idstr: name.clone(),
                used_length: *len,
                mr_addr: None,
            })
            .collect();
        let total = blocks.iter().map(|b| b.used_length).sum();
        let mut records = vec![
            Record::Header,
            Record::Configuration(Configuration {
                machine: Bytes::from_static(b"pc-i440fx-10.0"),
                subsections: Vec::new(),
            }),
            Record::SectionStart(SectionHeader {
                section_id: RAM_SECTION,
                idstr: Bytes::from_static(wire::RAM_IDSTR),
                instance_id: 0,
                version_id: wire::RAM_VERSION,
            }),
            Record::Ram(RamRecord::MemSize(MemSize { total, blocks })),
        ];
        records.extend(Self::end_of_payload());
        records
    }

    /// A PART section header of the RAM section.
    pub fn part() -> Record {
        Record::SectionPart {
            section_id: RAM_SECTION,
        }
    }

    /// The END section header of the RAM section (the last pass, VM stopped).
    pub fn end() -> Record {
        Record::SectionEnd {
            section_id: RAM_SECTION,
        }
    }

    /// EOS and the RAM section's footer, after each of its sections' pages.
    pub fn end_of_payload() -> [Record; 2] {
        [
            Record::Ram(RamRecord::Eos),
            Record::Footer {
                section_id: RAM_SECTION,
            },
        ]
    }

    /// The record of the page at `offset` of block `block` (an index into
    /// [`blocks`](Self::blocks)): ZERO if `data` is all zero, PAGE otherwise.
    pub fn page(&mut self, block: usize, offset: u64, data: Bytes) -> Record {
        let zero = migstream::page::is_zero(&data);
        self.record(block, offset, (!zero).then_some(data))
    }

    /// Like [`page`](Self::page), copying `data` only if it is a PAGE record's.
    pub fn page_copied(&mut self, block: usize, offset: u64, data: &[u8]) -> Record {
        let zero = migstream::page::is_zero(data);
        self.record(block, offset, (!zero).then(|| Bytes::copy_from_slice(data)))
    }

    fn record(&mut self, block: usize, offset: u64, data: Option<Bytes>) -> Record {
        let addr = PageAddr {
            block: self.blocks[block].0.clone(),
            offset,
            continued: self.last == Some(block),
        };
        self.last = Some(block);
        Record::Ram(match data {
            None => RamRecord::Zero { addr, fill: 0 },
            Some(data) => RamRecord::Page { addr, data },
        })
    }

    /// The device sections (the timer's header, then `state`: the rest of the
    /// device state, opaque), EOF and the JSON device `description`.
    pub fn device_tail(state: Bytes, description: Bytes) -> [Record; 4] {
        [
            Record::SectionFull(SectionHeader {
                section_id: TIMER_SECTION,
                idstr: Bytes::from_static(b"timer"),
                instance_id: 0,
                version_id: 2,
            }),
            Record::Opaque(state),
            Record::Eof,
            Record::VmDescription(description),
        ]
    }
}
