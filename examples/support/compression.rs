//! How the examples that encode (`dedup encode`, `proxy source`) let the user pick
//! the compression of the dedup stream's batches.

use clap::Args;
use migstream::dedup::Compression;

/// `--zstd LEVEL` or `--lz4-acceleration N`; LZ4 if neither.
#[derive(Args)]
pub(crate) struct CompressionArgs {
    /// zstd batches at this level (with the zstd feature).
    #[arg(
        long,
        value_name = "LEVEL",
        allow_negative_numbers = true,
        conflicts_with = "lz4_acceleration"
    )]
    zstd: Option<i32>,
    /// migstream's own LZ4 encoder probing every N-th position at first: less CPU, a few % more bytes.
    #[arg(long, value_name = "N")]
    lz4_acceleration: Option<u32>,
}

impl CompressionArgs {
    /// The compression asked for; `--zstd` is refused without the zstd feature.
    pub(crate) fn compression(&self) -> Result<Compression, String> {
        match (self.zstd, self.lz4_acceleration) {
            (Some(level), _) => zstd(level),
            (None, Some(n)) => Ok(Compression::Lz4Accelerated(n)),
            (None, None) => Ok(Compression::Lz4),
        }
    }
}

#[cfg(feature = "zstd")]
fn zstd(level: i32) -> Result<Compression, String> {
    Ok(Compression::Zstd(level))
}

#[cfg(not(feature = "zstd"))]
fn zstd(_level: i32) -> Result<Compression, String> {
    Err("--zstd needs the zstd feature (cargo run --features zstd ...)".into())
}
