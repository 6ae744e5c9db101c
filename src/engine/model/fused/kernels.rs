//! Host-slice maths for the fused block: row standardisation, softmax, `exp`, bias passes,
//! written so that the compiler vectorises them (products: [`super::matrix`]; GELU:
//! [`super::gelu`]).
//!
//! Every matrix here is row-major and contiguous; `[rows, cols]` in the comments.

use super::matrix::product;

/// LayerNorm's epsilon, in every layer norm of the model (burn's and the fused block's).
pub const LN_EPS: f64 = 1e-5;

pub(crate) use super::isa::multiversion;

/// Lanes of the reductions below: sums kept in 16 independent accumulators so that the
/// compiler can vectorise them (a single running f32 sum must stay sequential).
const LANES: usize = 16;

/// `Σ aᵢ·bᵢ`.
#[inline(always)]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; LANES];
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..LANES {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// `Σ aᵢ`.
#[inline(always)]
pub fn sum(a: &[f32]) -> f32 {
    let mut acc = [0.0f32; LANES];
    let ca = a.chunks_exact(LANES);
    let tail: f32 = ca.remainder().iter().sum();
    for x in ca {
        for i in 0..LANES {
            acc[i] += x[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// `x · w + bias` for `x` `[rows, d_in]`, `w` `[d_in, d_out]`: a new `[rows, d_out]`.
pub fn linear(x: &[f32], rows: usize, w: &[f32], bias: &[f32]) -> Vec<f32> {
    let d_out = bias.len();
    let d_in = w.len() / d_out.max(1);
    let mut y = product(rows, d_out, d_in, x, false, w, false);
    add_rows(&mut y, bias);
    y
}

multiversion! {
/// `x` with `bias` added to every row, as a new tensor.
pub fn with_bias(x: &[f32], bias: &[f32]) -> Vec<f32> {
    assert!(x.len().is_multiple_of(bias.len()), "rows of {} values", bias.len());
    let mut y = Vec::<f32>::with_capacity(x.len());
    let out = &mut y.spare_capacity_mut()[..x.len()];
    for (xr, yr) in x.chunks_exact(bias.len()).zip(out.chunks_exact_mut(bias.len())) {
        for ((o, a), b) in yr.iter_mut().zip(xr).zip(bias) {
            o.write(a + b);
        }
    }
    // SAFETY: the loop wrote every row, x.len() values in all.
    unsafe { y.set_len(x.len()) };
    y
}
}

multiversion! {
/// Adds `bias` to every row of `y`.
pub fn add_rows(y: &mut [f32], bias: &[f32]) {
    for row in y.chunks_exact_mut(bias.len()) {
        for (o, b) in row.iter_mut().zip(bias) {
            *o += b;
        }
    }
}
}

multiversion! {
/// Sum over rows of `g` `[rows, cols]`: the gradient of a bias.
pub fn col_sum(g: &[f32], cols: usize) -> Vec<f32> {
    let mut s = vec![0.0f32; cols];
    for row in g.chunks_exact(cols) {
        for (a, b) in s.iter_mut().zip(row) {
            *a += b;
        }
    }
    s
}
}

multiversion! {
/// Standardised rows (zero mean, unit variance; biased variance, `LN_EPS`) and each row's
/// reciprocal standard deviation.
pub fn standardize(x: &[f32], d: usize) -> (Vec<f32>, Vec<f32>) {
    assert!(d > 0 && x.len().is_multiple_of(d), "rows of {d} values");
    let rows = x.len() / d;
    let mut y = Vec::<f32>::with_capacity(x.len());
    let mut rstd = Vec::with_capacity(rows);
    let out = &mut y.spare_capacity_mut()[..x.len()];
    for (xr, yr) in x.chunks_exact(d).zip(out.chunks_exact_mut(d)) {
        let mean = sum(xr) / d as f32;
        for (o, v) in yr.iter_mut().zip(xr) {
            o.write(v - mean);
        }
        // SAFETY: every value of this row was written just above.
        let yr: &mut [f32] = unsafe { &mut *(yr as *mut [std::mem::MaybeUninit<f32>] as *mut [f32]) };
        let r = 1.0 / (dot(yr, yr) / d as f32 + LN_EPS as f32).sqrt();
        yr.iter_mut().for_each(|v| *v *= r);
        rstd.push(r);
    }
    // SAFETY: the loop wrote all rows · d = x.len() values.
    unsafe { y.set_len(x.len()) };
    (y, rstd)
}
}

multiversion! {
/// Adds to `dx` the gradient through [`standardize`]:
/// `dx += r · (dy − mean(dy) − y · mean(dy ⊙ y))` per row.
pub fn standardize_backward(dy: &[f32], y: &[f32], rstd: &[f32], d: usize, dx: &mut [f32]) {
    let rows = dy.chunks_exact(d).zip(y.chunks_exact(d));
    for ((dyr, yr), (dxr, r)) in rows.zip(dx.chunks_exact_mut(d).zip(rstd)) {
        let mean_dy = sum(dyr) / d as f32;
        let mean_dyy = dot(dyr, yr) / d as f32;
        for ((o, g), v) in dxr.iter_mut().zip(dyr).zip(yr) {
            *o += r * (g - mean_dy - v * mean_dyy);
        }
    }
}
}

multiversion! {
/// Softmax of every row of `s` `[rows, cols]`, in place. The exponentials run over the whole
/// buffer in one loop: attention rows are short (8 keys), too short to vectorise one by one.
pub fn softmax_rows(s: &mut [f32], cols: usize) {
    for row in s.chunks_exact_mut(cols) {
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        row.iter_mut().for_each(|v| *v -= max);
    }
    s.iter_mut().for_each(|v| *v = exp(*v));
    for row in s.chunks_exact_mut(cols) {
        let inv = 1.0 / row.iter().sum::<f32>();
        row.iter_mut().for_each(|v| *v *= inv);
    }
}
}

/// [`exp`]'s Cody–Waite split of ln 2 (`x − k·ln 2` in two steps) and its polynomial for
/// `e^r`, highest degree first; the GELU's SIMD paths compute the same function from these.
pub(crate) const EXP_LN2_HI: f32 = 0.693_145_75;
pub(crate) const EXP_LN2_LO: f32 = 1.428_606_8e-6;
pub(crate) const EXP_POLY: [f32; 7] = [
    1.0 / 720.0,
    1.0 / 120.0,
    1.0 / 24.0,
    1.0 / 6.0,
    0.5,
    1.0,
    1.0,
];

/// `e^x` to about 2 ulp for `x` in the f32 range (Cody–Waite reduction, degree-6 polynomial),
/// in plain arithmetic so that loops over it vectorise.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const ROUND: f32 = 12_582_912.0; // 1.5 · 2^23: adding it rounds to an integer
    let x = x.clamp(-87.0, 88.0);
    let kr = x * LOG2E + ROUND;
    let k = kr - ROUND;
    let r = x - k * EXP_LN2_HI - k * EXP_LN2_LO;
    let p = EXP_POLY[1..].iter().fold(EXP_POLY[0], |acc, c| r * acc + c);
    // The low mantissa bits of `kr` hold k + 2^22; shift k into the exponent.
    let bits = (kr.to_bits() as i32 - 0x4B40_0000 + 127) << 23;
    p * f32::from_bits(bits as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_matches_std() {
        let mut worst = 0.0f64;
        for i in -8700..8800 {
            let x = i as f32 * 0.01;
            let rel = ((exp(x) as f64 - (x as f64).exp()) / (x as f64).exp()).abs();
            worst = worst.max(rel);
        }
        assert!(worst < 5e-7, "worst relative error {worst}");
    }

    #[test]
    fn standardize_backward_matches_finite_differences() {
        let d = 5;
        let x: Vec<f32> = (0..10).map(|i| ((i * 7 % 11) as f32) * 0.3 - 1.0).collect();
        let w: Vec<f32> = (0..10).map(|i| (i as f32 * 0.37).sin()).collect();
        let loss = |x: &[f32]| -> f64 {
            let (y, _) = standardize(x, d);
            y.iter().zip(&w).map(|(a, b)| (a * b) as f64).sum()
        };
        let (y, r) = standardize(&x, d);
        let mut dx = vec![0.0; 10];
        standardize_backward(&w, &y, &r, d, &mut dx);
        for i in 0..10 {
            let (mut p, mut m) = (x.clone(), x.clone());
            p[i] += 1e-2;
            m[i] -= 1e-2;
            let fd = (loss(&p) - loss(&m)) / 2e-2;
            assert!(
                (fd - dx[i] as f64).abs() < 2e-3,
                "dx[{i}] {} vs {fd}",
                dx[i]
            );
        }
    }
}
