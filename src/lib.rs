//! tlb: train and serve the Temporal Latent Bottleneck image classifier.

pub mod cli;
pub mod engine;
