//! tlb: train and serve the Temporal Latent Bottleneck image classifier.
//!
//! Layers, top to bottom (nothing imports upward): `cli` (the `tlb` command) and `server`
//! (wiring, the data-dir lock, shutdown); `grpc` (the API) with `auth` (tokens and roles, a
//! tower layer) beside it; `worker` (the thread that owns the device); `store` (job
//! database), `artifacts` (where checkpoints live: the data dir, or S3), `datasets`
//! (resolution and download), `admission` (whether a new job fits the machine); `engine`
//! (model, data, training, inference, pictures). Beneath them all, used by any: `error`
//! (request errors and their gRPC codes), `names` (enums named by strings), `host` (this
//! machine's name) and `metrics` (the Prometheus registry every layer records into, and the
//! tower layer that counts RPCs).

pub mod admission;
pub mod artifacts;
pub mod auth;
pub mod cli;
pub mod datasets;
pub mod engine;
pub mod error;
pub mod grpc;
pub mod host;
pub mod http;
pub mod metrics;
pub mod names;
pub mod proto;
pub mod server;
pub mod store;
pub mod worker;
