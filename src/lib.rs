//! tlb: train and serve the Temporal Latent Bottleneck image classifier.
//!
//! Layers: `engine` (model, data, training, inference, pictures), `store` (job database),
//! `worker` (the thread that owns the device), `grpc` (the API) with `auth` (tokens and roles) and `metrics` (Prometheus) as tower layers beside it, `server` (wiring, datasets,
//! shutdown) and `cli` (the `tlb` command).

pub mod auth;
pub mod cli;
pub mod engine;
pub mod grpc;
pub mod metrics;
pub mod proto;
pub mod server;
pub mod store;
pub mod worker;
