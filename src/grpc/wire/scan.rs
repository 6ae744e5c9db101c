//! A look at a request's protobuf wire format before prost decodes it: how many entries each
//! repeated field holds and about how much memory the decoded message would take. A message
//! of a few bytes per entry (an empty `Image` is 2 bytes on the wire) would otherwise become
//! tens of bytes per entry in memory before any handler could count them.
//!
//! The schema comes from the descriptor set the server already serves by reflection. Wire
//! data the scan cannot follow is left to prost, whose error the client then gets unchanged.

use std::collections::{HashMap, HashSet};
use std::sync::LazyLock;

use prost::Message;
use prost_types::field_descriptor_proto::{Label, Type};

/// Most entries in one repeated field of messages, strings or bytes, in one message.
pub const MAX_REPEATED_ENTRIES: usize = 1024;
/// Most memory a request may take once decoded (an estimate from its wire format).
pub const MAX_DECODED_BYTES: usize = 2 * super::super::MAX_MESSAGE_BYTES;
/// What one decoded message entry is counted as, besides its contents (an upper bound of
/// the generated structs' sizes).
const MESSAGE_ENTRY_BYTES: usize = 256;
/// What one decoded string or bytes entry is counted as, besides its contents (a `Vec`).
const VEC_ENTRY_BYTES: usize = 24;
/// Nesting the scan follows (the requests here nest 4 deep; prost's own limit is 100).
const MAX_DEPTH: usize = 32;

#[derive(Debug)]
enum Kind {
    Message(String),
    /// Strings and bytes.
    Bytes,
    /// A scalar of this many bytes in memory; `varint` when each is a varint on the wire.
    Scalar {
        size: usize,
        varint: bool,
    },
}

#[derive(Debug)]
struct Field {
    name: String,
    repeated: bool,
    kind: Kind,
}

#[derive(Default)]
struct Schema {
    /// Fields by number, per message (full name without the leading dot).
    messages: HashMap<String, HashMap<u32, Field>>,
    /// The messages that RPCs take as requests: the only ones scanned.
    requests: HashSet<String>,
}

static SCHEMA: LazyLock<Schema> = LazyLock::new(|| {
    let set = prost_types::FileDescriptorSet::decode(crate::proto::FILE_DESCRIPTOR_SET)
        .expect("the build's descriptor set decodes");
    Schema::from(set)
});

impl From<prost_types::FileDescriptorSet> for Schema {
    fn from(set: prost_types::FileDescriptorSet) -> Self {
        let mut schema = Schema::default();
        for file in set.file {
            let package = file.package().to_string();
            for service in &file.service {
                for method in &service.method {
                    let input = method.input_type().trim_start_matches('.');
                    schema.requests.insert(input.to_string());
                }
            }
            for message in &file.message_type {
                schema.add(&package, message);
            }
        }
        schema
    }
}

impl Schema {
    fn add(&mut self, scope: &str, message: &prost_types::DescriptorProto) {
        let name = format!("{scope}.{}", message.name());
        let fields = message
            .field
            .iter()
            .map(|f| {
                let kind = match f.r#type() {
                    Type::Message | Type::Group => {
                        Kind::Message(f.type_name().trim_start_matches('.').to_string())
                    }
                    Type::String | Type::Bytes => Kind::Bytes,
                    Type::Double | Type::Fixed64 | Type::Sfixed64 => Kind::Scalar {
                        size: 8,
                        varint: false,
                    },
                    Type::Float | Type::Fixed32 | Type::Sfixed32 => Kind::Scalar {
                        size: 4,
                        varint: false,
                    },
                    Type::Int64 | Type::Uint64 | Type::Sint64 => Kind::Scalar {
                        size: 8,
                        varint: true,
                    },
                    Type::Bool => Kind::Scalar {
                        size: 1,
                        varint: true,
                    },
                    Type::Int32 | Type::Uint32 | Type::Sint32 | Type::Enum => Kind::Scalar {
                        size: 4,
                        varint: true,
                    },
                };
                let field = Field {
                    name: f.name().to_string(),
                    repeated: f.label() == Label::Repeated,
                    kind,
                };
                (f.number() as u32, field)
            })
            .collect();
        self.messages.insert(name.clone(), fields);
        for nested in &message.nested_type {
            self.add(&name, nested);
        }
    }
}

/// Why a request is refused before decoding.
#[derive(Debug, PartialEq)]
pub enum Refusal {
    /// A repeated field with too many entries (its dotted path).
    TooManyEntries(String),
    /// The decoded message would take about this many bytes.
    TooLarge(usize),
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::TooManyEntries(path) => write!(
                f,
                "{path}: more than {MAX_REPEATED_ENTRIES} entries in one request; refused \
                 before decoding"
            ),
            Refusal::TooLarge(bytes) => write!(
                f,
                "the request would take about {} MiB of memory once decoded (the limit is {} \
                 MiB); send images as raw bytes (raw_input_contents or RawImage) rather than \
                 one number per value",
                bytes >> 20,
                MAX_DECODED_BYTES >> 20
            ),
        }
    }
}

/// Checks the encoded request `message` (protobuf type `name`, e.g. `tlb.v1.ClassifyRequest`)
/// against the limits above. Messages that are not requests pass unscanned.
pub fn check(name: &str, message: &[u8]) -> Result<(), Refusal> {
    check_with(&SCHEMA, name, message)
}

fn check_with(schema: &Schema, name: &str, message: &[u8]) -> Result<(), Refusal> {
    if !schema.requests.contains(name) {
        return Ok(());
    }
    let mut scan = Scan { schema, decoded: 0 };
    scan.message(name, message, "", 0)
}

struct Scan<'a> {
    schema: &'a Schema,
    decoded: usize,
}

impl Scan<'_> {
    fn add(&mut self, bytes: usize) -> Result<(), Refusal> {
        self.decoded = self.decoded.saturating_add(bytes);
        if self.decoded > MAX_DECODED_BYTES {
            return Err(Refusal::TooLarge(self.decoded));
        }
        Ok(())
    }

    /// Walks one message. Wire data that does not parse ends the walk quietly (prost will
    /// say what is wrong with it).
    fn message(
        &mut self,
        name: &str,
        mut buf: &[u8],
        path: &str,
        depth: usize,
    ) -> Result<(), Refusal> {
        let Some(fields) = self.schema.messages.get(name) else {
            return Ok(());
        };
        if depth > MAX_DEPTH {
            return Ok(());
        }
        let mut entries: HashMap<u32, usize> = HashMap::new();
        while !buf.is_empty() {
            let Some(key) = varint(&mut buf) else {
                return Ok(());
            };
            let (number, wire) = ((key >> 3) as u32, key & 7);
            let field = fields.get(&number);
            let body = match wire {
                0 => varint(&mut buf).map(|_| &[][..]),
                1 => take(&mut buf, 8),
                5 => take(&mut buf, 4),
                2 => varint(&mut buf).and_then(|len| take(&mut buf, usize::try_from(len).ok()?)),
                _ => None,
            };
            let (Some(body), Some(field)) = (body, field) else {
                if body.is_none() {
                    return Ok(());
                }
                continue;
            };
            let here = || {
                if path.is_empty() {
                    field.name.clone()
                } else {
                    format!("{path}.{}", field.name)
                }
            };
            match (&field.kind, wire) {
                (Kind::Message(inner), 2) => {
                    self.count(&mut entries, number, field, &here)?;
                    self.add(MESSAGE_ENTRY_BYTES)?;
                    self.message(inner, body, &here(), depth + 1)?;
                }
                (Kind::Bytes, 2) => {
                    self.count(&mut entries, number, field, &here)?;
                    self.add(VEC_ENTRY_BYTES + body.len())?;
                }
                // A packed run of scalars.
                (Kind::Scalar { size, varint }, 2) => {
                    let n = if *varint {
                        body.iter().filter(|b| **b < 0x80).count()
                    } else {
                        body.len() / size
                    };
                    self.add(n * size)?;
                }
                (Kind::Scalar { size, .. }, _) => self.add(*size)?,
                // A wire type that does not fit the field: prost refuses it.
                _ => return Ok(()),
            }
        }
        Ok(())
    }

    fn count(
        &mut self,
        entries: &mut HashMap<u32, usize>,
        number: u32,
        field: &Field,
        here: &dyn Fn() -> String,
    ) -> Result<(), Refusal> {
        if !field.repeated {
            return Ok(());
        }
        let n = entries.entry(number).or_default();
        *n += 1;
        if *n > MAX_REPEATED_ENTRIES {
            return Err(Refusal::TooManyEntries(here()));
        }
        Ok(())
    }
}

fn varint(buf: &mut &[u8]) -> Option<u64> {
    let mut value = 0u64;
    for (i, b) in buf.iter().enumerate().take(10) {
        value |= u64::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            *buf = &buf[i + 1..];
            return Some(value);
        }
    }
    None
}

fn take<'a>(buf: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
    if buf.len() < n {
        return None;
    }
    let (head, rest) = buf.split_at(n);
    *buf = rest;
    Some(head)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::inference as oip;
    use crate::proto::v1 as pb;
    use oip::model_infer_request::InferInputTensor;

    fn classify(images: usize) -> Vec<u8> {
        pb::ClassifyRequest {
            images: vec![pb::Image::default(); images],
            ..Default::default()
        }
        .encode_to_vec()
    }

    #[test]
    fn repeated_entries_are_counted_per_field_before_decoding() {
        assert_eq!(
            check("tlb.v1.ClassifyRequest", &classify(MAX_REPEATED_ENTRIES)),
            Ok(())
        );
        assert_eq!(
            check(
                "tlb.v1.ClassifyRequest",
                &classify(MAX_REPEATED_ENTRIES + 1)
            ),
            Err(Refusal::TooManyEntries("images".into()))
        );
        // Nested: bytes elements inside the first input's contents.
        let r = oip::ModelInferRequest {
            inputs: vec![InferInputTensor {
                contents: Some(oip::InferTensorContents {
                    bytes_contents: vec![vec![]; MAX_REPEATED_ENTRIES + 1],
                    ..Default::default()
                }),
                ..Default::default()
            }],
            ..Default::default()
        };
        assert_eq!(
            check("inference.ModelInferRequest", &r.encode_to_vec()),
            Err(Refusal::TooManyEntries(
                "inputs.contents.bytes_contents".into()
            ))
        );
        // Responses are not scanned (the client decodes them).
        let many = pb::ClassifyResponse {
            results: vec![pb::ClassifyResult::default(); 2 * MAX_REPEATED_ENTRIES],
            ..Default::default()
        };
        assert_eq!(
            check("tlb.v1.ClassifyResponse", &many.encode_to_vec()),
            Ok(())
        );
    }

    #[test]
    fn packed_scalars_are_weighed_by_their_decoded_size() {
        // One byte per int64 on the wire, eight in memory.
        let values = MAX_DECODED_BYTES / 8 + 1;
        let r = oip::ModelInferRequest {
            inputs: vec![InferInputTensor {
                shape: vec![1; values],
                ..Default::default()
            }],
            ..Default::default()
        };
        let refused = check("inference.ModelInferRequest", &r.encode_to_vec());
        assert!(
            matches!(refused, Err(Refusal::TooLarge(b)) if b > MAX_DECODED_BYTES),
            "{refused:?}"
        );
        // Raw bytes count once: a large raw image passes.
        let raw = oip::ModelInferRequest {
            raw_input_contents: vec![vec![7; 48 << 20]],
            ..Default::default()
        };
        assert_eq!(
            check("inference.ModelInferRequest", &raw.encode_to_vec()),
            Ok(())
        );
    }

    #[test]
    fn malformed_wire_data_is_left_to_prost() {
        for junk in [&[0xff_u8; 11][..], &[0x12, 0x80], &[0x12, 0x05, 1], &[0x0f]] {
            assert_eq!(check("tlb.v1.ClassifyRequest", junk), Ok(()));
            assert!(pb::ClassifyRequest::decode(junk).is_err());
        }
    }
}
