//! DPM-Solver (Lu et al. 2022a), singlestep, noise-prediction form, orders 1-3.
//!
//! One model call per level, like the multistep solvers, so `--steps` counts calls: a step of
//! order k spans k intervals of the level grid and evaluates its intermediate stages at the grid
//! points inside it (r1, r2 are where they fall in lambda; 1/3 and 2/3 on a uniform log-SNR
//! grid, as in the paper's Algorithm 2). Intervals are grouped from the start; a remainder that
//! does not fill a group becomes lower-order steps at the end (never a lone first-order one
//! for order 3); the step to sigma = 0 is
//! first order (its lambda is infinite, so stages cannot sit inside it).

use ndarray::Array4;

use super::{lincomb, Progress, Trajectory};
use crate::error::Result;

/// The order of each step, as a list of interval counts summing to `n`.
pub(crate) fn step_orders(n: usize, order: usize, ends_clean: bool) -> Vec<usize> {
    let body = if ends_clean { n - 1 } else { n };
    let mut orders = vec![order; body / order];
    match body % order {
        0 => {}
        // A lone first-order step would cap third-order global accuracy at second order.
        1 if order == 3 && !orders.is_empty() => {
            orders.pop();
            orders.extend([2, 2]);
        }
        r => orders.push(r),
    }
    if ends_clean {
        orders.push(1);
    }
    orders
}

/// Runs singlestep DPM-Solver of `order` (1..=3); order 1 is DDIM.
pub fn dpm_solver(
    tr: &mut Trajectory<'_>,
    mut x: Array4<f32>,
    order: usize,
    progress: &mut Progress<'_>,
) -> Result<Array4<f32>> {
    let n = tr.steps();
    let lv = tr.levels;
    let mut i = 0;
    for k in step_orders(n, order, lv[n].is_clean()) {
        let (s, t) = (lv[i], lv[i + k]);
        let e_s = tr.den.denoise(&x, &s)?.eps;
        progress(i + 1, n);
        // x_t = (alpha_t/alpha_s) x_s - sigma_t (e^h - 1) eps_s + the order's corrections.
        // sigma_t (e^h - 1) = alpha_t sbar_s - sigma_t stays finite when t is clean.
        let (ra, phi1) = (t.alpha / s.alpha, t.alpha * s.sbar() - t.sigma);
        x = match k {
            1 => lincomb(&[(ra, &x), (-phi1, &e_s)]),
            2 => {
                let s1 = lv[i + 1];
                let h = t.lambda() - s.lambda();
                let r1 = (s1.lambda() - s.lambda()) / h;
                let u1 = first_order(&x, &e_s, &s, &s1);
                let e1 = tr.den.denoise(&u1, &s1)?.eps;
                progress(i + 2, n);
                // - sigma_t/(2 r1) (e^h - 1) (eps_s1 - eps_s)
                let c = phi1 / (2.0 * r1);
                lincomb(&[(ra, &x), (-phi1 + c, &e_s), (-c, &e1)])
            }
            _ => {
                let (s1, s2) = (lv[i + 1], lv[i + 2]);
                let h = t.lambda() - s.lambda();
                let (r1, r2) = (
                    (s1.lambda() - s.lambda()) / h,
                    (s2.lambda() - s.lambda()) / h,
                );
                let u1 = first_order(&x, &e_s, &s, &s1);
                let e1 = tr.den.denoise(&u1, &s1)?.eps;
                progress(i + 2, n);
                // u2 = first order to s2 - sigma_s2 (r2/r1) ((e^{r2 h} - 1)/(r2 h) - 1) D1
                let phi_s2 = s2.alpha * s.sbar() - s2.sigma; // sigma_s2 (e^{r2 h} - 1)
                let c2 = s2.sigma * (r2 / r1) * ((r2 * h).exp_m1() / (r2 * h) - 1.0);
                let u2 = lincomb(&[(s2.alpha / s.alpha, &x), (-phi_s2 + c2, &e_s), (-c2, &e1)]);
                let e2 = tr.den.denoise(&u2, &s2)?.eps;
                progress(i + 3, n);
                // x_t = first order - sigma_t / r2 ((e^h - 1)/h - 1) D2
                let c = t.sigma / r2 * (h.exp_m1() / h - 1.0);
                lincomb(&[(ra, &x), (-phi1 + c, &e_s), (-c, &e2)])
            }
        };
        i += k;
    }
    Ok(x)
}

/// The DDIM (first-order) move from `s` to `t` with noise prediction `e`.
fn first_order(
    x: &Array4<f32>,
    e: &Array4<f32>,
    s: &crate::schedule::NoiseLevel,
    t: &crate::schedule::NoiseLevel,
) -> Array4<f32> {
    lincomb(&[(t.alpha / s.alpha, x), (-(t.alpha * s.sbar() - t.sigma), e)])
}

#[cfg(test)]
mod tests {
    use super::step_orders;

    #[test]
    fn groups_cover_every_interval_and_end_first_order() {
        assert_eq!(step_orders(10, 3, true), vec![3, 3, 3, 1]);
        assert_eq!(step_orders(9, 3, true), vec![3, 3, 2, 1]);
        assert_eq!(step_orders(11, 3, true), vec![3, 3, 2, 2, 1]);
        assert_eq!(step_orders(5, 2, false), vec![2, 2, 1]);
        assert_eq!(step_orders(1, 3, true), vec![1]);
        for n in 1..30 {
            for order in 1..=3 {
                assert_eq!(step_orders(n, order, true).iter().sum::<usize>(), n);
            }
        }
    }
}
