//! QEMU's multifd channels, sans-IO: the greeting and packets of each extra
//! connection a multifd migration opens, decoded incrementally from `BytesMut` and
//! encoded back byte for byte, for QEMU 7.2 and 10.0.
//!
//! With the `multifd` capability QEMU opens the main channel (`QEVM`, see
//! [`QemuDecoder`](super::QemuDecoder)) and then `multifd-channels` more connections
//! to the same address; each starts with the 4 bytes `0x11223344`
//! ([`wire::is_channel_start`]). A channel carries a [`ChannelGreeting`], then
//! [`Packet`]s: a 320-byte header, one offset slot per page a packet can hold
//! (512 KiB / page size: 128 for 4 KiB pages), and the page data, handed out as
//! [`Bytes`](bytes::Bytes) slices of the input without copying (or, with
//! `multifd-compression`, as the opaque part of the channel's compression stream).
//!
//! # QEMU 7.2 and 10.0 alike
//!
//! The decoder needs no version: the header tells which rule gives the length of
//! the page data, the same rule QEMU's own receivers follow in both versions.
//!
//! - `normal_pages` = 0: no page data, whatever `next_packet_size` says (QEMU 7.2
//!   leaves a previous packet's value there, e.g. 524288 in SYNC packets).
//! - no compression: `normal_pages` × page size (`next_packet_size` is kept as it was).
//! - compression (zlib, zstd, QPL, UADK, QATzip): `next_packet_size` bytes.
//!
//! Every packet has 512 KiB / page size offset slots, also QEMU 10.0's SYNC-only
//! packets whose `pages_alloc` is 0: the receiver's page size, not a header field,
//! gives their number. Slots past the pages a packet carries are kept as they were
//! (QEMU 7.2 leaves stale offsets there), as are the reserved bytes, QEMU 10.0's
//! `zero_pages` (in a field 7.2 leaves zero) and SYNC on a packet with pages (7.2).
//! Device-state packets (QEMU 10.0 with VFIO) are carried too, their data opaque.
//!
//! ```
//! use bytes::{Bytes, BytesMut};
//! use migstream::qemu::multifd::{
//!     ChannelGreeting, ChannelRecord, MultifdDecoder, MultifdEncoder, Packet, Payload, wire,
//! };
//!
//! // a channel as QEMU 10.0 writes it: greeting, a packet with two pages (one of them
//! // a zero page, sent without data), then a SYNC packet
//! let page = Bytes::from(vec![0x5a; 4096]);
//! let mut offsets = vec![0; 128];
//! offsets[..2].copy_from_slice(&[0x1000, 0x2000]);
//! let pages = Packet {
//!     flags: 0,
//!     pages_alloc: 128,
//!     normal_pages: 1,
//!     next_packet_size: 4096,
//!     packet_num: 7,
//!     zero_pages: 1,
//!     reserved: [0; 28],
//!     block: Bytes::from_static(b"pc.ram"),
//!     offsets,
//!     payload: Payload::Pages(vec![page.clone()]),
//! };
//! let sync = Packet {
//!     flags: wire::flag::SYNC,
//!     pages_alloc: 0,
//!     normal_pages: 0,
//!     next_packet_size: 0,
//!     packet_num: 8,
//!     zero_pages: 0,
//!     reserved: [0; 28],
//!     block: Bytes::new(),
//!     offsets: vec![0; 128],
//!     payload: Payload::Pages(vec![]),
//! };
//! let greeting = ChannelGreeting { uuid: [0; 16], channel_id: 1, reserved: [0; 39] };
//! let records =
//!     [ChannelRecord::Greeting(greeting), ChannelRecord::Packet(pages), ChannelRecord::Packet(sync)];
//! let mut channel = BytesMut::new();
//! let mut enc = MultifdEncoder::new();
//! for record in &records {
//!     enc.encode(record, &mut channel)?;
//! }
//! assert_eq!(channel.len(), 64 + 1344 + 4096 + 1344);
//!
//! // decode it back, and re-encode: the same bytes
//! let (mut dec, mut enc) = (MultifdDecoder::new(), MultifdEncoder::new());
//! let (mut input, mut output) = (channel.clone(), BytesMut::new());
//! let mut data_pages = Vec::new();
//! while let Some(record) = dec.decode_eof(&mut input)? {
//!     if let ChannelRecord::Packet(packet) = &record {
//!         data_pages.extend(packet.pages().map(|(offset, data)| (offset, data.clone())));
//!         assert!(packet.zero_offsets().len() <= 1);
//!     }
//!     enc.encode(&record, &mut output)?;
//! }
//! assert_eq!(dec.channel_id(), Some(1));
//! assert_eq!(data_pages, [(0x1000, page)]);
//! assert_eq!(output, channel);
//! # Ok::<(), migstream::Error>(())
//! ```

mod codec;
mod decode;
mod encode;
mod limits;
mod record;
pub mod wire;

pub use decode::MultifdDecoder;
pub use encode::MultifdEncoder;
pub use limits::Limits;
pub use record::{ChannelGreeting, ChannelRecord, Compression, DeviceStatePacket, Packet, Payload};
