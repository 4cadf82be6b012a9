//! Compression of DATA batches: LZ4 by default, zstd with the `zstd` feature.

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
    /// the compressed length.
    pub(crate) fn compress(&mut self, input: &[u8], out: &mut Vec<u8>) -> Result<(u8, usize)> {
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
