//! Fused operations for burn's cube backends (wgpu here; CUDA once a GPU has checked them),
//! written in CubeCL with their own backward, like the CPU's [`super::fused`]: where burn's
//! composition launches one kernel per tensor operation, each of these is one launch forward
//! and one (plus a reduction) backward. On a GPU a TLB step is launch-bound (small tensors, a
//! recurrence over chunks), so launches saved are time saved.
//!
//! The model code stays generic: each operation is chosen by comparing `TypeId`s with the
//! backends it is written for, and falls back to burn's composition elsewhere.

pub mod gelu;

pub use gelu::{applies as gelu_applies, bias_gelu};

thread_local! {
    static CALLS: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// How many fused cube operations this thread has run (tests check the path is taken).
pub fn calls() -> u64 {
    CALLS.with(std::cell::Cell::get)
}
