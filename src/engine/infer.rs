//! Inference on prepared images: class probabilities and bottleneck attention maps.

use burn::tensor::activation::softmax;
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};

use crate::engine::data::{Augmenter, Batch, CropFlip};
use crate::engine::model::{host_f32, Tlb};
use crate::engine::train::forward_sharded;

/// Side at which decoded images are stored before the model's own resize (CIFAR's size, so
/// an arbitrary image goes through the same bilinear resize as the training data).
pub const STORE_SIDE: usize = 32;

/// Turns planar RGB8 images of side `side` into an evaluation batch for `model`.
pub fn eval_batch(images: &[&[u8]], side: usize, image_size: usize) -> Batch {
    let aug = Augmenter::new(side, image_size, false);
    let n = aug.out_len();
    let mut out = vec![0f32; images.len() * n];
    let identity = CropFlip {
        top: 0,
        left: 0,
        flip: false,
    };
    for (k, img) in images.iter().enumerate() {
        aug.apply(img, identity, &mut out[k * n..(k + 1) * n]);
    }
    Batch {
        images: out,
        labels: vec![0; images.len()],
        side: image_size,
    }
}

fn images_tensor<B: Backend>(batch: Batch, device: &B::Device) -> Tensor<B, 4> {
    let s = batch.side;
    Tensor::from_data(
        TensorData::new(batch.images, [batch.labels.len(), 3, s, s]),
        device,
    )
}

/// Class probabilities `[n][classes]`, the batch split over `threads` model replicas.
pub fn probabilities<B: Backend>(
    model: &Tlb<B>,
    batch: Batch,
    threads: usize,
    device: &B::Device,
) -> Vec<Vec<f32>> {
    let n = batch.len();
    let logits = forward_sharded(model, images_tensor(batch, device), threads);
    let probs = softmax(logits, 1);
    let flat = host_f32(probs);
    let c = flat.len() / n.max(1);
    flat.chunks(c.max(1)).map(<[f32]>::to_vec).collect()
}

/// The `k` most probable classes, most probable first.
pub fn top_k(probs: &[f32], k: usize) -> Vec<(usize, f32)> {
    let mut idx: Vec<usize> = (0..probs.len()).collect();
    idx.sort_by(|&a, &b| probs[b].total_cmp(&probs[a]));
    idx.into_iter().take(k).map(|i| (i, probs[i])).collect()
}

/// One image's bottleneck attention and prediction.
#[derive(Debug, Clone)]
pub struct AttentionMaps {
    /// `[chunks, heads, latents, chunk_size]`, row-major.
    pub weights: Vec<f32>,
    pub dims: [usize; 4],
    pub probabilities: Vec<f32>,
}

/// Runs one image and returns its per-chunk bottleneck attention (use an eval-mode model).
pub fn attention_maps<B: Backend>(
    model: &Tlb<B>,
    batch: Batch,
    device: &B::Device,
) -> AttentionMaps {
    assert_eq!(batch.len(), 1, "one image at a time");
    let out = model.forward_with(images_tensor(batch, device), true);
    let att = out.attention.expect("asked for attention");
    let [_, chunks, heads, latents, chunk] = att.dims();
    let probs = softmax(out.logits, 1);
    AttentionMaps {
        weights: host_f32(att),
        dims: [chunks, heads, latents, chunk],
        probabilities: host_f32(probs),
    }
}
