//! Export of trained weights as safetensors, named and laid out as PyTorch expects.
//!
//! Names (`{i}` is an index; block parts as in [`Block`]):
//! `patch_embed.{weight,bias}` (weight `[D, 3, p, p]`), `pos_embed` (`[1, tokens, D]`),
//! `embed_norm.{weight,bias}`, `perceptual.{i}.*`, `perceptual_cross.{i}.*` (after perceptual
//! layer `i·r`), `bottleneck.*`, `readout_norm.{weight,bias}`, `head.{weight,bias}`.
//! Block parts: `norm_query`, `norm_key`, `norm_value`, `norm_ffn` (LayerNorm, eps 1e-5) and
//! `query`, `key`, `value`, `output`, `ffn_in`, `ffn_out` (Linear). Linear weights are stored
//! `[out, in]` like `torch.nn.Linear`. The metadata holds the model config under `config` and
//! the class names (a JSON array) under `labels`: all that [`super::import`] needs.

use std::collections::HashMap;
use std::path::Path;

use anyhow::Result;
use burn::module::{Module, ModuleVisitor, Param};
use burn::nn::LayerNorm;
use burn::tensor::backend::Backend;
use burn::tensor::Tensor;
use safetensors::tensor::TensorView;

use super::checkpoint::write_atomic;
use crate::engine::model::{host_f32, Block, Projection, Tlb};

/// A named f32 tensor in host memory.
pub struct NamedTensor {
    pub name: String,
    pub shape: Vec<usize>,
    pub values: Vec<f32>,
}

fn host<B: Backend, const D: usize>(name: String, t: Tensor<B, D>) -> NamedTensor {
    let shape = t.dims().to_vec();
    let values = host_f32(t);
    NamedTensor {
        name,
        shape,
        values,
    }
}

/// What a walk over the model's parameters does with each one, under its documented name.
pub(super) trait ParamVisitor<B: Backend> {
    /// `torch_layout`: a Linear weight, stored `[out, in]` (burn holds it `[in, out]`).
    fn visit<const D: usize>(
        &mut self,
        name: String,
        param: &mut Param<Tensor<B, D>>,
        torch_layout: bool,
    );
}

fn norm<B: Backend>(v: &mut impl ParamVisitor<B>, prefix: &str, n: &mut LayerNorm<B>) {
    v.visit(format!("{prefix}.weight"), &mut n.gamma, false);
    if let Some(beta) = &mut n.beta {
        v.visit(format!("{prefix}.bias"), beta, false);
    }
}

fn linear<B: Backend>(v: &mut impl ParamVisitor<B>, prefix: &str, p: &mut Projection<B>) {
    v.visit(format!("{prefix}.weight"), &mut p.weight, true);
    v.visit(format!("{prefix}.bias"), &mut p.bias, false);
}

fn block<B: Backend>(v: &mut impl ParamVisitor<B>, prefix: &str, b: &mut Block<B>) {
    norm(v, &format!("{prefix}.norm_query"), &mut b.norm_query);
    norm(v, &format!("{prefix}.norm_key"), &mut b.norm_key);
    norm(v, &format!("{prefix}.norm_value"), &mut b.norm_value);
    linear(v, &format!("{prefix}.query"), &mut b.query);
    linear(v, &format!("{prefix}.key"), &mut b.key);
    linear(v, &format!("{prefix}.value"), &mut b.value);
    linear(v, &format!("{prefix}.output"), &mut b.output);
    norm(v, &format!("{prefix}.norm_ffn"), &mut b.norm_ffn);
    linear(v, &format!("{prefix}.ffn_in"), &mut b.ffn_in);
    linear(v, &format!("{prefix}.ffn_out"), &mut b.ffn_out);
}

/// Visits every parameter of `model` under its documented name, in the documented order.
pub(super) fn walk<B: Backend>(model: &mut Tlb<B>, v: &mut impl ParamVisitor<B>) {
    v.visit(
        "patch_embed.weight".into(),
        &mut model.patch_embed.weight,
        false,
    );
    if let Some(b) = &mut model.patch_embed.bias {
        v.visit("patch_embed.bias".into(), b, false);
    }
    v.visit("pos_embed".into(), &mut model.pos_embed, false);
    norm(v, "embed_norm", &mut model.embed_norm);
    for (i, b) in model.perceptual.iter_mut().enumerate() {
        block(v, &format!("perceptual.{i}"), b);
    }
    for (i, b) in model.perceptual_cross.iter_mut().enumerate() {
        block(v, &format!("perceptual_cross.{i}"), b);
    }
    block(v, "bottleneck", &mut model.bottleneck);
    norm(v, "readout_norm", &mut model.readout_norm);
    linear(v, "head", &mut model.head);
}

struct Collect(Vec<NamedTensor>);

impl<B: Backend> ParamVisitor<B> for Collect {
    fn visit<const D: usize>(
        &mut self,
        name: String,
        param: &mut Param<Tensor<B, D>>,
        torch_layout: bool,
    ) {
        let t = param.val();
        self.0
            .push(host(name, if torch_layout { t.transpose() } else { t }));
    }
}

/// Initialises every lazy parameter in place (a fresh model's weights are drawn on first use).
struct Materialise;

impl<B: Backend> ModuleVisitor<B> for Materialise {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        let _ = param.val();
    }
}

/// Every parameter of `model` under its documented name.
pub fn named_tensors<B: Backend>(model: &Tlb<B>) -> Vec<NamedTensor> {
    // The walk needs a model of its own: a clone, which shares the tensors once they exist
    // (a clone of a parameter not drawn yet would draw its own weights).
    model.visit(&mut Materialise);
    let mut collect = Collect(Vec::new());
    walk(&mut model.clone(), &mut collect);
    collect.0
}

/// Writes `model` to `path` as safetensors (f32, little-endian), atomically.
pub fn export_safetensors<B: Backend>(
    model: &Tlb<B>,
    labels: &[String],
    path: &Path,
) -> Result<()> {
    write_atomic(path, &safetensors_bytes(model, labels)?)
}

/// A checkpoint file's model, read on the CPU, as safetensors bytes: what `tlb export` writes
/// and ExportModel sends.
pub fn checkpoint_safetensors(path: &Path) -> Result<Vec<u8>> {
    let ckpt = super::Checkpoint::read(path)?;
    let labels = ckpt.meta.class_names.clone();
    let model =
        ckpt.into_model::<crate::engine::backend::Cpu>(&crate::engine::backend::cpu_device())?;
    safetensors_bytes(&model, &labels)
}

/// `model` as the bytes of a safetensors file (f32, little-endian), the same for the same
/// weights.
pub fn safetensors_bytes<B: Backend>(model: &Tlb<B>, labels: &[String]) -> Result<Vec<u8>> {
    let tensors = named_tensors(model);
    let bytes: Vec<Vec<u8>> = tensors
        .iter()
        .map(|t| t.values.iter().flat_map(|v| v.to_le_bytes()).collect())
        .collect();
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .zip(&bytes)
        .map(|(t, b)| {
            let view = TensorView::new(safetensors::Dtype::F32, t.shape.clone(), b)?;
            Ok((t.name.clone(), view))
        })
        .collect::<Result<_>>()?;
    let metadata = HashMap::from([
        ("format".to_string(), "pt".to_string()),
        ("config".to_string(), serde_json::to_string(model.config())?),
        ("labels".to_string(), serde_json::to_string(labels)?),
    ]);
    let mut data = safetensors::serialize(views, Some(metadata))?;
    sort_header(&mut data)?;
    Ok(data)
}

/// Rewrites the JSON header of a safetensors file with its keys sorted (same length: the
/// same entries in another order), so the same weights always give the same bytes. The
/// library writes its metadata map in hash order, which changes from run to run.
fn sort_header(data: &mut [u8]) -> Result<()> {
    type Sorted = std::collections::BTreeMap<String, serde_json::Value>;
    let len = u64::from_le_bytes(data[..8].try_into()?) as usize;
    let header = &mut data[8..8 + len];
    let mut entries: Sorted = serde_json::from_slice(header)?;
    if let Some(meta) = entries.get_mut("__metadata__") {
        let sorted: Sorted = serde_json::from_value(meta.take())?;
        *meta = serde_json::to_value(sorted)?;
    }
    let mut sorted = serde_json::to_vec(&entries)?;
    anyhow::ensure!(sorted.len() <= len, "sorted safetensors header grew");
    sorted.resize(len, b' ');
    header.copy_from_slice(&sorted);
    Ok(())
}
