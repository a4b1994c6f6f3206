//! Fréchet distance between Gaussians fitted to feature sets: the "FID" of Heusel et al. (2017),
//! here over whatever features the caller extracts (the MNIST classifier's penultimate layer
//! for the fast domain FID; Python's `tools/fid_inception.py` uses the same formula on
//! Inception-v3 pool features).
//!
//! d² = |mu_a − mu_b|² + tr(S_a) + tr(S_b) − 2 tr((S_a^{1/2} S_b S_a^{1/2})^{1/2}).
//!
//! The trace term is computed from symmetric eigendecompositions (cyclic Jacobi), so it stays
//! real and exact for singular covariances (dead ReLU features), where a general matrix square
//! root of S_a S_b needs the imaginary-part clean-up common FID code does.
//!
//! ```
//! use edgediff::fid::{frechet_distance, GaussianStats};
//! use ndarray::array;
//! let a = GaussianStats::of(array![[0.0f32, 1.0], [2.0, 3.0], [4.0, 2.0]].view());
//! assert!(frechet_distance(&a, &a).abs() < 1e-9);
//! ```

use ndarray::{Array1, Array2, ArrayView2, Axis};

/// Mean and (unbiased, n − 1) covariance of a feature set `[n, d]`.
#[derive(Debug, Clone)]
pub struct GaussianStats {
    pub mean: Array1<f64>,
    pub cov: Array2<f64>,
    pub n: usize,
}

impl GaussianStats {
    /// Fits the statistics of the rows of `features` (at least two rows for a covariance).
    pub fn of(features: ArrayView2<f32>) -> GaussianStats {
        let x = features.mapv(f64::from);
        let n = x.nrows();
        let mean = x
            .mean_axis(Axis(0))
            .unwrap_or_else(|| Array1::zeros(x.ncols()));
        let centred = &x - &mean;
        let cov = centred.t().dot(&centred) / (n.max(2) - 1) as f64;
        GaussianStats { mean, cov, n }
    }
}

/// The squared Fréchet distance between two fitted Gaussians (the FID when the features are
/// Inception's); NaN when their dimensions differ.
pub fn frechet_distance(a: &GaussianStats, b: &GaussianStats) -> f64 {
    if a.mean.len() != b.mean.len() {
        return f64::NAN;
    }
    let diff = &a.mean - &b.mean;
    let (vals, vecs) = symmetric_eigen(&a.cov);
    let root: Array1<f64> = vals.mapv(|v| v.max(0.0).sqrt());
    let a_half = (&vecs * &root).dot(&vecs.t());
    let m = a_half.dot(&b.cov).dot(&a_half);
    let (mu, _) = symmetric_eigen(&m);
    let cross: f64 = mu.iter().map(|v| v.max(0.0).sqrt()).sum();
    diff.dot(&diff) + a.cov.diag().sum() + b.cov.diag().sum() - 2.0 * cross
}

/// Eigenvalues and eigenvectors (columns) of a symmetric matrix by cyclic Jacobi rotations.
/// Accurate to rounding for the feature dimensions used here (≤ a few hundred).
pub fn symmetric_eigen(m: &Array2<f64>) -> (Array1<f64>, Array2<f64>) {
    let n = m.nrows();
    // Row-major work arrays; symmetrised, as products like S^{1/2} B S^{1/2} are symmetric
    // only up to rounding.
    let mut a: Vec<f64> = (0..n * n)
        .map(|k| (m[[k / n, k % n]] + m[[k % n, k / n]]) / 2.0)
        .collect();
    let mut v: Vec<f64> = (0..n * n)
        .map(|k| if k / n == k % n { 1.0 } else { 0.0 })
        .collect();
    let scale = a
        .iter()
        .map(|x| x * x)
        .sum::<f64>()
        .sqrt()
        .max(f64::MIN_POSITIVE);
    for _sweep in 0..100 {
        let off = (0..n)
            .flat_map(|p| (p + 1..n).map(move |q| (p, q)))
            .map(|(p, q)| a[p * n + q] * a[p * n + q])
            .sum::<f64>()
            .sqrt();
        if off <= 1e-15 * scale {
            break;
        }
        for p in 0..n {
            for q in p + 1..n {
                let apq = a[p * n + q];
                if apq.abs() <= 1e-300 {
                    continue;
                }
                // The rotation that zeroes a[p][q] (Golub & Van Loan, Algorithm 8.4.1).
                let theta = (a[q * n + q] - a[p * n + p]) / (2.0 * apq);
                let t = if theta == 0.0 {
                    1.0
                } else {
                    theta.signum() / (theta.abs() + (theta * theta + 1.0).sqrt())
                };
                let c = 1.0 / (t * t + 1.0).sqrt();
                let s = t * c;
                // A <- Jᵀ A J: columns p and q, then rows p and q.
                for k in 0..n {
                    let (akp, akq) = (a[k * n + p], a[k * n + q]);
                    a[k * n + p] = c * akp - s * akq;
                    a[k * n + q] = s * akp + c * akq;
                }
                let (rp, rq) = (p * n, q * n);
                for k in 0..n {
                    let (apk, aqk) = (a[rp + k], a[rq + k]);
                    a[rp + k] = c * apk - s * aqk;
                    a[rq + k] = s * apk + c * aqk;
                }
                for k in 0..n {
                    let (vkp, vkq) = (v[k * n + p], v[k * n + q]);
                    v[k * n + p] = c * vkp - s * vkq;
                    v[k * n + q] = s * vkp + c * vkq;
                }
            }
        }
    }
    let vals = Array1::from_iter((0..n).map(|i| a[i * n + i]));
    let vecs = Array2::from_shape_vec((n, n), v).expect("n x n elements");
    (vals, vecs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::{array, Array2};
    use rand::{Rng, SeedableRng};

    fn stats(mean: Array1<f64>, cov: Array2<f64>) -> GaussianStats {
        GaussianStats { mean, cov, n: 0 }
    }

    #[test]
    fn one_dimension_is_the_closed_form() {
        // d² = (m1 − m2)² + (s1 − s2)² for 1-D Gaussians.
        let a = stats(array![1.0], array![[4.0]]);
        let b = stats(array![-2.0], array![[0.25]]);
        let want = 9.0 + (2.0f64 - 0.5).powi(2);
        assert!((frechet_distance(&a, &b) - want).abs() < 1e-12);
    }

    #[test]
    fn commuting_covariances_match_the_closed_form() {
        // Diagonal covariances in a rotated basis: d² = |dm|² + Σ (sqrt(a_i) − sqrt(b_i))².
        let r = {
            let (c, s) = (0.6f64, 0.8f64);
            array![[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]]
        };
        let da = [3.0, 0.5, 0.0]; // singular on purpose
        let db = [1.0, 2.0, 4.0];
        let cov = |d: [f64; 3]| {
            r.dot(&Array2::from_diag(&Array1::from(d.to_vec())))
                .dot(&r.t())
        };
        let a = stats(array![0.0, 1.0, 2.0], cov(da));
        let b = stats(array![1.0, 1.0, 0.0], cov(db));
        let want = 1.0
            + 4.0
            + da.iter()
                .zip(db)
                .map(|(x, y)| (x.sqrt() - y.sqrt()).powi(2))
                .sum::<f64>();
        assert!((frechet_distance(&a, &b) - want).abs() < 1e-10);
        // Symmetric in its arguments.
        assert!((frechet_distance(&b, &a) - want).abs() < 1e-10);
    }

    #[test]
    fn eigen_reconstructs_a_random_symmetric_matrix() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        let n = 40;
        let g = Array2::from_shape_fn((n, n), |_| rng.random::<f64>() - 0.5);
        let m = g.dot(&g.t());
        let (vals, vecs) = symmetric_eigen(&m);
        let back = (&vecs * &vals).dot(&vecs.t());
        let err = (&back - &m).iter().fold(0.0f64, |e, x| e.max(x.abs()));
        assert!(err < 1e-10, "reconstruction error {err}");
        let orth = vecs.t().dot(&vecs) - Array2::<f64>::eye(n);
        assert!(orth.iter().fold(0.0f64, |e, x| e.max(x.abs())) < 1e-10);
    }

    #[test]
    fn sample_sets_give_zero_for_identical_and_more_for_shifted() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
        let x = Array2::from_shape_fn((500, 8), |_| rng.random::<f32>());
        let a = GaussianStats::of(x.view());
        assert!(frechet_distance(&a, &a).abs() < 1e-9);
        let shifted = GaussianStats::of((&x + 0.5f32).view());
        // A pure shift by 0.5 in 8 dimensions moves the means by 8 · 0.25 = 2; the covariances
        // differ only by the float32 rounding of x + 0.5 (~3e-8 per value).
        assert!((frechet_distance(&a, &shifted) - 2.0).abs() < 1e-5);
    }
}
