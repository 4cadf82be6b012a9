//! Caps on everything a multifd peer's count or length fields could make the decoder
//! hold.

/// Caps on a multifd channel's peer-controlled counts and lengths. A field beyond its
/// cap is an [`Error::LimitExceeded`](crate::Error::LimitExceeded) before anything is
/// reserved for it.
///
/// The most the decoder ever buffers at once is one packet: the header with its
/// offset slots (1344 bytes for 4 KiB pages), then the larger of
/// `max_pages_per_packet` pages, `max_compressed_len` and `max_device_state_len`.
/// The defaults accept every packet QEMU 7.2 and 10.0 write for any target page size.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Limits {
    /// Most offset slots per packet. QEMU sends `512 KiB / page size` (128 for 4 KiB
    /// pages, 512 for 1 KiB pages); the decoder expects that many, so a page size
    /// whose slot count is beyond this cap fails at the first packet.
    pub max_offset_slots: usize,
    /// Most pages with data (`normal_pages`) in one uncompressed or compressed packet.
    pub max_pages_per_packet: usize,
    /// Longest compressed payload (`next_packet_size` of a compressed packet with
    /// pages). A packet holds 512 KiB of pages; zstd and zlib add a little to data
    /// that does not compress.
    pub max_compressed_len: usize,
    /// Longest device-state payload (QEMU 10.0 VFIO state chunks).
    pub max_device_state_len: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_offset_slots: 512,
            max_pages_per_packet: 512,
            max_compressed_len: 1024 * 1024,
            max_device_state_len: 16 * 1024 * 1024,
        }
    }
}
