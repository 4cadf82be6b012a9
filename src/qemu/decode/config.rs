//! The configuration record: machine type and the subsections QEMU's loader finds
//! by peeking.

use bytes::{Bytes, BytesMut};

use super::{Phase, QemuDecoder, Step};
use crate::cursor::Cursor;
use crate::error::Result;
use crate::qemu::record::{ConfigSubsection, Configuration, Record};
use crate::qemu::wire::{self, record_type};

impl QemuDecoder {
    pub(super) fn configuration(&mut self, src: &mut BytesMut) -> Result<(Phase, Step)> {
        match src.first() {
            None => return Ok((Phase::Configuration, Step::NeedMore)),
            Some(&record_type::CONFIGURATION) => {}
            Some(_) => return Ok((Phase::TopLevel, Step::Continue)),
        }
        let Some((config, len)) = self.parse_configuration(src)? else {
            if src.len() > self.limits.max_config_len {
                return Err(self.pos.limit(
                    0,
                    "configuration length",
                    src.len(),
                    self.limits.max_config_len,
                ));
            }
            return Ok((Phase::Configuration, Step::NeedMore));
        };
        if len > self.limits.max_config_len {
            return Err(self
                .pos
                .limit(0, "configuration length", len, self.limits.max_config_len));
        }
        for sub in &config.subsections {
            match sub {
                ConfigSubsection::TargetPageBits(bits) => {
                    if !(10..=16).contains(bits) {
                        return Err(self.pos.unsupported(
                            0,
                            "target page bits",
                            "page size outside 1 KiB..64 KiB",
                        ));
                    }
                    self.page_size = 1 << bits;
                }
                ConfigSubsection::Capabilities(names) => {
                    for name in names {
                        match &name[..] {
                            b"x-ignore-shared" => self.ram.ignore_shared = true,
                            b"mapped-ram" => self.ram.mapped_ram = true,
                            _ => {}
                        }
                    }
                }
                ConfigSubsection::Uuid(_) => {}
            }
        }
        self.pos.skip(src, len);
        Ok((Phase::TopLevel, Step::Emit(Record::Configuration(config))))
    }

    /// Parses a whole configuration record (type byte included) if `buf` holds it
    /// and the byte after it, which tells whether another subsection follows.
    fn parse_configuration(&self, buf: &[u8]) -> Result<Option<(Configuration, usize)>> {
        const PREFIX: &[u8] = wire::CONFIGURATION_NAME;
        let mut c = Cursor::new(buf);
        c.u8();
        let Some(len) = c.be32() else { return Ok(None) };
        let len = len as usize;
        if len > self.limits.max_config_len {
            return Err(self
                .pos
                .limit(1, "machine type length", len, self.limits.max_config_len));
        }
        let Some(machine) = c.take(len) else {
            return Ok(None);
        };
        let mut config = Configuration {
            machine: Bytes::copy_from_slice(machine),
            subsections: Vec::new(),
        };
        // QEMU's loader finds the end of a VMState by peeking: a subsection follows
        // only if the next bytes are 0x05 and a name starting with the parent's.
        loop {
            let at = c.pos();
            match (c.peek(0, 1), c.peek(1, 1)) {
                (None, _) | (Some([record_type::SUBSECTION]), None) => return Ok(None),
                (Some([record_type::SUBSECTION]), Some(&[n])) if usize::from(n) > PREFIX.len() => {}
                _ => return Ok(Some((config, at))),
            }
            let Some(name) = Cursor::new(&buf[at + 1..]).cstr8() else {
                return Ok(None);
            };
            if !name.starts_with(PREFIX) {
                return Ok(Some((config, at)));
            }
            c.take(2 + name.len());
            let Some(version) = c.be32() else {
                return Ok(None);
            };
            let sub = match name {
                b"configuration/target-page-bits" => match c.be32() {
                    Some(bits) => ConfigSubsection::TargetPageBits(bits),
                    None => return Ok(None),
                },
                b"configuration/capabilities" => {
                    let Some(count) = c.be32() else {
                        return Ok(None);
                    };
                    if count as usize > self.limits.max_capabilities {
                        let limit = self.limits.max_capabilities;
                        return Err(self.pos.limit(
                            c.pos() - 4,
                            "capability count",
                            count as usize,
                            limit,
                        ));
                    }
                    let mut names = Vec::new();
                    for _ in 0..count {
                        let Some(name) = c.cstr8() else {
                            return Ok(None);
                        };
                        names.push(Bytes::copy_from_slice(name));
                    }
                    ConfigSubsection::Capabilities(names)
                }
                b"configuration/uuid" => match c.take(16) {
                    Some(uuid) => ConfigSubsection::Uuid(uuid.try_into().expect("16 bytes")),
                    None => return Ok(None),
                },
                _ => {
                    return Err(self.pos.unsupported(
                        at,
                        "configuration subsection",
                        "unknown subsection name",
                    ));
                }
            };
            if version != 1 {
                return Err(self
                    .pos
                    .unsupported(at, "configuration subsection version", "not 1"));
            }
            config.subsections.push(sub);
        }
    }
}
