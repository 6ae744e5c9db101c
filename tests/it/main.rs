//! Every integration test, in one binary: burn, sqlx and tonic are linked once instead of once
//! per file. A module per area; `common` holds what they share. Tests of different modules
//! run side by side in this one process, so anything process-wide (burn's CPU RNG) is taken
//! through `common::serial` or the library's own lock.

mod common;

mod artifacts;
mod checkpoint_faults;
mod cli;
mod data;
mod datasets;
mod fused;
mod hardening;
mod import;
mod model;
mod replicas;
mod search;
mod server;
mod server_auth;
mod server_download;
mod server_errors;
mod server_faults;
mod server_ops;
mod store;
mod train;
#[cfg(feature = "wgpu")]
mod wgpu;
