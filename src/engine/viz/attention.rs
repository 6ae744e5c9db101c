//! Attention maps as the reference visualises them: per chunk, max over latents and mean
//! over heads gives one score per token; the tokens form the patch grid (12×12 for 48px),
//! which is upsampled and laid over the image.

use image::{Rgb, RgbImage};

/// Per-token scores from one image's bottleneck attention `[chunks, heads, latents, chunk]`
/// (flattened row-major): `scores[c * chunk + t] = mean_h max_l w[c, h, l, t]`.
pub fn token_scores(weights: &[f32], dims: [usize; 4]) -> Vec<f32> {
    let [chunks, heads, latents, chunk] = dims;
    assert_eq!(
        weights.len(),
        chunks * heads * latents * chunk,
        "attention shape"
    );
    let mut scores = vec![0f32; chunks * chunk];
    for c in 0..chunks {
        for h in 0..heads {
            for t in 0..chunk {
                let max = (0..latents)
                    .map(|l| weights[((c * heads + h) * latents + l) * chunk + t])
                    .fold(f32::NEG_INFINITY, f32::max);
                scores[c * chunk + t] += max / heads as f32;
            }
        }
    }
    scores
}

/// How strongly the heatmap covers the image: the image stays visible beneath.
pub const OVERLAY_ALPHA: f32 = 0.6;

/// Lays the `grid × grid` token scores (min-max normalised, bilinear upsampling, colormap
/// `inferno`) over `image` scaled to `out × out` pixels, with `alpha` opacity.
pub fn overlay(image: &RgbImage, scores: &[f32], grid: usize, out: u32, alpha: f32) -> RgbImage {
    assert_eq!(scores.len(), grid * grid, "score grid");
    let base = image::imageops::resize(image, out, out, image::imageops::FilterType::Triangle);
    let (lo, hi) = scores
        .iter()
        .fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), &s| {
            (a.min(s), b.max(s))
        });
    let span = (hi - lo).max(1e-12);
    let at = |y: usize, x: usize| (scores[y * grid + x] - lo) / span;
    let scale = grid as f32 / out as f32;
    RgbImage::from_fn(out, out, |px, py| {
        let fy = ((py as f32 + 0.5) * scale - 0.5).clamp(0.0, (grid - 1) as f32);
        let fx = ((px as f32 + 0.5) * scale - 0.5).clamp(0.0, (grid - 1) as f32);
        let (y0, x0) = (fy.floor() as usize, fx.floor() as usize);
        let (y1, x1) = ((y0 + 1).min(grid - 1), (x0 + 1).min(grid - 1));
        let (wy, wx) = (fy - y0 as f32, fx - x0 as f32);
        let v = (at(y0, x0) * (1.0 - wx) + at(y0, x1) * wx) * (1.0 - wy)
            + (at(y1, x0) * (1.0 - wx) + at(y1, x1) * wx) * wy;
        let h = colorous::INFERNO.eval_continuous(v.clamp(0.0, 1.0) as f64);
        let b = base.get_pixel(px, py);
        let heat = [h.r, h.g, h.b];
        Rgb(std::array::from_fn(|k| {
            ((b[k] as f32) * (1.0 - alpha) + heat[k] as f32 * alpha).round() as u8
        }))
    })
}

/// The attention picture as served: with `side_by_side`, the image on the left and the
/// overlay on the right (`2·out × out`, as in the paper's figure); else the overlay alone.
pub fn attention_picture(
    image: &RgbImage,
    scores: &[f32],
    grid: usize,
    out: u32,
    side_by_side: bool,
) -> RgbImage {
    let over = overlay(image, scores, grid, out, OVERLAY_ALPHA);
    if !side_by_side {
        return over;
    }
    let base = image::imageops::resize(image, out, out, image::imageops::FilterType::Triangle);
    let mut both = RgbImage::new(2 * out, out);
    image::imageops::replace(&mut both, &base, 0, 0);
    image::imageops::replace(&mut both, &over, i64::from(out), 0);
    both
}

/// Encodes an RGB image as PNG bytes.
pub fn png_bytes(img: &RgbImage) -> Vec<u8> {
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png)
        .expect("PNG encoding into memory cannot fail");
    out.into_inner()
}
