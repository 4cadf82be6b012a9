//! Compression of DATA batches: LZ4 by default, zstd with the `zstd` feature.
//!
//! Every compressor first probes the batch: one whose sampled bytes are as evenly
//! spread as random bytes (a guest's `/dev/urandom` data, encrypted or already
//! compressed memory) is stored, not compressed, since nothing would shrink it.
//! On a 512 MiB guest holding 256 MiB of random data that is about 10 % less user
//! time with LZ4 or zstd -1, for under 0.01 % more bytes (`docs/benchmarks.md`,
//! "Against zstd -1").

use super::lz4::Lz4Encoder;
use super::wire::codec;
use crate::error::{Error, Result};

/// How the source compresses DATA batches. The destination reads every kind its
/// build supports, whatever it was told.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Compression {
    /// LZ4 (~1 µs to decompress a page): fast links, the default. lz4_flex's encoder.
    Lz4,
    /// LZ4 blocks from migstream's own encoder, probing every `n`-th position at
    /// first (1 is plain LZ4): a source short of CPU. At 4, about 28 % less time
    /// compressing an idle guest's residual pages for about 5 % more bytes than
    /// [`Lz4`](Self::Lz4). The destination reads them as any LZ4 frame.
    Lz4Accelerated(u32),
    /// zstd at this level (needs the `zstd` cargo feature): about a third smaller
    /// than LZ4 on guest memory, several times slower to compress; slow links.
    #[cfg(feature = "zstd")]
    Zstd(i32),
}

/// The source's compressor, with whatever context it keeps between batches.
pub(crate) enum Compressor {
    Lz4,
    Lz4Accelerated(Box<Lz4Encoder>),
    #[cfg(feature = "zstd")]
    Zstd(Box<zstd::bulk::Compressor<'static>>),
}

impl std::fmt::Debug for Compressor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Lz4 => f.write_str("Lz4"),
            Self::Lz4Accelerated(e) => e.fmt(f),
            #[cfg(feature = "zstd")]
            Self::Zstd(_) => f.write_str("Zstd"),
        }
    }
}

impl Compressor {
    pub(crate) fn new(compression: Compression) -> Self {
        match compression {
            Compression::Lz4 => Self::Lz4,
            Compression::Lz4Accelerated(n) => Self::Lz4Accelerated(Box::new(Lz4Encoder::new(n))),
            #[cfg(feature = "zstd")]
            Compression::Zstd(level) => Self::Zstd(Box::new(
                zstd::bulk::Compressor::new(level).expect("zstd accepts the level"),
            )),
        }
    }

    /// Compresses `input` into `out` (resized as needed); returns the codec byte and
    /// the compressed length. `(codec::STORED, input.len())` when `input` looks
    /// random: the caller sends `input` itself, and `out` is left as it was.
    pub(crate) fn compress(&mut self, input: &[u8], out: &mut Vec<u8>) -> Result<(u8, usize)> {
        if looks_random(input) {
            return Ok((codec::STORED, input.len()));
        }
        match self {
            Self::Lz4 => {
                out.resize(lz4_flex::block::get_maximum_output_size(input.len()), 0);
                let n =
                    lz4_flex::block::compress_into(input, out).expect("output sized by the bound");
                Ok((codec::LZ4, n))
            }
            Self::Lz4Accelerated(e) => {
                out.clear();
                out.reserve(lz4_flex::block::get_maximum_output_size(input.len()));
                e.compress(input, out);
                Ok((codec::LZ4, out.len()))
            }
            #[cfg(feature = "zstd")]
            Self::Zstd(c) => {
                out.resize(zstd::zstd_safe::compress_bound(input.len()), 0);
                let n = c.compress_to_buffer(input, &mut out[..])?;
                Ok((codec::ZSTD, n))
            }
        }
    }
}

/// Bytes of each sample [`looks_random`] takes, and how many samples.
const SAMPLE: usize = 16;
const SAMPLES: usize = 256;

/// Whether `input` looks like uniformly random bytes, from a χ² test of the byte
/// histogram of [`SAMPLES`] runs of [`SAMPLE`] bytes spread over it (4 KiB in all,
/// from inputs of at least 16 KiB; smaller ones are always compressed). The runs
/// are an odd number of bytes apart, never a multiple of the page size, so a layout
/// repeated every page cannot hide from the sample. Uniform bytes give a χ² of
/// about 255 ± 23 (255 degrees of freedom); the threshold of 400 is 6 σ above that.
/// Three or four pages of text or zeros among 64 random ones are enough to exceed
/// it: what a stored batch could have saved is at most a few of its pages.
fn looks_random(input: &[u8]) -> bool {
    const TOTAL: usize = SAMPLE * SAMPLES;
    if input.len() < 4 * TOTAL {
        return false;
    }
    let stride = ((input.len() - SAMPLE) / (SAMPLES - 1) - 1) | 1;
    let mut counts = [0u32; 256];
    for i in 0..SAMPLES {
        let at = i * stride;
        for &b in &input[at..at + SAMPLE] {
            counts[b as usize] += 1;
        }
    }
    // χ² = Σ (c - e)² / e with e = TOTAL / 256 = 16, kept in integers: Σ (c - e)² ≤ 400 e
    let expected = (TOTAL / 256) as i64;
    let spread: i64 = counts
        .iter()
        .map(|&c| (i64::from(c) - expected).pow(2))
        .sum();
    spread <= 400 * expected
}

/// The destination's decompressors.
#[derive(Default)]
pub(crate) struct Decompressor {
    #[cfg(feature = "zstd")]
    zstd: Option<Box<zstd::bulk::Decompressor<'static>>>,
}

impl std::fmt::Debug for Decompressor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Decompressor")
    }
}

impl Decompressor {
    /// Fills `raw` (already sized to the batch length) from `body`; false if `body`
    /// does not decompress to exactly that length.
    pub(crate) fn decompress(&mut self, codec: u8, body: &[u8], raw: &mut [u8]) -> Result<bool> {
        match codec {
            codec::STORED => {
                let fits = body.len() == raw.len();
                if fits {
                    raw.copy_from_slice(body);
                }
                Ok(fits)
            }
            codec::LZ4 => {
                Ok(lz4_flex::block::decompress_into(body, raw).is_ok_and(|n| n == raw.len()))
            }
            #[cfg(feature = "zstd")]
            codec::ZSTD => {
                if self.zstd.is_none() {
                    self.zstd = Some(Box::new(zstd::bulk::Decompressor::new()?));
                }
                let d = self.zstd.as_mut().expect("just set");
                Ok(d.decompress_to_buffer(body, raw)
                    .is_ok_and(|n| n == raw.len()))
            }
            _ => Err(Error::Unsupported {
                offset: 0,
                field: "data frame codec",
                reason: "unknown, or zstd in a build without the zstd feature",
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Bytes from a 64-bit linear congruential generator's high half.
    fn random_bytes(n: usize, seed: u64) -> Vec<u8> {
        let mut x = seed;
        (0..n)
            .map(|_| {
                x = x
                    .wrapping_mul(6_364_136_223_846_793_005)
                    .wrapping_add(1_442_695_040_888_963_407);
                (x >> 56) as u8
            })
            .collect()
    }

    fn compress(input: &[u8]) -> (u8, usize) {
        let mut out = Vec::new();
        Compressor::new(Compression::Lz4)
            .compress(input, &mut out)
            .expect("compresses")
    }

    #[test]
    fn random_batches_are_stored_without_compressing() {
        for seed in 1..20 {
            let batch = random_bytes(256 << 10, seed);
            assert_eq!(
                compress(&batch),
                (codec::STORED, batch.len()),
                "seed {seed}"
            );
        }
    }

    #[test]
    fn a_batch_with_a_few_compressible_pages_is_compressed() {
        let text: Vec<u8> = b"guest page ".iter().copied().cycle().take(4096).collect();
        let zeros = [0u8; 4096];
        // 4 pages of 64, scattered or together
        for (filler, pages) in [
            (&text[..], [3, 20, 41, 60]),
            (&zeros[..], [30, 31, 32, 33]),
            (&text[..], [0, 1, 2, 3]),
        ] {
            let mut batch = random_bytes(256 << 10, pages[0] as u64 + 7);
            for page in pages {
                batch[page * 4096..(page + 1) * 4096].copy_from_slice(filler);
            }
            let (codec, n) = compress(&batch);
            assert_eq!(codec, codec::LZ4, "pages {pages:?}");
            assert!(n < batch.len() - 4 * 2500, "pages {pages:?}: {n} bytes");
        }
    }

    #[test]
    fn small_batches_are_always_compressed() {
        let batch = random_bytes(8 << 10, 3);
        assert_eq!(compress(&batch).0, codec::LZ4);
    }
}
