//! Host-slice maths for the fused block: matrix products through `gemm`, row
//! standardisation, softmax, and an exact (erf) GELU written so that the compiler vectorises it.
//!
//! Every matrix here is row-major and contiguous; `[rows, cols]` in the comments.

use super::super::block::LN_EPS;

/// `c (+)= op(a) · op(b)` with `op(a)` `[m, k]` and `op(b)` `[k, n]`; `ta`/`tb` read `a`
/// stored `[k, m]` / `b` stored `[n, k]` (a transposed view, no copy). With `acc` the product
/// is added to `c`, else it replaces it.
#[allow(clippy::too_many_arguments)]
pub fn matmul(
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    ta: bool,
    b: &[f32],
    tb: bool,
    c: &mut [f32],
    acc: bool,
) {
    assert!(a.len() >= m * k && b.len() >= k * n && c.len() >= m * n);
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !acc {
            c[..m * n].fill(0.0);
        }
        return;
    }
    // (row stride, column stride) of each operand, in elements.
    let (a_rs, a_cs) = if ta { (1, m as isize) } else { (k as isize, 1) };
    let (b_rs, b_cs) = if tb { (1, k as isize) } else { (n as isize, 1) };
    // SAFETY: the asserts above bound every index gemm reads or writes: op(a) is m×k, op(b)
    // k×n and c m×n with the strides given; the three slices do not overlap (&mut c).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            n as isize,
            acc,
            a.as_ptr(),
            a_cs,
            a_rs,
            b.as_ptr(),
            b_cs,
            b_rs,
            1.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

/// `x · w + bias` for `x` `[rows, d_in]`, `w` `[d_in, d_out]`: a new `[rows, d_out]`.
pub fn linear(x: &[f32], rows: usize, w: &[f32], bias: &[f32]) -> Vec<f32> {
    let d_out = bias.len();
    let d_in = w.len() / d_out.max(1);
    let mut y = Vec::with_capacity(rows * d_out);
    for _ in 0..rows {
        y.extend_from_slice(bias);
    }
    matmul(rows, d_out, d_in, x, false, w, false, &mut y, true);
    y
}

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

/// Standardised rows (zero mean, unit variance; biased variance, `LN_EPS`) and each row's
/// reciprocal standard deviation.
pub fn standardize(x: &[f32], d: usize) -> (Vec<f32>, Vec<f32>) {
    let rows = x.len() / d;
    let mut y = vec![0.0f32; x.len()];
    let mut rstd = Vec::with_capacity(rows);
    for (xr, yr) in x.chunks_exact(d).zip(y.chunks_exact_mut(d)) {
        let mean = xr.iter().sum::<f32>() / d as f32;
        let var = xr.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / d as f32;
        let r = 1.0 / (var + LN_EPS as f32).sqrt();
        for (o, v) in yr.iter_mut().zip(xr) {
            *o = (v - mean) * r;
        }
        rstd.push(r);
    }
    (y, rstd)
}

/// Adds to `dx` the gradient through [`standardize`]:
/// `dx += r · (dy − mean(dy) − y · mean(dy ⊙ y))` per row.
pub fn standardize_backward(dy: &[f32], y: &[f32], rstd: &[f32], d: usize, dx: &mut [f32]) {
    let rows = dy.chunks_exact(d).zip(y.chunks_exact(d));
    for ((dyr, yr), (dxr, r)) in rows.zip(dx.chunks_exact_mut(d).zip(rstd)) {
        let mean_dy = dyr.iter().sum::<f32>() / d as f32;
        let mean_dyy = dyr.iter().zip(yr).map(|(a, b)| a * b).sum::<f32>() / d as f32;
        for ((o, g), v) in dxr.iter_mut().zip(dyr).zip(yr) {
            *o += r * (g - mean_dy - v * mean_dyy);
        }
    }
}

/// Softmax of every row of `s` `[rows, cols]`, in place.
pub fn softmax_rows(s: &mut [f32], cols: usize) {
    for row in s.chunks_exact_mut(cols) {
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut sum = 0.0;
        for v in row.iter_mut() {
            *v = exp(*v - max);
            sum += *v;
        }
        let inv = 1.0 / sum;
        row.iter_mut().for_each(|v| *v *= inv);
    }
}

/// `e^x` to about 2 ulp for `x` in the f32 range (Cody–Waite reduction, degree-6 polynomial),
/// in plain arithmetic so that loops over it vectorise.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    const ROUND: f32 = 12_582_912.0; // 1.5 · 2^23: adding it rounds to an integer
    let x = x.clamp(-87.0, 88.0);
    let kr = x * LOG2E + ROUND;
    let k = kr - ROUND;
    let r = x - k * LN2_HI - k * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    // The low mantissa bits of `kr` hold k + 2^22; shift k into the exponent.
    let bits = (kr.to_bits() as i32 - 0x4B40_0000 + 127) << 23;
    p * f32::from_bits(bits as u32)
}

/// `Φ(u)` (standard normal CDF) and `φ(u)` (its density), from erfc to ~1.2e-7 relative
/// (Numerical Recipes' Chebyshev fit).
#[inline(always)]
fn normal_cdf_pdf(u: f32) -> (f32, f32) {
    const FRAC_1_SQRT_2: f32 = std::f32::consts::FRAC_1_SQRT_2;
    const FRAC_1_SQRT_2PI: f32 = 0.398_942_3;
    let z = (u * FRAC_1_SQRT_2).abs();
    let t = 1.0 / (1.0 + 0.5 * z);
    let poly = -1.265_512_2
        + t * (1.000_023_7
            + t * (0.374_091_96
                + t * (0.096_784_18
                    + t * (-0.186_288_06
                        + t * (0.278_868_07
                            + t * (-1.135_203_98
                                + t * (1.488_515_87 + t * (-0.822_152_23 + t * 0.170_872_77))))))));
    let e = exp(-0.5 * u * u);
    // erfc(z) = t · e^(−z² + poly); half of it is the upper tail.
    let tail = 0.5 * t * e * exp(poly);
    let cdf = if u >= 0.0 { 1.0 - tail } else { tail };
    (cdf, e * FRAC_1_SQRT_2PI)
}

/// Exact GELU, `u · Φ(u)`, of every element.
pub fn gelu(u: &[f32]) -> Vec<f32> {
    u.iter().map(|&v| v * normal_cdf_pdf(v).0).collect()
}

/// `gelu(u)` and `g ⊙ gelu'(u)` (`gelu'(u) = Φ(u) + u·φ(u)`) in one pass; the second
/// overwrites `g`.
pub fn gelu_and_backward(u: &[f32], g: &mut [f32]) -> Vec<f32> {
    let mut out = vec![0.0f32; u.len()];
    for ((o, gi), &v) in out.iter_mut().zip(g.iter_mut()).zip(u) {
        let (cdf, pdf) = normal_cdf_pdf(v);
        *o = v * cdf;
        *gi *= cdf + v * pdf;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn erf_ref(x: f64) -> f64 {
        // Abramowitz–Stegun 7.1.28 is too coarse; integrate exp(−t²) by Simpson's rule.
        let n = 20_000;
        let h = x / n as f64;
        let f = |t: f64| (-t * t).exp();
        let mut s = f(0.0) + f(x);
        for i in 1..n {
            s += f(i as f64 * h) * if i % 2 == 1 { 4.0 } else { 2.0 };
        }
        s * h / 3.0 * 2.0 / std::f64::consts::PI.sqrt()
    }

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
    fn gelu_and_its_derivative_match_the_definition() {
        for i in -800..800 {
            let u = i as f64 * 0.01;
            let cdf = 0.5 * (1.0 + erf_ref(u / 2f64.sqrt()));
            let want = u * cdf;
            let got = gelu(&[u as f32])[0] as f64;
            assert!((got - want).abs() < 2e-6, "gelu({u}) = {got}, want {want}");
            let pdf = (-0.5 * u * u).exp() / (2.0 * std::f64::consts::PI).sqrt();
            let mut g = [1.0f32];
            gelu_and_backward(&[u as f32], &mut g);
            let dwant = cdf + u * pdf;
            assert!(
                (g[0] as f64 - dwant).abs() < 2e-6,
                "gelu'({u}) = {}, want {dwant}",
                g[0]
            );
        }
    }

    #[test]
    fn matmul_transposes_and_accumulates() {
        // a [2,3], b [3,2]
        let a = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
        let b = [7.0, 8.0, 9.0, 10.0, 11.0, 12.0];
        let mut c = [1.0; 4];
        matmul(2, 2, 3, &a, false, &b, false, &mut c, true);
        assert_eq!(c, [59.0, 65.0, 140.0, 155.0]);
        // aᵀ stored as [3,2] (= a read transposed), bᵀ stored as [2,3].
        let at = [1.0, 4.0, 2.0, 5.0, 3.0, 6.0];
        let bt = [7.0, 9.0, 11.0, 8.0, 10.0, 12.0];
        let mut c = [0.0; 4];
        matmul(2, 2, 3, &at, true, &bt, true, &mut c, false);
        assert_eq!(c, [58.0, 64.0, 139.0, 154.0]);
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
