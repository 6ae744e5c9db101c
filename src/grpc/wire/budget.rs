//! One byte budget for all the request bodies the server is receiving at once. tonic buffers a
//! whole message before decoding it (up to `MAX_MESSAGE_BYTES` each), so without a shared
//! bound a few dozen callers sending large requests at once take gigabytes although each
//! request alone is within its limit. Each gRPC message's 5-byte header declares its length:
//! the body takes that many bytes from the budget as soon as the header arrives (beyond the
//! first [`FREE_BYTES_PER_REQUEST`] of each body, so ordinary requests never wait on it), and
//! a body that finds the budget spent fails at once with RESOURCE_EXHAUSTED, before the rest
//! of it is sent. The bytes return when the body is dropped: after decoding, for a unary call.
//! A client stream (an upload) holds its two newest messages' bytes: one being received, one
//! the decoder may have handed to the handler; an older message's return when the next
//! header arrives, so a stream of any length holds at most two messages of the budget.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http_body::{Body, Frame, SizeHint};
use prost::bytes::Bytes;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::codegen::http;
use tonic::Status;

/// Bytes of each request body that do not count against the budget.
pub const FREE_BYTES_PER_REQUEST: usize = 1 << 20;

/// Tower layer: request bodies draw on one shared budget of `bytes`.
#[derive(Clone)]
pub struct RequestBytesLayer {
    budget: Arc<Semaphore>,
    bytes: usize,
}

impl RequestBytesLayer {
    pub fn new(bytes: usize) -> Self {
        Self {
            budget: Arc::new(Semaphore::new(bytes.min(Semaphore::MAX_PERMITS))),
            bytes,
        }
    }
}

impl<S> tower::Layer<S> for RequestBytesLayer {
    type Service = RequestBytes<S>;
    fn layer(&self, inner: S) -> RequestBytes<S> {
        RequestBytes {
            inner,
            layer: self.clone(),
        }
    }
}

#[derive(Clone)]
pub struct RequestBytes<S> {
    inner: S,
    layer: RequestBytesLayer,
}

impl<S> tower::Service<http::Request<tonic::body::Body>> for RequestBytes<S>
where
    S: tower::Service<http::Request<tonic::body::Body>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        let layer = self.layer.clone();
        self.inner.call(req.map(|inner| {
            tonic::body::Body::new(Budgeted {
                inner,
                layer,
                framing: Framing::default(),
                declared: 0,
                held: None,
                previous: None,
            })
        }))
    }
}

struct Budgeted {
    inner: tonic::body::Body,
    layer: RequestBytesLayer,
    framing: Framing,
    /// Bytes the messages of this body declared so far (headers included).
    declared: usize,
    /// The newest message's charge, and the one before it.
    held: Option<OwnedSemaphorePermit>,
    previous: Option<OwnedSemaphorePermit>,
}

/// Where a body is in gRPC's message framing: a 5-byte header (compression flag, length as a
/// big-endian u32), then that many bytes.
#[derive(Default)]
struct Framing {
    header: [u8; 5],
    header_filled: usize,
    message_left: usize,
}

impl Framing {
    /// Follows `data`; returns the bytes (header included) each message header in it declares.
    fn follow(&mut self, mut data: &[u8], mut declared: impl FnMut(usize)) {
        while !data.is_empty() {
            if self.message_left > 0 {
                let n = self.message_left.min(data.len());
                self.message_left -= n;
                data = &data[n..];
                continue;
            }
            let n = (5 - self.header_filled).min(data.len());
            self.header[self.header_filled..self.header_filled + n].copy_from_slice(&data[..n]);
            self.header_filled += n;
            data = &data[n..];
            if self.header_filled == 5 {
                self.header_filled = 0;
                let len = u32::from_be_bytes(self.header[1..].try_into().expect("4 bytes"));
                self.message_left = len as usize;
                declared(5 + len as usize);
            }
        }
    }
}

impl Budgeted {
    /// Takes the part of a message of `len` bytes beyond the free allowance from the budget.
    fn charge(&mut self, len: usize) -> Result<(), Status> {
        // A new message: the one before the last has been decoded and passed on.
        self.previous = self.held.take();
        let before = self.declared.saturating_sub(FREE_BYTES_PER_REQUEST);
        self.declared = self.declared.saturating_add(len);
        let due = self.declared.saturating_sub(FREE_BYTES_PER_REQUEST) - before;
        if due == 0 {
            return Ok(());
        }
        let permit = u32::try_from(due)
            .ok()
            .and_then(|n| self.layer.budget.clone().try_acquire_many_owned(n).ok())
            .ok_or_else(|| {
                Status::resource_exhausted(format!(
                    "the server is receiving {} MiB of large requests at once, its limit \
                     (--max-request-bytes-in-flight); retry later",
                    self.layer.bytes >> 20
                ))
            })?;
        self.held = Some(permit);
        Ok(())
    }

    /// Charges every message header in `data` declares.
    fn follow(&mut self, data: &[u8]) -> Result<(), Status> {
        let mut lengths = Vec::new();
        self.framing.follow(data, |n| lengths.push(n));
        lengths.into_iter().try_for_each(|n| self.charge(n))
    }
}

impl Body for Budgeted {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let frame = match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => frame,
            other => return other,
        };
        if let Some(data) = frame.data_ref() {
            if let Err(refused) = self.follow(data) {
                return Poll::Ready(Some(Err(refused)));
            }
        }
        Poll::Ready(Some(Ok(frame)))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(layer: &RequestBytesLayer) -> Budgeted {
        Budgeted {
            inner: tonic::body::Body::empty(),
            layer: layer.clone(),
            framing: Framing::default(),
            declared: 0,
            held: None,
            previous: None,
        }
    }

    #[test]
    fn bodies_share_the_budget_beyond_their_free_bytes_and_return_it_when_dropped() {
        let layer = RequestBytesLayer::new(10 << 20);
        let mut a = body(&layer);
        // Free, then charged.
        a.charge(FREE_BYTES_PER_REQUEST).unwrap();
        assert_eq!(layer.budget.available_permits(), 10 << 20);
        a.charge(6 << 20).unwrap();
        let mut b = body(&layer);
        b.charge(FREE_BYTES_PER_REQUEST + (4 << 20)).unwrap();
        assert_eq!(layer.budget.available_permits(), 0);
        let mut c = body(&layer);
        c.charge(FREE_BYTES_PER_REQUEST).unwrap();
        let refused = c.charge(1).unwrap_err();
        assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
        assert!(refused.message().contains("--max-request-bytes-in-flight"));
        drop(a);
        assert_eq!(layer.budget.available_permits(), 6 << 20);
        c.charge(1).unwrap();
    }

    #[test]
    fn a_stream_holds_its_two_newest_messages_whatever_its_length() {
        let layer = RequestBytesLayer::new(10 << 20);
        let mut upload = body(&layer);
        upload.charge(FREE_BYTES_PER_REQUEST).unwrap();
        for _ in 0..100 {
            upload.charge(4 << 20).unwrap();
        }
        assert_eq!(layer.budget.available_permits(), 2 << 20);
        drop(upload);
        assert_eq!(layer.budget.available_permits(), 10 << 20);
    }

    #[test]
    fn message_headers_declare_what_is_charged_however_the_frames_split_them() {
        let mut wire = Vec::new();
        for len in [3u32, 70_000, 0] {
            wire.push(0);
            wire.extend(len.to_be_bytes());
            wire.extend(std::iter::repeat_n(7u8, len as usize));
        }
        for frame in [1, 2, 5, 4096, wire.len()] {
            let mut framing = Framing::default();
            let mut declared = Vec::new();
            for chunk in wire.chunks(frame) {
                framing.follow(chunk, |n| declared.push(n));
            }
            assert_eq!(declared, vec![8, 70_005, 5], "frames of {frame}");
        }
        // The header alone commits the whole message: refused before its bytes arrive.
        let layer = RequestBytesLayer::new(64 << 20);
        let mut big = body(&layer);
        let mut header = vec![0];
        header.extend((100u32 << 20).to_be_bytes());
        let refused = big.follow(&header).unwrap_err();
        assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
    }
}
