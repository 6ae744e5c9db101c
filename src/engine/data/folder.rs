//! Image-folder datasets: `ROOT/<class>/<image>.png|jpg`, classes in sorted folder order.

use std::path::{Path, PathBuf};

use image::imageops::FilterType;

use super::set::{DataError, ImageSet};

const EXTENSIONS: [&str; 3] = ["png", "jpg", "jpeg"];

/// Decodes an encoded PNG/JPEG image and resizes it to `side × side`, planar RGB8.
pub fn decode_planar(bytes: &[u8], side: usize) -> Result<Vec<u8>, image::ImageError> {
    let img = image::load_from_memory(bytes)?;
    Ok(rgb_to_planar(&img.to_rgb8(), side))
}

/// Resizes an RGB image to `side × side` (triangle filter) and stores it planar.
pub fn rgb_to_planar(img: &image::RgbImage, side: usize) -> Vec<u8> {
    let resized;
    let img = if img.width() as usize == side && img.height() as usize == side {
        img
    } else {
        resized = image::imageops::resize(img, side as u32, side as u32, FilterType::Triangle);
        &resized
    };
    let plane = side * side;
    let mut out = vec![0u8; 3 * plane];
    for (i, px) in img.pixels().enumerate() {
        out[i] = px[0];
        out[plane + i] = px[1];
        out[2 * plane + i] = px[2];
    }
    out
}

/// A planar RGB8 `side × side` image (as stored) back as an RGB image.
pub fn planar_to_rgb(planar: &[u8], side: usize) -> image::RgbImage {
    let plane = side * side;
    image::RgbImage::from_fn(side as u32, side as u32, |x, y| {
        let i = y as usize * side + x as usize;
        image::Rgb([planar[i], planar[plane + i], planar[2 * plane + i]])
    })
}

fn sorted_entries(dir: &Path) -> Result<Vec<PathBuf>, DataError> {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| DataError::io(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    entries.sort();
    Ok(entries)
}

/// Reads every image under `root` into an [`ImageSet`] of `side × side` images.
pub fn read_image_folder(root: &Path, side: usize) -> Result<ImageSet, DataError> {
    let mut set = ImageSet {
        side,
        pixels: Vec::new(),
        labels: Vec::new(),
        class_names: Vec::new(),
    };
    for class_dir in sorted_entries(root)?.into_iter().filter(|p| p.is_dir()) {
        let label = set.class_names.len() as u16;
        set.class_names.push(
            class_dir
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned(),
        );
        for file in sorted_entries(&class_dir)? {
            let ext = file
                .extension()
                .map(|e| e.to_string_lossy().to_ascii_lowercase())
                .unwrap_or_default();
            if !EXTENSIONS.contains(&ext.as_str()) {
                continue;
            }
            let bytes = std::fs::read(&file).map_err(|e| DataError::io(&file, e))?;
            let planar = decode_planar(&bytes, side).map_err(|e| DataError::Decode {
                path: file.clone(),
                message: e.to_string(),
            })?;
            set.pixels.extend_from_slice(&planar);
            set.labels.push(label);
        }
    }
    if set.class_names.len() < 2 || set.is_empty() {
        return Err(DataError::Invalid {
            path: root.to_path_buf(),
            message: format!(
                "an image folder needs at least 2 class sub-folders with PNG/JPEG files; found {} classes and {} images",
                set.class_names.len(),
                set.len()
            ),
        });
    }
    Ok(set)
}
