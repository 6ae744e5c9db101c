//! What arrives on the wire, bounded before it becomes memory: the codec of every tlb.v1 and
//! Open Inference Protocol service (prost's, after a scan of the request's wire format: see
//! `scan`) and a byte budget shared by all request bodies being received (`budget`).

mod budget;
pub mod scan;

use std::marker::PhantomData;

use prost::bytes::Buf;
use prost::{Message, Name};
use tonic::codec::{Codec, DecodeBuf, Decoder};
use tonic::Status;
use tonic_prost::{ProstCodec, ProstDecoder, ProstEncoder};

pub use budget::RequestBytesLayer;

/// prost's codec, with requests scanned before they are decoded (named by `build.rs` as
/// the codec of the generated services and clients).
#[derive(Debug, Clone)]
pub struct GuardedCodec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for GuardedCodec<T, U> {
    fn default() -> Self {
        Self(PhantomData)
    }
}

impl<T, U> Codec for GuardedCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Name + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = GuardedDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstCodec::<T, U>::default().encoder()
    }

    fn decoder(&mut self) -> Self::Decoder {
        GuardedDecoder(ProstCodec::<T, U>::default().decoder())
    }
}

pub struct GuardedDecoder<U>(ProstDecoder<U>);

impl<U: Message + Name + Default> Decoder for GuardedDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        // The message is one contiguous buffer in tonic's decoder; were it not, the scan is
        // skipped rather than the message copied.
        if buf.chunk().len() == buf.remaining() {
            scan::check(&U::full_name(), buf.chunk())
                .map_err(|why| Status::resource_exhausted(why.to_string()))?;
        }
        self.0.decode(buf)
    }

    fn buffer_settings(&self) -> tonic::codec::BufferSettings {
        self.0.buffer_settings()
    }
}
