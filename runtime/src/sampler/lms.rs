//! Linear multistep (k-diffusion `sample_lms`, diffusers' LMSDiscreteScheduler): the last
//! `order` eps values define a Lagrange polynomial in sbar, integrated exactly over each step.

use std::collections::VecDeque;

use ndarray::Array4;

use super::ops::lincomb;
use super::{SamplerDef, SamplerOption, Step, Trajectory};

/// Integral over [a, b] of the Lagrange basis polynomial `j` on `nodes` (exact: 4-point
/// Gauss–Legendre integrates degree <= 7, and the basis has degree <= 3).
fn lagrange_integral(nodes: &[f64], j: usize, a: f64, b: f64) -> f64 {
    const X: [f64; 4] = [
        -0.861_136_311_594_052_6,
        -0.339_981_043_584_856_3,
        0.339_981_043_584_856_3,
        0.861_136_311_594_052_6,
    ];
    const W: [f64; 4] = [
        0.347_854_845_137_453_9,
        0.652_145_154_862_546_1,
        0.652_145_154_862_546_1,
        0.347_854_845_137_453_9,
    ];
    let basis = |s: f64| -> f64 {
        nodes
            .iter()
            .enumerate()
            .filter(|(k, _)| *k != j)
            .map(|(_, &nk)| (s - nk) / (nodes[j] - nk))
            .product()
    };
    let (mid, half) = (0.5 * (a + b), 0.5 * (b - a));
    X.iter()
        .zip(W)
        .map(|(&x, w)| w * basis(mid + half * x))
        .sum::<f64>()
        * half
}

/// One LMS step over the last `order` eps values, kept in `history` (most recent first).
fn step(
    tr: &Trajectory<'_>,
    s: Step<'_>,
    order: usize,
    history: &mut VecDeque<Array4<f32>>,
) -> Array4<f32> {
    history.push_front(s.d.eps);
    history.truncate(order);
    // xbar_next = xbar + sum_j c_j eps_j, carried in x = alpha xbar to stay O(1) in f32.
    let nodes: Vec<f64> = (0..history.len())
        .map(|k| tr.levels[s.i - k].sbar())
        .collect();
    let mut terms: Vec<(f64, &Array4<f32>)> = vec![(s.next.alpha / s.cur.alpha, s.x)];
    for (j, d) in history.iter().enumerate() {
        let integral = lagrange_integral(&nodes, j, s.cur.sbar(), s.next.sbar());
        terms.push((s.next.alpha * integral, d));
    }
    lincomb(&terms)
}

pub static LMS: SamplerDef = SamplerDef::new("lms", "--order (default 4)", "1")
    .summary("linear multistep in sigma/alpha with exact Lagrange integrals")
    .options(&[SamplerOption::Order { default: 4, max: 4 }])
    .run(|o, tr, x, progress| {
        let mut history = VecDeque::with_capacity(o.order);
        tr.walk(x, progress, |tr, s| Ok(step(tr, s, o.order, &mut history)))
    });

#[cfg(test)]
mod tests {
    use super::lagrange_integral;

    #[test]
    fn basis_integrals_are_exact() {
        // Nodes 0, 1, 2: the basis of node 0 is (s-1)(s-2)/2; its integral over [0, 3] is 3/4.
        assert!((lagrange_integral(&[0.0, 1.0, 2.0], 0, 0.0, 3.0) - 0.75).abs() < 1e-14);
        // The basis polynomials sum to 1, so their integrals sum to b - a.
        let total: f64 = (0..4)
            .map(|j| lagrange_integral(&[5.0, 3.5, 2.0, 1.2], j, 5.0, 0.3))
            .sum();
        assert!((total - (0.3 - 5.0)).abs() < 1e-13);
    }
}
