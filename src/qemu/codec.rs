//! tokio-util [`Decoder`]/[`Encoder`] over the sans-IO core, so a QEMU stream can be
//! read with `FramedRead` and written with `FramedWrite` over any transport.

use bytes::BytesMut;
use tokio_util::codec::{Decoder, Encoder};

use super::{QemuDecoder, QemuEncoder, Record};
use crate::error::Error;

impl Decoder for QemuDecoder {
    type Item = Record;
    type Error = Error;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Record>, Error> {
        QemuDecoder::decode(self, src)
    }

    fn decode_eof(&mut self, src: &mut BytesMut) -> Result<Option<Record>, Error> {
        QemuDecoder::decode_eof(self, src)
    }
}

impl Encoder<&Record> for QemuEncoder {
    type Error = Error;

    fn encode(&mut self, record: &Record, dst: &mut BytesMut) -> Result<(), Error> {
        QemuEncoder::encode(self, record, dst)
    }
}

impl Encoder<Record> for QemuEncoder {
    type Error = Error;

    fn encode(&mut self, record: Record, dst: &mut BytesMut) -> Result<(), Error> {
        QemuEncoder::encode(self, &record, dst)
    }
}
