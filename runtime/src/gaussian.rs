//! Normal-distribution arithmetic the ELBO needs: log Φ accurate far into both tails, the
//! KL divergence between two Gaussians, and the discretized Gaussian decoder of Ho et al. 2020
//! (eq. 13).
//!
//! erf and erfc come from `libm` (musl's, correctly rounded to about 1 ulp). Where erfc
//! underflows, `log_ndtr` switches to the asymptotic series of log erfc, whose truncation
//! error at the switch (z = 25) is below 1e-12 relative; so log Φ(x) is accurate to about
//! 1e-12 relative for every finite x, where a plain `ln(Φ(x))` is -inf below x ≈ -38.

use std::f64::consts::{FRAC_1_SQRT_2, LN_2, PI};

/// Where erfc(z) hands over to its asymptotic series: erfc(25) ≈ 8e-274 is still a normal
/// float, and the series' next term there is 945 / (32 z^10) ≈ 3e-13.
const ASYMPTOTIC_Z: f64 = 25.0;

/// ln erfc(z) for z ≥ [`ASYMPTOTIC_Z`]: -z² - ln(z √π) + ln(1 - 1/(2z²) + 3/(4z⁴) - 15/(8z⁶) + 105/(16z⁸)).
fn ln_erfc_asymptotic(z: f64) -> f64 {
    let u = 1.0 / (2.0 * z * z);
    // 1 - u + 3u² - 15u³ + 105u⁴ (the (2k-1)!! coefficients), in Horner form.
    let series = 1.0 - u * (1.0 - u * (3.0 - u * (15.0 - u * 105.0)));
    -z * z - (z * PI.sqrt()).ln() + series.ln()
}

/// ln Φ(x), the log of the standard normal CDF, accurate in both tails.
///
/// ```
/// let v = edgediff::gaussian::log_ndtr(-40.0);
/// assert!((v - -804.608_442_013_753_8).abs() < 1e-9); // mpmath: log(ncdf(-40))
/// ```
pub fn log_ndtr(x: f64) -> f64 {
    if x.is_nan() {
        return f64::NAN;
    }
    if x > 0.0 {
        // Φ(x) = 1 - Q(x) with Q(x) = erfc(x/√2)/2 small: ln1p keeps its digits.
        return (-0.5 * libm::erfc(x * FRAC_1_SQRT_2)).ln_1p();
    }
    let z = -x * FRAC_1_SQRT_2;
    if z < ASYMPTOTIC_Z {
        (0.5 * libm::erfc(z)).ln()
    } else {
        ln_erfc_asymptotic(z) - LN_2
    }
}

/// ln(Φ(b) - Φ(a)) for a < b, without cancellation: both tails go through [`log_ndtr`] (the
/// upper one by Φ(b) - Φ(a) = Φ(-a) - Φ(-b)) and an interval around 0 through erf.
pub fn log_ndtr_diff(a: f64, b: f64) -> f64 {
    if a >= 0.0 {
        return log_ndtr_diff(-b, -a);
    }
    if b <= 0.0 {
        let (la, lb) = (log_ndtr(a), log_ndtr(b));
        // Φ(b) (1 - Φ(a)/Φ(b)); exp_m1 keeps a narrow interval's digits.
        return lb + (-(la - lb).exp_m1()).ln();
    }
    // a < 0 < b: a sum of two positive halves.
    (0.5 * (libm::erf(b * FRAC_1_SQRT_2) + libm::erf(-a * FRAC_1_SQRT_2))).ln()
}

/// KL(N(m_q, var_q) || N(m_p, var_p)) for one dimension, given `mean_diff` = m_q - m_p.
///
/// Written as ((d² + var_q)/var_p - 1 - ln(var_q/var_p)) / 2 with the last three terms as
/// r - 1 - ln r (r = var_q/var_p), exactly 0 when the variances agree.
pub fn gaussian_kl(mean_diff: f64, var_q: f64, var_p: f64) -> f64 {
    let r = var_q / var_p;
    0.5 * (mean_diff * mean_diff / var_p + (r - 1.0) - r.ln())
}

/// KL(q(x_T | x_0) || N(0, 1)) for one dimension: q = N(√ᾱ x0, 1 - ᾱ).
///
/// = (ᾱ x0² + (1 - ᾱ) - 1 - ln(1 - ᾱ)) / 2, with (1 - ᾱ) - 1 written as -ᾱ and the log as
/// ln1p(-ᾱ), since ᾱ_T is tiny (4e-5 for the DDPM schedule).
pub fn prior_kl(x0: f64, alpha_bar: f64) -> f64 {
    0.5 * (alpha_bar * x0 * x0 - alpha_bar - (-alpha_bar).ln_1p())
}

/// Which of the 256 bins a pixel falls in: the edge bins are open to ±∞ (Ho et al. eq. 13).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bin {
    /// The lowest level: (-∞, x + h].
    Lowest,
    /// An inner level: [x - h, x + h].
    Inner,
    /// The highest level: [x - h, ∞).
    Highest,
}

impl Bin {
    /// The bin of level `k` of `levels` (0-based).
    pub fn of_level(k: usize, levels: usize) -> Bin {
        if k == 0 {
            Bin::Lowest
        } else if k + 1 == levels {
            Bin::Highest
        } else {
            Bin::Inner
        }
    }
}

/// ln p(x) for a pixel at value `x` (a level's centre) under the discretized Gaussian
/// N(`mean`, `std`²) with bins of half-width `half_width`: the Gaussian's mass over the bin.
pub fn discretized_gaussian_log_prob(
    x: f64,
    mean: f64,
    std: f64,
    half_width: f64,
    bin: Bin,
) -> f64 {
    let lower = (x - half_width - mean) / std;
    let upper = (x + half_width - mean) / std;
    match bin {
        Bin::Lowest => log_ndtr(upper),
        Bin::Highest => log_ndtr(-lower),
        Bin::Inner => log_ndtr_diff(lower, upper),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// ∫_a^b N(x; 0, 1) dx by composite Gauss-Legendre (5 points on each of `pieces` panels).
    fn normal_mass(a: f64, b: f64, pieces: usize) -> f64 {
        let nodes = [
            (0.0, 0.568_888_888_888_888_9),
            (0.538_469_310_105_683_1, 0.478_628_670_499_366_5),
            (-0.538_469_310_105_683_1, 0.478_628_670_499_366_5),
            (0.906_179_845_938_664, 0.236_926_885_056_189_1),
            (-0.906_179_845_938_664, 0.236_926_885_056_189_1),
        ];
        let pdf = |x: f64| (-0.5 * x * x).exp() / (2.0 * PI).sqrt();
        let h = (b - a) / pieces as f64;
        (0..pieces)
            .map(|i| {
                let mid = a + (i as f64 + 0.5) * h;
                nodes
                    .iter()
                    .map(|&(u, w)| w * pdf(mid + 0.5 * h * u))
                    .sum::<f64>()
                    * 0.5
                    * h
            })
            .sum()
    }

    #[test]
    fn log_ndtr_matches_high_precision_values() {
        // Reference values from mpmath at 50 digits: mpmath.log(mpmath.ncdf(x)).
        let refs = [
            (-100.0, -5_005.524_208_694_205),
            (-40.0, -804.608_442_013_753_8),
            (-35.0, -616.975_101_261_922_5),
            (-10.0, -53.231_285_150_512_47),
            (-1.0, -1.841_021_645_009_264),
            (0.0, -std::f64::consts::LN_2),
            (3.0, -0.001_350_809_964_748_193_8),
            (10.0, -7.619_853_024_160_526e-24),
        ];
        for (x, want) in refs {
            let got = log_ndtr(x);
            assert!(
                ((got - want) / want).abs() < 1e-12,
                "log_ndtr({x}) = {got}, mpmath {want}"
            );
        }
        // At and just below the switch both branches agree (the series is what is used beyond).
        for z in [ASYMPTOTIC_Z - 2.0, ASYMPTOTIC_Z] {
            let (series, direct) = (ln_erfc_asymptotic(z), libm::erfc(z).ln());
            assert!(
                ((series - direct) / direct).abs() < 1e-13,
                "{series} {direct}"
            );
        }
        assert_eq!(log_ndtr(f64::NEG_INFINITY), f64::NEG_INFINITY);
    }

    #[test]
    fn ndtr_difference_matches_quadrature() {
        for (a, b) in [
            (-0.3, 0.2),
            (0.5, 0.6),
            (-2.0, -1.9),
            (4.0, 4.001),
            (-7.0, -6.5),
            (1.0, 3.0),
        ] {
            let want = normal_mass(a, b, 200).ln();
            let got = log_ndtr_diff(a, b);
            assert!((got - want).abs() < 1e-10, "[{a}, {b}]: {got} vs {want}");
        }
        // Far in the tail quadrature underflows (φ(-60) ≈ 1e-783); the midpoint rule in log
        // space is exact enough there: the mass of [a, a + δ] is φ(a + δ/2) δ (1 + O(a²δ²)).
        let (a, d) = (-60.0f64, 1e-6f64);
        let m = a + 0.5 * d;
        let approx = -0.5 * m * m - 0.5 * (2.0 * PI).ln() + d.ln();
        assert!((log_ndtr_diff(a, a + d) - approx).abs() < 1e-8);
        assert!((log_ndtr_diff(-a - d, -a) - approx).abs() < 1e-8);
    }

    #[test]
    fn discretized_decoder_integrates_the_gaussian_over_each_bin() {
        // 256 levels on [-1, 1]: x_k = -1 + 2k/255, half-width 1/255.
        let h = 1.0 / 255.0;
        let (mean, std) = (0.123, 0.05);
        let mut total = 0.0;
        for k in 0..256 {
            let x = -1.0 + 2.0 * k as f64 / 255.0;
            let bin = Bin::of_level(k, 256);
            let p = discretized_gaussian_log_prob(x, mean, std, h, bin).exp();
            let (lo, hi) = match bin {
                Bin::Lowest => (-1.0 - 40.0 * std, x + h),
                Bin::Highest => (x - h, 1.0 + 40.0 * std),
                Bin::Inner => (x - h, x + h),
            };
            let want = normal_mass((lo - mean) / std, (hi - mean) / std, 400);
            assert!(
                (p - want).abs() < 1e-13 + 1e-9 * want,
                "level {k}: {p} vs {want}"
            );
            total += p;
        }
        // The bins tile the line: the probabilities of all levels sum to one.
        assert!((total - 1.0).abs() < 1e-12, "{total}");
        // Edge bins take the tail mass: a mean far below -1 puts almost everything in bin 0.
        let p0 = discretized_gaussian_log_prob(-1.0, -3.0, 0.1, h, Bin::Lowest);
        assert!(p0 > -1e-80 && p0 <= 0.0, "{p0}");
    }

    #[test]
    fn gaussian_kl_matches_numerical_integration() {
        // KL(q || p) = ∫ q (ln q - ln p) by Gauss-Legendre over ±12 std of q.
        for (mq, vq, mp, vp) in [
            (0.3, 0.5, -0.2, 1.5),
            (1.0, 2.0, 1.0, 2.0),
            (0.0, 1e-2, 0.05, 3e-2),
        ] {
            let (sq, sp) = (f64::sqrt(vq), f64::sqrt(vp));
            let logn = |x: f64, m: f64, s: f64| {
                -0.5 * ((x - m) / s).powi(2) - s.ln() - 0.5 * (2.0 * PI).ln()
            };
            let pieces = 2000;
            let (a, b) = (mq - 12.0 * sq, mq + 12.0 * sq);
            let h = (b - a) / pieces as f64;
            let mut integral = 0.0;
            for i in 0..pieces {
                // Simpson on each panel (smooth integrand, 2000 panels: error ~1e-14).
                let f = |x: f64| logn(x, mq, sq).exp() * (logn(x, mq, sq) - logn(x, mp, sp));
                let x0 = a + i as f64 * h;
                integral += h / 6.0 * (f(x0) + 4.0 * f(x0 + 0.5 * h) + f(x0 + h));
            }
            let got = gaussian_kl(mq - mp, vq, vp);
            assert!((got - integral).abs() < 1e-10, "{got} vs {integral}");
        }
        assert_eq!(gaussian_kl(0.0, 0.7, 0.7), 0.0);
        // The prior term is the same KL with p = N(0, 1).
        let (x0, ab) = (0.8f64, 0.3f64);
        let want = gaussian_kl(ab.sqrt() * x0, 1.0 - ab, 1.0);
        assert!((prior_kl(x0, ab) - want).abs() < 1e-15);
    }
}
