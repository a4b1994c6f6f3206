//! DPM-Solver++ multistep (Lu et al. 2022b) in lambda = log(alpha / sigma) with data prediction
//! x0: orders 1-3 (2M, 3M), and the SDE variant (order 1-2) that adds fresh noise each step.
//! The first steps warm up at lower order; the step to sigma = 0 is always first order (the
//! higher-order terms divide by an infinite step there), and with fewer than 15 steps the last
//! two steps lower their order, as diffusers does (`lower_order_final`).

use std::collections::VecDeque;

use ndarray::Array4;

use super::ops::lincomb;
use super::{SamplerDef, SamplerOption, Step, Stochastic, Trajectory};
use crate::error::Result;
use crate::spacing::LeadingRatio;

/// Which DPM-Solver++ family member.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DpmVariant {
    /// Deterministic probability-flow ODE solver.
    Ode,
    /// The SDE solver (Lu et al. 2022b, §5 / diffusers "sde-dpmsolver++", midpoint).
    Sde,
}

/// Terms of an update, each a coefficient and an array.
type Terms = Vec<(f64, Array4<f32>)>;

/// Runs DPM-Solver++ of `order` (1..=3; the SDE variant at most 2).
fn dpmpp(
    tr: &mut Trajectory<'_>,
    x: Array4<f32>,
    order: usize,
    variant: DpmVariant,
    progress: &mut super::Progress<'_>,
) -> Result<Array4<f32>> {
    let mut x0s: VecDeque<Array4<f32>> = VecDeque::with_capacity(3);
    tr.walk(x, progress, |tr, s| step(tr, s, order, variant, &mut x0s))
}

/// One step; `x0s` holds the last three data predictions, most recent first.
fn step(
    tr: &mut Trajectory<'_>,
    s: Step<'_>,
    order: usize,
    variant: DpmVariant,
    x0s: &mut VecDeque<Array4<f32>>,
) -> Result<Array4<f32>> {
    let (i, n, cur, next) = (s.i, s.n, s.cur, s.next);
    x0s.push_front(s.d.x0);
    x0s.truncate(3);
    let mut k = order.min(i + 1);
    if next.is_clean() || (n < 15 && i == n - 1) {
        k = 1;
    } else if n < 15 && i + 2 == n {
        k = k.min(2);
    }
    let h = next.lambda() - cur.lambda();
    let em = (-h).exp_m1(); // e^{-h} - 1, accurate for small h
    let (at, st) = (next.alpha, next.sigma);
    // D0, D1, D2: the data-prediction polynomial's terms (diffusers' notation).
    let lv = tr.levels;
    let lam = |j: usize| lv[i - j].lambda();
    let d1 = |a: &Array4<f32>, b: &Array4<f32>, r: f64| lincomb(&[(1.0 / r, a), (-1.0 / r, b)]);
    // The sample's coefficient, the other terms, and the scale of fresh noise.
    let (c_x, terms, noise): (f64, Terms, Option<f64>) = match variant {
        DpmVariant::Ode => {
            let c_x = st / cur.sigma;
            let mut t = vec![(-at * em, x0s[0].clone())];
            if k == 2 {
                let r0 = (lam(0) - lam(1)) / h;
                t.push((-0.5 * at * em, d1(&x0s[0], &x0s[1], r0)));
            } else if k == 3 {
                let (r0, r1) = ((lam(0) - lam(1)) / h, (lam(1) - lam(2)) / h);
                let d1_0 = d1(&x0s[0], &x0s[1], r0);
                let d1_1 = d1(&x0s[1], &x0s[2], r1);
                let diff = lincomb(&[(1.0, &d1_0), (-1.0, &d1_1)]);
                let dd1 = lincomb(&[(1.0, &d1_0), (r0 / (r0 + r1), &diff)]);
                let dd2 = diff.mapv(|v| v / (r0 + r1) as f32);
                t.push((at * (em / h + 1.0), dd1));
                t.push((-at * ((em + h) / (h * h) - 0.5), dd2));
            }
            (c_x, t, None)
        }
        DpmVariant::Sde => {
            let c_x = if st == 0.0 {
                0.0
            } else {
                st / cur.sigma * (-h).exp()
            };
            let e2 = -(-2.0 * h).exp_m1(); // 1 - e^{-2h}
            let mut t = vec![(at * e2, x0s[0].clone())];
            if k >= 2 {
                let r0 = (lam(0) - lam(1)) / h;
                t.push((0.5 * at * e2, d1(&x0s[0], &x0s[1], r0)));
            }
            (c_x, t, (st > 0.0).then(|| st * e2.sqrt()))
        }
    };
    let mut all: Vec<(f64, &Array4<f32>)> = vec![(c_x, s.x)];
    all.extend(terms.iter().map(|(c, t)| (*c, t)));
    tr.lincomb_with_noise(i, &all, noise)
}

pub static DPMPP_2M: SamplerDef = SamplerDef::new("dpm++2m", "2", "1")
    .summary("DPM-Solver++ 2M multistep (Lu et al. 2022)")
    .options(&[SamplerOption::Order { default: 2, max: 3 }])
    .leading(LeadingRatio::StepsPlusOne)
    .run(|o, tr, x, progress| dpmpp(tr, x, o.order, DpmVariant::Ode, progress));

/// 2M's solver at order 3 by default: the same function, its own row.
pub static DPMPP_3M: SamplerDef = SamplerDef {
    name: "dpm++3m",
    order: "3",
    summary: "DPM-Solver++ 3M multistep (Lu et al. 2022)",
    options: &[SamplerOption::Order { default: 3, max: 3 }],
    ..DPMPP_2M
};

pub static DPMPP_2M_SDE: SamplerDef = SamplerDef::new("dpm++2m-sde", "2 (weak)", "1")
    .summary("SDE DPM-Solver++ 2M, midpoint (Lu et al. 2022)")
    .options(&[SamplerOption::Order { default: 2, max: 2 }])
    .stochastic(Stochastic::Always)
    .leading(LeadingRatio::StepsPlusOne)
    .run(|o, tr, x, progress| dpmpp(tr, x, o.order, DpmVariant::Sde, progress));
