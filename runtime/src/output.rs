//! Where samples go, chunk by chunk: a folder of PNGs (one file per sample), an appendable
//! float32 `.npy`, or a PNG grid. Folder and `.npy` outputs hold at most one batch in memory,
//! lose at most the batch in flight when a run dies, and can resume: a folder skips the
//! samples whose files exist (each is written whole, through a rename); an `.npy` grows in
//! a hidden `.NAME.partial` file that a resumed run truncates to its whole samples and extends,
//! and is renamed to its name only when complete.

// A list of one range is the common case of a list of ranges, not a mistake.
#![allow(clippy::single_range_in_vec_init)]

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::ops::Range;
use std::path::{Path, PathBuf};

use ndarray::{concatenate, Array4, Axis};

use crate::error::{Error, Result};
use crate::image::{grid_png, sample_png};
use crate::npy::{npy_bytes, parse_npy_header, write_atomic};

/// The kind of output a path asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutKind {
    /// `*.png`: one grid image.
    Grid,
    /// `*.npy`: float32 `[n, C, H, W]`.
    Npy,
    /// Anything else: a directory of `000000.png`, `000001.png`, ...
    Folder,
}

impl OutKind {
    /// The kind `path`'s extension asks for.
    pub fn of(path: &Path) -> OutKind {
        match path
            .extension()
            .and_then(|e| e.to_str())
            .map(str::to_ascii_lowercase)
            .as_deref()
        {
            Some("png") => OutKind::Grid,
            Some("npy") => OutKind::Npy,
            _ => OutKind::Folder,
        }
    }
}

/// An output being written.
pub struct Output {
    path: PathBuf,
    kind: OutKind,
    range: [f64; 2],
    n: usize,
    grid_cols: Option<usize>,
    grid: Vec<Array4<f32>>,
    npy: Option<(File, PathBuf)>,
    /// Samples in the .npy partial (resumed ones included).
    npy_samples: usize,
}

fn io(ctx: String) -> impl FnOnce(std::io::Error) -> Error {
    Error::io(ctx)
}

/// Contiguous runs of the indices in 0..n for which `missing(i)` holds.
fn runs(n: usize, missing: impl Fn(usize) -> bool) -> Vec<Range<usize>> {
    let mut out: Vec<Range<usize>> = Vec::new();
    for i in (0..n).filter(|&i| missing(i)) {
        match out.last_mut() {
            Some(r) if r.end == i => r.end = i + 1,
            _ => out.push(i..i + 1),
        }
    }
    out
}

impl Output {
    /// Prepares `path` for `n` samples of `shape` in the data range `range`; returns the
    /// output and the sample ranges still to generate (all of 0..n unless `resume` finds work
    /// already done). `grid_cols` sets a grid's columns (None: square).
    pub fn create(
        path: &Path,
        n: usize,
        shape: [usize; 3],
        range: [f64; 2],
        resume: bool,
        grid_cols: Option<usize>,
    ) -> Result<(Output, Vec<Range<usize>>)> {
        let kind = OutKind::of(path);
        let mut out = Output {
            path: path.into(),
            kind,
            range,
            n,
            grid_cols,
            grid: Vec::new(),
            npy: None,
            npy_samples: 0,
        };
        let todo =
            match kind {
                OutKind::Grid if resume => return Err(Error::options(
                    "{0} needs a folder or .npy output (a grid is written once, at the end)",
                    &["resume"],
                )),
                OutKind::Grid => vec![0..n],
                OutKind::Folder => {
                    std::fs::create_dir_all(path)
                        .map_err(io(format!("creating directory {}", path.display())))?;
                    if resume {
                        runs(n, |i| !out.sample_path(i).exists())
                    } else {
                        vec![0..n]
                    }
                }
                OutKind::Npy => out.open_npy(shape, resume)?,
            };
        Ok((out, todo))
    }

    fn sample_path(&self, i: usize) -> PathBuf {
        self.path.join(format!("{i:06}.png"))
    }

    fn partial_path(&self) -> Result<PathBuf> {
        let name = self.path.file_name().ok_or_else(|| {
            Error::invalid(format!("{} is not a file path", self.path.display()))
        })?;
        let dir = self
            .path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        Ok(dir.join(format!(".{}.partial", name.to_string_lossy())))
    }

    /// Opens (or resumes) the partial `.npy`; returns the ranges still to generate.
    fn open_npy(&mut self, shape: [usize; 3], resume: bool) -> Result<Vec<Range<usize>>> {
        let full = [self.n, shape[0], shape[1], shape[2]];
        let header = npy_bytes(&full, std::iter::empty());
        let per_sample = 4 * shape.iter().product::<usize>() as u64;
        let partial = self.partial_path()?;
        let ctx = format!("writing {}", partial.display());
        if resume && self.path.exists() {
            let mut head = vec![0u8; header.len()];
            let same = File::open(&self.path)
                .and_then(|mut f| f.read_exact(&mut head))
                .is_ok()
                && head == header;
            if same {
                return Ok(Vec::new()); // already complete
            }
            return Err(Error::options(
                format!(
                    "{{0}}: {} exists but is not [{}, {}, {}, {}]; remove it or choose another {{1}}",
                    self.path.display(),
                    full[0],
                    full[1],
                    full[2],
                    full[3]
                ),
                &["resume", "out"],
            ));
        }
        let mut done = 0u64;
        if resume && partial.exists() {
            let mut f = File::open(&partial).map_err(io(ctx.clone()))?;
            let mut head = vec![0u8; header.len()];
            let len = f.metadata().map_err(io(ctx.clone()))?.len();
            if f.read_exact(&mut head).is_ok() && head == header {
                done = (len - header.len() as u64) / per_sample;
            } else {
                let shape = parse_npy_header(&head)
                    .map(|(s, _, _)| s)
                    .unwrap_or_default();
                return Err(Error::options(
                    format!(
                        "{{0}}: {} holds a run of shape {shape:?}, not {full:?}; remove it or give the same {{1}} and model",
                        partial.display()
                    ),
                    &["resume", "n"],
                ));
            }
        }
        let mut f = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&partial)
            .map_err(io(ctx.clone()))?;
        let keep = header.len() as u64 + done * per_sample;
        (|| {
            f.set_len(keep)?;
            f.seek(SeekFrom::Start(0))?;
            f.write_all(&header)?;
            f.seek(SeekFrom::Start(keep))?;
            Ok(())
        })()
        .map_err(io(ctx))?;
        self.npy = Some((f, partial));
        self.npy_samples = done as usize;
        Ok(if done as usize >= self.n {
            Vec::new()
        } else {
            vec![done as usize..self.n]
        })
    }

    /// Writes the samples `x` whose first index is `first` (chunks arrive in index order).
    pub fn write(&mut self, first: usize, x: Array4<f32>) -> Result<()> {
        match self.kind {
            OutKind::Grid => self.grid.push(x),
            OutKind::Folder => {
                for (j, s) in x.outer_iter().enumerate() {
                    write_atomic(&self.sample_path(first + j), &sample_png(s, self.range)?)?;
                }
            }
            OutKind::Npy => {
                let (f, partial) = self.npy.as_mut().expect("open_npy ran");
                let std = x.as_standard_layout();
                let bytes: Vec<u8> = std.iter().flat_map(|v| v.to_le_bytes()).collect();
                (|| {
                    f.write_all(&bytes)?;
                    f.sync_data()
                })()
                .map_err(io(format!(
                    "writing {} (the samples before this batch are kept there; fix the cause and rerun with --resume)",
                    partial.display()
                )))?;
                self.npy_samples += x.shape()[0];
            }
        }
        Ok(())
    }

    /// Gives up after a failed run: a `.npy` partial that holds no sample is removed (there is
    /// nothing to resume); one with samples stays for `--resume`.
    pub fn abandon(self) {
        if let Some((f, partial)) = self.npy {
            drop(f);
            if self.npy_samples == 0 {
                let _ = std::fs::remove_file(partial);
            }
        }
    }

    /// Completes the output; returns the files it consists of.
    pub fn finish(self) -> Result<Vec<PathBuf>> {
        match self.kind {
            OutKind::Grid => {
                let views: Vec<_> = self.grid.iter().map(|a| a.view()).collect();
                let x = concatenate(Axis(0), &views)
                    .map_err(|e| Error::invalid(e.to_string()))?;
                write_atomic(&self.path, &grid_png(x.view(), self.range, self.grid_cols)?)?;
                Ok(vec![self.path])
            }
            OutKind::Folder => Ok((0..self.n).map(|i| self.sample_path(i)).collect()),
            OutKind::Npy => {
                if let Some((f, partial)) = self.npy {
                    drop(f);
                    std::fs::rename(&partial, &self.path).map_err(io(format!(
                        "renaming {} to {}",
                        partial.display(),
                        self.path.display()
                    )))?;
                }
                Ok(vec![self.path])
            }
        }
    }
}

/// What [`generate_to_path`] did.
#[derive(Debug, Clone)]
pub struct Written {
    pub files: Vec<PathBuf>,
    /// Samples found already written (with `resume`) and not generated again.
    pub resumed: usize,
    pub report: crate::generate::Report,
}

/// Generates `opts.n` samples into `path` as `edgediff sample --out` does: options are checked
/// before anything is created there, batches are written as they finish, and a run that fails
/// leaves only what `--resume` can continue from.
pub fn generate_to_path(
    model: &mut crate::model::Model,
    opts: &crate::generate::SampleOptions,
    injected: Option<&crate::noise::InjectedNoise>,
    path: &Path,
    resume: bool,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Written> {
    crate::generate::check_options(model, opts, injected)?;
    let meta = model.metadata().clone();
    let (mut output, todo) = Output::create(
        path,
        opts.n,
        meta.sample_shape,
        meta.data_range,
        resume,
        None,
    )?;
    let resumed = opts.n - todo.iter().map(|r| r.len()).sum::<usize>();
    let run = crate::generate::generate_chunks(
        model,
        opts,
        injected,
        &todo,
        progress,
        &mut |first, x| output.write(first, x),
    );
    match run {
        Ok(report) => Ok(Written {
            files: output.finish()?,
            resumed,
            report,
        }),
        Err(e) => {
            output.abandon();
            Err(e)
        }
    }
}

/// Writes all of `x` at once (for outputs small enough to hold: reconstructions, strips).
pub fn write_all(
    x: &Array4<f32>,
    path: &Path,
    range: [f64; 2],
    grid_cols: Option<usize>,
) -> Result<Vec<PathBuf>> {
    let [_, c, h, w] = [x.shape()[0], x.shape()[1], x.shape()[2], x.shape()[3]];
    let (mut out, _) = Output::create(path, x.shape()[0], [c, h, w], range, false, grid_cols)?;
    out.write(0, x.clone())?;
    out.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_group_missing_indices() {
        assert_eq!(runs(7, |i| i != 2 && i != 3), vec![0..2, 4..7]);
        assert!(runs(3, |_| false).is_empty());
    }

    #[test]
    fn npy_resume_truncates_to_whole_samples_and_completes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.npy");
        let x = Array4::from_shape_fn((5, 1, 2, 2), |(i, _, j, k)| (i * 4 + j * 2 + k) as f32);
        let (mut out, todo) = Output::create(&path, 5, [1, 2, 2], [0.0, 1.0], false, None).unwrap();
        assert_eq!(todo, vec![0..5]);
        out.write(0, x.slice(ndarray::s![0..2, .., .., ..]).to_owned())
            .unwrap();
        drop(out); // a crash: the partial file holds 2 samples
        let partial = dir.path().join(".x.npy.partial");
        // Half a sample more, as if killed mid-write.
        let mut f = OpenOptions::new().append(true).open(&partial).unwrap();
        f.write_all(&[0u8; 6]).unwrap();
        assert!(!path.exists());
        let (mut out, todo) = Output::create(&path, 5, [1, 2, 2], [0.0, 1.0], true, None).unwrap();
        assert_eq!(todo, vec![2..5]);
        out.write(2, x.slice(ndarray::s![2..5, .., .., ..]).to_owned())
            .unwrap();
        out.finish().unwrap();
        let back = crate::npy::read_npy(&path).unwrap();
        assert_eq!(back.as_slice().unwrap(), x.as_slice().unwrap());
        // Resuming a complete file does nothing; a different shape is refused.
        let (_, todo) = Output::create(&path, 5, [1, 2, 2], [0.0, 1.0], true, None).unwrap();
        assert!(todo.is_empty());
        assert!(Output::create(&path, 6, [1, 2, 2], [0.0, 1.0], true, None).is_err());
    }
}
