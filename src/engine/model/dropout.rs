//! Dropout whose masks are a pure function of a per-thread stream, so that several threads
//! training replicas at once stay deterministic.
//!
//! burn's CPU backends draw random numbers from one process-wide generator; two replicas
//! drawing from it at once would interleave unpredictably. Each mask here is drawn under a
//! lock right after seeding the backend from `(stream, draw index)`.

use std::sync::Mutex;

use burn::tensor::backend::Backend;
use burn::tensor::{Distribution, Tensor, TensorData};

pub use super::fused::mask::set_dropout_stream;
use super::fused::mask::{host_mask, next_seed, MaskKey};

static DRAW_LOCK: Mutex<()> = Mutex::new(());

/// Runs `f` while no dropout mask is being drawn: for anything else that uses burn's RNG
/// (a model's initialisation) while training threads run.
pub fn with_rng_lock<T>(f: impl FnOnce() -> T) -> T {
    let _guard = DRAW_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    f()
}

/// Inverted dropout with keep probability `1 - p`; the identity outside training.
pub fn dropout<B: Backend, const D: usize>(x: Tensor<B, D>, p: f64) -> Tensor<B, D> {
    let device = x.device();
    if p == 0.0 || !B::ad_enabled(&device) {
        return x;
    }
    if super::fused::is_host::<B>() {
        let shape = x.shape();
        let mask = host_mask(shape.num_elements(), p);
        let dtype = x.dtype();
        return x * Tensor::from_data(TensorData::new(mask, shape), (&device, dtype));
    }
    if super::cube::is_cube::<B>() && x.dtype() == burn::tensor::DType::F32 {
        // The mask the block's kernels compute (`model::cube`), from the same key.
        let mask = super::cube::dropout_mask(&x, MaskKey::next(p));
        return x * mask;
    }
    let mask = device_mask::<B, D>(x.dims(), p, (&device, x.dtype()));
    // Same dtype as `x` (bf16 under mixed precision): the backend does not check operands.
    let mask = if mask.dtype() == x.dtype() {
        mask
    } else {
        mask.cast(x.dtype())
    };
    x * mask * (1.0 / (1.0 - p))
}

/// The next mask of this thread's stream drawn by the backend's generator (seeded from the
/// stream under a lock): 0 with probability `p`, else 1 (the caller scales by `1/(1−p)`).
fn device_mask<B: Backend, const D: usize>(
    shape: [usize; D],
    p: f64,
    (device, dtype): (&B::Device, burn::tensor::DType),
) -> Tensor<B, D> {
    let seed = next_seed();
    let _guard = DRAW_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    B::seed(device, seed);
    Tensor::random(shape, Distribution::Bernoulli(1.0 - p), (device, dtype))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_drop_the_share_asked_for_and_follow_the_stream() {
        for p in [0.1, 0.2, 0.5] {
            set_dropout_stream(7);
            let a = host_mask(200_000, p);
            let dropped = a.iter().filter(|v| **v == 0.0).count() as f64 / a.len() as f64;
            assert!((dropped - p).abs() < 0.005, "p={p}: dropped {dropped}");
            let keep = (1.0 / (1.0 - p)) as f32;
            assert!(a.iter().all(|v| *v == 0.0 || *v == keep));
            // The next draw differs; the same stream again repeats.
            let b = host_mask(200_000, p);
            assert_ne!(a, b);
            set_dropout_stream(7);
            assert_eq!(a, host_mask(200_000, p));
        }
    }
}
