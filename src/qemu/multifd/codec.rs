//! tokio-util [`Decoder`]/[`Encoder`] over the sans-IO core, so a multifd channel can
//! be read with `FramedRead` and written with `FramedWrite` over any transport.

use bytes::BytesMut;
use tokio_util::codec::{Decoder, Encoder};

use super::{ChannelRecord, MultifdDecoder, MultifdEncoder};
use crate::error::Error;

impl Decoder for MultifdDecoder {
    type Item = ChannelRecord;
    type Error = Error;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<ChannelRecord>, Error> {
        MultifdDecoder::decode(self, src)
    }

    fn decode_eof(&mut self, src: &mut BytesMut) -> Result<Option<ChannelRecord>, Error> {
        MultifdDecoder::decode_eof(self, src)
    }
}

impl Encoder<&ChannelRecord> for MultifdEncoder {
    type Error = Error;

    fn encode(&mut self, record: &ChannelRecord, dst: &mut BytesMut) -> Result<(), Error> {
        MultifdEncoder::encode(self, record, dst)
    }
}

impl Encoder<ChannelRecord> for MultifdEncoder {
    type Error = Error;

    fn encode(&mut self, record: ChannelRecord, dst: &mut BytesMut) -> Result<(), Error> {
        MultifdEncoder::encode(self, &record, dst)
    }
}
