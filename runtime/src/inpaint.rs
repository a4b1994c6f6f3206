//! Inpainting with any sampler that steps through noise levels: before every network call the
//! known pixels are replaced by the known image noised to that call's level, and the x0
//! prediction there is the known image, so the sampler fills the rest consistently with it
//! (the replacement method of Song et al. 2021). RePaint's resampling (Lugmayr et al. 2022)
//! harmonises the two regions: after every `jumps` steps the sample is noised back up those
//! steps and they are run again, `resample` extra times.
//!
//! The mask is 1 (white) where the image is filled and 0 (black) where it is kept, binarised
//! at 0.5, for pixel models and pipelines alike; that is also diffusers' convention (its mask
//! processor binarises, white repaints).
//!
//! Pixel models pin the known pixels with fresh noise at every call (as RePaint). A
//! text-to-image pipeline inpaints in latent space, as diffusers' StableDiffusionInpaintPipeline:
//!
//! - an ordinary U-Net (C latent channels): the image's VAE latents are the known values and
//!   the mask downscaled to the latents (nearest neighbour, as its `F.interpolate`) says where;
//!   they are pinned with the sample's own initial noise at every call (diffusers noises
//!   `image_latents` with the same `noise` after every step), the first call sees the start as
//!   it is (pure noise at strength 1), and the final latents take the image's latents where
//!   the mask keeps them (diffusers' last blend) before the VAE decodes them;
//! - an inpainting U-Net (2C + 1 input channels): nothing is pinned; the U-Net gets the
//!   downscaled mask and the latents of the masked image (`image * (mask < 0.5)`) beside the
//!   latents at every call, and the decoded latents are the output.
//!
//! Both take a strength as diffusers does: the last `floor(steps * strength)` steps, from
//! the image (its latents) noised to the first of them; at 1 (the default) the run starts
//! from pure noise.

use ndarray::{concatenate, s, Array4, Axis, Zip};

use crate::denoiser::{Denoised, Denoiser, Rows};
use crate::error::{Error, Result};
use crate::generate::{
    encode_images, img2img_levels, noised_start, prepare, prior_std, run_batches, BatchPlan,
    Report, SampleOptions,
};
use crate::model::Model;
use crate::noise::{InjectedNoise, SeededNoise};
use crate::pipeline::Stage;
use crate::sampler::Trajectory;
use crate::schedule::NoiseLevel;

/// Most extra passes RePaint resampling may make over each jump (RePaint itself used 9); the
/// bound keeps `steps * (1 + resample)` far from overflow and a run finite.
pub const MAX_RESAMPLE: usize = 1000;

/// RePaint resampling: every `jumps` steps, go back up and redo them `resample` more times
/// (`jumps` 0: no resampling).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Resampling {
    pub jumps: usize,
    pub resample: usize,
}

/// What inpainting takes besides the sampling options.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct InpaintOptions {
    /// RePaint resampling. Default: none.
    pub resampling: Resampling,
    /// How much of the sampling runs, in (0, 1], as diffusers' StableDiffusionInpaintPipeline:
    /// the last `floor(steps * strength)` steps, from the image noised to the first of them
    /// (for a pipeline, its latents); 1 runs every step from pure noise. Default: 1
    /// (diffusers' default; [`SampleOptions::strength`], img2img's, is not read here).
    pub strength: f64,
}

impl Default for InpaintOptions {
    fn default() -> Self {
        InpaintOptions {
            resampling: Resampling::default(),
            strength: 1.0,
        }
    }
}

/// The noise the known region is pinned with.
enum PinNoise {
    /// Fresh noise at every call (RePaint; pixel models).
    Fresh(SeededNoise),
    /// The batch's initial noise `[m, C, H, W]` at every call (pipelines, as diffusers).
    Fixed(Array4<f32>),
}

/// The model with the known region pinned to the known image.
struct Pinned<'a> {
    inner: &'a mut dyn Denoiser,
    known: &'a Array4<f32>,
    /// 1 where the value is known (kept), 0 where it is filled.
    keep: &'a Array4<f32>,
    noise: PinNoise,
    /// The first call sees the sampler's x as it is (diffusers pins only after a step).
    first_unpinned: bool,
    calls: usize,
}

impl Denoiser for Pinned<'_> {
    fn denoise_rows(&mut self, x: &Array4<f32>, at: Rows<'_>) -> Result<Denoised> {
        let Rows {
            index: rows,
            levels,
        } = at;
        let pick = |a: &Array4<f32>| {
            if rows.is_empty() {
                a.clone()
            } else {
                a.select(Axis(0), rows)
            }
        };
        let (known, keep) = (pick(self.known), pick(self.keep));
        let pin = !(self.first_unpinned && self.calls == 0);
        self.calls += 1;
        let mut d = if pin {
            let z = match &mut self.noise {
                PinNoise::Fresh(noise) => noise.draw_rows(rows),
                PinNoise::Fixed(z) => pick(z),
            };
            let mut xp = x.clone();
            for (j, l) in levels.iter().enumerate() {
                let (a, sg) = (l.alpha as f32, l.sigma as f32);
                Zip::from(xp.index_axis_mut(Axis(0), j))
                    .and(known.index_axis(Axis(0), j))
                    .and(keep.index_axis(Axis(0), j))
                    .and(z.index_axis(Axis(0), j))
                    .for_each(|x, &k, &m, &z| *x = m * (a * k + sg * z) + (1.0 - m) * *x);
            }
            self.inner.denoise_rows(&xp, at)?
        } else {
            self.inner.denoise_rows(x, at)?
        };
        // The sampler gets x0 = the image on the known values and eps measured from its own x
        // (not the re-noised input): every update of the form x' = A x + B eps then keeps the
        // known values a noised copy of the image, reaching it exactly at sigma = 0. The
        // filled values keep the network's answer untouched (there x is the network's input).
        for (j, l) in levels.iter().enumerate() {
            let (a, sg) = (l.alpha as f32, l.sigma as f32);
            Zip::from(d.x0.index_axis_mut(Axis(0), j))
                .and(d.eps.index_axis_mut(Axis(0), j))
                .and(x.index_axis(Axis(0), j))
                .and(known.index_axis(Axis(0), j))
                .and(keep.index_axis(Axis(0), j))
                .for_each(|x0, e, &x, &k, &m| {
                    if m != 0.0 {
                        *x0 = k;
                        *e = (x - a * k) / sg;
                    }
                });
        }
        Ok(d)
    }
}

/// Noises `x` from level `from` up to the noisier level `to` (the forward process).
fn renoise(x: &Array4<f32>, from: &NoiseLevel, to: &NoiseLevel, z: &Array4<f32>) -> Array4<f32> {
    let ratio = to.alpha / from.alpha;
    let std = (to.sigma.powi(2) - (ratio * from.sigma).powi(2))
        .max(0.0)
        .sqrt();
    Zip::from(x)
        .and(z)
        .map_collect(|&x, &z| (ratio * x as f64 + std * z as f64) as f32)
}

/// How a run inpaints: what is pinned where, what an inpainting U-Net gets beside the
/// latents, and what a strength below 1 starts from.
struct Plan {
    /// The known values and the mask of those kept (1) in the sampler's space.
    pinned: Option<(Array4<f32>, Array4<f32>)>,
    /// An inpainting U-Net's mask and masked image latents `[n, 1 + C, h, w]`.
    channels: Option<Array4<f32>>,
    /// The data a strength below 1 starts from, noised (the image or its latents).
    start: Option<Array4<f32>>,
}

/// Fills the values of `images` (`[n, C, H, W]`, data range; a pipeline's images, not its
/// latents) where `masks` (`[n, 1, H, W]`, or `[n, C, H, W]` for a pixel model) is 1, keeping
/// those where it is 0, with `opts.sampler` over its levels (see the module's notes for
/// pipelines). `injected` replaces the seeded noise as for [`crate::generate::generate`] (a
/// pipeline's initial noise is in the latents' shape).
#[allow(clippy::single_range_in_vec_init)] // one range of samples: all of them
pub fn inpaint(
    model: &mut Model,
    opts: &SampleOptions,
    images: &Array4<f32>,
    masks: &Array4<f32>,
    how: &InpaintOptions,
    injected: Option<&InjectedNoise>,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<(Array4<f32>, Report)> {
    let [c, h, w] = model.output_shape();
    let pipeline = model.pipeline().cloned();
    let n = images.shape()[0];
    // A pipeline's images may be of another size than the folder's: it is then the run's.
    let size = [images.shape()[2], images.shape()[3]];
    if images.shape()[1] != c || (pipeline.is_none() && size != [h, w]) {
        return Err(Error::invalid(format!(
            "images have shape {:?}; the model takes [n, {c}, {h}, {w}]{}",
            images.shape(),
            if pipeline.is_some() {
                " (the pipeline's images, not its latents; or of another height and width)"
            } else {
                ""
            }
        )));
    }
    let opts = match (&pipeline, opts.image_size) {
        (Some(_), Some(asked)) if asked != size => {
            return Err(Error::options(
                format!(
                    "{{0}} asks for {}x{} but the images to inpaint are {}x{}; they are not resized: leave {{0}} out (the images' size is the run's)",
                    asked[0], asked[1], size[0], size[1]
                ),
                &["image_size"],
            ))
        }
        (Some(_), _) => SampleOptions {
            image_size: Some(size),
            ..opts.clone()
        },
        (None, _) => opts.clone(),
    };
    let shapes = opts.shapes(model)?;
    let [_, h, w] = shapes.output;
    // A pipeline's mask is downscaled to the latents, whose channels are not the image's.
    let per_channel = pipeline.is_none() && c > 1;
    if masks.shape()[0] != n
        || masks.shape()[2..] != [h, w]
        || (masks.shape()[1] != 1 && !(per_channel && masks.shape()[1] == c))
    {
        return Err(Error::invalid(format!(
            "the mask has shape {:?}; it must match the images: [{n}, 1{}, {h}, {w}]",
            masks.shape(),
            if per_channel {
                format!(" or {c}")
            } else {
                String::new()
            }
        )));
    }
    if opts.init_image.is_some() {
        return Err(Error::options(
            "{0} does not apply to inpainting: its images are the ones to fill",
            &["init_image"],
        ));
    }
    if opts.coefficients.is_some() {
        return Err(Error::options(
            "{0} do not apply to inpainting: it runs the grid in segments (strength, jumps), not the whole grid they were fitted on",
            &["coefficients"],
        ));
    }
    if let Some(p) = model.pipeline.as_ref() {
        p.check_vae_encoder()?;
    }
    let opts = SampleOptions { n, ..opts };
    let (label, lv) = prepare(model, &opts, injected)?;
    let lv = img2img_levels(lv, how.strength)?;
    let resampling = how.resampling;
    if resampling.jumps > 0 && opts.sampler.is_adaptive() {
        return Err(Error::options(
            "{0} needs a sampler with a level grid; the adaptive samplers choose their own",
            &["jumps"],
        ));
    }
    let steps = lv.len() - 1;
    if resampling.jumps > steps {
        return Err(Error::out_of_range(
            "jumps",
            resampling.jumps,
            &format!("must be in 0..={steps} (the run's steps)"),
        ));
    }
    if resampling.resample > MAX_RESAMPLE {
        return Err(Error::out_of_range(
            "resample",
            resampling.resample,
            &format!("must be in 0..={MAX_RESAMPLE}"),
        ));
    }
    let rounds = if resampling.jumps > 0 {
        1 + resampling.resample
    } else {
        1
    };
    let jumps = if resampling.jumps == 0 {
        steps
    } else {
        resampling.jumps
    };
    // 1 where the mask asks to fill, binarised as diffusers' mask processor does.
    let fill = masks.mapv(|m| if m >= 0.5 { 1.0f32 } else { 0.0 });
    let from_image = how.strength < 1.0;
    // A pipeline encodes the images first: in low-memory mode the VAE encoder is then the one
    // graph held, freed again when the run moves on to the prompts.
    model.enter(Stage::ImageEncoding);
    let plan = plan(
        model,
        images,
        &fill,
        from_image,
        opts.batch_size,
        shapes.sample,
    )?;
    let latent = pipeline.is_some();
    let prior = prior_std(model.schedule(), &lv);
    let batch_plan = BatchPlan {
        label,
        levels: &lv,
        steps_per_batch: steps * rounds,
        injected,
        channels: plan.channels.as_ref(),
    };
    let mut out = Array4::zeros((n, c, h, w));
    let report = run_batches(
        model,
        &opts,
        &batch_plan,
        &[0..n],
        progress,
        &mut |first, x| {
            out.slice_mut(s![first..first + x.shape()[0], .., .., ..])
                .assign(&x);
            Ok(())
        },
        &mut |b, x, progress| {
            let rows = s![b.first..b.first + b.len, .., .., ..];
            // The batch's initial noise, in unit variance: a pipeline pins with it.
            let eps = x.mapv(|v| v / prior as f32);
            let mut x = match &plan.start {
                Some(z) => noised_start(z.slice(rows), &x, &lv[0], prior),
                None => x,
            };
            let region = plan
                .pinned
                .as_ref()
                .map(|(k, m)| (k.slice(rows).to_owned(), m.slice(rows).to_owned()));
            let mut pinned;
            let den: &mut dyn Denoiser = match &region {
                Some((known, keep)) => {
                    let shape = [known.shape()[1], known.shape()[2], known.shape()[3]];
                    pinned = Pinned {
                        inner: &mut *b.den,
                        known,
                        keep,
                        noise: if latent {
                            PinNoise::Fixed(eps)
                        } else {
                            PinNoise::Fresh(SeededNoise::new(
                                opts.seed ^ 0x1a9a_1a7e_5eed_0001,
                                opts.first_index + b.first,
                                b.len,
                                shape,
                            ))
                        },
                        first_unpinned: latent,
                        calls: 0,
                    };
                    &mut pinned
                }
                None => &mut *b.den,
            };
            let mut done = 0;
            let mut start = 0;
            while start < steps {
                let end = (start + jumps).min(steps);
                for round in 0..rounds {
                    if round > 0 {
                        let z = b.noise.step(0)?;
                        x = renoise(&x, &lv[end], &lv[start], &z);
                    }
                    let mut tr = Trajectory {
                        den: &mut *den,
                        noise: &mut *b.noise,
                        levels: &lv[start..=end],
                        schedule: b.schedule,
                        step_counts: None,
                        // RePaint runs segments of the grid: fitted coefficients are refused.
                        coefficients: None,
                    };
                    let base = done;
                    x = opts
                        .sampler
                        .run(&mut tr, x, &mut |i, _| progress(base + i))?;
                    done += end - start;
                    if end == steps {
                        break; // the last segment ends clean: nothing to go back up from
                    }
                }
                start = end;
            }
            if let (true, Some((known, keep))) = (latent, &region) {
                // diffusers' last blend: the kept latents are the image's (the pixels are not
                // pasted; they come back through the VAE).
                Zip::from(&mut x)
                    .and(known)
                    .and(keep)
                    .for_each(|x, &k, &m| *x = m * k + (1.0 - m) * *x);
            }
            Ok((x, None))
        },
    )?;
    Ok((out, report))
}

/// What [`inpaint`] pins, conditions on and starts from, for a pixel model or a pipeline
/// (whose images are encoded here, in batches of `batch_size`, into latents of `latent`
/// `[C, h, w]`); `fill` is the binarised mask.
fn plan(
    model: &mut Model,
    images: &Array4<f32>,
    fill: &Array4<f32>,
    from_image: bool,
    batch_size: usize,
    latent: [usize; 3],
) -> Result<Plan> {
    let [n, c, h, w] = [
        images.shape()[0],
        images.shape()[1],
        images.shape()[2],
        images.shape()[3],
    ];
    let Some(p) = model.pipeline.as_mut() else {
        let mc = fill.shape()[1];
        let keep = Array4::from_shape_fn((n, c, h, w), |(i, k, y, x)| {
            1.0 - fill[[i, k.min(mc - 1), y, x]]
        });
        return Ok(Plan {
            pinned: Some((images.clone(), keep)),
            channels: None,
            start: from_image.then(|| images.clone()),
        });
    };
    let [lc, lh, lw] = latent;
    // The mask at the latents' size by nearest neighbour, as diffusers' F.interpolate: latent
    // cell (y, x) takes pixel (floor(y H / h), floor(x W / w)), the top left of its block.
    let small = Array4::from_shape_fn((n, 1, lh, lw), |(i, _, y, x)| {
        fill[[i, 0, y * h / lh, x * w / lw]]
    });
    if p.config().inpainting() {
        // diffusers' masked_image = image * (mask < 0.5): the filled pixels are 0.
        let masked = Array4::from_shape_fn((n, c, h, w), |(i, k, y, x)| {
            images[[i, k, y, x]] * (1.0 - fill[[i, 0, y, x]])
        });
        let masked = encode_images(p, &masked, batch_size)?;
        let channels = concatenate(Axis(1), &[small.view(), masked.view()])
            .map_err(|e| Error::invalid(e.to_string()))?;
        let start = if from_image {
            Some(encode_images(p, images, batch_size)?)
        } else {
            None
        };
        return Ok(Plan {
            pinned: None,
            channels: Some(channels),
            start,
        });
    }
    let known = encode_images(p, images, batch_size)?;
    let keep = Array4::from_shape_fn((n, lc, lh, lw), |(i, _, y, x)| 1.0 - small[[i, 0, y, x]]);
    Ok(Plan {
        start: from_image.then(|| known.clone()),
        pinned: Some((known, keep)),
        channels: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Answers x0 = x / 2, eps = x - 1 and records the inputs it saw.
    struct Echo(Vec<Array4<f32>>);

    impl Denoiser for Echo {
        fn denoise_rows(&mut self, x: &Array4<f32>, _: Rows<'_>) -> Result<Denoised> {
            self.0.push(x.clone());
            Ok(Denoised {
                x0: x.mapv(|v| v / 2.0),
                eps: x.mapv(|v| v - 1.0),
            })
        }
    }

    #[test]
    fn pinning_with_fixed_noise_leaves_the_filled_values_to_the_network() {
        // Two values, the first kept (known 3), the second filled; fixed noise 0.5 for both.
        let level = NoiseLevel {
            t: 0.0,
            alpha: 0.6,
            sigma: 0.8,
        };
        let known = Array4::from_shape_vec((1, 1, 1, 2), vec![3.0, 9.0]).unwrap();
        let keep = Array4::from_shape_vec((1, 1, 1, 2), vec![1.0, 0.0]).unwrap();
        let x = Array4::from_shape_vec((1, 1, 1, 2), vec![0.25, -0.75]).unwrap();
        let mut echo = Echo(Vec::new());
        let mut pinned = Pinned {
            inner: &mut echo,
            known: &known,
            keep: &keep,
            noise: PinNoise::Fixed(Array4::from_elem((1, 1, 1, 2), 0.5)),
            first_unpinned: true,
            calls: 0,
        };
        for call in 0..2 {
            let d = pinned.denoise(&x, &level).unwrap();
            // The kept value: x0 is the image, eps measured from the sampler's own x.
            assert_eq!(d.x0[[0, 0, 0, 0]], 3.0);
            assert!((d.eps[[0, 0, 0, 0]] - (0.25 - 0.6 * 3.0) / 0.8).abs() < 1e-6);
            // The filled value: the network's answer, untouched.
            assert_eq!(
                (d.x0[[0, 0, 0, 1]], d.eps[[0, 0, 0, 1]]),
                (-0.375, -1.75),
                "{call}"
            );
        }
        // The first call saw x as it is, the second the kept value noised with the fixed noise.
        assert_eq!(echo.0[0], x);
        assert!((echo.0[1][[0, 0, 0, 0]] - (0.6 * 3.0 + 0.8 * 0.5)).abs() < 1e-6);
        assert_eq!(echo.0[1][[0, 0, 0, 1]], -0.75);
    }

    #[test]
    fn renoise_reaches_the_noisier_level_marginal() {
        // x at level a has variance alpha_a² v + sigma_a²; renoised to b it must have
        // alpha_b² v + sigma_b² (here with v = 0 and many draws of z at one pixel each).
        let (a, b) = (
            NoiseLevel {
                t: 0.0,
                alpha: 0.9,
                sigma: (1.0f64 - 0.81).sqrt(),
            },
            NoiseLevel {
                t: 0.0,
                alpha: 0.5,
                sigma: (1.0f64 - 0.25).sqrt(),
            },
        );
        let x = Array4::from_elem((1, 1, 1, 1), 0.0f32);
        let z = Array4::from_elem((1, 1, 1, 1), 1.0f32);
        // With x = 0 the result is the added noise's std times z.
        let y = renoise(&x, &a, &b, &z);
        let want = (b.sigma.powi(2) - (b.alpha / a.alpha * a.sigma).powi(2)).sqrt();
        assert!((y[[0, 0, 0, 0]] as f64 - want).abs() < 1e-6);
        // And alpha scales by alpha_b / alpha_a.
        let y = renoise(&Array4::from_elem((1, 1, 1, 1), 1.0), &a, &b, &(z * 0.0));
        assert!((y[[0, 0, 0, 0]] as f64 - 0.5 / 0.9).abs() < 1e-6);
        // Total variance: (0.5/0.9)² 0.19 + added = 0.75 = sigma_b².
        assert!(((0.5f64 / 0.9).powi(2) * 0.19 + want * want - 0.75).abs() < 1e-12);
    }
}
