//! The REST binding's tensors: JSON `data` arrays and Triton's binary-data extension (the
//! JSON header, then each binary tensor's bytes in order, the header's length in
//! `Inference-Header-Content-Length`) to and from the gRPC messages' raw contents.

use std::collections::HashMap;

use bytes::Bytes;
use serde::Deserialize;
use serde_json::{json, Map, Value};
use tonic::codegen::http::HeaderMap;
use tonic::Status;

use crate::proto::inference as oip;
use oip::infer_parameter::ParameterChoice;

/// The header giving the JSON part's length when binary tensors follow it.
pub const BINARY_HEADER: &str = "inference-header-content-length";

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RestRequest {
    #[serde(default)]
    id: String,
    #[serde(default)]
    parameters: Map<String, Value>,
    inputs: Vec<RestInput>,
    #[serde(default)]
    outputs: Vec<RestOutput>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RestInput {
    name: String,
    shape: Vec<i64>,
    datatype: String,
    #[serde(default)]
    parameters: Map<String, Value>,
    data: Option<Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RestOutput {
    name: String,
    #[serde(default)]
    parameters: Map<String, Value>,
}

/// Which outputs go back as binary data: named ones as asked, the rest as the request's
/// `binary_data_output` says (JSON when unset).
#[derive(Debug)]
pub struct Binary {
    default: bool,
    by_name: HashMap<String, bool>,
}

impl Binary {
    fn wants(&self, name: &str) -> bool {
        self.by_name.get(name).copied().unwrap_or(self.default)
    }
}

fn invalid(message: String) -> Status {
    Status::invalid_argument(message)
}

/// The gRPC request a REST body stands for, and how its outputs want to come back.
pub fn infer_request(
    headers: &HeaderMap,
    body: Bytes,
    model_name: String,
    model_version: String,
) -> Result<(oip::ModelInferRequest, Binary), Status> {
    check_content_type(headers)?;
    let json_len = match headers.get(BINARY_HEADER) {
        None => body.len(),
        Some(v) => v
            .to_str()
            .ok()
            .and_then(|v| v.trim().parse::<usize>().ok())
            .filter(|n| *n <= body.len())
            .ok_or_else(|| {
                invalid(format!(
                    "{BINARY_HEADER}: {v:?} is not a length within the {} bytes of the body",
                    body.len()
                ))
            })?,
    };
    let mut request: RestRequest = serde_json::from_slice(&body[..json_len])
        .map_err(|e| invalid(format!("malformed inference request JSON: {e}")))?;
    let mut tail = body.slice(json_len..);
    let mut inputs = Vec::with_capacity(request.inputs.len());
    let mut raw = Vec::with_capacity(request.inputs.len());
    for (i, mut input) in request.inputs.into_iter().enumerate() {
        let at = format!("inputs[{i}] ({})", input.name);
        let size = input.parameters.remove("binary_data_size");
        raw.push(match (size, &input.data) {
            (Some(n), None) => {
                let n = n
                    .as_u64()
                    .and_then(|n| usize::try_from(n).ok())
                    .ok_or_else(|| invalid(format!("{at}: binary_data_size {n} is not a size")))?;
                if n > tail.len() {
                    return Err(invalid(format!(
                        "{at}: binary_data_size {n}, but only {} bytes follow",
                        tail.len()
                    )));
                }
                tail.split_to(n).to_vec()
            }
            (None, Some(data)) => json_to_raw(&input.datatype, data, &at)?,
            (Some(_), Some(_)) => {
                return Err(invalid(format!("{at}: both `data` and binary_data_size")))
            }
            (None, None) => {
                return Err(invalid(format!(
                    "{at}: no data: give `data` or parameters.binary_data_size"
                )))
            }
        });
        inputs.push(oip::model_infer_request::InferInputTensor {
            parameters: parameters(input.parameters, &at)?,
            name: input.name,
            datatype: input.datatype,
            shape: input.shape,
            contents: None,
        });
    }
    if !tail.is_empty() {
        return Err(invalid(format!(
            "{} bytes follow the binary inputs that no input's binary_data_size claims",
            tail.len()
        )));
    }
    let default = match request.parameters.remove("binary_data_output") {
        None => false,
        Some(Value::Bool(b)) => b,
        Some(v) => {
            return Err(invalid(format!(
                "parameters.binary_data_output: {v} is not a bool"
            )))
        }
    };
    let mut binary = Binary {
        default,
        by_name: HashMap::new(),
    };
    let mut outputs = Vec::with_capacity(request.outputs.len());
    for (i, mut o) in request.outputs.into_iter().enumerate() {
        let at = format!("outputs[{i}] ({})", o.name);
        match o.parameters.remove("binary_data") {
            None => {}
            Some(Value::Bool(b)) => {
                binary.by_name.insert(o.name.clone(), b);
            }
            Some(v) => return Err(invalid(format!("{at}: binary_data {v} is not a bool"))),
        }
        outputs.push(oip::model_infer_request::InferRequestedOutputTensor {
            parameters: parameters(o.parameters, &at)?,
            name: o.name,
        });
    }
    let request = oip::ModelInferRequest {
        model_name,
        model_version,
        id: request.id,
        parameters: parameters(request.parameters, "parameters")?,
        inputs,
        outputs,
        raw_input_contents: raw,
    };
    Ok((request, binary))
}

/// The body is JSON, or JSON and binary tensors; a form or text is refused.
fn check_content_type(headers: &HeaderMap) -> Result<(), Status> {
    let Some((sent, essence)) = super::media_type(headers) else {
        return Ok(());
    };
    match essence.as_str() {
        "application/json" | "application/octet-stream" | "" => Ok(()),
        _ => Err(invalid(format!(
            "content-type: '{sent}' is not application/json or application/octet-stream"
        ))),
    }
}

fn parameters(
    map: Map<String, Value>,
    at: &str,
) -> Result<HashMap<String, oip::InferParameter>, Status> {
    map.into_iter()
        .map(|(k, v)| {
            let choice = match &v {
                Value::Bool(b) => ParameterChoice::BoolParam(*b),
                Value::String(s) => ParameterChoice::StringParam(s.clone()),
                Value::Number(n) if n.is_i64() => {
                    ParameterChoice::Int64Param(n.as_i64().unwrap_or(0))
                }
                _ => {
                    return Err(invalid(format!(
                        "{at}.parameters.{k}: {v} is not a bool, an integer or a string"
                    )))
                }
            };
            Ok((
                k,
                oip::InferParameter {
                    parameter_choice: Some(choice),
                },
            ))
        })
        .collect()
}

fn parameter_json(p: &oip::InferParameter) -> Value {
    match &p.parameter_choice {
        Some(ParameterChoice::BoolParam(b)) => json!(b),
        Some(ParameterChoice::Int64Param(n)) => json!(n),
        Some(ParameterChoice::StringParam(s)) => json!(s),
        None => Value::Null,
    }
}

/// Every leaf of a (possibly nested) JSON array, in row-major order.
fn flatten<'a>(v: &'a Value, out: &mut Vec<&'a Value>) {
    match v {
        Value::Array(items) => items.iter().for_each(|i| flatten(i, out)),
        leaf => out.push(leaf),
    }
}

/// A JSON `data` array as the tensor's raw little-endian bytes (BYTES: each element's
/// length as 4 bytes, then its bytes, as Triton lays them out).
fn json_to_raw(datatype: &str, data: &Value, at: &str) -> Result<Vec<u8>, Status> {
    let mut leaves = Vec::new();
    flatten(data, &mut leaves);
    let mut out = Vec::with_capacity(leaves.len() * 4);
    for (k, v) in leaves.into_iter().enumerate() {
        let bad = || invalid(format!("{at}: data[{k}] = {v} is not a {datatype}"));
        macro_rules! int {
            ($t:ty) => {{
                let n = v
                    .as_i64()
                    .map(i128::from)
                    .or_else(|| v.as_u64().map(i128::from));
                let n = n.and_then(|n| <$t>::try_from(n).ok()).ok_or_else(bad)?;
                out.extend_from_slice(&n.to_le_bytes());
            }};
        }
        match datatype {
            "BOOL" => out.push(u8::from(v.as_bool().ok_or_else(bad)?)),
            "UINT8" => int!(u8),
            "UINT16" => int!(u16),
            "UINT32" => int!(u32),
            "UINT64" => int!(u64),
            "INT8" => int!(i8),
            "INT16" => int!(i16),
            "INT32" => int!(i32),
            "INT64" => int!(i64),
            "FP32" => out.extend_from_slice(&(v.as_f64().ok_or_else(bad)? as f32).to_le_bytes()),
            "FP64" => out.extend_from_slice(&v.as_f64().ok_or_else(bad)?.to_le_bytes()),
            "BYTES" => {
                let s = v.as_str().ok_or_else(bad)?;
                out.extend_from_slice(&(s.len() as u32).to_le_bytes());
                out.extend_from_slice(s.as_bytes());
            }
            other => {
                return Err(invalid(format!(
                    "{at}: {other} data cannot be JSON; send it as binary data"
                )))
            }
        }
    }
    Ok(out)
}

/// Raw little-endian bytes of a tensor as a flat JSON array.
fn raw_to_json(datatype: &str, raw: &[u8]) -> Result<Value, Status> {
    macro_rules! each {
        ($t:ty) => {{
            const N: usize = std::mem::size_of::<$t>();
            raw.chunks_exact(N)
                .map(|c| json!(<$t>::from_le_bytes(c.try_into().expect("N bytes"))))
                .collect::<Vec<_>>()
        }};
    }
    let values = match datatype {
        "BOOL" => raw.iter().map(|b| json!(*b != 0)).collect(),
        "UINT8" => each!(u8),
        "UINT16" => each!(u16),
        "UINT32" => each!(u32),
        "UINT64" => each!(u64),
        "INT8" => each!(i8),
        "INT16" => each!(i16),
        "INT32" => each!(i32),
        "INT64" => each!(i64),
        "FP32" => each!(f32),
        "FP64" => each!(f64),
        "BYTES" => {
            let mut out = Vec::new();
            let mut rest = raw;
            while rest.len() >= 4 {
                let n = u32::from_le_bytes(rest[..4].try_into().expect("4 bytes")) as usize;
                let item = rest
                    .get(4..4 + n)
                    .ok_or_else(|| Status::internal("a BYTES output ends inside an element"))?;
                out.push(json!(String::from_utf8_lossy(item)));
                rest = &rest[4 + n..];
            }
            out
        }
        other => {
            return Err(Status::internal(format!(
                "{other} outputs have no JSON form"
            )))
        }
    };
    Ok(Value::Array(values))
}

/// The REST answer: JSON, and the binary outputs' bytes to follow it (when any output is
/// binary).
pub fn infer_response(
    r: oip::ModelInferResponse,
    binary: &Binary,
) -> Result<(Value, Option<Vec<u8>>), Status> {
    let mut tail: Option<Vec<u8>> = None;
    let mut outputs = Vec::with_capacity(r.outputs.len());
    for (i, o) in r.outputs.iter().enumerate() {
        let raw = r.raw_output_contents.get(i).ok_or_else(|| {
            Status::internal(format!("output {} came without its contents", o.name))
        })?;
        let mut params: Map<String, Value> = o
            .parameters
            .iter()
            .map(|(k, v)| (k.clone(), parameter_json(v)))
            .collect();
        let mut out = json!({ "name": o.name, "datatype": o.datatype, "shape": o.shape });
        if binary.wants(&o.name) {
            params.insert("binary_data_size".into(), json!(raw.len()));
            tail.get_or_insert_with(Vec::new).extend_from_slice(raw);
        } else {
            out["data"] = raw_to_json(&o.datatype, raw)?;
        }
        if !params.is_empty() {
            out["parameters"] = Value::Object(params);
        }
        outputs.push(out);
    }
    let params: Map<String, Value> = r
        .parameters
        .iter()
        .map(|(k, v)| (k.clone(), parameter_json(v)))
        .collect();
    let body = json!({
        "model_name": r.model_name,
        "model_version": r.model_version,
        "id": r.id,
        "parameters": params,
        "outputs": outputs,
    });
    Ok((body, tail))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_data_becomes_little_endian_bytes_and_back() {
        let nested = json!([[1, 2], [3, 255]]);
        assert_eq!(
            json_to_raw("UINT8", &nested, "x").unwrap(),
            vec![1, 2, 3, 255]
        );
        let err = json_to_raw("UINT8", &json!([1, 256]), "inputs[0] (images)").unwrap_err();
        assert!(
            err.message().contains("data[1] = 256 is not a UINT8"),
            "{err:?}"
        );
        let f = json_to_raw("FP32", &json!([0.5, -2.0]), "x").unwrap();
        assert_eq!(raw_to_json("FP32", &f).unwrap(), json!([0.5, -2.0]));
        let s = json_to_raw("BYTES", &json!(["cat", ""]), "x").unwrap();
        assert_eq!(s, b"\x03\0\0\0cat\0\0\0\0".to_vec());
        assert_eq!(raw_to_json("BYTES", &s).unwrap(), json!(["cat", ""]));
        assert!(json_to_raw("FP16", &json!([1]), "x").is_err());
        assert!(json_to_raw("INT8", &json!(["1"]), "x").is_err());
    }

    #[test]
    fn binary_inputs_are_cut_from_after_the_json() {
        let head = r#"{"inputs":[{"name":"a","shape":[2],"datatype":"UINT8","parameters":{"binary_data_size":2}},
            {"name":"b","shape":[1],"datatype":"UINT8","data":[7]}],"parameters":{"binary_data_output":true},
            "outputs":[{"name":"p","parameters":{"binary_data":false}}]}"#;
        let mut body = head.as_bytes().to_vec();
        body.extend_from_slice(&[9, 8]);
        let mut headers = HeaderMap::new();
        headers.insert(BINARY_HEADER, head.len().to_string().parse().unwrap());
        let (r, binary) =
            infer_request(&headers, body.clone().into(), "m".into(), "".into()).unwrap();
        assert_eq!(r.raw_input_contents, vec![vec![9, 8], vec![7]]);
        assert!(
            r.inputs[0].parameters.is_empty(),
            "binary_data_size is the REST layer's"
        );
        assert!(binary.wants("q") && !binary.wants("p"));
        // A claimed size past the body, and bytes no input claims, are refused.
        body.push(1);
        let extra = infer_request(&headers, body.into(), "m".into(), "".into()).unwrap_err();
        assert!(extra.message().contains("1 bytes follow"), "{extra:?}");
        headers.insert(BINARY_HEADER, "99999".parse().unwrap());
        assert!(infer_request(&headers, head.into(), "m".into(), "".into()).is_err());
        headers.insert(
            tonic::codegen::http::header::CONTENT_TYPE,
            "text/plain".parse().unwrap(),
        );
        let typed = infer_request(&headers, head.into(), "m".into(), "".into()).unwrap_err();
        assert!(typed.message().starts_with("content-type:"), "{typed:?}");
    }
}
