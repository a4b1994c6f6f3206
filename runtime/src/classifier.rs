//! The judge of samples: an image classifier in ONNX (as `edgediff-train-classifier` writes
//! it: input `image` `[N, C, H, W]`, outputs `logits` `[N, K]` and `features` `[N, F]`, the
//! penultimate layer). Its features give a fast domain FID; its probabilities say how many
//! samples it recognises with confidence and how evenly they spread over the classes.

use std::path::{Path, PathBuf};

use ndarray::{s, Array2, ArrayView4, Axis};
use ort::session::Session;
use ort::value::TensorRef;

use crate::backend::Network;
use crate::error::{Error, Result};
use crate::fid::{frechet_distance, GaussianStats};

/// The metadata key of the classifier's own description (`input_range`, `task`).
const METADATA_KEY: &str = "edgediff_classifier";

/// An opened classifier.
pub struct Classifier {
    session: Session,
    /// The data range the classifier was trained on; samples are mapped onto it.
    input_range: [f64; 2],
    /// `[C, H, W]` as declared (-1 where dynamic).
    declared_shape: Vec<i64>,
    path: PathBuf,
}

/// What the classifier says about a set of images.
#[derive(Debug, Clone)]
pub struct Judged {
    /// Softmax probabilities `[n, K]`.
    pub probs: Array2<f32>,
    /// Penultimate features `[n, F]`.
    pub features: Array2<f32>,
}

/// Quality of a sample set as the classifier sees it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DomainScores {
    /// Fréchet distance between the samples' and the reference's feature Gaussians.
    pub fid: f64,
    /// Share of samples whose top class has probability at least the threshold.
    pub confident: f64,
    /// Share of samples per predicted (argmax) class.
    pub class_shares: Vec<f64>,
    /// Smallest class share times the number of classes: 1 when the classes are equally
    /// frequent, 0 when one never appears.
    pub balance: f64,
}

impl Classifier {
    /// Opens a classifier ONNX file and checks its inputs and outputs.
    pub fn open(path: &Path, intra_threads: usize) -> Result<Classifier> {
        let session = Network::plain_session(path, intra_threads)?;
        let contract = |detail: String| {
            Error::Contract {
            path: path.into(),
            detail: format!("{detail} (a classifier takes `image` [N, C, H, W] and returns `logits` and `features`, as edgediff-train-classifier writes)"),
        }
        };
        let image = session
            .inputs()
            .iter()
            .find(|i| i.name() == "image")
            .ok_or_else(|| contract("no input named 'image'".into()))?;
        let declared_shape: Vec<i64> = match image.dtype() {
            ort::value::ValueType::Tensor { shape, .. } if shape.len() == 4 => {
                shape.iter().skip(1).copied().collect()
            }
            _ => return Err(contract("input 'image' is not a rank-4 tensor".into())),
        };
        for name in ["logits", "features"] {
            if !session.outputs().iter().any(|o| o.name() == name) {
                return Err(contract(format!("no output named '{name}'")));
            }
        }
        let raw = session
            .metadata()
            .map_err(Error::ort("reading classifier metadata"))?
            .custom(METADATA_KEY);
        let input_range = raw
            .and_then(|text| serde_json::from_str::<serde_json::Value>(&text).ok())
            .and_then(|v| {
                let r = v.get("input_range")?.as_array()?.clone();
                Some([r.first()?.as_f64()?, r.get(1)?.as_f64()?])
            })
            .unwrap_or([-1.0, 1.0]);
        Ok(Classifier {
            session,
            input_range,
            declared_shape,
            path: path.into(),
        })
    }

    /// Classifies `x` (in `data_range`) in batches of `batch` images.
    pub fn judge(
        &mut self,
        x: ArrayView4<f32>,
        data_range: [f64; 2],
        batch: usize,
    ) -> Result<Judged> {
        let shape = &x.shape()[1..];
        let fits = self
            .declared_shape
            .iter()
            .zip(shape)
            .all(|(&d, &s)| d < 0 || d as usize == s);
        if !fits {
            return Err(Error::invalid(format!(
                "the classifier {} takes images {:?}; these are {shape:?}",
                self.path.display(),
                self.declared_shape
            )));
        }
        // Map the samples' range onto the classifier's.
        let [lo, hi] = data_range;
        let [clo, chi] = self.input_range;
        let scale = ((chi - clo) / (hi - lo)) as f32;
        let shift = (clo - lo * (chi - clo) / (hi - lo)) as f32;
        let (mut probs, mut features) = (Vec::new(), Vec::new());
        for start in (0..x.shape()[0]).step_by(batch.max(1)) {
            let end = (start + batch.max(1)).min(x.shape()[0]);
            let chunk = x
                .slice(s![start..end, .., .., ..])
                .mapv(|v| v * scale + shift);
            let input =
                TensorRef::from_array_view(chunk.view()).map_err(Error::ort("classifier input"))?;
            let out = self
                .session
                .run(ort::inputs!["image" => input])
                .map_err(Error::ort("running the classifier"))?;
            let get = |name: &str| -> Result<Array2<f32>> {
                out[name]
                    .try_extract_array::<f32>()
                    .map_err(Error::ort(format!("reading classifier output '{name}'")))?
                    .to_owned()
                    .into_dimensionality()
                    .map_err(|_| Error::Contract {
                        path: self.path.clone(),
                        detail: format!("output '{name}' is not [N, K]"),
                    })
            };
            let logits = get("logits")?;
            features.push(get("features")?);
            probs.push(softmax_rows(logits));
        }
        let cat = |parts: Vec<Array2<f32>>| {
            let views: Vec<_> = parts.iter().map(|a| a.view()).collect();
            ndarray::concatenate(Axis(0), &views)
                .map_err(|e| Error::invalid(format!("no images to classify ({e})")))
        };
        Ok(Judged {
            probs: cat(probs)?,
            features: cat(features)?,
        })
    }
}

fn softmax_rows(mut logits: Array2<f32>) -> Array2<f32> {
    for mut row in logits.rows_mut() {
        let max = row.fold(f32::NEG_INFINITY, |m, &v| m.max(v));
        row.mapv_inplace(|v| (v - max).exp());
        let sum = row.sum();
        row.mapv_inplace(|v| v / sum);
    }
    logits
}

/// Scores `judged` samples against the reference features' statistics; `threshold` is the
/// probability a top class needs for a sample to count as confidently recognised (e.g. 0.9).
pub fn domain_scores(judged: &Judged, reference: &GaussianStats, threshold: f64) -> DomainScores {
    let n = judged.probs.nrows();
    let k = judged.probs.ncols();
    let mut counts = vec![0usize; k];
    let mut confident = 0usize;
    for row in judged.probs.rows() {
        let (best, p) =
            row.iter().enumerate().fold(
                (0, f32::NEG_INFINITY),
                |b, (i, &p)| if p > b.1 { (i, p) } else { b },
            );
        counts[best] += 1;
        confident += usize::from(f64::from(p) >= threshold);
    }
    let class_shares: Vec<f64> = counts.iter().map(|&c| c as f64 / n as f64).collect();
    let balance = class_shares.iter().copied().fold(f64::INFINITY, f64::min) * k as f64;
    DomainScores {
        fid: frechet_distance(&GaussianStats::of(judged.features.view()), reference),
        confident: confident as f64 / n as f64,
        class_shares,
        balance,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::array;

    #[test]
    fn scores_count_confidence_and_balance() {
        let judged = Judged {
            probs: array![[0.95, 0.05], [0.6, 0.4], [0.08, 0.92], [0.2, 0.8]],
            features: array![[0.0, 1.0], [1.0, 0.0], [1.0, 1.0], [0.0, 0.0]],
        };
        let reference = GaussianStats::of(judged.features.view());
        let s = domain_scores(&judged, &reference, 0.9);
        assert_eq!(s.confident, 0.5);
        assert_eq!(s.class_shares, vec![0.5, 0.5]);
        assert_eq!(s.balance, 1.0);
        assert!(s.fid.abs() < 1e-9);
    }

    #[test]
    fn softmax_is_normalised_and_stable() {
        let p = softmax_rows(array![[1000.0, 1000.0], [0.0, f32::ln(3.0)]]);
        assert!((p[[0, 0]] - 0.5).abs() < 1e-7);
        assert!((p[[1, 1]] - 0.75).abs() < 1e-6);
    }
}
