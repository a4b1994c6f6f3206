//! UniPC (Zhao et al. 2023), B(h) = e^h - 1 ("bh2"), data prediction: a multistep predictor
//! UniP of order p and the corrector UniC, which refines each new sample with the model output
//! already computed there (no extra call). The step to sigma = 0 is first order, and orders
//! shrink near the end (p <= steps left), as diffusers' `lower_order_final` does.

use std::collections::VecDeque;

use ndarray::Array4;

use super::ops::{lincomb, solve_augmented};
use super::{SamplerDef, SamplerOption, Step};
use crate::schedule::NoiseLevel;
use crate::spacing::LeadingRatio;

/// The phi-function right-hand side b_k and B(h) for an update over hh = -h (data prediction).
fn b_vector(hh: f64, order: usize) -> (f64, f64, Vec<f64>) {
    let h_phi_1 = hh.exp_m1();
    let b_h = hh.exp_m1();
    let mut h_phi_k = h_phi_1 / hh - 1.0;
    let mut factorial = 1.0;
    let mut b = Vec::with_capacity(order);
    for i in 1..=order {
        b.push(h_phi_k * factorial / b_h);
        factorial *= (i + 1) as f64;
        h_phi_k = h_phi_k / hh - 1.0 / factorial;
    }
    (h_phi_1, b_h, b)
}

/// Solves R rho = b with R[i][j] = rks[j]^i (a Vandermonde system, at most 3x3).
fn solve_vandermonde(rks: &[f64], b: &[f64]) -> Vec<f64> {
    let k = rks.len();
    solve_augmented(
        (0..k)
            .map(|i| {
                (0..k)
                    .map(|j| rks[j].powi(i as i32))
                    .chain([b[i]])
                    .collect()
            })
            .collect(),
    )
}

/// One UniP / UniC update from level `s0` (sample `x`, data prediction `m0`) to level `t`.
/// `hist` holds (level, x0) of earlier points, most recent first; `m_t` is the model output at
/// `t` for the corrector (None for the predictor).
fn update(
    x: &Array4<f32>,
    s0: &NoiseLevel,
    m0: &Array4<f32>,
    t: &NoiseLevel,
    hist: &[(NoiseLevel, &Array4<f32>)],
    m_t: Option<&Array4<f32>>,
) -> Array4<f32> {
    let h = t.lambda() - s0.lambda();
    let rks: Vec<f64> = hist
        .iter()
        .map(|(l, _)| (l.lambda() - s0.lambda()) / h)
        .collect();
    let order = hist.len() + 1;
    let (h_phi_1, b_h, b) = b_vector(-h, order);
    let scale = t.alpha * b_h;
    let rhos: Vec<f64> = match m_t {
        // Predictor: order 2 uses rho = 1/2; order 3 solves the (order-1)-sized system.
        None if order == 2 => vec![0.5],
        None => solve_vandermonde(&rks, &b[..order - 1]),
        // Corrector: order 1 uses rho = 1/2; else the full system including rk = 1 for t.
        Some(_) if order == 1 => vec![0.5],
        Some(_) => solve_vandermonde(&rks.iter().copied().chain([1.0]).collect::<Vec<_>>(), &b),
    };
    // x_t = (sigma_t/sigma_s0) x - alpha_t h phi_1 m0 - alpha_t B(h) sum_k rho_k D_k,
    // with D_k = (m_k - m0) / r_k and, for the corrector, D_t = m_t - m0 weighted by rho_last.
    let mut c_m0 = -t.alpha * h_phi_1;
    let mut terms: Vec<(f64, &Array4<f32>)> = vec![(t.sigma / s0.sigma, x)];
    for (k, (_, mk)) in hist.iter().enumerate() {
        let c = scale * rhos[k] / rks[k];
        terms.push((-c, mk));
        c_m0 += c;
    }
    if let Some(mt) = m_t {
        let c = scale * rhos[rhos.len() - 1];
        terms.push((-c, mt));
        c_m0 += c;
    }
    terms.push((c_m0, m0));
    lincomb(&terms)
}

/// What UniPC carries between steps.
struct State {
    /// Predictor order.
    order: usize,
    /// Data predictions, most recent first, with their step index.
    ms: VecDeque<(usize, Array4<f32>)>,
    /// The last step's starting sample and order, for the corrector at the next level.
    last: Option<(Array4<f32>, usize)>,
}

impl State {
    /// The earlier data predictions an update of `order` uses (skipping the newest), with their
    /// levels.
    fn history<'m>(
        &'m self,
        lv: &[NoiseLevel],
        order: usize,
    ) -> Vec<(NoiseLevel, &'m Array4<f32>)> {
        self.ms
            .iter()
            .skip(1)
            .take(order - 1)
            .map(|(k, m)| (lv[*k], m))
            .collect()
    }

    /// One step: UniC corrects the sample the last step predicted with the model output now in
    /// hand, then UniP predicts the next level from the corrected sample.
    fn step(&mut self, lv: &[NoiseLevel], s: Step<'_>) -> Array4<f32> {
        let i = s.i;
        let m_i = s.d.x0;
        let x = match self.last.take() {
            Some((prev_x, prev_order)) => {
                let (j, m0) = (&self.ms[0].0, &self.ms[0].1);
                let hist = self.history(lv, prev_order);
                update(&prev_x, &lv[*j], m0, &lv[i], &hist, Some(&m_i))
            }
            None => s.x.clone(),
        };
        self.ms.push_front((i, m_i));
        self.ms.truncate(self.order);
        let this_order = self.order.min(s.n - i).min(i + 1);
        let hist = self.history(lv, this_order);
        let next = update(&x, &lv[i], &self.ms[0].1, &lv[i + 1], &hist, None);
        self.last = Some((x, this_order));
        next
    }
}

pub static UNIPC: SamplerDef = SamplerDef::new("unipc", "--order (default 2), +1 by UniC", "1")
    .summary("UniPC: UniP predictor with the UniC corrector, bh2 (Zhao et al. 2023)")
    .options(&[SamplerOption::Order { default: 2, max: 3 }])
    .leading(LeadingRatio::StepsPlusOne)
    .run(|o, tr, x, progress| {
        let mut state = State {
            order: o.order,
            ms: VecDeque::with_capacity(o.order + 1),
            last: None,
        };
        let lv = tr.levels;
        tr.walk(x, progress, |_, s| Ok(state.step(lv, s)))
    });

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vandermonde_solution_satisfies_the_system() {
        let rks = [-0.7, -1.9, 1.0];
        let b = [0.3, -0.2, 0.05];
        let rho = solve_vandermonde(&rks, &b);
        for (i, bi) in b.iter().enumerate() {
            let lhs: f64 = rks
                .iter()
                .zip(&rho)
                .map(|(r, p)| r.powi(i as i32) * p)
                .sum();
            assert!((lhs - bi).abs() < 1e-12);
        }
    }
}
