//! Samplers: each one short function over a [`Denoiser`] and a list of [`NoiseLevel`]s ending at
//! the clean level. A sampler never knows which network, schedule or spacing it drives.

pub mod ddim;
pub mod ddpm;

use std::str::FromStr;

use ndarray::{Array4, Zip};

use crate::denoiser::Denoiser;
use crate::error::{Error, Result};
use crate::noise::NoiseSource;
use crate::schedule::NoiseLevel;

/// Called after each step with (steps done, total steps).
pub type Progress<'a> = dyn FnMut(usize, usize) + 'a;

/// Which sampler, with its own parameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum SamplerKind {
    /// DDPM ancestral sampling from the true posterior q(x_s | x_t, x0) (Ho et al. 2020).
    Ddpm,
    /// DDIM (Song et al. 2021) with stochasticity eta in [0, 1]; eta = 0 is deterministic.
    Ddim { eta: f64 },
}

impl SamplerKind {
    /// Parses a CLI name; `eta` applies to DDIM.
    pub fn parse(name: &str, eta: f64) -> Result<SamplerKind> {
        let kind = SamplerKind::from_str(name)?;
        if let SamplerKind::Ddim { .. } = kind {
            if !(0.0..=1.0).contains(&eta) {
                return Err(Error::InvalidArgument(format!("--eta {eta} is outside [0, 1]")));
            }
            return Ok(SamplerKind::Ddim { eta });
        }
        Ok(kind)
    }

    /// The CLI name.
    pub fn name(&self) -> &'static str {
        match self {
            SamplerKind::Ddpm => "ddpm",
            SamplerKind::Ddim { .. } => "ddim",
        }
    }

    /// Runs the sampler from `x` (noise at `levels[0]`) to the last level.
    pub fn run(
        &self,
        den: &mut dyn Denoiser,
        x: Array4<f32>,
        levels: &[NoiseLevel],
        noise: &mut dyn NoiseSource,
        progress: &mut Progress<'_>,
    ) -> Result<Array4<f32>> {
        match *self {
            SamplerKind::Ddpm => ddpm::ddpm(den, x, levels, noise, progress),
            SamplerKind::Ddim { eta } => ddim::ddim(den, x, levels, eta, noise, progress),
        }
    }
}

impl FromStr for SamplerKind {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "ddpm" => Ok(SamplerKind::Ddpm),
            "ddim" => Ok(SamplerKind::Ddim { eta: 0.0 }),
            other => Err(Error::InvalidArgument(format!("unknown sampler '{other}'; expected ddpm or ddim"))),
        }
    }
}

/// a * x + b * y + c * z elementwise, the one update every sampler here is made of.
pub(crate) fn combine(a: f64, x: &Array4<f32>, b: f64, y: &Array4<f32>, c: f64, z: Option<&Array4<f32>>) -> Array4<f32> {
    let (a, b, c) = (a as f32, b as f32, c as f32);
    match z {
        Some(z) => Zip::from(x).and(y).and(z).map_collect(|&x, &y, &z| a * x + b * y + c * z),
        None => Zip::from(x).and(y).map_collect(|&x, &y| a * x + b * y),
    }
}

/// Variance of the true posterior q(x_s | x_t, x0) for s < t on any VP or VE schedule:
/// sigma_{t|s}² sigma_s² / sigma_t² with sigma_{t|s}² = sigma_t² - (alpha_t/alpha_s)² sigma_s².
pub(crate) fn posterior_variance(cur: &NoiseLevel, next: &NoiseLevel) -> f64 {
    let a_ts = cur.alpha / next.alpha;
    let s2_ts = cur.sigma.powi(2) - a_ts.powi(2) * next.sigma.powi(2);
    (s2_ts * next.sigma.powi(2) / cur.sigma.powi(2)).max(0.0)
}
