//! The TLB model: configuration, the attention block and the chunked recurrence.

mod block;
mod config;
pub mod cube;
mod dropout;
pub mod fused;
mod precision;
mod tlb;

pub use block::{standardize, Affine, Block, FoldedBlock, Normed, Projection, LN_EPS};
pub use config::{ConfigError, Readout, TlbConfig};
pub use dropout::{dropout, set_dropout_stream, with_rng_lock};
pub use precision::{cast_params, host_f32, Precision};
pub use tlb::{Tlb, TlbAttention, TlbOutput, MERGE_MAX_ROWS};

/// `t` as the type `U`, which must be its own type: how a fused operation, chosen by comparing
/// `TypeId`s, takes a generic backend's tensors as its concrete backend's and gives them back.
#[cfg(any(feature = "flex", feature = "wgpu"))]
fn same_type<T: std::any::Any, U: std::any::Any>(t: T) -> U {
    let boxed: Box<dyn std::any::Any> = Box::new(t);
    *boxed
        .downcast::<U>()
        .unwrap_or_else(|_| panic!("fused operation: backend mismatch"))
}
