//! Host-slice maths for the fused block: matrix products through `gemm`, row
//! standardisation, softmax, and an exact (erf) GELU written so that the compiler vectorises it.
//!
//! Every matrix here is row-major and contiguous; `[rows, cols]` in the comments.

use super::super::block::LN_EPS;

/// Defines `fn` so that its body is compiled three times (baseline x86-64, AVX2+FMA,
/// AVX-512) and the widest one the CPU has is chosen at run time. The bodies are plain
/// loops the compiler vectorises for each width.
macro_rules! multiversion {
    ($(#[$m:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$m])*
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn body($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
                unsafe fn v4($($arg: $ty),*) $(-> $ret)? { body($($arg),*) }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn v3($($arg: $ty),*) $(-> $ret)? { body($($arg),*) }
                if std::arch::is_x86_feature_detected!("avx512f")
                    && std::arch::is_x86_feature_detected!("avx512vl")
                {
                    // SAFETY: the CPU has the features v4 is compiled for.
                    return unsafe { v4($($arg),*) };
                }
                if std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
                {
                    // SAFETY: the CPU has the features v3 is compiled for.
                    return unsafe { v3($($arg),*) };
                }
            }
            body($($arg),*)
        }
    };
}
pub(crate) use multiversion;

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
    assert!(c.len() >= m * n);
    // SAFETY: c holds m·n initialised values and is borrowed exclusively.
    unsafe { gemm_into(m, n, k, a, ta, b, tb, c.as_mut_ptr(), acc) }
}

/// `op(a) · op(b)` as a new `[m, n]` (see [`matmul`]), written straight into fresh memory.
pub fn product(m: usize, n: usize, k: usize, a: &[f32], ta: bool, b: &[f32], tb: bool) -> Vec<f32> {
    let mut c = Vec::<f32>::with_capacity(m * n);
    // SAFETY: the spare capacity holds m·n values; gemm without `acc` only writes them (and
    // gemm_into zero-fills when k = 0), so all are initialised before set_len.
    unsafe {
        gemm_into(
            m,
            n,
            k,
            a,
            ta,
            b,
            tb,
            c.spare_capacity_mut().as_mut_ptr().cast(),
            false,
        );
        c.set_len(m * n);
    }
    c
}

/// # Safety
/// `c` must be valid for writes of `m·n` values, and for reads of them when `acc`.
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_into(
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    ta: bool,
    b: &[f32],
    tb: bool,
    c: *mut f32,
    acc: bool,
) {
    assert!(a.len() >= m * k && b.len() >= k * n);
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !acc {
            std::ptr::write_bytes(c, 0, m * n);
        }
        return;
    }
    // (row stride, column stride) of each operand, in elements.
    let (a_rs, a_cs) = if ta { (1, m as isize) } else { (k as isize, 1) };
    let (b_rs, b_cs) = if tb { (1, k as isize) } else { (n as isize, 1) };
    // SAFETY: the assert bounds every index gemm reads: op(a) is m×k, op(b) k×n with the
    // strides given; c is m×n row-major, valid as the caller promises; without `acc` gemm
    // does not read c.
    gemm::gemm(
        m,
        n,
        k,
        c,
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

/// `erf(x)` to a few ulp: the rational minimax fit used by Eigen and XLA (odd degree-13
/// numerator, even degree-8 denominator on [−4, 4], ±1 beyond), no exponential.
#[inline(always)]
fn erf(x: f32) -> f32 {
    let x = x.clamp(-4.0, 4.0);
    let x2 = x * x;
    let mut p = x2 * -2.726_142_3e-10 + 2.770_681_4e-8;
    p = x2 * p + -2.101_024e-6;
    p = x2 * p + -5.692_506_4e-5;
    p = x2 * p + -7.349_906_3e-4;
    p = x2 * p + -2.954_600_2e-3;
    p = x2 * p + -1.609_603_3e-2;
    let mut q = x2 * -1.456_607_2e-5 + -2.133_740_6e-4;
    q = x2 * q + -1.682_827e-3;
    q = x2 * q + -7.373_329_2e-3;
    q = x2 * q + -1.426_474e-2;
    x * p / q
}

/// `Φ(u)`, the standard normal CDF.
#[inline(always)]
fn normal_cdf(u: f32) -> f32 {
    0.5 + 0.5 * erf(u * std::f32::consts::FRAC_1_SQRT_2)
}

/// `φ(u)`, the standard normal density.
#[inline(always)]
fn normal_pdf(u: f32) -> f32 {
    0.398_942_3 * exp(-0.5 * u * u)
}

multiversion! {
/// `u ← u + bias` (per row), then exact GELU in place.
pub fn bias_gelu_in_place(u: &mut [f32], bias: &[f32]) {
    for row in u.chunks_exact_mut(bias.len()) {
        for (v, b) in row.iter_mut().zip(bias) {
            let x = *v + b;
            *v = x * normal_cdf(x);
        }
    }
}
}

multiversion! {
/// `u ← u + bias` (per row), and the exact GELU of the result, `u · Φ(u)`, as a new tensor.
pub fn bias_gelu(u: &mut [f32], bias: &[f32]) -> Vec<f32> {
    let mut out = vec![0.0f32; u.len()];
    for (row, orow) in u.chunks_exact_mut(bias.len()).zip(out.chunks_exact_mut(bias.len())) {
        for ((v, b), o) in row.iter_mut().zip(bias).zip(orow) {
            *v += b;
            *o = *v * normal_cdf(*v);
        }
    }
    out
}
}

multiversion! {
/// `gelu(u)` and `g ⊙ gelu'(u)` (`gelu'(u) = Φ(u) + u·φ(u)`) in one pass; the second
/// overwrites `g`.
pub fn gelu_and_backward(u: &[f32], g: &mut [f32]) -> Vec<f32> {
    let mut out = vec![0.0f32; u.len()];
    for ((o, gi), &v) in out.iter_mut().zip(g.iter_mut()).zip(u) {
        let cdf = normal_cdf(v);
        *o = v * cdf;
        *gi *= cdf + v * normal_pdf(v);
    }
    out
}
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
            let got = bias_gelu(&mut [u as f32], &[0.0])[0] as f64;
            let mut in_place = [u as f32];
            bias_gelu_in_place(&mut in_place, &[0.0]);
            assert_eq!(in_place[0] as f64, got);
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
