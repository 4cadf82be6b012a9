//! tokio-util [`Decoder`]/[`Encoder`] over the sans-IO dedup codecs: a
//! `FramedWrite` of [`DedupEncoder`] takes QEMU records (of the main channel or of a
//! multifd channel) and then [`End`], a `FramedRead` of [`DedupDecoder`] yields the
//! verified QEMU bytes.

use bytes::{Bytes, BytesMut};
use tokio_util::codec::{Decoder, Encoder};

use super::{Decoded, DedupDecoder, DedupEncoder};
use crate::error::{Error, Result};
use crate::qemu::Record;
use crate::qemu::multifd::ChannelRecord;

/// The end of the QEMU stream, for a `FramedWrite` of dedup frames: sending it
/// writes what is still batched and the END frame ([`DedupEncoder::finish`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct End;

/// What a [`DedupEncoder`] takes in: the records of QEMU's main channel
/// ([`Record`]) or of one of its multifd channels ([`ChannelRecord`]).
pub trait EncoderInput {
    /// Hands the record to the encoder's method for its kind.
    fn encode_into(&self, encoder: &mut DedupEncoder, dst: &mut BytesMut) -> Result<()>;
}

impl EncoderInput for Record {
    fn encode_into(&self, encoder: &mut DedupEncoder, dst: &mut BytesMut) -> Result<()> {
        encoder.encode(self, dst)
    }
}

impl EncoderInput for ChannelRecord {
    fn encode_into(&self, encoder: &mut DedupEncoder, dst: &mut BytesMut) -> Result<()> {
        encoder.encode_channel(self, dst)
    }
}

impl<T: EncoderInput> Encoder<&T> for DedupEncoder {
    type Error = Error;

    fn encode(&mut self, record: &T, dst: &mut BytesMut) -> Result<()> {
        record.encode_into(self, dst)
    }
}

impl Encoder<Record> for DedupEncoder {
    type Error = Error;

    fn encode(&mut self, record: Record, dst: &mut BytesMut) -> Result<()> {
        DedupEncoder::encode(self, &record, dst)
    }
}

impl Encoder<ChannelRecord> for DedupEncoder {
    type Error = Error;

    fn encode(&mut self, record: ChannelRecord, dst: &mut BytesMut) -> Result<()> {
        DedupEncoder::encode_channel(self, &record, dst)
    }
}

impl Encoder<End> for DedupEncoder {
    type Error = Error;

    fn encode(&mut self, _: End, dst: &mut BytesMut) -> Result<()> {
        self.finish(dst)
    }
}

/// A `FramedRead` of dedup frames yields the verified QEMU bytes. It cannot fetch:
/// with a resolver that waits for pages (a DHT store), a frame that needs a fetch
/// fails with [`Error::Config`]; drive such a decoder with
/// `relay::decode_stream` (feature `relay`) or by hand
/// ([`Decoded::Fetch`]).
impl Decoder for DedupDecoder {
    type Item = Bytes;
    type Error = Error;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Bytes>> {
        framed(DedupDecoder::decode(self, src)?)
    }

    fn decode_eof(&mut self, src: &mut BytesMut) -> Result<Option<Bytes>> {
        framed(DedupDecoder::decode_eof(self, src)?)
    }
}

fn framed(decoded: Decoded) -> Result<Option<Bytes>> {
    match decoded {
        Decoded::Qemu(bytes) => Ok(Some(bytes)),
        Decoded::NeedInput | Decoded::Done => Ok(None),
        Decoded::Fetch => Err(Error::Config {
            what: "resolvers",
            reason: "a resolver waits for pages to be fetched, which a FramedRead cannot do: \
                     use relay::decode_stream"
                .into(),
        }),
    }
}
