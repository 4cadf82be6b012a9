//! An LZ4 block encoder with an acceleration factor, for
//! [`Compression::Lz4Accelerated`](super::Compression::Lz4Accelerated).
//!
//! lz4_flex (the default encoder, and the decoder of every LZ4 frame) has no
//! acceleration. On the residual pages of an idle guest's migration, LZ4 is two
//! thirds of the source's time, and probing every 4th position from the start
//! (acceleration 4) takes about 28 % less time for about 5 % more bytes
//! (`docs/benchmarks.md`, session 5). The output is an ordinary LZ4 block.
//!
//! The method is LZ4's fast one: a table of the last position seen for each hash of
//! 5 bytes; probe, and on a 4-byte match extend it both ways and emit the literals
//! before it and the match; between matches, the step between probes grows with the
//! number of misses (every 64 misses by one), starting at the acceleration.

/// log2 of the hash table's entries (16 KiB of positions, in L1).
const HASH_LOG: u32 = 12;
const MIN_MATCH: usize = 4;
/// The last match starts at least this many bytes before the end of the block.
const MF_LIMIT: usize = 12;
/// A block always ends with at least this many literals.
const LAST_LITERALS: usize = 5;
const MAX_OFFSET: usize = 65535;
/// Misses per step increase, as a shift.
const SKIP_TRIGGER: u32 = 6;

/// The encoder and its hash table, reused from block to block.
pub(crate) struct Lz4Encoder {
    table: Box<[u32; 1 << HASH_LOG]>,
    acceleration: u32,
}

impl std::fmt::Debug for Lz4Encoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lz4Encoder")
            .field("acceleration", &self.acceleration)
            .finish()
    }
}

fn read_u32(b: &[u8], i: usize) -> u32 {
    u32::from_le_bytes(b[i..i + 4].try_into().expect("4 bytes"))
}

fn read_u64(b: &[u8], i: usize) -> u64 {
    u64::from_le_bytes(b[i..i + 8].try_into().expect("8 bytes"))
}

/// The table slot of the 5 bytes at `i` (reads 8).
fn slot(b: &[u8], i: usize) -> usize {
    ((read_u64(b, i) << 24).wrapping_mul(0x9E37_79B1_85EB_CA87) >> (64 - HASH_LOG)) as usize
}

/// How many bytes from `a` on equal those from `b` on (`b < a`), reading before `end`.
fn common(input: &[u8], mut a: usize, mut b: usize, end: usize) -> usize {
    let start = a;
    while a + 8 <= end {
        let x = read_u64(input, a) ^ read_u64(input, b);
        if x != 0 {
            return a - start + (x.trailing_zeros() / 8) as usize;
        }
        a += 8;
        b += 8;
    }
    while a < end && input[a] == input[b] {
        a += 1;
        b += 1;
    }
    a - start
}

/// The bytes of a length beyond a token's 15.
fn put_length(out: &mut Vec<u8>, mut n: usize) {
    while n >= 255 {
        out.push(255);
        n -= 255;
    }
    out.push(n as u8);
}

/// A token with `match_nibble` in its low half, then `literals` with their length.
fn put_literals(out: &mut Vec<u8>, literals: &[u8], match_nibble: u8) {
    let lit = literals.len();
    out.push(((lit.min(15) as u8) << 4) | match_nibble);
    if lit >= 15 {
        put_length(out, lit - 15);
    }
    out.extend_from_slice(literals);
}

/// A sequence: `literals`, then a match of `len` bytes `offset` back.
fn put_sequence(out: &mut Vec<u8>, literals: &[u8], offset: usize, len: usize) {
    let extra = len - MIN_MATCH;
    put_literals(out, literals, extra.min(15) as u8);
    out.extend_from_slice(&(offset as u16).to_le_bytes());
    if extra >= 15 {
        put_length(out, extra - 15);
    }
}

/// The last sequence: literals only.
fn put_last(out: &mut Vec<u8>, literals: &[u8]) {
    put_literals(out, literals, 0);
}

impl Lz4Encoder {
    /// An encoder probing every `acceleration`-th position at first (1 is plain LZ4;
    /// 0 counts as 1).
    pub(crate) fn new(acceleration: u32) -> Self {
        Self {
            table: Box::new([0; 1 << HASH_LOG]),
            acceleration: acceleration.clamp(1, 1 << 16),
        }
    }

    /// Appends the LZ4 block of `input` (at most 4 GiB) to `out`.
    pub(crate) fn compress(&mut self, input: &[u8], out: &mut Vec<u8>) {
        let n = input.len();
        if n <= MF_LIMIT {
            return put_last(out, input);
        }
        assert!(u32::try_from(n).is_ok(), "a block of at most 4 GiB");
        // stale positions would only cost a failed probe; a clean table keeps the
        // output a function of the block alone
        self.table.fill(0);
        // a match starts at most at `last_start` and ends at most at `match_end`
        let last_start = n - MF_LIMIT;
        let match_end = n - LAST_LITERALS;
        let mut anchor = 0;
        let mut next = 1;
        self.table[slot(input, 0)] = 0;
        'block: loop {
            let mut misses = self.acceleration << SKIP_TRIGGER;
            let (mut at, mut candidate);
            loop {
                at = next;
                if at > last_start {
                    break 'block;
                }
                next = at + (misses >> SKIP_TRIGGER) as usize;
                misses += 1;
                let s = slot(input, at);
                candidate = self.table[s] as usize;
                self.table[s] = at as u32;
                if candidate < at
                    && at - candidate <= MAX_OFFSET
                    && read_u32(input, candidate) == read_u32(input, at)
                {
                    break;
                }
            }
            while at > anchor && candidate > 0 && input[at - 1] == input[candidate - 1] {
                at -= 1;
                candidate -= 1;
            }
            let len = MIN_MATCH + common(input, at + MIN_MATCH, candidate + MIN_MATCH, match_end);
            put_sequence(out, &input[anchor..at], at - candidate, len);
            anchor = at + len;
            next = anchor;
            if next > last_start {
                break;
            }
            self.table[slot(input, next - 2)] = (next - 2) as u32;
        }
        put_last(out, &input[anchor..]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn round_trip(input: &[u8], acceleration: u32) -> usize {
        let mut out = Vec::new();
        Lz4Encoder::new(acceleration).compress(input, &mut out);
        let back = lz4_flex::block::decompress(&out, input.len()).expect("a valid LZ4 block");
        assert!(back == input, "round trip differs ({} bytes)", input.len());
        out.len()
    }

    #[test]
    fn edge_sizes_and_shapes_decode_back() {
        for n in 0..80 {
            let bytes: Vec<u8> = (0..n).map(|i| (i % 7) as u8).collect();
            round_trip(&bytes, 1);
            round_trip(&vec![0; n], 4);
        }
        // offsets near and beyond the 64 KiB window, long runs, long literals
        let mut big: Vec<u8> = (0..300_000u32)
            .flat_map(|i| i.wrapping_mul(2_654_435_761).to_le_bytes())
            .collect();
        big.extend_from_within(..70_000);
        big.extend_from_within(200_000..266_000);
        big.extend(std::iter::repeat_n(9, 100_000));
        for acceleration in [0, 1, 2, 4, 8, 1 << 20] {
            round_trip(&big, acceleration);
        }
        let zeros = round_trip(&vec![0; 1 << 20], 1);
        assert!(zeros < 5000, "a MiB of zeros takes {zeros} bytes");
    }

    #[test]
    fn acceleration_trades_size_for_probes() {
        // text-like data: matches everywhere, at odd offsets
        let words = [
            "page ",
            "guest ",
            "migration ",
            "stream ",
            "frame ",
            "batch ",
        ];
        let mut x = 1u32;
        let text: Vec<u8> = (0..200_000)
            .flat_map(|_| {
                x = x.wrapping_mul(1_103_515_245).wrapping_add(12_345);
                words[(x >> 16) as usize % words.len()].bytes()
            })
            .collect();
        let (plain, fast) = (round_trip(&text, 1), round_trip(&text, 64));
        assert!(
            plain < text.len() / 2,
            "plain LZ4: {plain} of {}",
            text.len()
        );
        assert!(
            fast > plain,
            "acceleration 64 finds as much as 1: {fast} vs {plain}"
        );
    }

    proptest! {
        #[test]
        fn any_input_decodes_back(
            input in prop::collection::vec(prop_oneof![Just(0u8), Just(1u8), any::<u8>()], 0..5000),
            repeat in 0usize..3,
            acceleration in 0u32..10,
        ) {
            let mut input = input;
            for _ in 0..repeat {
                let half = input.len() / 2;
                input.extend_from_within(half..);
            }
            round_trip(&input, acceleration);
        }
    }
}
