//! The dropout masks' random stream, on the host: each thread draws from a stream of its own
//! (set per step and replica), and a mask is a pure function of the stream's next seed, so
//! that several threads training replicas at once stay deterministic. Used by the fused
//! block and by burn's composition on the CPU backend (`model::dropout`), which draw the
//! same masks.

use std::cell::Cell;

use crate::engine::data::mix64;

thread_local! {
    static STREAM: Cell<(u64, u64)> = const { Cell::new((0, 0)) };
}

/// Sets this thread's dropout stream (e.g. from the run seed, the step and the replica).
pub fn set_dropout_stream(seed: u64) {
    STREAM.with(|s| s.set((seed, 0)));
}

pub(crate) fn next_seed() -> u64 {
    STREAM.with(|s| {
        let (seed, n) = s.get();
        s.set((seed, n + 1));
        mix64(seed ^ mix64(n))
    })
}

/// What a dropout mask is a function of: the stream's seed (its two halves), the threshold
/// below which a value is dropped (24-bit resolution) and the factor kept values get. The CPU
/// ([`host_mask`]) and the cube kernels (`model::cube`) compute the same mask from it.
#[derive(Clone, Copy, Debug)]
pub struct MaskKey {
    pub k0: u32,
    pub k1: u32,
    pub threshold: u32,
    pub keep: f32,
}

impl MaskKey {
    /// The key of this thread's next mask, for dropout probability `p`.
    pub fn next(p: f64) -> Self {
        let seed = next_seed();
        Self {
            k0: seed as u32,
            k1: (seed >> 32) as u32,
            // 24 random bits per value, compared with p at that resolution.
            threshold: (p * (1u64 << 24) as f64) as u32,
            keep: (1.0 / (1.0 - p)) as f32,
        }
    }
}

/// The next inverted-dropout mask of this thread's stream for `len` values: each value is 0
/// with probability `p`, else `1 / (1 - p)`. A pure function of the stream, drawn on the host
/// without a lock (the CPU backend's masks; the fused block draws the same ones).
pub(crate) fn host_mask(len: usize, p: f64) -> Vec<f32> {
    let key = MaskKey::next(p);
    let mut mask = vec![0.0f32; len];
    fill_mask(&mut mask, key);
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

super::kernels::multiversion! {
/// Mask value `i` from two hash rounds keyed by the seed's halves: counter-based, so the
/// loop vectorises (and a GPU computes value `i` where it needs it).
fn fill_mask(mask: &mut [f32], key: MaskKey) {
    let MaskKey { k0, k1, threshold, keep } = key;
    for (i, m) in mask.iter_mut().enumerate() {
        let bits = hash32(hash32(i as u32 ^ k0).wrapping_add(k1)) >> 8;
        *m = if bits < threshold { 0.0 } else { keep };
    }
}
}
