//! Images from requests: decoded once, checked against the limits, stored planar at the
//! side the models' data path starts from.

use std::io::Cursor;

use image::{ImageError, ImageReader, Limits, RgbImage};

use super::{MAX_IMAGE_SIDE, MAX_REQUEST_PIXELS};
use crate::engine::data::rgb_to_planar;
use crate::engine::infer::STORE_SIDE;
use crate::error::ApiError;
use crate::proto::v1 as pb;

/// A request image, decoded.
pub struct Decoded {
    /// Planar RGB8 at `STORE_SIDE × STORE_SIDE`, what the worker batches.
    pub planar: Vec<u8>,
    /// The full image (kept only when an overlay is drawn on it).
    pub rgb: Option<RgbImage>,
}

fn too_large(field: &str, w: u32, h: u32) -> ApiError {
    ApiError::ResourceExhausted(format!(
        "{field}: {w}x{h} pixels; the limit is {MAX_IMAGE_SIDE}x{MAX_IMAGE_SIDE}"
    ))
}

/// Width × height of `image`, read from its header (nothing is decoded).
fn pixels(field: &str, image: &pb::Image) -> Result<u64, ApiError> {
    use pb::image::Source;
    let (w, h) = match &image.source {
        None => return Err(ApiError::field(field, "has neither encoded nor raw set")),
        Some(Source::Raw(raw)) => (raw.width, raw.height),
        Some(Source::Encoded(bytes)) => ImageReader::new(Cursor::new(bytes.as_slice()))
            .with_guessed_format()
            .ok()
            .and_then(|r| r.into_dimensions().ok())
            .ok_or_else(|| {
                ApiError::field(
                    &format!("{field}.encoded"),
                    "not a decodable PNG or JPEG image (unreadable header)",
                )
            })?,
    };
    Ok(u64::from(w) * u64::from(h))
}

/// Refuses a request whose images hold more than [`MAX_REQUEST_PIXELS`] together, before
/// any of them is decoded.
pub fn check_pixel_budget(images: &[pb::Image]) -> Result<(), ApiError> {
    let mut total = 0u64;
    for (i, image) in images.iter().enumerate() {
        total += pixels(&format!("images[{i}]"), image)?;
    }
    if total > MAX_REQUEST_PIXELS {
        return Err(ApiError::ResourceExhausted(format!(
            "images: {total} pixels in one request; the limit is {MAX_REQUEST_PIXELS} \
             (e.g. one {MAX_IMAGE_SIDE}x{MAX_IMAGE_SIDE} image or 256 of 256x256): send \
             fewer or smaller images per request"
        )));
    }
    Ok(())
}

/// Decodes `image` (the request field `field`); keeps the RGB image when `keep_rgb`.
pub fn decode(field: &str, image: pb::Image, keep_rgb: bool) -> Result<Decoded, ApiError> {
    use pb::image::Source;
    let rgb = match image.source {
        None => return Err(ApiError::field(field, "has neither encoded nor raw set")),
        Some(Source::Encoded(bytes)) => {
            if bytes.is_empty() {
                return Err(ApiError::field(&format!("{field}.encoded"), "is empty"));
            }
            let mut reader = ImageReader::new(Cursor::new(bytes.as_slice()))
                .with_guessed_format()
                .map_err(|e| ApiError::field(&format!("{field}.encoded"), e))?;
            let mut limits = Limits::default();
            limits.max_image_width = Some(MAX_IMAGE_SIDE);
            limits.max_image_height = Some(MAX_IMAGE_SIDE);
            limits.max_alloc = Some(256 << 20);
            reader.limits(limits);
            match reader.decode() {
                Ok(img) => img.to_rgb8(),
                Err(ImageError::Limits(e)) => {
                    return Err(ApiError::ResourceExhausted(format!(
                        "{field}.encoded: image too large ({e}); the limit is \
                         {MAX_IMAGE_SIDE}x{MAX_IMAGE_SIDE} pixels"
                    )))
                }
                Err(e) => {
                    return Err(ApiError::field(
                        &format!("{field}.encoded"),
                        format!("not a decodable PNG or JPEG image ({e})"),
                    ))
                }
            }
        }
        Some(Source::Raw(raw)) => {
            let f = format!("{field}.raw");
            let (w, h) = (raw.width, raw.height);
            if w == 0 || h == 0 {
                return Err(ApiError::field(
                    &f,
                    format!("width and height must be positive, got {w}x{h}"),
                ));
            }
            if w > MAX_IMAGE_SIDE || h > MAX_IMAGE_SIDE {
                return Err(too_large(&f, w, h));
            }
            let expected = w as usize * h as usize * 3;
            if raw.rgb8.len() != expected {
                return Err(ApiError::field(
                    &format!("{f}.rgb8"),
                    format!(
                        "has {} bytes; {w}x{h} RGB8 needs {expected} (width * height * 3)",
                        raw.rgb8.len()
                    ),
                ));
            }
            RgbImage::from_raw(w, h, raw.rgb8)
                .ok_or_else(|| ApiError::field(&f, "inconsistent size"))?
        }
    };
    Ok(Decoded {
        planar: rgb_to_planar(&rgb, STORE_SIDE),
        rgb: keep_rgb.then_some(rgb),
    })
}

/// Decodes images off the async threads.
pub async fn decode_all(images: Vec<pb::Image>, keep_rgb: bool) -> Result<Vec<Decoded>, ApiError> {
    tokio::task::spawn_blocking(move || {
        images
            .into_iter()
            .enumerate()
            .map(|(i, img)| decode(&format!("images[{i}]"), img, keep_rgb))
            .collect()
    })
    .await
    .map_err(|e| ApiError::internal(anyhow::anyhow!("image decoding task: {e}")))?
}
