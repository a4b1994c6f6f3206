//! Multistep latent consistency sampling (Luo et al. 2023, Algorithm 1; Song et al. 2023's
//! multistep consistency sampling): at each level the consistency function
//! f(x, t) = c_skip(t) x + c_out(t) x0(x, t) maps straight to clean data, and the next level is
//! reached by noising that estimate afresh, x_next = alpha_next f + sigma_next z. The last step
//! returns f itself.
//!
//! c_skip and c_out are LCM's boundary condition on the training index t, scaled by 10
//! (diffusers' `timestep_scaling`) with sigma_data 0.5: c_skip = sigma_data² / ((10t)² +
//! sigma_data²), c_out = 10t / sqrt((10t)² + sigma_data²), so f(x, 0) = x. For the indices a
//! few-step grid visits (>= 19) c_skip is below 2e-6: f is x0 to within that, and the boundary
//! condition matters for parity with diffusers' LCMScheduler rather than for the images.

use ndarray::Array4;

use super::ops::lincomb;
use super::{SamplerDef, Step, Stochastic, Trajectory};
use crate::error::Result;

/// diffusers' LCMScheduler `timestep_scaling` default, which the released LCMs use.
const TIMESTEP_SCALING: f64 = 10.0;
/// The data standard deviation of LCM's boundary condition (Karras et al.'s sigma_data).
const SIGMA_DATA: f64 = 0.5;

/// (c_skip, c_out) at training index `t`.
fn boundary_condition(t: f64) -> (f64, f64) {
    let scaled = t * TIMESTEP_SCALING;
    let d2 = SIGMA_DATA * SIGMA_DATA;
    (
        d2 / (scaled * scaled + d2),
        scaled / (scaled * scaled + d2).sqrt(),
    )
}

/// One consistency step: f at the current level, then noised to the next level unless that
/// is the clean end (a trajectory cut short, as inpainting's jumps are, goes on noising).
fn step(tr: &mut Trajectory<'_>, s: Step<'_>) -> Result<Array4<f32>> {
    let (c_skip, c_out) = boundary_condition(s.cur.t);
    let f = lincomb(&[(c_out, &s.d.x0), (c_skip, s.x)]);
    if s.next.is_clean() {
        return Ok(f);
    }
    tr.lincomb_with_noise(s.i, &[(s.next.alpha, &f)], Some(s.next.sigma))
}

pub static LCM: SamplerDef = SamplerDef::new("lcm", "consistency", "1")
    .summary("latent consistency multistep sampling, for LCM-distilled models (Luo et al. 2023)")
    .stochastic(Stochastic::Always)
    .consistency_grid()
    .discrete()
    .run(|_, tr, x, progress| tr.walk(x, progress, step));

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_boundary_condition_is_the_identity_at_zero_and_x0_far_from_it() {
        assert_eq!(boundary_condition(0.0), (1.0, 0.0));
        // diffusers' LCMScheduler.get_scalings_for_boundary_condition_discrete(259) in f64.
        let (c_skip, c_out) = boundary_condition(259.0);
        assert!((c_skip - 0.25 / (2590.0f64.powi(2) + 0.25)).abs() < 1e-20);
        assert!((c_out - 2590.0 / (2590.0f64.powi(2) + 0.25).sqrt()).abs() < 1e-15);
        assert!(c_skip < 4e-8 && (1.0 - c_out) < 2e-8);
    }
}
