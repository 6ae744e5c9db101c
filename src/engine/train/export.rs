//! Export of trained weights as safetensors, named and laid out as PyTorch expects.
//!
//! Names (`{i}` is an index; block parts as in [`Block`]):
//! `patch_embed.{weight,bias}` (weight `[D, 3, p, p]`), `pos_embed` (`[1, tokens, D]`),
//! `embed_norm.{weight,bias}`, `perceptual.{i}.*`, `perceptual_cross.{i}.*` (after perceptual
//! layer `i·r`), `bottleneck.*`, `readout_norm.{weight,bias}`, `head.{weight,bias}`.
//! Block parts: `norm_query`, `norm_key`, `norm_value`, `norm_ffn` (LayerNorm, eps 1e-5) and
//! `query`, `key`, `value`, `output`, `ffn_in`, `ffn_out` (Linear). Linear weights are stored
//! `[out, in]` like `torch.nn.Linear`. The model config is in the metadata under `config`.

use std::collections::HashMap;
use std::path::Path;

use anyhow::Result;
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

fn norm<B: Backend>(out: &mut Vec<NamedTensor>, prefix: &str, n: &LayerNorm<B>) {
    out.push(host(format!("{prefix}.weight"), n.gamma.val()));
    if let Some(beta) = &n.beta {
        out.push(host(format!("{prefix}.bias"), beta.val()));
    }
}

fn linear<B: Backend>(out: &mut Vec<NamedTensor>, prefix: &str, p: &Projection<B>) {
    out.push(host(format!("{prefix}.weight"), p.weight.val().transpose()));
    out.push(host(format!("{prefix}.bias"), p.bias.val()));
}

fn block<B: Backend>(out: &mut Vec<NamedTensor>, prefix: &str, b: &Block<B>) {
    norm(out, &format!("{prefix}.norm_query"), &b.norm_query);
    norm(out, &format!("{prefix}.norm_key"), &b.norm_key);
    norm(out, &format!("{prefix}.norm_value"), &b.norm_value);
    linear(out, &format!("{prefix}.query"), &b.query);
    linear(out, &format!("{prefix}.key"), &b.key);
    linear(out, &format!("{prefix}.value"), &b.value);
    linear(out, &format!("{prefix}.output"), &b.output);
    norm(out, &format!("{prefix}.norm_ffn"), &b.norm_ffn);
    linear(out, &format!("{prefix}.ffn_in"), &b.ffn_in);
    linear(out, &format!("{prefix}.ffn_out"), &b.ffn_out);
}

/// Every parameter of `model` under its documented name.
pub fn named_tensors<B: Backend>(model: &Tlb<B>) -> Vec<NamedTensor> {
    let mut out = Vec::new();
    out.push(host(
        "patch_embed.weight".into(),
        model.patch_embed.weight.val(),
    ));
    if let Some(b) = &model.patch_embed.bias {
        out.push(host("patch_embed.bias".into(), b.val()));
    }
    out.push(host("pos_embed".into(), model.pos_embed.val()));
    norm(&mut out, "embed_norm", &model.embed_norm);
    for (i, b) in model.perceptual.iter().enumerate() {
        block(&mut out, &format!("perceptual.{i}"), b);
    }
    for (i, b) in model.perceptual_cross.iter().enumerate() {
        block(&mut out, &format!("perceptual_cross.{i}"), b);
    }
    block(&mut out, "bottleneck", &model.bottleneck);
    norm(&mut out, "readout_norm", &model.readout_norm);
    linear(&mut out, "head", &model.head);
    out
}

/// Writes `model` to `path` as safetensors (f32, little-endian), atomically.
pub fn export_safetensors<B: Backend>(model: &Tlb<B>, path: &Path) -> Result<()> {
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
    ]);
    let mut data = safetensors::serialize(views, Some(metadata))?;
    sort_header(&mut data)?;
    write_atomic(path, &data)
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
