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

pub mod kernels;

#[cfg(feature = "flex")]
pub mod block;
#[cfg(feature = "flex")]
mod host;
#[cfg(feature = "flex")]
pub use host::*;

/// Without the `flex` backend there is nothing to fuse on: burn's composition runs.
#[cfg(not(feature = "flex"))]
mod absent {
    use burn::tensor::{backend::Backend, Tensor};

    pub fn with_unfused<T>(f: impl FnOnce() -> T) -> T {
        f()
    }
    pub fn calls() -> u64 {
        0
    }
    pub fn is_host<B: Backend>() -> bool {
        false
    }
    pub fn enabled<B: Backend>() -> bool {
        false
    }
    pub struct BlockInputs<B: Backend> {
        pub x: Tensor<B, 3>,
        pub context: Option<Tensor<B, 3>>,
        pub weights: [Tensor<B, 2>; 6],
        pub biases: [Tensor<B, 1>; 6],
        pub attn_dropout: f64,
        pub ffn_dropout: f64,
    }
    pub fn run<B: Backend>(_: BlockInputs<B>) -> Tensor<B, 3> {
        unreachable!("no fused block without the flex backend")
    }
}
#[cfg(not(feature = "flex"))]
pub use absent::*;
