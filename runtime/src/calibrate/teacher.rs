//! The teacher's whole trajectory, so that a fit can ask where it is at any time.
//!
//! Fitting a solver's coefficients step by step needs the converged solution at every time
//! point of every grid the search tries. Re-running the teacher per grid would cost hundreds of
//! calls per pilot noise each time; instead the teacher's states and slopes at its own levels
//! are kept and interpolated: in xbar = x / alpha against u = log sbar the probability-flow ODE
//! is d xbar / du = sbar eps, and eps at each level is the teacher's own first call there, so a
//! cubic Hermite interpolant costs no call at all. Its error is O(h^4) in the level spacing h,
//! far below the teacher's own (second order) error at the default 250 steps.

use ndarray::Array4;

use crate::sampler::ops::lincomb;
use crate::schedule::NoiseLevel;

/// The teacher's states `x` and slopes `eps` at its levels (noisiest first, the clean end
/// excluded), and its output at the clean end.
pub(crate) struct Teacher {
    pub levels: Vec<NoiseLevel>,
    pub x: Vec<Array4<f32>>,
    pub eps: Vec<Array4<f32>>,
    pub out: Array4<f32>,
}

impl Teacher {
    /// The teacher's state at `level`: the output at the clean end, else interpolated between
    /// the two levels around it (clamped to the first and last).
    pub fn at(&self, level: &NoiseLevel) -> Array4<f32> {
        if level.is_clean() {
            return self.out.clone();
        }
        let u = level.sbar().ln();
        let us: Vec<f64> = self.levels.iter().map(|l| l.sbar().ln()).collect();
        let n = us.len();
        if n < 2 || u >= us[0] {
            return self.x[0].clone();
        }
        if u <= us[n - 1] {
            return self.x[n - 1].clone();
        }
        // us decreases: us[k] > u >= us[k + 1].
        let k = us.partition_point(|&v| v > u) - 1;
        let (l0, l1) = (&self.levels[k], &self.levels[k + 1]);
        let h = us[k + 1] - us[k];
        let s = (u - us[k]) / h;
        let (h00, h10) = (
            2.0 * s.powi(3) - 3.0 * s * s + 1.0,
            s.powi(3) - 2.0 * s * s + s,
        );
        let (h01, h11) = (-2.0 * s.powi(3) + 3.0 * s * s, s.powi(3) - s * s);
        // x = alpha (h00 xbar_k + h10 h m_k + h01 xbar_k1 + h11 h m_k1), xbar = x / alpha and
        // m = sbar eps, written on x and eps directly.
        let a = level.alpha;
        lincomb(&[
            (a * h00 / l0.alpha, &self.x[k]),
            (a * h10 * h * l0.sbar(), &self.eps[k]),
            (a * h01 / l1.alpha, &self.x[k + 1]),
            (a * h11 * h * l1.sbar(), &self.eps[k + 1]),
        ])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A single Gaussian N(0, v) per component has the closed-form flow
    /// xbar(sbar) = xbar_T sqrt(v + sbar²) / sqrt(v + sbar_T²) (alpha = 1/sqrt(1 + sbar²)),
    /// whose eps is sbar xbar / (v + sbar²).
    #[test]
    fn hermite_interpolation_follows_a_known_flow() {
        let v = 0.3;
        let x_t = Array4::from_shape_fn((2, 1, 1, 3), |(i, _, _, j)| {
            (i as f32 - 0.5) + 0.2 * j as f32
        });
        let level = |sbar: f64| NoiseLevel::from_sbar(0.0, sbar);
        let (sbar_t, xbar_t) = (80.0, 80.0f64.hypot(1.0));
        let state = |sbar: f64| -> (Array4<f32>, Array4<f32>) {
            let l = level(sbar);
            let scale = (v + sbar * sbar).sqrt() / (v + sbar_t * sbar_t).sqrt() * xbar_t;
            let x = x_t.mapv(|e| (e as f64 * scale * l.alpha) as f32);
            let eps = x_t.mapv(|e| (sbar * e as f64 * scale / (v + sbar * sbar)) as f32);
            (x, eps)
        };
        let sbars: Vec<f64> = (0..=40)
            .map(|k| sbar_t * (0.01f64 / sbar_t).powf(k as f64 / 40.0))
            .collect();
        let (xs, epss): (Vec<_>, Vec<_>) = sbars.iter().map(|&s| state(s)).unzip();
        let teacher = Teacher {
            levels: sbars.iter().map(|&s| level(s)).collect(),
            x: xs,
            eps: epss,
            out: x_t.clone(),
        };
        for sbar in [80.0, 31.7, 2.2, 0.9, 0.137, 0.0101] {
            let want = state(sbar).0;
            let got = teacher.at(&level(sbar));
            let err = (&got - &want).mapv(f32::abs).fold(0.0f32, |m, &e| m.max(e));
            // 41 levels over log sbar in [ln 0.01, ln 80]: h = 0.22; the cubic's error there is
            // ~1e-5 at the flow's bend (sbar ~ sqrt v), f32 rounding ~1e-7.
            assert!(err < 2e-5, "sbar {sbar}: {err}");
        }
        assert_eq!(teacher.at(&NoiseLevel::CLEAN), x_t);
    }
}
