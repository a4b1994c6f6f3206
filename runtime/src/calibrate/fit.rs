//! The fitted solver's coefficients ([`crate::sampler::fitted`]) on one grid, by least squares
//! step by step.
//!
//! Step i's new sample x_{i+1} = c_i0 x_i + sum_j c_i(j+1) D_j is linear in its coefficients
//! once x_i and the predictions D_0..D_i are known, and those depend only on the steps before:
//! so the steps are fitted in order, each in closed form, to the teacher's state at the next
//! time point (its output at the clean end), on every pilot sample and component at once.
//! Fitting each step to the teacher's state rather than to the next step's ideal keeps the
//! errors of earlier steps from accumulating: every step is asked to bring the sample back onto
//! the teacher's trajectory.

use ndarray::Array4;

use super::teacher::Teacher;
use crate::error::Result;
use crate::sampler::fitted::combine;
use crate::sampler::ops::solve_augmented;
use crate::schedule::NoiseLevel;

/// The pilot's x0 predictions `[pilot, C, H, W]` at a level, for the pilot's samples `x`.
pub(crate) type PilotDenoiser<'a> =
    dyn FnMut(&Array4<f32>, &NoiseLevel) -> Result<Array4<f32>> + 'a;

/// Fits one row of coefficients per step of `levels` (the time points, then the clean end) from
/// the pilot's initial noise `x`; returns them and the pilot's output with them.
pub(crate) fn fit_coefficients(
    mut x: Array4<f32>,
    levels: &[NoiseLevel],
    teacher: &Teacher,
    x0_at: &mut PilotDenoiser<'_>,
) -> Result<(Vec<Vec<f64>>, Array4<f32>)> {
    let steps = levels.len() - 1;
    let mut x0s = Vec::with_capacity(steps);
    let mut rows = Vec::with_capacity(steps);
    for i in 0..steps {
        x0s.push(x0_at(&x, &levels[i])?);
        let basis: Vec<&Array4<f32>> = std::iter::once(&x).chain(&x0s).collect();
        let row = least_squares(&basis, &teacher.at(&levels[i + 1]));
        x = combine(&row, &x, &x0s);
        rows.push(row);
    }
    Ok((rows, x))
}

/// argmin_c || sum_k c_k a_k - y ||² over all elements, by the normal equations in f64.
///
/// A ridge of 1e-12 of the mean diagonal keeps the system solvable when two columns coincide
/// (two time points the search brings together give the same prediction twice); it moves a
/// well-posed solution by about that relative amount, far below float32 resolution.
pub(crate) fn least_squares(basis: &[&Array4<f32>], y: &Array4<f32>) -> Vec<f64> {
    let cols: Vec<Vec<f32>> = basis.iter().map(|a| a.iter().copied().collect()).collect();
    let y: Vec<f32> = y.iter().copied().collect();
    let dot =
        |a: &[f32], b: &[f32]| -> f64 { a.iter().zip(b).map(|(p, q)| *p as f64 * *q as f64).sum() };
    let m = cols.len();
    let mut gram = vec![vec![0.0; m + 1]; m];
    for i in 0..m {
        for j in i..m {
            let g = dot(&cols[i], &cols[j]);
            gram[i][j] = g;
            gram[j][i] = g;
        }
        gram[i][m] = dot(&cols[i], &y);
    }
    let ridge = 1e-12 * (0..m).map(|i| gram[i][i]).sum::<f64>() / m as f64;
    for (i, row) in gram.iter_mut().enumerate() {
        row[i] += ridge.max(f64::MIN_POSITIVE);
    }
    solve_augmented(gram)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn least_squares_recovers_an_exact_combination() {
        let a = Array4::from_shape_fn((3, 1, 2, 2), |(i, _, j, k)| {
            (i * 4 + j * 2 + k) as f32 * 0.1 - 0.4
        });
        let b = a.mapv(|v| v * v - 0.05);
        let c = a.mapv(f32::sin);
        let y = &a * 1.5 - &b * 0.25 + &c * 3.0;
        let got = least_squares(&[&a, &b, &c], &y);
        for (g, w) in got.iter().zip([1.5, -0.25, 3.0]) {
            assert!((g - w).abs() < 1e-4, "{got:?}");
        }
    }

    /// A single Gaussian N(mu, v I) is the case where the fitted solver can be exact: its x0
    /// prediction is affine in x, so each step of the probability-flow ODE maps x_i to a
    /// combination of x_i and D_i with coefficients shared by every sample and component.
    /// In xbar = x / alpha, xbar(sbar) = mu + (xbar_T - mu) sqrt(v + sbar²) / sqrt(v + sbar_T²).
    #[test]
    fn fitted_coefficients_reproduce_the_exact_flow_of_a_single_gaussian() {
        let (v, sbar_t) = (0.2, 150.0);
        let mu =
            Array4::from_shape_fn((1, 1, 2, 3), |(_, _, j, k)| 0.3 * j as f32 - 0.2 * k as f32);
        let x_init = Array4::from_shape_fn((64, 1, 2, 3), |(i, _, j, k)| {
            ((i * 7 + j * 3 + k * 5) % 11) as f32 / 5.0 - 1.0
        });
        let level = |sbar: f64| NoiseLevel::from_sbar(0.0, sbar);
        let lt = level(sbar_t);
        let flow = |sbar: f64| -> Array4<f32> {
            let f = ((v + sbar * sbar) / (v + sbar_t * sbar_t)).sqrt();
            let a = if sbar == 0.0 { 1.0 } else { level(sbar).alpha };
            let mut out = x_init.clone();
            ndarray::Zip::from(&mut out)
                .and_broadcast(&mu)
                .for_each(|x, &m| {
                    let xbar = *x as f64 / lt.alpha;
                    *x = (a * (m as f64 + (xbar - m as f64) * f)) as f32
                });
            out
        };
        let mut x0_at = |x: &Array4<f32>, l: &NoiseLevel| -> Result<Array4<f32>> {
            let g = l.alpha * v / (l.alpha * l.alpha * v + l.sigma * l.sigma);
            let mut out = x.clone();
            ndarray::Zip::from(&mut out)
                .and_broadcast(&mu)
                .for_each(|x, &m| *x = (m as f64 + g * (*x as f64 - l.alpha * m as f64)) as f32);
            Ok(out)
        };
        // The teacher is the exact flow at 41 levels, with eps = (x - alpha x0) / sigma.
        let sbars: Vec<f64> = (0..=40)
            .map(|k| sbar_t * (0.01f64 / sbar_t).powf(k as f64 / 40.0))
            .collect();
        let levels: Vec<NoiseLevel> = sbars.iter().map(|&s| level(s)).collect();
        let xs: Vec<Array4<f32>> = sbars.iter().map(|&s| flow(s)).collect();
        let eps = xs
            .iter()
            .zip(&levels)
            .map(|(x, l)| {
                let x0 = x0_at(x, l).unwrap();
                (x - &x0.mapv(|v| v * l.alpha as f32)).mapv(|v| v / l.sigma as f32)
            })
            .collect();
        let teacher = Teacher {
            levels: levels.clone(),
            x: xs,
            eps,
            out: flow(0.0),
        };
        assert!(rms(&teacher.out, &flow(0.0)) == 0.0 && rms(&x_init, &flow(sbar_t)) < 1e-6);

        // Three calls at teacher levels (targets exact), and three between them (interpolated).
        for grid in [[0, 17, 31], [0, 9, 26]]
            .map(|g| g.map(|k| levels[k]))
            .into_iter()
            .chain([[level(sbar_t), level(3.3), level(0.21)]])
        {
            let lv: Vec<NoiseLevel> = grid.iter().copied().chain([NoiseLevel::CLEAN]).collect();
            let (rows, out) = fit_coefficients(x_init.clone(), &lv, &teacher, &mut x0_at).unwrap();
            assert_eq!(rows.iter().map(Vec::len).collect::<Vec<_>>(), [2, 3, 4]);
            // float32 samples of size ~1: a few ulps of 1 (1.2e-7) per step.
            let err = rms(&out, &flow(0.0));
            assert!(err < 1e-6, "{grid:?}: {err}");
            // What a fixed solver makes of the same three calls: DDIM errs by 0.15-0.18.
            let mut x = x_init.clone();
            for w in lv.windows(2) {
                let x0 = x0_at(&x, &w[0]).unwrap();
                let eps =
                    (&x - &x0.mapv(|v| v * w[0].alpha as f32)).mapv(|v| v / w[0].sigma as f32);
                x = crate::sampler::ops::transfer(&x, &eps, &w[0], &w[1]);
            }
            assert!(rms(&x, &flow(0.0)) > 0.1, "{grid:?}");
        }
    }

    fn rms(a: &Array4<f32>, b: &Array4<f32>) -> f64 {
        let s: f64 = a
            .iter()
            .zip(b)
            .map(|(p, q)| (*p as f64 - *q as f64).powi(2))
            .sum();
        (s / a.len() as f64).sqrt()
    }
}
