//! Random streams. Each sample has its own counter-based stream (ChaCha8 seeded by the run's
//! seed, stream = global sample index), so sample i is the same whatever the batch size or
//! chunking, and whatever other samples share its batch (the server batches several
//! requests, each row keeping its own (seed, index) stream).

use ndarray::{s, Array4, ArrayD, Axis, Ix4};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::StandardNormal;

use crate::error::{Error, Result};

/// Where a sampler's Gaussian noise comes from.
pub trait NoiseSource {
    /// The initial x_T noise for the batch.
    fn initial(&mut self) -> Result<Array4<f32>>;
    /// Fresh noise for step `step` (0-based) of the trajectory.
    fn step(&mut self, step: usize) -> Result<Array4<f32>>;
}

/// Per-sample ChaCha8 streams, each seeded by a (seed, global sample index) pair.
pub struct SeededNoise {
    rngs: Vec<ChaCha8Rng>,
    shape: [usize; 3],
}

impl SeededNoise {
    /// Streams for samples `first .. first + n`.
    pub fn new(seed: u64, first: usize, n: usize, shape: [usize; 3]) -> SeededNoise {
        SeededNoise::from_streams((first..first + n).map(|i| (seed, i as u64)), shape)
    }

    /// One row per `(seed, index)` pair: row j draws what sample `index` of a run seeded
    /// `seed` draws, whatever the other rows are.
    pub fn from_streams(
        streams: impl IntoIterator<Item = (u64, u64)>,
        shape: [usize; 3],
    ) -> SeededNoise {
        let rngs = streams
            .into_iter()
            .map(|(seed, i)| {
                let mut r = ChaCha8Rng::seed_from_u64(seed);
                r.set_stream(i);
                r
            })
            .collect();
        SeededNoise { rngs, shape }
    }

    /// Draws for the batch rows `rows` only (all when empty), advancing just their streams.
    pub(crate) fn draw_rows(&mut self, rows: &[usize]) -> Array4<f32> {
        if rows.is_empty() {
            return self.draw();
        }
        let [c, h, w] = self.shape;
        let mut out = Array4::<f32>::zeros((rows.len(), c, h, w));
        for (mut row, &r) in out.outer_iter_mut().zip(rows) {
            let rng = &mut self.rngs[r];
            row.iter_mut().for_each(|v| *v = rng.sample(StandardNormal));
        }
        out
    }

    /// Draws `k` numbers uniformly from [0, 1) from row `row`'s stream (the ELBO's timesteps:
    /// drawn from the same per-sample stream as its noise, so they too do not depend on
    /// batching).
    pub(crate) fn unit_draws(&mut self, row: usize, k: usize) -> Vec<f64> {
        let rng = &mut self.rngs[row];
        (0..k).map(|_| rng.random::<f64>()).collect()
    }

    fn draw(&mut self) -> Array4<f32> {
        let [c, h, w] = self.shape;
        let mut out = Array4::<f32>::zeros((self.rngs.len(), c, h, w));
        for (mut row, rng) in out.outer_iter_mut().zip(self.rngs.iter_mut()) {
            row.iter_mut().for_each(|v| *v = rng.sample(StandardNormal));
        }
        out
    }
}

impl NoiseSource for SeededNoise {
    fn initial(&mut self) -> Result<Array4<f32>> {
        Ok(self.draw())
    }
    fn step(&mut self, _step: usize) -> Result<Array4<f32>> {
        Ok(self.draw())
    }
}

/// Noise given by the caller: an initial batch and, optionally, one batch per step
/// (`[steps, N, C, H, W]`). Used to reproduce another implementation's trajectory exactly.
pub struct InjectedNoise {
    pub initial: Array4<f32>,
    pub steps: Option<ArrayD<f32>>,
}

impl InjectedNoise {
    /// Restricts the injected arrays to samples `first .. first + n`.
    pub fn rows(&self, first: usize, n: usize) -> InjectedNoise {
        InjectedNoise {
            initial: self
                .initial
                .slice(s![first..first + n, .., .., ..])
                .to_owned(),
            steps: self
                .steps
                .as_ref()
                .map(|a| a.slice_axis(Axis(1), (first..first + n).into()).to_owned()),
        }
    }
}

impl NoiseSource for InjectedNoise {
    fn initial(&mut self) -> Result<Array4<f32>> {
        Ok(self.initial.clone())
    }
    fn step(&mut self, step: usize) -> Result<Array4<f32>> {
        let steps = self.steps.as_ref().ok_or_else(|| {
            Error::options(
                "this sampler is stochastic: give {0} as well as {1}",
                &["step_noise", "init_noise"],
            )
        })?;
        if step >= steps.shape()[0] {
            return Err(Error::options(
                format!(
                    "{{0}} holds {} steps but step {} needs noise",
                    steps.shape()[0],
                    step
                ),
                &["step_noise"],
            ));
        }
        steps
            .index_axis(Axis(0), step)
            .to_owned()
            .into_dimensionality::<Ix4>()
            .map_err(|_| Error::options("{0} must be shaped [steps, N, C, H, W]", &["step_noise"]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sample_streams_do_not_depend_on_batching() {
        let whole = SeededNoise::new(7, 0, 6, [1, 2, 2]).draw();
        let tail = SeededNoise::new(7, 4, 2, [1, 2, 2]).draw();
        assert_eq!(whole.slice(s![4..6, .., .., ..]), tail);
        assert_ne!(whole.slice(s![0..2, .., .., ..]), tail);
    }

    #[test]
    fn rows_of_other_runs_keep_their_own_streams() {
        // Rows from two runs in one batch draw what each run draws alone.
        let a = SeededNoise::new(3, 5, 1, [1, 2, 2]).draw();
        let b = SeededNoise::new(9, 0, 2, [1, 2, 2]).draw();
        let mixed = SeededNoise::from_streams([(9, 0), (3, 5), (9, 1)], [1, 2, 2]).draw();
        assert_eq!(mixed.slice(s![1..2, .., .., ..]), a);
        assert_eq!(
            mixed.slice(s![0..1, .., .., ..]),
            b.slice(s![0..1, .., .., ..])
        );
        assert_eq!(
            mixed.slice(s![2..3, .., .., ..]),
            b.slice(s![1..2, .., .., ..])
        );
    }

    #[test]
    fn seeded_noise_is_standard_normal() {
        let a = SeededNoise::new(1, 0, 50, [1, 20, 20]).draw();
        let n = a.len() as f64;
        let mean = a.iter().map(|&v| v as f64).sum::<f64>() / n;
        let var = a.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n;
        // 20000 draws: standard errors 0.007 (mean) and 0.01 (variance); 5 sigma bounds.
        assert!(
            mean.abs() < 0.035 && (var - 1.0).abs() < 0.05,
            "mean {mean} var {var}"
        );
    }
}
