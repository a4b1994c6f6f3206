//! The step maths every sampler is built from, written once: the f64-accumulating linear
//! combination, the DDIM/Euler transfer between two levels, the DDPM posterior variance, and the
//! Bogacki–Shampine 3(2) step with its error norm (shared by `ode-adaptive`, `adaptive` and the
//! likelihood ODE).
//!
//! There is no k-diffusion `to_d`: in xbar = x / alpha against sbar = sigma / alpha the
//! probability-flow ODE's slope d xbar / d sbar is eps itself, which the denoiser returns.

use std::borrow::Cow;

use ndarray::{Array4, ArrayView3};

use crate::error::Result;
use crate::schedule::NoiseLevel;

/// sum_k c_k a_k elementwise, accumulated in f64: the one update every sampler is made of.
///
/// Steps from the top of steep schedules (cosine at t = T-1, alpha ~ 1e-2) multiply O(1)
/// samples by coefficients in the hundreds that then cancel; f32 products would lose ~1e-5.
pub(crate) fn lincomb(terms: &[(f64, &Array4<f32>)]) -> Array4<f32> {
    let shape = terms[0].1.raw_dim();
    let slices: Vec<(f64, Cow<'_, [f32]>)> = terms
        .iter()
        .map(|(c, a)| {
            debug_assert_eq!(a.raw_dim(), shape);
            let data = match a.as_slice() {
                Some(s) => Cow::Borrowed(s),
                None => Cow::Owned(a.iter().copied().collect()),
            };
            (*c, data)
        })
        .collect();
    let len = slices[0].1.len();
    let out: Vec<f32> = (0..len)
        .map(|i| slices.iter().map(|(c, s)| c * s[i] as f64).sum::<f64>() as f32)
        .collect();
    Array4::from_shape_vec(shape, out).expect("same shape as the inputs")
}

/// Solves the k x k system whose augmented rows `[A | b]` are `a` (k rows of k + 1), by
/// Gauss-Jordan elimination with partial pivoting: the small dense systems of UniPC's
/// coefficients and of fitted solver coefficients (crate::calibrate).
pub(crate) fn solve_augmented(mut a: Vec<Vec<f64>>) -> Vec<f64> {
    let k = a.len();
    for col in 0..k {
        let pivot = (col..k)
            .max_by(|&p, &q| a[p][col].abs().total_cmp(&a[q][col].abs()))
            .unwrap_or(col);
        a.swap(col, pivot);
        let pivot_row = a[col].clone();
        for (row, r) in a.iter_mut().enumerate() {
            if row != col {
                let f = r[col] / pivot_row[col];
                for (v, p) in r[col..].iter_mut().zip(&pivot_row[col..]) {
                    *v -= f * p;
                }
            }
        }
    }
    (0..k).map(|i| a[i][k] / a[i][i]).collect()
}

/// The coefficients (c_x, c_eps) of the DDIM/Euler transfer from `cur` to `next`:
/// x_next = c_x x + c_eps eps = alpha_next x0 + sigma_next eps with x0 = (x - sigma eps) / alpha,
/// which is also one Euler step of d xbar / d sbar = eps. c_eps is written in the x0/eps form,
/// sigma_next - alpha_next sbar, rather than alpha_next (sbar_next - sbar), which would divide
/// sigma_next by alpha_next only to multiply it back.
pub(crate) fn transfer_coefficients(cur: &NoiseLevel, next: &NoiseLevel) -> (f64, f64) {
    (next.alpha / cur.alpha, next.sigma - next.alpha * cur.sbar())
}

/// The DDIM/Euler transfer of `x` from `cur` to `next` along `eps`.
pub(crate) fn transfer(
    x: &Array4<f32>,
    eps: &Array4<f32>,
    cur: &NoiseLevel,
    next: &NoiseLevel,
) -> Array4<f32> {
    let (c_x, c_eps) = transfer_coefficients(cur, next);
    lincomb(&[(c_x, x), (c_eps, eps)])
}

/// Variance of the true posterior q(x_s | x_t, x0) for s < t on any VP or VE schedule:
/// sigma_{t|s}² sigma_s² / sigma_t² with sigma_{t|s}² = sigma_t² - (alpha_t/alpha_s)² sigma_s².
pub(crate) fn posterior_variance(cur: &NoiseLevel, next: &NoiseLevel) -> f64 {
    let a_ts = cur.alpha / next.alpha;
    let s2_ts = cur.sigma.powi(2) - a_ts.powi(2) * next.sigma.powi(2);
    (s2_ts * next.sigma.powi(2) / cur.sigma.powi(2)).max(0.0)
}

/// One Bogacki–Shampine 3(2) step's results: the third-order solution, the slope there (the
/// next step's first stage: FSAL) and the embedded second-order solution's difference from it.
pub(crate) struct Bs3<S, K> {
    pub y: S,
    pub k4: K,
    pub err: S,
}

/// One Bogacki–Shampine 3(2) step (Hairer et al., II.4) from `y`, whose slope `k1` is known.
///
/// The state type is the caller's: `f(c, y)` evaluates the slope at the stage time u + c h and
/// `axpy(y, terms)` forms y + h sum a_i k_i (`None`: h sum a_i k_i alone, for the error), so a
/// caller can carry one step size for the batch or one per sample, and extra components.
pub(crate) fn bs3_step<S, K>(
    y: &S,
    k1: &K,
    mut f: impl FnMut(f64, &S) -> Result<K>,
    axpy: impl Fn(Option<&S>, &[(f64, &K)]) -> S,
) -> Result<Bs3<S, K>> {
    let k2 = f(0.5, &axpy(Some(y), &[(0.5, k1)]))?;
    let k3 = f(0.75, &axpy(Some(y), &[(0.75, &k2)]))?;
    let new = axpy(
        Some(y),
        &[(2.0 / 9.0, k1), (1.0 / 3.0, &k2), (4.0 / 9.0, &k3)],
    );
    let k4 = f(1.0, &new)?;
    let err = axpy(
        None,
        &[
            (-5.0 / 72.0, k1),
            (1.0 / 12.0, &k2),
            (1.0 / 9.0, &k3),
            (-1.0 / 8.0, &k4),
        ],
    );
    Ok(Bs3 { y: new, k4, err })
}

/// Sum over one sample's elements of (err / (atol + rtol max(|y|, |y_new|)))²: the error norm's
/// share of a sample's array part (the caller divides by the count and takes the root).
pub(crate) fn scaled_error_sq(
    err: ArrayView3<'_, f32>,
    y: ArrayView3<'_, f32>,
    new: ArrayView3<'_, f32>,
    rtol: f64,
    atol: f64,
) -> f64 {
    err.iter()
        .zip(y.iter())
        .zip(new.iter())
        .map(|((&e, &a), &b)| scaled_error(e as f64, a as f64, b as f64, rtol, atol).powi(2))
        .sum()
}

/// err / (atol + rtol max(|y|, |y_new|)) for one component.
pub(crate) fn scaled_error(e: f64, y: f64, new: f64, rtol: f64, atol: f64) -> f64 {
    e / (atol + rtol * y.abs().max(new.abs()))
}

/// The factor the next step size is the last one times, for a step of error norm `norm`:
/// (0.9 / norm)^(1/3), kept within [0.2, 5] (Hairer et al., II.4, for a third-order pair).
pub(crate) fn step_factor(norm: f64) -> f64 {
    (0.9 * norm.max(1e-10).powf(-1.0 / 3.0)).clamp(0.2, 5.0)
}
