//! The encoder: [`ChannelRecord`]s back into the exact bytes QEMU wrote.

use bytes::{BufMut, Bytes, BytesMut};

use super::record::{ChannelRecord, Compression, DeviceStatePacket, Packet, Payload};
use super::wire::{self, flag};
use crate::error::{Error, Result};
use crate::qemu::DEFAULT_PAGE_SIZE;
use crate::qemu::wire::checked_page_size;

/// Writes [`ChannelRecord`]s as a multifd channel's bytes.
///
/// For every channel the [`MultifdDecoder`](super::MultifdDecoder) accepts, encoding
/// its records in order gives back the consumed bytes exactly. Records are checked
/// on the way out ([`Error::InvalidRecord`]) against what the decoder accepts, so that
/// a resolver bug cannot produce a channel QEMU would misread: a page of the wrong
/// size, a payload whose length the header does not announce, offset slots of the
/// wrong number, a packet before the greeting.
#[derive(Debug)]
pub struct MultifdEncoder {
    page_size: usize,
    greeted: bool,
}

impl Default for MultifdEncoder {
    fn default() -> Self {
        Self::new()
    }
}

impl MultifdEncoder {
    /// An encoder for x86 channels (4 KiB target pages, 128 offset slots).
    pub fn new() -> Self {
        Self {
            page_size: DEFAULT_PAGE_SIZE,
            greeted: false,
        }
    }

    /// Sets the target page size (see
    /// [`MultifdDecoder::with_page_size`](super::MultifdDecoder::with_page_size)).
    ///
    /// # Panics
    ///
    /// If `page_size` is not a power of two from 1 KiB to 64 KiB.
    pub fn with_page_size(mut self, page_size: usize) -> Self {
        self.page_size = checked_page_size(page_size);
        self
    }

    /// The offset slots every RAM packet must have: 512 KiB / page size.
    pub fn offset_slots(&self) -> usize {
        wire::offset_slots(self.page_size)
    }

    /// Appends the bytes of `record` to `dst`. Nothing is written if the record is
    /// refused.
    pub fn encode(&mut self, record: &ChannelRecord, dst: &mut BytesMut) -> Result<()> {
        if matches!(record, ChannelRecord::Greeting(_)) == self.greeted {
            return Err(match self.greeted {
                true => invalid("channel greeting", "a second greeting"),
                false => invalid("channel greeting", "a packet before the greeting"),
            });
        }
        match record {
            ChannelRecord::Greeting(greeting) => {
                dst.reserve(wire::GREETING_LEN);
                dst.put_u32(wire::MAGIC);
                dst.put_u32(wire::VERSION);
                dst.put_slice(&greeting.uuid);
                dst.put_u8(greeting.channel_id);
                dst.put_slice(&greeting.reserved);
                self.greeted = true;
            }
            ChannelRecord::Packet(packet) => {
                self.packet_header(packet, dst)?;
                match &packet.payload {
                    Payload::Pages(pages) => pages.iter().for_each(|page| dst.put_slice(page)),
                    Payload::Compressed(data) => dst.put_slice(data),
                }
            }
            ChannelRecord::DeviceState(packet) => device_state(packet, dst)?,
        }
        Ok(())
    }

    /// Appends the header and offset slots of a RAM packet without its page data,
    /// after the same checks as [`encode`](Self::encode) (payload included): for a
    /// writer that sends the pages its own way and appends them after, in slot order,
    /// as the dedup encoder does.
    pub fn encode_packet_header(&mut self, packet: &Packet, dst: &mut BytesMut) -> Result<()> {
        if !self.greeted {
            return Err(invalid("channel greeting", "a packet before the greeting"));
        }
        self.packet_header(packet, dst)
    }

    /// Checks a RAM packet and appends its header and offset slots; room is reserved
    /// for its payload too.
    fn packet_header(&self, p: &Packet, dst: &mut BytesMut) -> Result<()> {
        check_flags(p.flags)?;
        if p.flags & flag::DEVICE_STATE != 0 {
            return Err(invalid("packet flags", "DEVICE_STATE on a RAM packet"));
        }
        let slots = self.offset_slots();
        if p.offsets.len() != slots {
            return Err(invalid(
                "offset slots",
                "not 512 KiB / page size of them (128 for 4 KiB pages)",
            ));
        }
        if p.pages_alloc as usize > slots {
            return Err(invalid("pages_alloc", "more than the offset slots"));
        }
        if p.normal_pages > p.pages_alloc {
            return Err(invalid("normal_pages", "more than pages_alloc"));
        }
        if p.zero_pages > p.pages_alloc - p.normal_pages {
            return Err(invalid(
                "zero_pages",
                "more than pages_alloc leaves after the normal pages",
            ));
        }
        check_name(&p.block, "RAM block name")?;
        if p.block.is_empty() && p.normal_pages + p.zero_pages > 0 {
            return Err(invalid("RAM block name", "empty in a packet with pages"));
        }
        let payload_len = match (&p.payload, p.compression()) {
            (Payload::Pages(pages), Some(Compression::None)) => {
                if pages.len() != p.normal_pages as usize {
                    return Err(invalid("page data", "not one page per normal page"));
                }
                if pages.iter().any(|page| page.len() != self.page_size) {
                    return Err(invalid("page data", "not exactly one target page"));
                }
                pages.len() * self.page_size
            }
            (Payload::Compressed(data), Some(c)) if c != Compression::None => {
                let announced = match p.normal_pages {
                    0 => 0,
                    _ => p.next_packet_size as usize,
                };
                if data.len() != announced {
                    return Err(invalid(
                        "compressed payload",
                        "not next_packet_size bytes (none without normal pages)",
                    ));
                }
                data.len()
            }
            _ => {
                return Err(invalid(
                    "payload",
                    "raw pages with compression flags, or compressed data without",
                ));
            }
        };
        dst.reserve(wire::PACKET_HEADER_LEN + 8 * slots + payload_len);
        dst.put_u32(wire::MAGIC);
        dst.put_u32(wire::VERSION);
        dst.put_u32(p.flags);
        dst.put_u32(p.pages_alloc);
        dst.put_u32(p.normal_pages);
        dst.put_u32(p.next_packet_size);
        dst.put_u64(p.packet_num);
        dst.put_u32(p.zero_pages);
        dst.put_slice(&p.reserved);
        put_name(dst, &p.block);
        for &offset in &p.offsets {
            dst.put_u64(offset);
        }
        Ok(())
    }
}

fn device_state(p: &DeviceStatePacket, dst: &mut BytesMut) -> Result<()> {
    check_flags(p.flags)?;
    if p.flags & flag::DEVICE_STATE == 0 {
        return Err(invalid(
            "packet flags",
            "no DEVICE_STATE on a device-state packet",
        ));
    }
    if p.flags & flag::SYNC != 0 {
        return Err(invalid("packet flags", "SYNC on a device-state packet"));
    }
    check_name(&p.idstr, "device idstr")?;
    if p.idstr.is_empty() {
        return Err(invalid("device idstr", "empty"));
    }
    let len = match u32::try_from(p.data.len()) {
        Ok(0) => return Err(invalid("device-state data", "empty")),
        Ok(len) => len,
        Err(_) => return Err(invalid("device-state data", "longer than 4 GiB")),
    };
    dst.reserve(wire::DEVICE_STATE_HEADER_LEN + p.data.len());
    dst.put_u32(wire::MAGIC);
    dst.put_u32(wire::VERSION);
    dst.put_u32(p.flags);
    put_name(dst, &p.idstr);
    dst.put_u32(p.instance_id);
    dst.put_u32(len);
    dst.put_slice(&p.data);
    Ok(())
}

/// The flags the decoder accepts: known bits and a compression method QEMU defines.
fn check_flags(flags: u32) -> Result<()> {
    if flags & !flag::KNOWN != 0 {
        return Err(invalid("packet flags", "unknown flag bits"));
    }
    if Compression::from_flags(flags).is_none() {
        return Err(invalid("packet flags", "unknown compression method"));
    }
    Ok(())
}

/// A name that fits QEMU's 256-byte NUL-terminated field.
fn check_name(name: &Bytes, field: &'static str) -> Result<()> {
    if name.len() >= wire::BLOCK_NAME_LEN {
        return Err(invalid(field, "longer than 255 bytes"));
    }
    if name.contains(&0) {
        return Err(invalid(field, "contains a NUL byte"));
    }
    Ok(())
}

/// A name and its NUL padding to 256 bytes.
fn put_name(dst: &mut BytesMut, name: &[u8]) {
    dst.put_slice(name);
    dst.put_bytes(0, wire::BLOCK_NAME_LEN - name.len());
}

fn invalid(field: &'static str, reason: &'static str) -> Error {
    Error::InvalidRecord { field, reason }
}
