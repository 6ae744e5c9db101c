//! Pictures: attention overlays and training curves.

mod attention;
mod curves;

pub use attention::{overlay, png_bytes, token_scores};
pub use curves::{plot_curves, read_epochs};
