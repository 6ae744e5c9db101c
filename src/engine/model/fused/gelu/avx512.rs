//! The GELU on 16 lanes of AVX-512 with fused multiply-adds; the erf's division is a 14-bit
//! reciprocal estimate refined by one Newton step.

use std::arch::x86_64::*;

use super::super::isa::{isa, Isa};
use super::super::kernels::{EXP_LN2_HI, EXP_LN2_LO, EXP_POLY};
use super::{ERF_P, ERF_Q, INV_SQRT_2PI};

/// Whether this thread's kernels run on AVX-512 ([`isa`]).
pub fn available() -> bool {
    isa() == Isa::Avx512
}

/// The lanes of a 16-value step at `j` of a `len`-value row that exist.
#[inline(always)]
fn lanes(len: usize, j: usize) -> __mmask16 {
    if len - j >= 16 {
        0xFFFF
    } else {
        (1u16 << (len - j)) - 1
    }
}

#[inline]
#[target_feature(enable = "avx512f")]
fn splat(v: f32) -> __m512 {
    _mm512_set1_ps(v)
}

#[inline]
#[target_feature(enable = "avx512f")]
fn horner(x: __m512, coefficients: &[f32]) -> __m512 {
    let mut acc = splat(coefficients[0]);
    for &c in &coefficients[1..] {
        acc = _mm512_fmadd_ps(x, acc, splat(c));
    }
    acc
}

/// The portable `erf` on 16 lanes; `1/Q` from a 14-bit estimate and one Newton step
/// (`r ← r + r·(1 − Q·r)`, error ≈ 2⁻²⁸ before rounding).
#[inline]
#[target_feature(enable = "avx512f")]
fn erf(x: __m512) -> __m512 {
    let x = _mm512_min_ps(_mm512_max_ps(x, splat(-4.0)), splat(4.0));
    let x2 = _mm512_mul_ps(x, x);
    let p = horner(x2, &ERF_P);
    let q = horner(x2, &ERF_Q);
    let r0 = _mm512_rcp14_ps(q);
    let r = _mm512_fmadd_ps(r0, _mm512_fnmadd_ps(q, r0, splat(1.0)), r0);
    _mm512_mul_ps(_mm512_mul_ps(x, p), r)
}

#[inline]
#[target_feature(enable = "avx512f")]
fn normal_cdf(u: __m512) -> __m512 {
    let e = erf(_mm512_mul_ps(u, splat(std::f32::consts::FRAC_1_SQRT_2)));
    _mm512_fmadd_ps(e, splat(0.5), splat(0.5))
}

/// `e^x` as the portable `exp` computes it; `2^k` applied by `scalef`.
#[inline]
#[target_feature(enable = "avx512f")]
fn exp(x: __m512) -> __m512 {
    let x = _mm512_min_ps(_mm512_max_ps(x, splat(-87.0)), splat(88.0));
    let k = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
        _mm512_mul_ps(x, splat(std::f32::consts::LOG2_E)),
    );
    let r = _mm512_fnmadd_ps(k, splat(EXP_LN2_HI), x);
    let r = _mm512_fnmadd_ps(k, splat(EXP_LN2_LO), r);
    _mm512_scalef_ps(horner(r, &EXP_POLY), k)
}

/// `u + bias` for the lanes `m` of the step at `j`, written back to `u`'s row when `keep`.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn biased(row: *mut f32, bias: &[f32], j: usize, m: __mmask16, keep: bool) -> __m512 {
    // SAFETY (caller): the lanes `m` of `row + j` and `bias[j..]` exist.
    let x = _mm512_add_ps(
        _mm512_maskz_loadu_ps(m, row.add(j)),
        _mm512_maskz_loadu_ps(m, bias.as_ptr().add(j)),
    );
    if keep {
        _mm512_mask_storeu_ps(row.add(j), m, x);
    }
    x
}

/// # Safety
/// The CPU must have AVX-512F; `u.len()` must be a whole number of rows of `bias.len()` (> 0)
/// values.
#[target_feature(enable = "avx512f")]
pub unsafe fn bias_gelu_in_place(u: &mut [f32], bias: &[f32]) {
    let f = bias.len();
    for row in u.chunks_exact_mut(f) {
        for j in (0..f).step_by(16) {
            let m = lanes(f, j);
            // SAFETY: `lanes` keeps every access inside the row and the bias.
            unsafe {
                let x = biased(row.as_mut_ptr(), bias, j, m, false);
                _mm512_mask_storeu_ps(row.as_mut_ptr().add(j), m, _mm512_mul_ps(x, normal_cdf(x)));
            }
        }
    }
}

/// # Safety
/// The CPU must have AVX-512F; `u.len()` must be a whole number of rows of `bias.len()` (> 0)
/// values.
#[target_feature(enable = "avx512f")]
pub unsafe fn bias_gelu(u: &mut [f32], bias: &[f32]) -> Vec<f32> {
    let f = bias.len();
    let mut out = Vec::<f32>::with_capacity(u.len());
    let o = out.as_mut_ptr();
    for (r, row) in u.chunks_exact_mut(f).enumerate() {
        for j in (0..f).step_by(16) {
            let m = lanes(f, j);
            // SAFETY: `lanes` keeps every access inside the row, the bias and `out`'s
            // capacity.
            unsafe {
                let x = biased(row.as_mut_ptr(), bias, j, m, true);
                _mm512_mask_storeu_ps(o.add(r * f + j), m, _mm512_mul_ps(x, normal_cdf(x)));
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
/// The CPU must have AVX-512F; `g` as long as `u`.
#[target_feature(enable = "avx512f")]
pub unsafe fn gelu_and_backward(u: &[f32], g: &mut [f32]) -> Vec<f32> {
    let len = u.len();
    let mut out = Vec::<f32>::with_capacity(len);
    let (o, gp, up) = (out.as_mut_ptr(), g.as_mut_ptr(), u.as_ptr());
    for j in (0..len).step_by(16) {
        let m = lanes(len, j);
        // SAFETY: `lanes` keeps every access inside `u`, `g` and `out`'s capacity (all
        // `len` values).
        unsafe {
            let v = _mm512_maskz_loadu_ps(m, up.add(j));
            let cdf = normal_cdf(v);
            _mm512_mask_storeu_ps(o.add(j), m, _mm512_mul_ps(v, cdf));
            let half_v2 = _mm512_mul_ps(_mm512_mul_ps(v, v), splat(-0.5));
            let pdf = _mm512_mul_ps(splat(INV_SQRT_2PI), exp(half_v2));
            let slope = _mm512_fmadd_ps(v, pdf, cdf);
            let gv = _mm512_maskz_loadu_ps(m, gp.add(j));
            _mm512_mask_storeu_ps(gp.add(j), m, _mm512_mul_ps(gv, slope));
        }
    }
    // SAFETY: the loop wrote all `len` values.
    unsafe { out.set_len(len) };
    out
}
