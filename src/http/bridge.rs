//! Calls into the gRPC services in-process, through the very stack the gRPC port serves
//! (tokens and roles, metrics, the in-flight byte budget, the message limits): the HTTP face
//! has one set of semantics with gRPC, not a second API. A call is the gRPC wire format in
//! memory: a length-prefixed message in, length-prefixed messages and a `grpc-status` out.

use std::convert::Infallible;

use bytes::{Buf, Bytes, BytesMut};
use http_body_util::BodyExt as _;
use tokio_stream::Stream;
use tonic::codegen::http;
use tonic::{Code, Status};
use tower::ServiceExt as _;

/// The layered gRPC routes, as one cloneable service.
pub type GrpcStack = tower::util::BoxCloneSyncService<
    http::Request<tonic::body::Body>,
    http::Response<tonic::body::Body>,
    Infallible,
>;

/// Request headers a bridged call carries over (the token; nothing else reaches the handlers).
const FORWARDED: [http::HeaderName; 1] = [http::header::AUTHORIZATION];

#[derive(Clone)]
pub struct Bridge {
    grpc: GrpcStack,
}

impl Bridge {
    pub fn new(grpc: GrpcStack) -> Self {
        Self { grpc }
    }

    /// Calls a unary (or client-streaming with one message) method: `path` is
    /// `/package.Service/Method`, `message` the encoded request.
    pub async fn unary(
        &self,
        path: &str,
        message: Bytes,
        headers: &http::HeaderMap,
    ) -> Result<Bytes, Status> {
        let mut reply = self.call(path, message, headers).await?;
        let mut first = None;
        while let Some(frame) = reply.next_message().await? {
            first.get_or_insert(frame);
        }
        first.ok_or_else(|| Status::internal(format!("{path} answered no message")))
    }

    /// Calls a server-streaming method: its messages as they come, then its status (an error
    /// ends the stream).
    pub async fn streaming(
        &self,
        path: &str,
        message: Bytes,
        headers: &http::HeaderMap,
    ) -> Result<impl Stream<Item = Result<Bytes, Status>> + Send + 'static, Status> {
        let reply = self.call(path, message, headers).await?;
        Ok(message_stream(reply))
    }

    async fn call(
        &self,
        path: &str,
        message: Bytes,
        headers: &http::HeaderMap,
    ) -> Result<Reply, Status> {
        let mut framed = BytesMut::with_capacity(message.len() + 5);
        framed.extend_from_slice(&[0]);
        let len = u32::try_from(message.len())
            .map_err(|_| Status::resource_exhausted("the request is over 4 GiB"))?;
        framed.extend_from_slice(&len.to_be_bytes());
        framed.extend_from_slice(&message);
        let mut request = http::Request::builder()
            .method(http::Method::POST)
            .uri(path)
            .version(http::Version::HTTP_2)
            .header(http::header::CONTENT_TYPE, "application/grpc")
            .header("te", "trailers")
            .body(tonic::body::Body::new(http_body_util::Full::new(
                framed.freeze(),
            )))
            .map_err(|e| Status::internal(format!("building the call to {path}: {e}")))?;
        for name in FORWARDED {
            if let Some(v) = headers.get(&name) {
                request.headers_mut().insert(name, v.clone());
            }
        }
        let response = match self.grpc.clone().oneshot(request).await {
            Ok(r) => r,
            Err(never) => match never {},
        };
        // A trailers-only answer (an error before any message) has its status in the headers.
        if let Some(status) = Status::from_header_map(response.headers()) {
            if status.code() != Code::Ok {
                return Err(status);
            }
        }
        Ok(Reply {
            body: response.into_body(),
            frames: Frames::default(),
            done: false,
        })
    }
}

/// A call's answer body: messages, then trailers.
struct Reply {
    body: tonic::body::Body,
    /// What has arrived of the body and not been handed out yet.
    frames: Frames,
    done: bool,
}

/// Bytes of the answer not yet cut into messages.
#[derive(Default)]
struct Frames {
    buf: BytesMut,
}

impl Frames {
    /// The next whole message in the buffer, if one is there.
    fn take(&mut self) -> Option<Bytes> {
        if self.buf.len() < 5 {
            return None;
        }
        let len = u32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]]);
        let end = 5 + len as usize;
        if self.buf.len() < end {
            return None;
        }
        self.buf.advance(5);
        Some(self.buf.split_to(len as usize).freeze())
    }
}

impl Reply {
    /// The next message, `None` after an OK status, the status when it is an error.
    async fn next_message(&mut self) -> Result<Option<Bytes>, Status> {
        loop {
            if let Some(message) = self.frames.take() {
                return Ok(Some(message));
            }
            if self.done {
                return Ok(None);
            }
            let Some(frame) = self.body.frame().await else {
                self.done = true;
                if !self.frames.buf.is_empty() {
                    return Err(Status::internal("the answer ended inside a message"));
                }
                return Ok(None);
            };
            let frame = frame?;
            match frame.into_data() {
                Ok(data) => self.frames.buf.extend_from_slice(&data),
                Err(frame) => {
                    if let Some(trailers) = frame.trailers_ref() {
                        self.done = true;
                        match Status::from_header_map(trailers) {
                            Some(s) if s.code() != Code::Ok => return Err(s),
                            _ => {}
                        }
                    }
                }
            }
        }
    }
}

/// A streaming answer's messages, read by a task of their own (an error ends them); when
/// the receiver goes away, the answer is dropped and the call ends.
fn message_stream(mut reply: Reply) -> impl Stream<Item = Result<Bytes, Status>> + Send + 'static {
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tokio::spawn(async move {
        loop {
            let next = tokio::select! {
                next = reply.next_message() => next,
                _ = tx.closed() => break,
            };
            let item = match next {
                Ok(Some(m)) => Ok(m),
                Ok(None) => break,
                Err(s) => Err(s),
            };
            let last = item.is_err();
            if tx.send(item).await.is_err() || last {
                break;
            }
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// The HTTP status of a gRPC error: its code's, except that a request over a documented
/// limit is 413 (too large) while a full queue or budget stays 429 (retry later), and a
/// body of the wrong type is 415.
pub fn http_status_of(status: &Status) -> http::StatusCode {
    let m = status.message();
    let over_limit =
        m.contains("the limit is") && !m.contains("queue full") && !m.contains("retry later");
    match status.code() {
        Code::ResourceExhausted if over_limit => http::StatusCode::PAYLOAD_TOO_LARGE,
        Code::InvalidArgument if m.starts_with("content-type:") => {
            http::StatusCode::UNSUPPORTED_MEDIA_TYPE
        }
        code => http_status(code),
    }
}

/// The HTTP status a gRPC code maps to (as Google's API gateways map them).
pub fn http_status(code: Code) -> http::StatusCode {
    use http::StatusCode as H;
    match code {
        Code::Ok => H::OK,
        Code::InvalidArgument | Code::FailedPrecondition | Code::OutOfRange => H::BAD_REQUEST,
        Code::Unauthenticated => H::UNAUTHORIZED,
        Code::PermissionDenied => H::FORBIDDEN,
        Code::NotFound => H::NOT_FOUND,
        Code::AlreadyExists | Code::Aborted => H::CONFLICT,
        Code::ResourceExhausted => H::TOO_MANY_REQUESTS,
        // 499: the client closed the request (nginx's code; no standard one exists).
        Code::Cancelled => H::from_u16(499).unwrap_or(H::BAD_REQUEST),
        Code::Unimplemented => H::NOT_IMPLEMENTED,
        Code::Unavailable => H::SERVICE_UNAVAILABLE,
        Code::DeadlineExceeded => H::GATEWAY_TIMEOUT,
        Code::Unknown | Code::Internal | Code::DataLoss => H::INTERNAL_SERVER_ERROR,
    }
}

/// A gRPC code's name as the proto3 JSON mapping writes it (`INVALID_ARGUMENT`).
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_come_out_whole_and_in_order() {
        let mut f = Frames::default();
        assert!(f.take().is_none());
        f.buf.extend_from_slice(&[0, 0, 0, 0, 3, b'a', b'b']);
        assert!(f.take().is_none(), "a cut message waits for its bytes");
        f.buf
            .extend_from_slice(&[b'c', 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
        assert_eq!(f.take().as_deref(), Some(&b"abc"[..]));
        assert_eq!(f.take().as_deref(), Some(&b""[..]));
        assert!(f.take().is_none());
        f.buf.extend_from_slice(b"z");
        assert_eq!(f.take().as_deref(), Some(&b"z"[..]));
    }

    #[test]
    fn codes_map_to_their_http_statuses() {
        assert_eq!(http_status(Code::InvalidArgument), 400);
        assert_eq!(http_status(Code::Unauthenticated), 401);
        assert_eq!(http_status(Code::PermissionDenied), 403);
        assert_eq!(http_status(Code::NotFound), 404);
        assert_eq!(http_status(Code::ResourceExhausted), 429);
        assert_eq!(http_status(Code::Unimplemented), 501);
        assert_eq!(http_status(Code::Unavailable), 503);
        assert_eq!(code_name(Code::FailedPrecondition), "FAILED_PRECONDITION");
        let over =
            Status::resource_exhausted("images: 300 images in one request; the limit is 256");
        assert_eq!(http_status_of(&over), 413);
        let full = Status::resource_exhausted(
            "inference queue full: 9 images waiting, the limit is 8 (--max-queued-images); retry later",
        );
        assert_eq!(http_status_of(&full), 429);
        let typed = Status::invalid_argument("content-type: the body must be application/json");
        assert_eq!(http_status_of(&typed), 415);
    }
}
