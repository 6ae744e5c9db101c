//! Pictures: attention overlays and training curves.

mod attention;
mod curves;

pub use attention::{attention_picture, overlay, png_bytes, token_scores, OVERLAY_ALPHA};
pub use curves::{plot_curves, read_epochs};
