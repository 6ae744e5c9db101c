//! The reference's input pipeline, in one pass per image: scale to [0, 1], bilinear resize
//! (half-pixel centres, as tf.image.resize), and for training a random crop of the resized
//! image at `size + 4` plus a random horizontal flip.

use rand::Rng;

/// Bilinear sampling taps for one axis: output index → (low index, high index, high weight).
#[derive(Debug, Clone)]
pub struct Taps(Vec<(u16, u16, f32)>);

impl Taps {
    pub fn new(src: usize, dst: usize) -> Self {
        let scale = src as f32 / dst as f32;
        Taps(
            (0..dst)
                .map(|i| {
                    let x = ((i as f32 + 0.5) * scale - 0.5).clamp(0.0, (src - 1) as f32);
                    let lo = x.floor() as usize;
                    let hi = (lo + 1).min(src - 1);
                    (lo as u16, hi as u16, x - lo as f32)
                })
                .collect(),
        )
    }
}

/// Resizes `src → resized` and cuts `out × out` from it.
#[derive(Debug, Clone)]
pub struct Augmenter {
    src: usize,
    out: usize,
    /// Side of the resized image the crop is cut from (`out + 4` for training, `out` for eval).
    resized: usize,
    taps: Taps,
    train: bool,
}

/// Where the crop sits in the resized image and whether it is mirrored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CropFlip {
    pub top: usize,
    pub left: usize,
    pub flip: bool,
}

impl Augmenter {
    pub fn new(src: usize, out: usize, train: bool) -> Self {
        let resized = if train { out + 4 } else { out };
        Self {
            src,
            out,
            resized,
            taps: Taps::new(src, resized),
            train,
        }
    }

    pub fn out_len(&self) -> usize {
        3 * self.out * self.out
    }

    /// Draws the crop and flip for one image (the identity for evaluation).
    pub fn draw(&self, rng: &mut impl Rng) -> CropFlip {
        if !self.train {
            return CropFlip {
                top: 0,
                left: 0,
                flip: false,
            };
        }
        let room = self.resized - self.out + 1;
        CropFlip {
            top: rng.random_range(0..room),
            left: rng.random_range(0..room),
            flip: rng.random_bool(0.5),
        }
    }

    /// Writes one planar `[3, out, out]` image in [0, 1] into `dst`.
    pub fn apply(&self, src: &[u8], cf: CropFlip, dst: &mut [f32]) {
        let (s, o) = (self.src, self.out);
        debug_assert_eq!(src.len(), 3 * s * s);
        debug_assert_eq!(dst.len(), 3 * o * o);
        let taps = &self.taps.0;
        for c in 0..3 {
            let plane = &src[c * s * s..(c + 1) * s * s];
            let out = &mut dst[c * o * o..(c + 1) * o * o];
            for y in 0..o {
                let (y0, y1, wy) = taps[cf.top + y];
                let (r0, r1) = (y0 as usize * s, y1 as usize * s);
                for x in 0..o {
                    let xr = if cf.flip { o - 1 - x } else { x };
                    let (x0, x1, wx) = taps[cf.left + xr];
                    let (x0, x1) = (x0 as usize, x1 as usize);
                    let top = plane[r0 + x0] as f32 * (1.0 - wx) + plane[r0 + x1] as f32 * wx;
                    let bot = plane[r1 + x0] as f32 * (1.0 - wx) + plane[r1 + x1] as f32 * wx;
                    out[y * o + x] = (top * (1.0 - wy) + bot * wy) * (1.0 / 255.0);
                }
            }
        }
    }
}
