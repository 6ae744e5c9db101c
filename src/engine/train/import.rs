//! Import of weights as [`super::export`] writes them (safetensors, the documented names and
//! layouts; the model config and class names in the metadata): the inverse of export.
//!
//! Everything is checked before a model exists, and each refusal names what is wrong: the
//! header's size, the config, the labels, and then every tensor (missing, unexpected, wrong
//! dtype or shape, not finite).

use std::collections::BTreeSet;

use burn::module::{Module, Param};
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};
use safetensors::{Dtype, SafeTensors};

use super::checkpoint::{record_bytes, Checkpoint, CheckpointMeta};
use super::config::Preset;
use super::export::{walk, ParamVisitor};
use super::memory::param_count;
use crate::engine::model::{with_rng_lock, Tlb, TlbConfig};

/// Largest safetensors header read (`tlb export` writes about 20 KiB for `reference`).
pub const MAX_HEADER_BYTES: u64 = 1 << 20;
/// Names listed in one message before "and N more".
const NAMES_SHOWN: usize = 5;

/// Why an import was refused: which part of the request, and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct ImportError {
    /// `safetensors`, `config` or `labels`.
    pub field: &'static str,
    pub message: String,
}

fn refuse<T>(field: &'static str, message: impl Into<String>) -> Result<T, ImportError> {
    Err(ImportError {
        field,
        message: message.into(),
    })
}

/// An imported model and its class names.
pub struct Imported<B: Backend> {
    pub model: Tlb<B>,
    pub labels: Vec<String>,
}

/// Reads a model from safetensors `bytes`. `labels` (when not empty) replaces the class names
/// of the file's metadata; `config_json` (when not empty) replaces its `config`.
/// `max_params` bounds the model the config may describe before anything is allocated.
pub fn import_safetensors<B: Backend>(
    bytes: &[u8],
    config_json: &str,
    labels: Vec<String>,
    max_params: u64,
    device: &B::Device,
) -> Result<Imported<B>, ImportError> {
    check_header_size(bytes)?;
    let (_, meta) = SafeTensors::read_metadata(bytes)
        .or_else(|e| refuse("safetensors", format!("not a valid safetensors file ({e})")))?;
    let file = SafeTensors::deserialize(bytes)
        .or_else(|e| refuse("safetensors", format!("not a valid safetensors file ({e})")))?;
    let meta = meta.metadata().clone().unwrap_or_default();
    let config = config_of(config_json, meta.get("config"))?;
    let labels = labels_of(labels, meta.get("labels"), config.num_classes)?;
    let params = param_count(&config);
    if params > max_params {
        return refuse(
            "config",
            format!("describes a model of {params} parameters; the limit is {max_params}"),
        );
    }
    // Weights are drawn and then replaced: under the lock every draw from burn's RNG takes.
    let mut model =
        with_rng_lock(|| config.init::<B>(device)).or_else(|e| refuse("config", e.to_string()))?;
    let mut load = Load {
        file: &file,
        device,
        seen: BTreeSet::new(),
        problems: Problems::default(),
    };
    walk(&mut model, &mut load);
    let seen = load.seen;
    let mut problems = load.problems;
    problems.extra = file
        .names()
        .into_iter()
        .filter(|n| !seen.contains(*n))
        .map(str::to_string)
        .collect();
    problems.into_result()?;
    Ok(Imported { model, labels })
}

impl<B: Backend> Imported<B> {
    /// A checkpoint of the model alone (no optimiser state, no epochs): what inference reads.
    /// Its training config is `tiny`'s with the imported model's config.
    pub fn into_checkpoint(self) -> anyhow::Result<Checkpoint> {
        let mut config = Preset::Tiny.config();
        config.model = self.model.config().clone();
        Ok(Checkpoint {
            meta: CheckpointMeta::start(config, self.labels),
            model: record_bytes::<B, _>(self.model.into_record())?,
            optimizer: Vec::new(),
        })
    }
}

fn check_header_size(bytes: &[u8]) -> Result<(), ImportError> {
    let Some(prefix) = bytes.get(..8) else {
        return refuse(
            "safetensors",
            format!("{} bytes is too short for a safetensors file", bytes.len()),
        );
    };
    let n = u64::from_le_bytes(prefix.try_into().expect("8 bytes"));
    if n > MAX_HEADER_BYTES {
        return refuse(
            "safetensors",
            format!("the header declares {n} bytes; the limit is {MAX_HEADER_BYTES}"),
        );
    }
    Ok(())
}

fn config_of(given: &str, stored: Option<&String>) -> Result<TlbConfig, ImportError> {
    let json = match (given.trim(), stored) {
        ("", Some(stored)) => stored.as_str(),
        ("", None) => {
            return refuse(
                "config",
                "missing: the file's metadata has no `config` (tlb export writes one); \
                 send the model config in the request",
            )
        }
        (given, _) => given,
    };
    let config: TlbConfig = serde_json::from_str(json)
        .or_else(|e| refuse("config", format!("not a model config ({e})")))?;
    config
        .validate()
        .or_else(|e| refuse("config", e.to_string()))?;
    Ok(config)
}

fn labels_of(
    given: Vec<String>,
    stored: Option<&String>,
    classes: usize,
) -> Result<Vec<String>, ImportError> {
    let labels = match (given.is_empty(), stored) {
        (false, _) => given,
        (true, Some(json)) => serde_json::from_str(json).or_else(|e| {
            refuse(
                "labels",
                format!("the file's `labels` metadata is not a JSON array of names ({e})"),
            )
        })?,
        (true, None) => (0..classes).map(|c| format!("class {c}")).collect(),
    };
    if labels.len() != classes {
        return refuse(
            "labels",
            format!("{} names for a model of {classes} classes", labels.len()),
        );
    }
    Ok(labels)
}

/// What is wrong with the file's tensors, by kind.
#[derive(Default)]
struct Problems {
    missing: Vec<String>,
    extra: Vec<String>,
    /// `name: what`
    wrong: Vec<String>,
}

impl Problems {
    fn into_result(self) -> Result<(), ImportError> {
        let mut parts = Vec::new();
        for (what, names) in [
            ("missing tensors", self.missing),
            ("unexpected tensors", self.extra),
            ("wrong tensors", self.wrong),
        ] {
            if !names.is_empty() {
                parts.push(format!("{what}: {}", shown(&names)));
            }
        }
        if parts.is_empty() {
            Ok(())
        } else {
            refuse("safetensors", parts.join("; "))
        }
    }
}

fn shown(names: &[String]) -> String {
    let mut out = names
        .iter()
        .take(NAMES_SHOWN)
        .cloned()
        .collect::<Vec<_>>()
        .join(", ");
    if names.len() > NAMES_SHOWN {
        out += &format!(" and {} more", names.len() - NAMES_SHOWN);
    }
    out
}

/// Replaces each parameter with the file's tensor of the same name.
struct Load<'a, B: Backend> {
    file: &'a SafeTensors<'a>,
    device: &'a B::Device,
    seen: BTreeSet<String>,
    problems: Problems,
}

impl<B: Backend> ParamVisitor<B> for Load<'_, B> {
    fn visit<const D: usize>(
        &mut self,
        name: String,
        param: &mut Param<Tensor<B, D>>,
        torch_layout: bool,
    ) {
        let mut want = param.val().dims();
        if torch_layout {
            let n = want.len();
            want.swap(n - 2, n - 1);
        }
        let Ok(view) = self.file.tensor(&name) else {
            self.problems.missing.push(name);
            return;
        };
        self.seen.insert(name.clone());
        let wrong = |what: String| format!("{name} ({what})");
        if view.dtype() != Dtype::F32 {
            let got = format!("{:?}, expected F32", view.dtype());
            self.problems.wrong.push(wrong(got));
            return;
        }
        if view.shape() != want.as_slice() {
            let got = format!("shape {:?}, expected {want:?}", view.shape());
            self.problems.wrong.push(wrong(got));
            return;
        }
        let values: Vec<f32> = view
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes")))
            .collect();
        if let Some(i) = values.iter().position(|v| !v.is_finite()) {
            let got = format!("value {} at index {i} is not finite", values[i]);
            self.problems.wrong.push(wrong(got));
            return;
        }
        let t =
            Tensor::<B, D>::from_data(TensorData::new(values, view.shape().to_vec()), self.device);
        *param = Param::from_tensor(if torch_layout { t.transpose() } else { t });
    }
}
