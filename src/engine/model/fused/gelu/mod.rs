//! Exact GELU, `u·Φ(u)` with `Φ` through erf, fused with the FFN bias, and its derivative.
//!
//! Three implementations of the same maths, the widest the CPU has chosen at run time: on
//! AVX-512 ([`avx512`], 16 lanes) and on AVX2+FMA ([`avx2`], 8 lanes) the loops are written
//! with fused multiply-adds and the erf's division replaced by a reciprocal estimate refined
//! by Newton steps (the division was half of the GELU's time); elsewhere portable loops that
//! the compiler vectorises. All agree to a few ulp; tests hold each to the definition.

use super::kernels::exp;

/// Calls `f` from the widest implementation this thread's kernels may use
/// ([`super::isa::isa`]): `avx512::f`, `avx2::f` or `portable::f`.
macro_rules! dispatch {
    ($f:ident($($arg:expr),*)) => {{
        #[cfg(target_arch = "x86_64")]
        if avx512::available() {
            // SAFETY: `available` only where the CPU has AVX-512F (`isa::detected`).
            return unsafe { avx512::$f($($arg),*) };
        }
        #[cfg(target_arch = "x86_64")]
        if avx2::available() {
            // SAFETY: `available` only where the CPU has AVX2 and FMA (`isa::detected`).
            return unsafe { avx2::$f($($arg),*) };
        }
        portable::$f($($arg),*)
    }};
}

/// erf's rational fit on [−4, 4] (±1 beyond; Eigen's and XLA's): `x·P(x²) / Q(x²)`, the
/// coefficients highest degree first.
const ERF_P: [f32; 7] = [
    -2.726_142_3e-10,
    2.770_681_4e-8,
    -2.101_024e-6,
    -5.692_506_4e-5,
    -7.349_906_3e-4,
    -2.954_600_2e-3,
    -1.609_603_3e-2,
];
const ERF_Q: [f32; 5] = [
    -1.456_607_2e-5,
    -2.133_740_6e-4,
    -1.682_827e-3,
    -7.373_329_2e-3,
    -1.426_474e-2,
];
/// `1/√(2π)`: `φ(u) = e^(−u²/2) / √(2π)`.
const INV_SQRT_2PI: f32 = 0.398_942_3;

/// `u ← u + bias` (per row), then exact GELU in place. `u` holds whole rows of `bias.len()`.
pub fn bias_gelu_in_place(u: &mut [f32], bias: &[f32]) {
    whole_rows(u, bias);
    dispatch!(bias_gelu_in_place(u, bias))
}

/// `u ← u + bias` (per row), and the exact GELU of the result, `u · Φ(u)`, as a new tensor.
/// `u` holds whole rows of `bias.len()`.
pub fn bias_gelu(u: &mut [f32], bias: &[f32]) -> Vec<f32> {
    whole_rows(u, bias);
    dispatch!(bias_gelu(u, bias))
}

/// The SIMD paths' contract (their output is sized from it): checked in release builds too,
/// once per call, next to a pass over every value.
fn whole_rows(u: &[f32], bias: &[f32]) {
    assert!(
        !bias.is_empty() && u.len().is_multiple_of(bias.len()),
        "bias_gelu: {} values are not whole rows of {}",
        u.len(),
        bias.len()
    );
}

/// `gelu(u)` and `g ⊙ gelu'(u)` (`gelu'(u) = Φ(u) + u·φ(u)`) in one pass; the second
/// overwrites `g`.
pub fn gelu_and_backward(u: &[f32], g: &mut [f32]) -> Vec<f32> {
    assert_eq!(u.len(), g.len());
    dispatch!(gelu_and_backward(u, g))
}

/// The baseline path: reached only where [`super::isa::isa`] is `Baseline`, so it is compiled
/// once, for plain x86-64 (or another architecture).
mod portable {
    use super::*;

    /// `erf(x)` to a few ulp, in plain arithmetic so that loops over it vectorise.
    #[inline(always)]
    fn erf(x: f32) -> f32 {
        let x = x.clamp(-4.0, 4.0);
        let x2 = x * x;
        let p = ERF_P[1..].iter().fold(ERF_P[0], |acc, c| x2 * acc + c);
        let q = ERF_Q[1..].iter().fold(ERF_Q[0], |acc, c| x2 * acc + c);
        x * p / q
    }

    #[inline(always)]
    fn normal_cdf(u: f32) -> f32 {
        0.5 + 0.5 * erf(u * std::f32::consts::FRAC_1_SQRT_2)
    }

    pub fn bias_gelu_in_place(u: &mut [f32], bias: &[f32]) {
        for row in u.chunks_exact_mut(bias.len()) {
            for (v, b) in row.iter_mut().zip(bias) {
                let x = *v + b;
                *v = x * normal_cdf(x);
            }
        }
    }

    pub fn bias_gelu(u: &mut [f32], bias: &[f32]) -> Vec<f32> {
        let mut out = vec![0.0f32; u.len()];
        for (row, orow) in u
            .chunks_exact_mut(bias.len())
            .zip(out.chunks_exact_mut(bias.len()))
        {
            for ((v, b), o) in row.iter_mut().zip(bias).zip(orow) {
                *v += b;
                *o = *v * normal_cdf(*v);
            }
        }
        out
    }

    pub fn gelu_and_backward(u: &[f32], g: &mut [f32]) -> Vec<f32> {
        let mut out = vec![0.0f32; u.len()];
        for ((o, gi), &v) in out.iter_mut().zip(g.iter_mut()).zip(u) {
            let cdf = normal_cdf(v);
            *o = v * cdf;
            *gi *= cdf + v * INV_SQRT_2PI * exp(-0.5 * v * v);
        }
        out
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;

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

    type Gelu = fn(&mut [f32], &[f32]) -> Vec<f32>;
    type GeluInPlace = fn(&mut [f32], &[f32]);
    type GeluBackward = fn(&[f32], &mut [f32]) -> Vec<f32>;

    /// Holds one implementation to the definition on [−8, 8], with a row length (37) that
    /// leaves a partial 16-lane step and a bias that moves every value.
    fn check(name: &str, gelu: Gelu, in_place: GeluInPlace, backward: GeluBackward) {
        let f = 37;
        let bias: Vec<f32> = (0..f).map(|j| j as f32 * 0.01 - 0.2).collect();
        let raw: Vec<f32> = (0..1600).map(|i| i as f32 * 0.01 - 8.0).collect();
        let rows = raw.len() / f;
        let mut u = raw[..rows * f].to_vec();
        let out = gelu(&mut u, &bias);
        let mut place = raw[..rows * f].to_vec();
        in_place(&mut place, &bias);
        let mut g = vec![1.0f32; u.len()];
        let again = backward(&u, &mut g);
        for (i, &x) in u.iter().enumerate() {
            assert_eq!(x, raw[i] + bias[i % f], "{name}: u keeps u + bias");
            let x = x as f64;
            let cdf = 0.5 * (1.0 + erf_ref(x / 2f64.sqrt()));
            let pdf = (-0.5 * x * x).exp() / (2.0 * std::f64::consts::PI).sqrt();
            assert!(
                (out[i] as f64 - x * cdf).abs() < 2e-6,
                "{name}: gelu({x}) = {}",
                out[i]
            );
            assert_eq!(place[i], out[i], "{name}: in place at {x}");
            assert_eq!(again[i], out[i], "{name}: backward's gelu at {x}");
            let slope = cdf + x * pdf;
            assert!(
                (g[i] as f64 - slope).abs() < 2e-6,
                "{name}: gelu'({x}) = {}",
                g[i]
            );
        }
    }

    #[test]
    fn gelu_and_its_derivative_match_the_definition() {
        // Each path the CPU has: AVX-512, AVX2 and portable, by holding the dispatch down.
        use super::super::isa::{detected, isa, with_isa_at_most, Isa};
        for cap in [Isa::Avx512, Isa::Avx2, Isa::Baseline] {
            if cap > detected() {
                continue;
            }
            with_isa_at_most(cap, || {
                assert_eq!(isa(), cap);
                check(
                    &format!("{cap:?}"),
                    bias_gelu,
                    bias_gelu_in_place,
                    gelu_and_backward,
                )
            });
        }
    }
}
