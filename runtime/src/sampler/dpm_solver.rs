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

use super::ops::{lincomb, transfer, transfer_coefficients};
use super::{Progress, SamplerDef, SamplerOption, Trajectory};
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
        // x_t = (alpha_t/alpha_s) x_s - sigma_t (e^h - 1) eps_s + the order's corrections: the
        // DDIM transfer, whose eps coefficient -sigma_t (e^h - 1) = sigma_t - alpha_t sbar_s stays
        // finite when t is clean.
        let (ra, c_eps) = transfer_coefficients(&s, &t);
        x = match k {
            1 => transfer(&x, &e_s, &s, &t),
            2 => {
                let s1 = lv[i + 1];
                let h = t.lambda() - s.lambda();
                let r1 = (s1.lambda() - s.lambda()) / h;
                let u1 = transfer(&x, &e_s, &s, &s1);
                let e1 = tr.den.denoise(&u1, &s1)?.eps;
                progress(i + 2, n);
                // - sigma_t/(2 r1) (e^h - 1) (eps_s1 - eps_s)
                let c = -c_eps / (2.0 * r1);
                lincomb(&[(ra, &x), (c_eps + c, &e_s), (-c, &e1)])
            }
            _ => {
                let (s1, s2) = (lv[i + 1], lv[i + 2]);
                let h = t.lambda() - s.lambda();
                let (r1, r2) = (
                    (s1.lambda() - s.lambda()) / h,
                    (s2.lambda() - s.lambda()) / h,
                );
                let u1 = transfer(&x, &e_s, &s, &s1);
                let e1 = tr.den.denoise(&u1, &s1)?.eps;
                progress(i + 2, n);
                // u2 = first order to s2 - sigma_s2 (r2/r1) ((e^{r2 h} - 1)/(r2 h) - 1) D1
                let (ra2, c_eps2) = transfer_coefficients(&s, &s2);
                let c2 = s2.sigma * (r2 / r1) * ((r2 * h).exp_m1() / (r2 * h) - 1.0);
                let u2 = lincomb(&[(ra2, &x), (c_eps2 + c2, &e_s), (-c2, &e1)]);
                let e2 = tr.den.denoise(&u2, &s2)?.eps;
                progress(i + 3, n);
                // x_t = first order - sigma_t / r2 ((e^h - 1)/h - 1) D2
                let c = t.sigma / r2 * (h.exp_m1() / h - 1.0);
                lincomb(&[(ra, &x), (c_eps + c, &e_s), (-c, &e2)])
            }
        };
        i += k;
    }
    Ok(x)
}

pub static DPM_SOLVER: SamplerDef = SamplerDef::new(
    "dpm-solver",
    "--order (default 3)",
    "1 per level (a step of order k spans k levels)",
)
.summary("DPM-Solver singlestep, noise prediction (Lu et al. 2022a)")
.options(&[SamplerOption::Order { default: 3, max: 3 }])
.run(|o, tr, x, progress| dpm_solver(tr, x, o.order, progress));

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
