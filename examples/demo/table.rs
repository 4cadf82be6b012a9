//! The results table, shared by the in-process demo and `--qemu`.

use migstream::dedup::Stats;
use migstream::resolve::tag;

use crate::out::outln;

/// One migration's figures.
#[derive(Debug, Clone)]
pub(crate) struct Row {
    pub(crate) guest: String,
    pub(crate) mode: &'static str,
    /// What QEMU sent (what would cross the link without the proxies).
    pub(crate) qemu_bytes: u64,
    /// What crossed the link between the two ends.
    pub(crate) wire_bytes: u64,
    pub(crate) seconds: f64,
    /// Pages by how they travelled, in the order of [`tag::NAMED`].
    pub(crate) pages: [u64; 5],
}

impl Row {
    pub(crate) fn ratio(&self) -> f64 {
        self.wire_bytes as f64 / (self.qemu_bytes as f64).max(1.0)
    }
}

/// Pages by kind from an end's counters.
pub(crate) fn pages(stats: &Stats) -> [u64; 5] {
    tag::NAMED.map(|(_, t)| stats.pages(t))
}

/// Prints the rows, one guest after the other.
pub(crate) fn print(rows: &[Row]) -> std::io::Result<()> {
    let kinds = tag::NAMED.map(|(name, _)| name);
    outln!(
        "{:<8} {:<28} {:>9} {:>9} {:>6} {:>6} {:>7} | pages by how they travelled: {}",
        "guest",
        "mode",
        "QEMU MB",
        "wire MB",
        "ratio",
        "less",
        "time",
        kinds.join(" / ")
    )?;
    for row in rows {
        let pages: Vec<String> = row.pages.iter().map(|n| n.to_string()).collect();
        outln!(
            "{:<8} {:<28} {:>9.1} {:>9.1} {:>6.3} {:>5.1}x {:>6.2}s | {}",
            row.guest,
            row.mode,
            mb(row.qemu_bytes),
            mb(row.wire_bytes),
            row.ratio(),
            1.0 / row.ratio().max(1e-9),
            row.seconds,
            pages.join(" / "),
        )?;
    }
    Ok(())
}

/// Megabytes (10^6 bytes, as the proxies print them).
pub(crate) fn mb(bytes: u64) -> f64 {
    bytes as f64 / 1e6
}
