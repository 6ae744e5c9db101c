//! tlb.v1 over HTTP as JSON (the proto3 JSON mapping), each route a gRPC method called
//! through the [`Bridge`]: the path's `{ids}`, the query string and the JSON body fill the
//! request message; the answer is the response message as JSON, or Server-Sent Events for
//! the Watch methods. Errors are the gRPC status as JSON with its HTTP status.

use std::collections::HashMap;
use std::convert::Infallible;

use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, RawQuery, State};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::MethodRouter;
use bytes::Bytes;
use prost::Message as _;
use prost_reflect::{
    DescriptorPool, DynamicMessage, MessageDescriptor, ReflectMessage, SerializeOptions,
};
use serde_json::{Map, Value};
use tokio_stream::StreamExt as _;
use tonic::codegen::http::{self, HeaderMap};
use tonic::Status;

use super::bridge::{code_name, http_status_of};
use super::{json_response, media_type, Face};

/// Where a route's request message comes from, besides the path.
#[derive(Clone, Copy)]
enum Input {
    /// The query string only (GET).
    Query,
    /// A JSON body (`content-type: application/json`; an empty body is `{}`).
    Body,
}

/// The tlb.v1 routes.
pub fn routes() -> axum::Router<Face> {
    use Input::{Body, Query};
    use Verb::{Delete, Get, Post};
    const T: &str = "tlb.v1.TrainingService";
    const I: &str = "tlb.v1.InferenceService";
    const S: &str = "tlb.v1.SearchService";
    const D: &str = "tlb.v1.DatasetService";
    axum::Router::new()
        .route(
            "/v1/jobs",
            unary(Get, T, "ListJobs", Query).merge(unary(Post, T, "StartTraining", Body)),
        )
        .route("/v1/jobs/{job_id}", unary(Get, T, "GetJob", Query))
        .route(
            "/v1/jobs/{job_id}/cancel",
            unary(Post, T, "CancelJob", Body),
        )
        .route(
            "/v1/jobs/{job_id}/epochs",
            unary(Get, T, "ListEpochs", Query),
        )
        .route(
            "/v1/jobs/{job_id}/checkpoints",
            unary(Get, T, "ListCheckpoints", Query),
        )
        .route("/v1/jobs/{job_id}/events", events(T, "WatchJob"))
        .route("/v1/models", unary(Get, I, "ListModels", Query))
        .route("/v1/models/{model}/export", axum::routing::get(export))
        .route("/v1/classify", unary(Post, I, "Classify", Body))
        .route("/v1/attention", unary(Post, I, "GetAttention", Body))
        .route(
            "/v1/searches",
            unary(Get, S, "ListSearches", Query).merge(unary(Post, S, "StartSearch", Body)),
        )
        .route(
            "/v1/searches/{search_id}",
            unary(Get, S, "GetSearch", Query),
        )
        .route(
            "/v1/searches/{search_id}/cancel",
            unary(Post, S, "CancelSearch", Body),
        )
        .route("/v1/searches/{search_id}/events", events(S, "WatchSearch"))
        .route("/v1/datasets", unary(Get, D, "ListDatasets", Query))
        .route(
            "/v1/datasets/{name}",
            unary(Get, D, "GetDataset", Query).merge(unary(Delete, D, "DeleteDataset", Query)),
        )
}

type Params = Option<Path<HashMap<String, String>>>;

#[derive(Clone, Copy)]
enum Verb {
    Get,
    Post,
    Delete,
}

/// A route calling the unary method `service/method`.
fn unary(
    verb: Verb,
    service: &'static str,
    method: &'static str,
    input: Input,
) -> MethodRouter<Face> {
    let handler = move |State(face): State<Face>,
                        params: Params,
                        RawQuery(query): RawQuery,
                        headers: HeaderMap,
                        body: Result<Bytes, BytesRejection>| async move {
        let body = match body {
            Ok(b) => b,
            Err(r) => return error_response(&super::too_large(&r.body_text())),
        };
        let call = async {
            let (path, request, output) =
                face.request(service, method, input, params, query, &headers, body)?;
            let answer = face.bridge.unary(&path, request, &headers).await?;
            json_of(&output, answer)
        };
        match call.await {
            Ok(json) => json_response(http::StatusCode::OK, json),
            Err(status) => error_response(&status),
        }
    };
    match verb {
        Verb::Get => axum::routing::get(handler),
        Verb::Post => axum::routing::post(handler),
        Verb::Delete => axum::routing::delete(handler),
    }
}

/// A route streaming the server-streaming method `service/method` as Server-Sent Events:
/// `event: NAME` (the set field of the message's oneof, or its kind) and `data: JSON`, then
/// `event: end` with the call's status.
fn events(service: &'static str, method: &'static str) -> MethodRouter<Face> {
    let handler = move |State(face): State<Face>,
                        params: Params,
                        RawQuery(query): RawQuery,
                        headers: HeaderMap| async move {
        let opened = async {
            let (path, request, output) = face.request(
                service,
                method,
                Input::Query,
                params,
                query,
                &headers,
                Bytes::new(),
            )?;
            let stream = face.bridge.streaming(&path, request, &headers).await?;
            Ok::<_, Status>((stream, output))
        };
        let (stream, output) = match opened.await {
            Ok(s) => s,
            Err(status) => return error_response(&status),
        };
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        tokio::spawn(async move {
            let mut stream = std::pin::pin!(stream);
            let status = loop {
                let item = tokio::select! {
                    item = stream.next() => item,
                    // The client went away: dropping the stream ends the call.
                    _ = tx.closed() => return,
                };
                let event = match item.map(|i| i.and_then(|m| event_of(&output, m))) {
                    Some(Ok(event)) => event,
                    Some(Err(status)) => break status,
                    None => break Status::ok(""),
                };
                if tx.send(event).await.is_err() {
                    return;
                }
            };
            let _ = tx.send(end_event(&status)).await;
        });
        let events = tokio_stream::wrappers::ReceiverStream::new(rx).map(Ok::<_, Infallible>);
        Sse::new(events)
            .keep_alive(KeepAlive::default())
            .into_response()
    };
    axum::routing::get(handler)
}

/// ExportModel as a file download (`default` names the default model): its size, name and
/// SHA-256 in the headers, the bytes streamed as they come.
async fn export(
    State(face): State<Face>,
    Path(model): Path<String>,
    headers: HeaderMap,
) -> Response {
    use crate::proto::v1::{export_model_response::Part, ExportModelRequest, ExportModelResponse};
    let model = if model == "default" {
        String::new()
    } else {
        model
    };
    let request = ExportModelRequest { model }.encode_to_vec().into();
    let path = "/tlb.v1.InferenceService/ExportModel";
    let opened = async {
        let mut stream = Box::pin(face.bridge.streaming(path, request, &headers).await?);
        let first = stream
            .next()
            .await
            .unwrap_or_else(|| Err(Status::internal("no header")))?;
        match ExportModelResponse::decode(first).map(|m| m.part) {
            Ok(Some(Part::Header(h))) => Ok((h, stream)),
            _ => Err(Status::internal(
                "ExportModel did not start with its header",
            )),
        }
    };
    let (header, stream) = match opened.await {
        Ok(o) => o,
        Err(status) => return error_response(&status),
    };
    let chunks = stream.map(|item| {
        let bytes = item.map_err(|s| std::io::Error::other(s.message().to_string()))?;
        match ExportModelResponse::decode(bytes).map(|m| m.part) {
            Ok(Some(Part::Chunk(c))) => Ok(Bytes::from(c)),
            _ => Err(std::io::Error::other(
                "ExportModel sent a part out of order",
            )),
        }
    });
    let disposition = format!("attachment; filename=\"{}\"", header.file_name);
    (
        [
            (
                http::header::CONTENT_TYPE,
                "application/octet-stream".to_string(),
            ),
            (http::header::CONTENT_LENGTH, header.total_bytes.to_string()),
            (http::header::CONTENT_DISPOSITION, disposition),
            (http::HeaderName::from_static("x-tlb-sha256"), header.sha256),
            (http::HeaderName::from_static("x-tlb-model"), header.model),
        ],
        axum::body::Body::from_stream(chunks),
    )
        .into_response()
}

impl Face {
    /// The gRPC path, the encoded request and the response's descriptor of a call.
    #[allow(clippy::too_many_arguments)]
    fn request(
        &self,
        service: &str,
        method: &str,
        input: Input,
        params: Params,
        query: Option<String>,
        headers: &HeaderMap,
        body: Bytes,
    ) -> Result<(String, Bytes, MessageDescriptor), Status> {
        let m = self
            .pool
            .get_service_by_name(service)
            .and_then(|s| s.methods().find(|m| m.name() == method))
            .ok_or_else(|| Status::internal(format!("no method {service}/{method}")))?;
        let mut fields = match input {
            Input::Body => json_body(headers, &body)?,
            Input::Query if !body.is_empty() => {
                return Err(Status::invalid_argument(
                    "this call takes no body: its arguments go in the path and query string",
                ))
            }
            Input::Query => Map::new(),
        };
        for (k, v) in form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
            fields.insert(k.into_owned(), Value::String(v.into_owned()));
        }
        for (k, v) in params.map(|Path(p)| p).unwrap_or_default() {
            match fields.get(&k) {
                Some(Value::String(b)) if *b != v => {
                    return Err(Status::invalid_argument(format!(
                        "{k}: the path says '{v}', the request '{b}'"
                    )))
                }
                _ => fields.insert(k, Value::String(v)),
            };
        }
        let message = DynamicMessage::deserialize(m.input(), Value::Object(fields))
            .map_err(|e| Status::invalid_argument(format!("{}: {e}", m.input().name())))?;
        let path = format!("/{service}/{method}");
        Ok((path, message.encode_to_vec().into(), m.output()))
    }
}

/// The body as a JSON object, refusing other content types and malformed JSON.
fn json_body(headers: &HeaderMap, body: &[u8]) -> Result<Map<String, Value>, Status> {
    if body.is_empty() {
        return Ok(Map::new());
    }
    let (sent, essence) = media_type(headers).unwrap_or_default();
    if essence != "application/json" {
        return Err(Status::invalid_argument(format!(
            "content-type: the body must be application/json, not '{sent}'"
        )));
    }
    match serde_json::from_slice(body) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(Status::invalid_argument("the body must be a JSON object")),
        Err(e) => Err(Status::invalid_argument(format!("malformed JSON: {e}"))),
    }
}

/// The response message as JSON, default values written out.
fn json_of(output: &MessageDescriptor, answer: Bytes) -> Result<Value, Status> {
    to_json(&decode(output, answer)?)
}

fn decode(output: &MessageDescriptor, answer: Bytes) -> Result<DynamicMessage, Status> {
    DynamicMessage::decode(output.clone(), answer)
        .map_err(|e| Status::internal(format!("decoding {}: {e}", output.name())))
}

fn to_json(message: &DynamicMessage) -> Result<Value, Status> {
    let options = SerializeOptions::new().skip_default_fields(false);
    message
        .serialize_with_options(serde_json::value::Serializer, &options)
        .map_err(|e| {
            let name = message.descriptor().name().to_string();
            Status::internal(format!("writing {name} as JSON: {e}"))
        })
}

fn event_of(output: &MessageDescriptor, answer: Bytes) -> Result<Event, Status> {
    let message = decode(output, answer)?;
    let json = to_json(&message)?;
    // A oneof's set field names the event and is its data (JobEvent); otherwise the kind.
    let set = output
        .oneofs()
        .flat_map(|o| o.fields().collect::<Vec<_>>())
        .find(|f| message.has_field(f));
    let (name, data) = match set {
        Some(f) => (f.name().to_string(), json[f.json_name()].clone()),
        None => {
            let kind = json["kind"]
                .as_str()
                .unwrap_or("message")
                .to_ascii_lowercase();
            (kind, json)
        }
    };
    Ok(Event::default().event(name).data(data.to_string()))
}

fn end_event(status: &Status) -> Event {
    Event::default()
        .event("end")
        .data(status_json(status).to_string())
}

/// A status as JSON: `{"code": 3, "status": "INVALID_ARGUMENT", "message": "..."}`.
pub fn status_json(status: &Status) -> Value {
    serde_json::json!({
        "code": status.code() as i32,
        "status": code_name(status.code()),
        "message": status.message(),
    })
}

/// A gRPC error as an HTTP answer: its mapped status and the status as JSON.
pub fn error_response(status: &Status) -> Response {
    json_response(http_status_of(status), status_json(status))
}

/// The descriptors of every tlb.v1 and Open Inference message (and Google's well-known
/// types they use).
pub fn pool() -> anyhow::Result<DescriptorPool> {
    let mut pool = DescriptorPool::global();
    pool.decode_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)?;
    Ok(pool)
}
