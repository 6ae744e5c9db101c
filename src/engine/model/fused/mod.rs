//! The attention block as one fused operation on the CPU backend, with its own backward.
//!
//! burn runs the block as ~25 separate tensor operations forward and ~50 backward, each
//! allocating its result and walking memory again; on small chunk-sized tensors that
//! overhead, not the arithmetic, is most of a training step. On the `flex` CPU backend
//! (plain, and under `Autodiff` for training) the block instead runs as one operation on host
//! slices ([`block`]: `gemm` for the projections, exact GELU, softmax and norms in single
//! passes) and registers one autodiff node whose backward computes every input's gradient at
//! once (burn's `Backward` extension point). The maths is the same; the composition in
//! [`super::block`] stays the reference and the path for other backends (CUDA), and tests
//! compare both (values and gradients).
//!
//! The model code stays generic over the backend: the fused path is chosen by comparing
//! `TypeId`s and moving tensors across by a checked `Any` downcast, so no new trait bound
//! spreads through the code base.

use std::cell::Cell;

use burn::tensor::{backend::Backend, Tensor};

pub mod isa;
pub mod kernels;
pub(crate) mod mask;
pub mod matrix;

#[cfg(feature = "flex")]
mod attention;
#[cfg(feature = "flex")]
pub mod block;
#[cfg(feature = "flex")]
mod gelu;
#[cfg(feature = "flex")]
mod host;
#[cfg(feature = "flex")]
pub use host::{is_host, run};
pub use isa::{with_isa_at_most, Isa};

thread_local! {
    static DISABLED: Cell<bool> = const { Cell::new(false) };
    static CALLS: Cell<u64> = const { Cell::new(0) };
}

/// How many fused blocks this thread has run (tests check the path is taken).
pub fn calls() -> u64 {
    CALLS.with(Cell::get)
}

/// Runs `f` with the fused block switched off on this thread (burn's composition instead):
/// for tests and measurements that compare the two.
pub fn with_unfused<T>(f: impl FnOnce() -> T) -> T {
    let before = DISABLED.with(|d| d.replace(true));
    let out = f();
    DISABLED.with(|d| d.set(before));
    out
}

/// Fused operations switched off in the whole process ([`disable_everywhere`]).
static DISABLED_EVERYWHERE: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(false);

/// Switches the fused operations off in every thread, for good: `tlb bench --unfused`, which
/// measures burn's composition beside them.
pub fn disable_everywhere() {
    DISABLED_EVERYWHERE.store(true, std::sync::atomic::Ordering::Relaxed);
}

/// Whether fused operations are switched off on this thread ([`with_unfused`],
/// [`disable_everywhere`]).
pub fn disabled() -> bool {
    DISABLED.with(Cell::get) || DISABLED_EVERYWHERE.load(std::sync::atomic::Ordering::Relaxed)
}

/// Whether blocks on `B` run fused on this thread.
pub fn enabled<B: Backend>() -> bool {
    is_host::<B>() && !disabled()
}

/// The inputs of one block: `x` (queries), `context` (keys and values; `None` for
/// self-attention), and the folded parameters in the order of `block::Weights`
/// (`[wqkv, wo, w1, w2]`, `[bqkv, bo, b1, b2]`; `wqkv` = `[Wq | Wk | Wv]`, `[d, 3d]`).
pub struct BlockInputs<B: Backend> {
    pub x: Tensor<B, 3>,
    pub context: Option<Tensor<B, 3>>,
    pub weights: [Tensor<B, 2>; 4],
    pub biases: [Tensor<B, 1>; 4],
    /// Dropout on the attention weights and on the FFN output, applied when training.
    pub attn_dropout: f64,
    pub ffn_dropout: f64,
}

#[cfg(any(feature = "flex", cube_kernels))]
impl<B: Backend> BlockInputs<B> {
    /// The same inputs as tensors of backend `T`, which must be `B` (the fused paths are
    /// chosen by `TypeId`, then work on their concrete backend).
    pub(crate) fn cast<T: Backend>(self) -> BlockInputs<T> {
        use super::same_type;
        BlockInputs {
            x: same_type(self.x),
            context: self.context.map(same_type),
            weights: self.weights.map(same_type),
            biases: self.biases.map(same_type),
            attn_dropout: self.attn_dropout,
            ffn_dropout: self.ffn_dropout,
        }
    }
}

/// `[w0, b0, w1, b1, …]`: the order of a fused block's parameters in its autodiff node's
/// parents (after `x` and the context) and in its gradients, on the CPU and on the cube
/// backends.
#[cfg(any(feature = "flex", cube_kernels))]
pub(crate) fn interleave<T>(weights: [T; 4], biases: [T; 4]) -> [T; 8] {
    let [wqkv, wo, w1, w2] = weights;
    let [bqkv, bo, b1, b2] = biases;
    [wqkv, bqkv, wo, bo, w1, b1, w2, b2]
}

/// A fused block's autodiff parents: `x`, the context (`x` again for self-attention), then
/// the parameters in [`interleave`]'s order.
#[cfg(any(feature = "flex", cube_kernels))]
pub(crate) fn parents<T>(x: T, context: T, weights: [T; 4], biases: [T; 4]) -> [T; 10] {
    let [w0, b0, w1, b1, w2, b2, w3, b3] = interleave(weights, biases);
    [x, context, w0, b0, w1, b1, w2, b2, w3, b3]
}

/// Without the `flex` backend there is nothing to fuse on: burn's composition runs.
#[cfg(not(feature = "flex"))]
pub fn is_host<B: Backend>() -> bool {
    false
}

#[cfg(not(feature = "flex"))]
pub fn run<B: Backend>(_: BlockInputs<B>) -> Tensor<B, 3> {
    unreachable!("no fused block without the flex backend")
}
