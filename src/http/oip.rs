//! The Open Inference Protocol's REST binding (KServe v2, with Triton's binary-data
//! extension): each endpoint calls its `inference.GRPCInferenceService` method through the
//! [`Bridge`], so models, limits, the queue and errors are the gRPC endpoint's. Errors are
//! `{"error": "..."}` with the HTTP status of the gRPC code, as Triton's clients read them.

use std::collections::HashMap;

use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use bytes::Bytes;
use prost::Message;
use serde_json::json;
use tonic::codegen::http::{self, HeaderMap, StatusCode};
use tonic::Status;

use super::bridge::http_status_of;
use super::tensors::{infer_request, infer_response, BINARY_HEADER};
use super::{json_response, too_large, Face};
use crate::proto::inference as oip;

const SERVICE: &str = "/inference.GRPCInferenceService";

pub fn routes() -> axum::Router<Face> {
    axum::Router::new()
        .route("/v2", get(server_metadata))
        .route("/v2/health/live", get(live))
        .route("/v2/health/ready", get(ready))
        .route("/v2/models/{model}", get(model_metadata))
        .route("/v2/models/{model}/versions/{version}", get(model_metadata))
        .route("/v2/models/{model}/ready", get(model_ready))
        .route(
            "/v2/models/{model}/versions/{version}/ready",
            get(model_ready),
        )
        .route("/v2/models/{model}/infer", post(infer))
        .route("/v2/models/{model}/versions/{version}/infer", post(infer))
        .route("/v2/{*rest}", axum::routing::any(not_served))
}

/// `{"error": message}` with the status's HTTP code.
pub fn error(status: &Status) -> Response {
    json_response(http_status_of(status), json!({ "error": status.message() }))
}

/// Calls `method` with `request`; the decoded answer.
async fn call<Req: Message, Res: Message + Default>(
    face: &Face,
    method: &str,
    request: Req,
    headers: &HeaderMap,
) -> Result<Res, Status> {
    let path = format!("{SERVICE}/{method}");
    let answer = face
        .bridge
        .unary(&path, request.encode_to_vec().into(), headers)
        .await?;
    Res::decode(answer).map_err(|e| Status::internal(format!("decoding {method}: {e}")))
}

/// A readiness answer: 200 when true, 400 when false (the protocol's "4xx means false").
fn readiness(field: &str, yes: bool) -> Response {
    let code = if yes {
        StatusCode::OK
    } else {
        StatusCode::BAD_REQUEST
    };
    json_response(code, json!({ field: yes }))
}

async fn live(State(face): State<Face>, headers: HeaderMap) -> Response {
    match call::<_, oip::ServerLiveResponse>(
        &face,
        "ServerLive",
        oip::ServerLiveRequest {},
        &headers,
    )
    .await
    {
        Ok(r) => readiness("live", r.live),
        Err(s) => error(&s),
    }
}

async fn ready(State(face): State<Face>, headers: HeaderMap) -> Response {
    match call::<_, oip::ServerReadyResponse>(
        &face,
        "ServerReady",
        oip::ServerReadyRequest {},
        &headers,
    )
    .await
    {
        Ok(r) => readiness("ready", r.ready),
        Err(s) => error(&s),
    }
}

async fn server_metadata(State(face): State<Face>, headers: HeaderMap) -> Response {
    let request = oip::ServerMetadataRequest {};
    match call::<_, oip::ServerMetadataResponse>(&face, "ServerMetadata", request, &headers).await {
        Ok(r) => json_response(
            StatusCode::OK,
            json!({ "name": r.name, "version": r.version, "extensions": r.extensions }),
        ),
        Err(s) => error(&s),
    }
}

type ModelPath = Path<HashMap<String, String>>;

fn name_and_version(Path(p): ModelPath) -> (String, String) {
    let name = p.get("model").cloned().unwrap_or_default();
    (name, p.get("version").cloned().unwrap_or_default())
}

async fn model_metadata(State(face): State<Face>, path: ModelPath, headers: HeaderMap) -> Response {
    let (name, version) = name_and_version(path);
    let request = oip::ModelMetadataRequest { name, version };
    match call::<_, oip::ModelMetadataResponse>(&face, "ModelMetadata", request, &headers).await {
        Ok(r) => {
            let tensors = |ts: &[oip::model_metadata_response::TensorMetadata]| {
                ts.iter()
                    .map(|t| json!({ "name": t.name, "datatype": t.datatype, "shape": t.shape }))
                    .collect::<Vec<_>>()
            };
            json_response(
                StatusCode::OK,
                json!({
                    "name": r.name,
                    "versions": r.versions,
                    "platform": r.platform,
                    "inputs": tensors(&r.inputs),
                    "outputs": tensors(&r.outputs),
                }),
            )
        }
        Err(s) => error(&s),
    }
}

async fn model_ready(State(face): State<Face>, path: ModelPath, headers: HeaderMap) -> Response {
    let (name, version) = name_and_version(path);
    let request = oip::ModelReadyRequest { name, version };
    match call::<_, oip::ModelReadyResponse>(&face, "ModelReady", request, &headers).await {
        Ok(r) => readiness("ready", r.ready),
        Err(s) => error(&s),
    }
}

async fn infer(
    State(face): State<Face>,
    path: ModelPath,
    headers: HeaderMap,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Response {
    let body = match body {
        Ok(b) => b,
        Err(r) => return error(&too_large(&r.body_text())),
    };
    let (name, version) = name_and_version(path);
    let run = async {
        let (request, binary) = infer_request(&headers, body, name, version)?;
        let answer: oip::ModelInferResponse = call(&face, "ModelInfer", request, &headers).await?;
        infer_response(answer, &binary)
    };
    match run.await {
        Ok((json, None)) => json_response(StatusCode::OK, json),
        Ok((json, Some(tail))) => {
            let head = json.to_string();
            let mut bytes = head.clone().into_bytes();
            bytes.extend_from_slice(&tail);
            (
                StatusCode::OK,
                [
                    (
                        http::header::CONTENT_TYPE,
                        "application/octet-stream".to_string(),
                    ),
                    (
                        http::HeaderName::from_static(BINARY_HEADER),
                        head.len().to_string(),
                    ),
                ],
                bytes,
            )
                .into_response()
        }
        Err(s) => error(&s),
    }
}

/// Triton's other endpoints (model config, statistics, repository, shared memory, tracing,
/// logging) and unknown paths.
async fn not_served(Path(rest): Path<String>) -> Response {
    const TRITON: [&str; 8] = [
        "config",
        "stats",
        "repository",
        "systemsharedmemory",
        "cudasharedmemory",
        "trace",
        "logging",
        "load",
    ];
    let word = |w: &str| rest.split('/').any(|part| part == w);
    if TRITON.iter().any(|w| word(w)) {
        error(&Status::unimplemented(format!(
            "/v2/{rest} is not served by tlb: it implements the Open Inference Protocol's \
             health, metadata and infer endpoints, not Triton's extensions"
        )))
    } else {
        error(&Status::not_found(format!("no endpoint /v2/{rest}")))
    }
}
