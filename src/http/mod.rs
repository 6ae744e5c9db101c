//! The HTTP face (`tlb serve --http-addr`): the dashboard at `/`, tlb.v1 as JSON under
//! `/v1` (with Server-Sent Events for the Watch methods), the Open Inference Protocol's REST
//! binding under `/v2`, and an open `GET /healthz`. Every `/v1` and `/v2` call goes through
//! the gRPC services' own stack in-process ([`bridge`]): the same tokens, roles, limits and
//! handlers. TLS, when the gRPC port has it, is the same certificate here.

mod bridge;
mod dashboard;
mod oip;
mod rest;
mod serve;
mod tensors;
pub mod tls;

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use prost_reflect::DescriptorPool;
use serde_json::json;
use tonic::codegen::http::{self, HeaderMap, HeaderValue};
use tonic::Status;

pub use bridge::{Bridge, GrpcStack};
pub use serve::serve;

use crate::auth::{identify, Tokens};
use crate::names::Named;

/// Largest request body: a 64 MiB message (the gRPC limit) as base64 in JSON, with room.
pub const MAX_BODY_BYTES: usize = 2 * crate::grpc::MAX_MESSAGE_BYTES;

/// What the HTTP handlers share.
#[derive(Clone)]
pub struct Face {
    bridge: Bridge,
    pool: DescriptorPool,
    tokens: Option<Tokens>,
}

impl Face {
    pub fn new(grpc: GrpcStack, tokens: Option<Tokens>) -> anyhow::Result<Self> {
        Ok(Self {
            bridge: Bridge::new(grpc),
            pool: rest::pool()?,
            tokens,
        })
    }
}

/// Every route of the face.
pub fn router(face: Face) -> axum::Router {
    axum::Router::new()
        .route("/healthz", get(healthz))
        .route("/v1/whoami", get(whoami))
        .merge(rest::routes())
        .merge(oip::routes())
        .merge(dashboard::routes())
        .fallback(not_found)
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(axum::middleware::from_fn(declared_size))
        .layer(axum::middleware::map_response(security_headers))
        .with_state(face)
}

/// Open: for load balancers and probes (and the dashboard's version and login prompt).
async fn healthz(State(face): State<Face>) -> Response {
    json_response(
        http::StatusCode::OK,
        json!({
            "status": "ok",
            "version": env!("CARGO_PKG_VERSION"),
            "auth": face.tokens.is_some(),
        }),
    )
}

/// Who the request's token belongs to; without tokens on the server, everyone is admin.
async fn whoami(State(face): State<Face>, headers: HeaderMap) -> Response {
    let Some(tokens) = &face.tokens else {
        let body = json!({ "name": "", "role": "admin", "authenticated": false });
        return json_response(http::StatusCode::OK, body);
    };
    match identify(tokens, &headers) {
        Ok(c) => json_response(
            http::StatusCode::OK,
            json!({ "name": c.name, "role": c.role.name(), "authenticated": true }),
        ),
        Err(status) => rest::error_response(&status),
    }
}

/// A body declared over the limit is refused before a byte of it is read.
async fn declared_size(request: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let declared = request
        .headers()
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    match declared {
        Some(n) if n > MAX_BODY_BYTES as u64 => {
            rest::error_response(&too_large(&format!("{n} bytes")))
        }
        _ => next.run(request).await,
    }
}

/// A body over [`MAX_BODY_BYTES`] (`what` says how large it was): 413 once mapped.
pub fn too_large(what: &str) -> Status {
    Status::resource_exhausted(format!(
        "the request body: {what}; the limit is {MAX_BODY_BYTES} bytes"
    ))
}

/// A JSON answer.
pub fn json_response(code: http::StatusCode, json: serde_json::Value) -> Response {
    (
        code,
        [(http::header::CONTENT_TYPE, "application/json")],
        json.to_string(),
    )
        .into_response()
}

/// The request's content type as sent, and its media type in lower case without parameters
/// (`application/json; charset=utf-8` → `application/json`); `None` when it has none.
pub fn media_type(headers: &HeaderMap) -> Option<(&str, String)> {
    let sent = headers
        .get(http::header::CONTENT_TYPE)?
        .to_str()
        .unwrap_or("");
    let essence = sent
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    Some((sent, essence))
}

async fn not_found(uri: http::Uri) -> Response {
    rest::error_response(&Status::not_found(format!("no endpoint {}", uri.path())))
}

/// No sniffing, no framing by other sites, no referrer leaks; the dashboard's scripts come
/// from this server only.
async fn security_headers(mut response: Response) -> Response {
    let h = response.headers_mut();
    let set = |h: &mut HeaderMap, k: &'static str, v: &'static str| {
        h.insert(k, HeaderValue::from_static(v));
    };
    set(h, "x-content-type-options", "nosniff");
    set(h, "x-frame-options", "DENY");
    set(h, "referrer-policy", "no-referrer");
    set(
        h,
        "content-security-policy",
        "default-src 'self'; img-src 'self' data: blob:; style-src 'self' 'unsafe-inline'; \
         frame-ancestors 'none'",
    );
    response.into_response()
}
