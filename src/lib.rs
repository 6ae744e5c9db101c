//! tlb: train and serve the Temporal Latent Bottleneck image classifier.

pub mod engine;
pub mod cli;
