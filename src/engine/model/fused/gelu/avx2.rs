//! The GELU on 8 lanes of AVX2 with fused multiply-adds: the same maths as [`super::avx512`],
//! the erf's division a 12-bit reciprocal estimate refined by two Newton steps, `2^k` built in
//! the exponent bits, and masked loads and stores for a row's last step.

use std::arch::x86_64::*;

use super::super::isa::{isa, Isa};
use super::super::kernels::{EXP_LN2_HI, EXP_LN2_LO, EXP_POLY};
use super::{ERF_P, ERF_Q, INV_SQRT_2PI};

/// Whether this thread's kernels run on AVX2+FMA or wider ([`isa`]).
pub fn available() -> bool {
    isa() >= Isa::Avx2
}

/// The lanes of an 8-value step at `j` of a `len`-value row that exist, as a load/store mask
/// (all bits set in a lane that exists).
#[inline]
#[target_feature(enable = "avx2,fma")]
fn lanes(len: usize, j: usize) -> __m256i {
    let n = (len - j).min(8) as i32;
    _mm256_cmpgt_epi32(
        _mm256_set1_epi32(n),
        _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
    )
}

#[inline]
#[target_feature(enable = "avx2,fma")]
fn splat(v: f32) -> __m256 {
    _mm256_set1_ps(v)
}

#[inline]
#[target_feature(enable = "avx2,fma")]
fn horner(x: __m256, coefficients: &[f32]) -> __m256 {
    let mut acc = splat(coefficients[0]);
    for &c in &coefficients[1..] {
        acc = _mm256_fmadd_ps(x, acc, splat(c));
    }
    acc
}

/// `r ← r + r·(1 − q·r)`: one Newton step towards `1/q`.
#[inline]
#[target_feature(enable = "avx2,fma")]
fn newton(q: __m256, r: __m256) -> __m256 {
    _mm256_fmadd_ps(r, _mm256_fnmadd_ps(q, r, splat(1.0)), r)
}

/// The portable `erf` on 8 lanes; `1/Q` from a 12-bit estimate and two Newton steps.
#[inline]
#[target_feature(enable = "avx2,fma")]
fn erf(x: __m256) -> __m256 {
    let x = _mm256_min_ps(_mm256_max_ps(x, splat(-4.0)), splat(4.0));
    let x2 = _mm256_mul_ps(x, x);
    let p = horner(x2, &ERF_P);
    let q = horner(x2, &ERF_Q);
    let r = newton(q, newton(q, _mm256_rcp_ps(q)));
    _mm256_mul_ps(_mm256_mul_ps(x, p), r)
}

#[inline]
#[target_feature(enable = "avx2,fma")]
fn normal_cdf(u: __m256) -> __m256 {
    let e = erf(_mm256_mul_ps(u, splat(std::f32::consts::FRAC_1_SQRT_2)));
    _mm256_fmadd_ps(e, splat(0.5), splat(0.5))
}

/// `e^x` as the portable `exp` computes it; `2^k` put straight into the exponent bits (`k`
/// stays within [−126, 127] for the clamped `x`).
#[inline]
#[target_feature(enable = "avx2,fma")]
fn exp(x: __m256) -> __m256 {
    let x = _mm256_min_ps(_mm256_max_ps(x, splat(-87.0)), splat(88.0));
    let k = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm256_mul_ps(
        x,
        splat(std::f32::consts::LOG2_E),
    ));
    let r = _mm256_fnmadd_ps(k, splat(EXP_LN2_HI), x);
    let r = _mm256_fnmadd_ps(k, splat(EXP_LN2_LO), r);
    let two_k = _mm256_castsi256_ps(_mm256_slli_epi32::<23>(_mm256_add_epi32(
        _mm256_cvtps_epi32(k),
        _mm256_set1_epi32(127),
    )));
    _mm256_mul_ps(horner(r, &EXP_POLY), two_k)
}

/// `u + bias` for the lanes `m` of the step at `j`, written back to `u`'s row when `keep`.
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn biased(row: *mut f32, bias: &[f32], j: usize, m: __m256i, keep: bool) -> __m256 {
    // SAFETY: the caller guarantees that the lanes `m` of `row + j` and `bias[j..]` exist.
    let x = unsafe {
        _mm256_add_ps(
            _mm256_maskload_ps(row.add(j), m),
            _mm256_maskload_ps(bias.as_ptr().add(j), m),
        )
    };
    if keep {
        // SAFETY: the same lanes of the same row, as above.
        unsafe { _mm256_maskstore_ps(row.add(j), m, x) };
    }
    x
}

/// # Safety
/// The CPU must have AVX2 and FMA; `u.len()` must be a whole number of rows of `bias.len()` (> 0)
/// values.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn bias_gelu_in_place(u: &mut [f32], bias: &[f32]) {
    let f = bias.len();
    for row in u.chunks_exact_mut(f) {
        for j in (0..f).step_by(8) {
            let m = lanes(f, j);
            // SAFETY: `lanes` keeps every access inside the row and the bias.
            unsafe {
                let x = biased(row.as_mut_ptr(), bias, j, m, false);
                _mm256_maskstore_ps(row.as_mut_ptr().add(j), m, _mm256_mul_ps(x, normal_cdf(x)));
            }
        }
    }
}

/// # Safety
/// The CPU must have AVX2 and FMA; `u.len()` must be a whole number of rows of `bias.len()` (> 0)
/// values.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn bias_gelu(u: &mut [f32], bias: &[f32]) -> Vec<f32> {
    let f = bias.len();
    let mut out = Vec::<f32>::with_capacity(u.len());
    let o = out.as_mut_ptr();
    for (r, row) in u.chunks_exact_mut(f).enumerate() {
        for j in (0..f).step_by(8) {
            let m = lanes(f, j);
            // SAFETY: `lanes` keeps every access inside the row, the bias and `out`'s capacity.
            unsafe {
                let x = biased(row.as_mut_ptr(), bias, j, m, true);
                _mm256_maskstore_ps(o.add(r * f + j), m, _mm256_mul_ps(x, normal_cdf(x)));
            }
        }
    }
    debug_assert_eq!(u.len() % f, 0);
    // SAFETY: the loop wrote every value of every whole row, and by this function's contract
    // (asserted by the safe wrapper) the whole rows are all of `u`.
    unsafe { out.set_len(u.len()) };
    out
}

/// # Safety
/// The CPU must have AVX2 and FMA; `g` as long as `u`.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn gelu_and_backward(u: &[f32], g: &mut [f32]) -> Vec<f32> {
    let len = u.len();
    let mut out = Vec::<f32>::with_capacity(len);
    let (o, gp, up) = (out.as_mut_ptr(), g.as_mut_ptr(), u.as_ptr());
    for j in (0..len).step_by(8) {
        let m = lanes(len, j);
        // SAFETY: `lanes` keeps every access inside `u`, `g` and `out`'s capacity (all `len`
        // values).
        unsafe {
            let v = _mm256_maskload_ps(up.add(j), m);
            let cdf = normal_cdf(v);
            _mm256_maskstore_ps(o.add(j), m, _mm256_mul_ps(v, cdf));
            let half_v2 = _mm256_mul_ps(_mm256_mul_ps(v, v), splat(-0.5));
            let pdf = _mm256_mul_ps(splat(INV_SQRT_2PI), exp(half_v2));
            let slope = _mm256_fmadd_ps(v, pdf, cdf);
            let gv = _mm256_maskload_ps(gp.add(j), m);
            _mm256_maskstore_ps(gp.add(j), m, _mm256_mul_ps(gv, slope));
        }
    }
    // SAFETY: the loop wrote all `len` values.
    unsafe { out.set_len(len) };
    out
}
