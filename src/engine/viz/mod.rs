//! Pictures: attention overlays, training curves and a search's trials' curves.

mod attention;
mod curves;
mod search;

pub use attention::{attention_picture, overlay, png_bytes, token_scores, OVERLAY_ALPHA};
pub use curves::{plot_curves, read_epochs};
pub use search::{plot_search, TrialCurve};
