//! The TLB model: configuration, the attention block and the chunked recurrence.

mod block;
mod config;
pub mod cube;
mod dropout;
pub mod fused;
mod precision;
mod tlb;

pub use block::{standardize, Affine, Block, FoldedBlock, Projection, LN_EPS};
pub use config::{ConfigError, Readout, TlbConfig};
pub use dropout::{dropout, set_dropout_stream, with_rng_lock};
pub use precision::{cast_params, host_f32, Precision};
pub use tlb::{Tlb, TlbAttention, TlbOutput, MERGE_MAX_ROWS};
