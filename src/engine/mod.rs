//! The engine: the TLB model, its data pipeline and training, independent of any server.

pub mod backend;
pub mod data;
pub mod infer;
pub mod model;
pub mod search;
pub mod tensorboard;
pub mod train;
pub mod viz;
