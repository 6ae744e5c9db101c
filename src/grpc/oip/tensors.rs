//! Open Inference Protocol tensors: the request's inputs as images, requested outputs, and the
//! answer as raw little-endian tensors (BYTES elements length-prefixed, 4 bytes LE).

use crate::error::ApiError;
use crate::grpc::MAX_BATCH;
use crate::proto::inference as oip;
use crate::proto::v1 as pb;

pub const IMAGES: &str = "images";
pub const ENCODED: &str = "encoded_images";
pub const PROBABILITIES: &str = "probabilities";
pub const ATTENTION: &str = "attention";
pub const LABELS: &str = "labels";
/// Outputs answered when a request names none.
pub const DEFAULT_OUTPUTS: [&str; 2] = [PROBABILITIES, LABELS];

fn bad(field: &str, message: impl std::fmt::Display) -> ApiError {
    ApiError::field(field, message)
}

fn what_inputs() -> &'static str {
    "the model takes one input: `images` (UINT8, shape [batch, height, width, 3], RGB) or \
     `encoded_images` (BYTES, shape [batch]: PNG or JPEG files)"
}

/// The images of a ModelInfer request, as `tlb.v1` images (decoded later, like Classify's).
pub fn images(r: &mut oip::ModelInferRequest) -> Result<Vec<pb::Image>, ApiError> {
    let raw = std::mem::take(&mut r.raw_input_contents);
    if !raw.is_empty() && raw.len() != r.inputs.len() {
        return Err(bad(
            "raw_input_contents",
            format!("has {} entries for {} inputs", raw.len(), r.inputs.len()),
        ));
    }
    let [input] = r.inputs.as_mut_slice() else {
        return Err(bad(
            "inputs",
            format!("{} inputs given; {}", r.inputs.len(), what_inputs()),
        ));
    };
    let field = format!("inputs[0] ({})", input.name);
    let bytes = raw.into_iter().next();
    if bytes.is_some() && input.contents.is_some() {
        return Err(bad(
            &field,
            "has both contents and raw_input_contents; send one",
        ));
    }
    match input.name.as_str() {
        IMAGES => raw_images(&field, input, bytes),
        ENCODED => encoded_images(&field, input, bytes),
        other => Err(bad(
            &field,
            format!("unknown input '{other}'; {}", what_inputs()),
        )),
    }
}

/// `images`: UINT8 `[batch, height, width, 3]`, RGB8 pixels.
fn raw_images(
    field: &str,
    input: &mut oip::model_infer_request::InferInputTensor,
    bytes: Option<Vec<u8>>,
) -> Result<Vec<pb::Image>, ApiError> {
    let shape = &input.shape;
    if input.datatype != "UINT8" {
        return Err(bad(
            field,
            format!("datatype is {}; it must be UINT8", input.datatype),
        ));
    }
    let [n, h, w, 3] = shape[..] else {
        return Err(bad(
            field,
            format!("shape is {shape:?}; it must be [batch, height, width, 3]"),
        ));
    };
    if n <= 0 || h <= 0 || w <= 0 {
        return Err(bad(
            field,
            format!("shape {shape:?} has an empty dimension"),
        ));
    }
    let (n, h, w) = (n as usize, h as usize, w as usize);
    let per_image = h
        .checked_mul(w)
        .and_then(|p| p.checked_mul(3))
        .ok_or_else(|| bad(field, format!("shape {shape:?} is too large")))?;
    let data = match bytes {
        Some(b) => b,
        None => uint8_contents(field, input.contents.take())?,
    };
    if Some(data.len()) != per_image.checked_mul(n) {
        return Err(bad(
            field,
            format!(
                "holds {} bytes; shape {:?} of UINT8 needs {}",
                data.len(),
                input.shape,
                per_image.saturating_mul(n)
            ),
        ));
    }
    within_batch_limit(n)?;
    Ok(data
        .chunks_exact(per_image)
        .map(|rgb8| pb::Image {
            source: Some(pb::image::Source::Raw(pb::RawImage {
                width: w as u32,
                height: h as u32,
                rgb8: rgb8.to_vec(),
            })),
        })
        .collect())
}

/// `encoded_images`: BYTES `[batch]` (or `[batch, 1]`), one PNG or JPEG file each.
fn encoded_images(
    field: &str,
    input: &mut oip::model_infer_request::InferInputTensor,
    bytes: Option<Vec<u8>>,
) -> Result<Vec<pb::Image>, ApiError> {
    let shape = &input.shape;
    if input.datatype != "BYTES" {
        return Err(bad(
            field,
            format!("datatype is {}; it must be BYTES", input.datatype),
        ));
    }
    let n = match shape[..] {
        [n] | [n, 1] if n > 0 => n as usize,
        _ => {
            return Err(bad(
                field,
                format!("shape is {shape:?}; it must be [batch] (or [batch, 1])"),
            ))
        }
    };
    // Counted before any element is copied out.
    let held = match &bytes {
        Some(b) => bytes_elements(field, b).try_fold(0, |n, e| e.map(|_| n + 1))?,
        None => input
            .contents
            .as_ref()
            .map_or(0, |c| c.bytes_contents.len()),
    };
    if held != n {
        return Err(bad(
            field,
            format!("holds {held} elements; shape {shape:?} needs {n}"),
        ));
    }
    within_batch_limit(n)?;
    let files: Vec<Vec<u8>> = match bytes {
        Some(b) => bytes_elements(field, &b)
            .map(|e| e.map(<[u8]>::to_vec))
            .collect::<Result<_, _>>()?,
        None => input
            .contents
            .take()
            .map(|c| c.bytes_contents)
            .unwrap_or_default(),
    };
    Ok(files
        .into_iter()
        .map(|f| pb::Image {
            source: Some(pb::image::Source::Encoded(f)),
        })
        .collect())
}

/// UINT8 elements sent as typed contents (`uint_contents`, one element per entry).
fn uint8_contents(
    field: &str,
    contents: Option<oip::InferTensorContents>,
) -> Result<Vec<u8>, ApiError> {
    let values = contents.map(|c| c.uint_contents).unwrap_or_default();
    values
        .into_iter()
        .map(|v| u8::try_from(v).map_err(|_| bad(field, format!("element {v} is not a UINT8"))))
        .collect()
}

/// BYTES elements of a raw tensor: each a 4-byte little-endian length, then that many bytes.
fn bytes_elements<'a>(
    field: &'a str,
    mut raw: &'a [u8],
) -> impl Iterator<Item = Result<&'a [u8], ApiError>> + 'a {
    std::iter::from_fn(move || {
        if raw.is_empty() {
            return None;
        }
        let Some((len, rest)) = raw.split_first_chunk::<4>() else {
            raw = &[];
            return Some(Err(bad(field, "ends inside a 4-byte element length")));
        };
        let len = u32::from_le_bytes(*len) as usize;
        if rest.len() < len {
            let remain = rest.len();
            raw = &[];
            return Some(Err(bad(
                field,
                format!("an element says {len} bytes but {remain} remain"),
            )));
        }
        let (element, rest) = rest.split_at(len);
        raw = rest;
        Some(Ok(element))
    })
}

/// The images of one request are counted before they are split out of its tensor.
fn within_batch_limit(n: usize) -> Result<(), ApiError> {
    if n > MAX_BATCH {
        return Err(ApiError::ResourceExhausted(format!(
            "inputs[0]: {n} images in one request; the limit is {MAX_BATCH}"
        )));
    }
    Ok(())
}

/// The outputs a request asks for, in its order (the default ones when it names none).
pub fn requested_outputs(r: &oip::ModelInferRequest) -> Result<Vec<&'static str>, ApiError> {
    if r.outputs.is_empty() {
        return Ok(DEFAULT_OUTPUTS.to_vec());
    }
    let mut names = Vec::with_capacity(r.outputs.len());
    for (i, o) in r.outputs.iter().enumerate() {
        let name = [PROBABILITIES, ATTENTION, LABELS]
            .into_iter()
            .find(|n| *n == o.name)
            .ok_or_else(|| {
                bad(
                    &format!("outputs[{i}]"),
                    format!(
                        "unknown output '{}'; the model has `probabilities`, `attention` \
                         and `labels`",
                        o.name
                    ),
                )
            })?;
        if names.contains(&name) {
            return Err(bad(
                &format!("outputs[{i}]"),
                format!("'{name}' asked twice"),
            ));
        }
        names.push(name);
    }
    Ok(names)
}

/// An FP32 output tensor and its raw contents.
pub fn fp32(name: &str, shape: Vec<i64>, values: impl IntoIterator<Item = f32>) -> Output {
    Output {
        tensor: tensor(name, "FP32", shape),
        raw: values.into_iter().flat_map(f32::to_le_bytes).collect(),
    }
}

/// A BYTES output tensor of strings.
pub fn strings<'a>(name: &str, values: impl IntoIterator<Item = &'a str>) -> Output {
    let mut raw = Vec::new();
    let mut n = 0;
    for v in values {
        raw.extend((v.len() as u32).to_le_bytes());
        raw.extend(v.as_bytes());
        n += 1;
    }
    Output {
        tensor: tensor(name, "BYTES", vec![n]),
        raw,
    }
}

fn tensor(
    name: &str,
    datatype: &str,
    shape: Vec<i64>,
) -> oip::model_infer_response::InferOutputTensor {
    oip::model_infer_response::InferOutputTensor {
        name: name.into(),
        datatype: datatype.into(),
        shape,
        ..Default::default()
    }
}

/// One output of a ModelInfer answer.
pub struct Output {
    pub tensor: oip::model_infer_response::InferOutputTensor,
    pub raw: Vec<u8>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use oip::model_infer_request::{InferInputTensor, InferRequestedOutputTensor};

    fn request(
        name: &str,
        datatype: &str,
        shape: Vec<i64>,
        raw: Vec<u8>,
    ) -> oip::ModelInferRequest {
        oip::ModelInferRequest {
            inputs: vec![InferInputTensor {
                name: name.into(),
                datatype: datatype.into(),
                shape,
                ..Default::default()
            }],
            raw_input_contents: vec![raw],
            ..Default::default()
        }
    }

    fn message(e: ApiError) -> String {
        tonic::Status::from(e).message().to_string()
    }

    #[test]
    fn uint8_images_split_per_image_and_sizes_are_checked() {
        let mut r = request(IMAGES, "UINT8", vec![2, 2, 3, 3], (0..36).collect());
        let split = images(&mut r).unwrap();
        assert_eq!(split.len(), 2);
        let Some(pb::image::Source::Raw(second)) = &split[1].source else {
            panic!()
        };
        assert_eq!((second.width, second.height, second.rgb8[0]), (3, 2, 18));
        let mut short = request(IMAGES, "UINT8", vec![2, 2, 3, 3], vec![0; 35]);
        let e = message(images(&mut short).unwrap_err());
        assert!(
            e.contains("holds 35 bytes") && e.contains("needs 36"),
            "{e}"
        );
        let mut fp = request(IMAGES, "FP32", vec![1, 1, 1, 3], vec![0; 12]);
        assert!(message(images(&mut fp).unwrap_err()).contains("must be UINT8"));
        let mut gray = request(IMAGES, "UINT8", vec![1, 2, 2], vec![0; 4]);
        assert!(message(images(&mut gray).unwrap_err()).contains("[batch, height, width, 3]"));
    }

    #[test]
    fn bytes_elements_are_length_prefixed() {
        let mut raw = Vec::new();
        for file in [&b"png-one"[..], b"2"] {
            raw.extend((file.len() as u32).to_le_bytes());
            raw.extend(file);
        }
        let mut r = request(ENCODED, "BYTES", vec![2], raw.clone());
        let files: Vec<_> = images(&mut r)
            .unwrap()
            .into_iter()
            .map(|i| match i.source {
                Some(pb::image::Source::Encoded(b)) => b,
                _ => panic!(),
            })
            .collect();
        assert_eq!(files, vec![b"png-one".to_vec(), b"2".to_vec()]);
        let mut cut = request(ENCODED, "BYTES", vec![2], raw[..raw.len() - 1].to_vec());
        assert!(message(images(&mut cut).unwrap_err()).contains("remain"));
        let mut three = request(ENCODED, "BYTES", vec![3], raw);
        assert!(message(images(&mut three).unwrap_err()).contains("holds 2 elements"));
    }

    #[test]
    fn more_images_than_a_request_may_hold_are_refused_before_they_are_split() {
        let n = MAX_BATCH + 1;
        let mut raw = request(IMAGES, "UINT8", vec![n as i64, 1, 1, 3], vec![0; 3 * n]);
        let e = images(&mut raw).unwrap_err();
        assert!(
            matches!(&e, ApiError::ResourceExhausted(m) if m.contains("257 images")),
            "{e:?}"
        );
        let mut files = request(ENCODED, "BYTES", vec![n as i64], [0u8; 4].repeat(n));
        let e = images(&mut files).unwrap_err();
        assert!(
            matches!(&e, ApiError::ResourceExhausted(m) if m.contains("257 images")),
            "{e:?}"
        );
        // A size mismatch is still the argument error it was.
        let mut short = request(ENCODED, "BYTES", vec![n as i64 + 1], [0u8; 4].repeat(n));
        assert!(message(images(&mut short).unwrap_err()).contains("holds 257 elements"));
    }

    #[test]
    fn outputs_default_in_order_and_unknown_or_repeated_ones_are_refused() {
        let mut r = oip::ModelInferRequest::default();
        assert_eq!(requested_outputs(&r).unwrap(), DEFAULT_OUTPUTS.to_vec());
        let ask = |n: &str| InferRequestedOutputTensor {
            name: n.into(),
            ..Default::default()
        };
        r.outputs = vec![ask(ATTENTION), ask(LABELS)];
        assert_eq!(requested_outputs(&r).unwrap(), vec![ATTENTION, LABELS]);
        r.outputs.push(ask(ATTENTION));
        assert!(message(requested_outputs(&r).unwrap_err()).contains("asked twice"));
        r.outputs = vec![ask("logits")];
        assert!(message(requested_outputs(&r).unwrap_err()).contains("unknown output 'logits'"));
        let s = strings(LABELS, ["cat", ""]);
        assert_eq!(s.raw, [3, 0, 0, 0, b'c', b'a', b't', 0, 0, 0, 0]);
        assert_eq!(s.tensor.shape, vec![2]);
    }
}
