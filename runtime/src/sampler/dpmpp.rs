//! DPM-Solver++ multistep (Lu et al. 2022b) in lambda = log(alpha / sigma) with data prediction
//! x0: orders 1-3 (2M, 3M), and the SDE variant (order 1-2) that adds fresh noise each step.
//! The first steps warm up at lower order; the step to sigma = 0 is always first order (the
//! higher-order terms divide by an infinite step there), and with fewer than 15 steps the last
//! two steps lower their order, as diffusers does (`lower_order_final`).

use std::collections::VecDeque;

use ndarray::Array4;

use super::{lincomb, Progress, Trajectory};
use crate::error::Result;

/// Which DPM-Solver++ family member.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DpmVariant {
    /// Deterministic probability-flow ODE solver.
    Ode,
    /// The SDE solver (Lu et al. 2022b, §5 / diffusers "sde-dpmsolver++", midpoint).
    Sde,
}

/// Runs DPM-Solver++ of `order` (1..=3; the SDE variant at most 2).
pub fn dpmpp(
    tr: &mut Trajectory<'_>,
    mut x: Array4<f32>,
    order: usize,
    variant: DpmVariant,
    progress: &mut Progress<'_>,
) -> Result<Array4<f32>> {
    let n = tr.steps();
    let mut x0s: VecDeque<Array4<f32>> = VecDeque::with_capacity(3);
    for i in 0..n {
        let (cur, next) = (tr.levels[i], tr.levels[i + 1]);
        x0s.push_front(tr.den.denoise(&x, &cur)?.x0);
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
        let lam = |j: usize| tr.levels[i - j].lambda();
        let d1 = |a: &Array4<f32>, b: &Array4<f32>, r: f64| combine2(1.0 / r, a, -1.0 / r, b);
        let (c_x, terms): (f64, Vec<(f64, Array4<f32>)>) = match variant {
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
                    let diff = combine2(1.0, &d1_0, -1.0, &d1_1);
                    let dd1 = combine2(1.0, &d1_0, r0 / (r0 + r1), &diff);
                    let dd2 = diff.mapv(|v| v / (r0 + r1) as f32);
                    t.push((at * (em / h + 1.0), dd1));
                    t.push((-at * ((em + h) / (h * h) - 0.5), dd2));
                }
                (c_x, t)
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
                if st > 0.0 {
                    t.push((st * e2.sqrt(), tr.noise.step(i)?));
                }
                (c_x, t)
            }
        };
        let mut all: Vec<(f64, &Array4<f32>)> = vec![(c_x, &x)];
        all.extend(terms.iter().map(|(c, t)| (*c, t)));
        x = lincomb(&all);
        progress(i + 1, n);
    }
    Ok(x)
}

fn combine2(a: f64, x: &Array4<f32>, b: f64, y: &Array4<f32>) -> Array4<f32> {
    super::combine(a, x, b, y, 0.0, None)
}
