//! Dropout whose masks are a pure function of a per-thread stream, so that several threads
//! training replicas at once stay deterministic.
//!
//! burn's CPU backends draw random numbers from one process-wide generator; two replicas
//! drawing from it at once would interleave unpredictably. Each mask here is drawn under a
//! lock right after seeding the backend from `(stream, draw index)`.

use std::cell::Cell;
use std::sync::Mutex;

use burn::tensor::backend::Backend;
use burn::tensor::{Distribution, Tensor, TensorData};

use crate::engine::data::mix64;

static DRAW_LOCK: Mutex<()> = Mutex::new(());

thread_local! {
    static STREAM: Cell<(u64, u64)> = const { Cell::new((0, 0)) };
}

/// Sets this thread's dropout stream (e.g. from the run seed, the step and the replica).
pub fn set_dropout_stream(seed: u64) {
    STREAM.with(|s| s.set((seed, 0)));
}

fn next_seed() -> u64 {
    STREAM.with(|s| {
        let (seed, n) = s.get();
        s.set((seed, n + 1));
        mix64(seed ^ mix64(n))
    })
}

/// Runs `f` while no dropout mask is being drawn: for anything else that uses burn's RNG
/// (a model's initialisation) while training threads run.
pub fn with_rng_lock<T>(f: impl FnOnce() -> T) -> T {
    let _guard = DRAW_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    f()
}

/// The next inverted-dropout mask of this thread's stream for `len` values: each value is 0
/// with probability `p`, else `1 / (1 - p)`. A pure function of the stream, drawn on the host
/// without a lock (the CPU backend's masks; the fused block draws the same ones).
pub(crate) fn host_mask(len: usize, p: f64) -> Vec<f32> {
    let seed = next_seed();
    let keep = (1.0 / (1.0 - p)) as f32;
    // 24 random bits per value, compared with p at that resolution.
    let threshold = (p * (1u64 << 24) as f64) as u32;
    let mut mask = vec![0.0f32; len];
    fill_mask(&mut mask, seed, threshold, keep);
    mask
}

/// A 32-bit integer hash with good avalanche (Wellons' "lowbias32").
#[inline(always)]
fn hash32(mut x: u32) -> u32 {
    x ^= x >> 16;
    x = x.wrapping_mul(0x7feb_352d);
    x ^= x >> 15;
    x = x.wrapping_mul(0x846c_a68b);
    x ^ (x >> 16)
}

super::fused::kernels::multiversion! {
/// Mask value `i` from two hash rounds keyed by the seed's halves: counter-based, so the
/// loop vectorises.
fn fill_mask(mask: &mut [f32], seed: u64, threshold: u32, keep: f32) {
    let (k0, k1) = (seed as u32, (seed >> 32) as u32);
    for (i, m) in mask.iter_mut().enumerate() {
        let bits = hash32(hash32(i as u32 ^ k0).wrapping_add(k1)) >> 8;
        *m = if bits < threshold { 0.0 } else { keep };
    }
}
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
    let seed = next_seed();
    let mask = {
        let _guard = DRAW_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        B::seed(&device, seed);
        x.random_like(Distribution::Bernoulli(1.0 - p))
    };
    // Same dtype as `x` (bf16 under mixed precision): the backend does not check operands.
    let mask = if mask.dtype() == x.dtype() {
        mask
    } else {
        mask.cast(x.dtype())
    };
    x * mask * (1.0 / (1.0 - p))
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
