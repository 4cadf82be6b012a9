//! Caps on everything a peer's length or count field could make the decoder hold.

/// Caps on peer-controlled lengths and counts. Every allocation or buffering the
/// QEMU decoder does is bounded by one of these; a field beyond its cap is a
/// [`Error::LimitExceeded`](crate::Error::LimitExceeded) before anything is reserved.
///
/// The most the decoder ever needs buffered at once is the largest of
/// `max_vmdesc_len + 6`, `max_config_len`, `max_command_len + 5` and one page
/// record (page size + 264 bytes).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Limits {
    /// Longest configuration record, subsections included (QEMU: ~100 bytes).
    pub max_config_len: usize,
    /// Most capabilities named in the configuration (QEMU 10.0 validates 2).
    pub max_capabilities: usize,
    /// Most RAM blocks in the setup record (a `pc` guest has 6).
    pub max_ram_blocks: usize,
    /// Longest command payload (the wire allows 65535; QEMU sends at most ~250).
    pub max_command_len: usize,
    /// Longest JSON device description after EOF (QEMU: ~100 KB for a small guest).
    /// A longer one is still passed through, as opaque bytes.
    pub max_vmdesc_len: usize,
    /// Largest [`Record::Opaque`](super::Record::Opaque) chunk handed out at once.
    pub max_opaque_chunk: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_config_len: 16 * 1024,
            max_capabilities: 64,
            max_ram_blocks: 512,
            max_command_len: 64 * 1024,
            max_vmdesc_len: 16 * 1024 * 1024,
            max_opaque_chunk: 64 * 1024,
        }
    }
}
