//! Where samples go, chunk by chunk: a folder of PNGs (one file per sample), an appendable
//! float32 `.npy`, or a PNG grid. Folder and `.npy` outputs hold at most one batch in memory,
//! lose at most the batch in flight when a run dies, and can resume: a folder skips the
//! samples whose files exist (each is written whole, through a rename); an `.npy` grows in
//! a hidden `.NAME.partial` file that a resumed run truncates to its whole samples and extends,
//! and is renamed to its name only when complete.

// A list of one range is the common case of a list of ranges, not a mistake.
#![allow(clippy::single_range_in_vec_init)]

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::ops::Range;
use std::path::{Path, PathBuf};

use ndarray::{concatenate, Array4, Axis};

use serde_json::{Map, Value};

use crate::error::{Error, Result};
use crate::image::{grid_png, sample_png};
use crate::job;
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
pub(crate) struct Output {
    path: PathBuf,
    kind: OutKind,
    range: [f64; 2],
    n: usize,
    /// Global index of the first sample (`SampleOptions::first_index`): a folder names its
    /// files by it, so the folders of index ranges merge by copying.
    first: usize,
    shape: [usize; 3],
    grid_cols: Option<usize>,
    grid: Vec<Array4<f32>>,
    /// The `.npy` partial, open and locked while the run writes it.
    npy: Option<(File, PathBuf)>,
    /// Samples in the .npy partial (resumed ones included).
    npy_samples: usize,
    /// A folder's lock file, held while the run writes into it.
    lock: Option<(File, PathBuf)>,
    /// Where the job record is and what it says (outputs that can be resumed).
    record: Option<(PathBuf, Map<String, Value>)>,
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

/// Longest file name most file systems take (NAME_MAX on Linux, macOS and Windows).
const NAME_MAX: usize = 255;

/// Refuses a destination that could only fail after sampling: a directory where a file is
/// meant (or a file where a folder is), a name too long for the hidden companion files. (A
/// directory that is missing or not writable fails when the output is opened, also before
/// sampling.)
fn check_destination(path: &Path, kind: OutKind) -> Result<()> {
    let shown = path.display();
    let dir_meant = path
        .as_os_str()
        .to_string_lossy()
        .ends_with(std::path::MAIN_SEPARATOR);
    let is_dir = path.is_dir();
    match kind {
        OutKind::Grid | OutKind::Npy if dir_meant || is_dir => {
            return Err(Error::options(
                format!(
                    "{{0}} {shown} is a directory, but a name ending .png or .npy asks for a file; give a file name, or a folder name without the extension"
                ),
                &["out"],
            ))
        }
        OutKind::Folder if path.exists() && !is_dir => {
            return Err(Error::options(
                format!("{{0}} {shown} is a file, but a name without .png or .npy asks for a folder of PNGs"),
                &["out"],
            ))
        }
        _ => {}
    }
    if kind != OutKind::Folder {
        let name = path.file_name().map_or(0, |n| n.len());
        // `.NAME.job.json` is the longest companion; `.NAME.RANDOM16.tmp` the next.
        if name + ".job.json".len() + 1 > NAME_MAX || name + 22 > NAME_MAX {
            return Err(Error::options(
                format!(
                    "{{0}} {shown}: the file name is too long ({name} bytes; at most {} here)",
                    NAME_MAX - 22
                ),
                &["out"],
            ));
        }
    }
    Ok(())
}

/// Checks, before any work, that an output written at the end of a command (a `.png` grid, a
/// `.npy`, a folder of PNGs) can be written at `path`: the destination is of the right kind and
/// a file can be created beside it.
pub fn check_output(path: &Path) -> Result<()> {
    let kind = OutKind::of(path);
    check_destination(path, kind)?;
    match kind {
        OutKind::Folder => Ok(()), // created, parents and all, when written
        OutKind::Grid | OutKind::Npy => check_file(path),
    }
}

/// Checks, before any work, that the single file `path` (a table, a list, a `.npy`) can be
/// written: not a directory, and its directory takes a new file.
pub fn check_file(path: &Path) -> Result<()> {
    if path.is_dir() {
        return Err(Error::invalid(format!(
            "{} is a directory; give a file name",
            path.display()
        )));
    }
    let (_, tmp) =
        crate::files::create_temp(path).map_err(io(format!("writing {}", path.display())))?;
    let _ = std::fs::remove_file(tmp);
    Ok(())
}

/// Whether `file` holds a whole PNG of a sample of `shape`: a resumed folder keeps only those.
fn is_whole_sample(file: &Path, shape: [usize; 3], range: [f64; 2]) -> bool {
    std::fs::read(file)
        .ok()
        .is_some_and(|b| crate::image::read_png(&b, shape, range).is_ok())
}

impl Output {
    /// Prepares `path` for the samples of global indices `samples` (n of them), of `shape` in
    /// the data range `range`; returns the output and the sample ranges still to generate, as
    /// indices of the run (all of 0..n unless `resume` finds work already done). A folder
    /// names sample i `{first + i:06}.png`. `job` is the identity of the run (see `job.rs`): recorded beside folder
    /// and `.npy` outputs, and what `resume` checks before continuing one. `grid_cols` sets a
    /// grid's columns (None: square).
    pub(crate) fn create(
        path: &Path,
        samples: Range<usize>,
        shape: [usize; 3],
        range: [f64; 2],
        resume: bool,
        grid_cols: Option<usize>,
        job: Option<Map<String, Value>>,
    ) -> Result<(Output, Vec<Range<usize>>)> {
        let kind = OutKind::of(path);
        check_destination(path, kind)?;
        let record = match (&job, kind) {
            (Some(j), OutKind::Folder | OutKind::Npy) => Some((job::record_path(path)?, j.clone())),
            _ => None,
        };
        let n = samples.len();
        let mut out = Output {
            path: path.into(),
            kind,
            range,
            n,
            first: samples.start,
            shape,
            grid_cols,
            grid: Vec::new(),
            npy: None,
            npy_samples: 0,
            lock: None,
            record,
        };
        let todo = match kind {
            OutKind::Grid if resume => {
                return Err(Error::options(
                    "{0} needs a folder or .npy output (a grid is written once, at the end)",
                    &["resume"],
                ))
            }
            OutKind::Grid => {
                // Prove now that the file can be written, not after the run.
                let (_, tmp) = crate::files::create_temp(path)
                    .map_err(io(format!("writing {}", path.display())))?;
                let _ = std::fs::remove_file(tmp);
                vec![0..n]
            }
            OutKind::Folder => out.open_folder(resume)?,
            OutKind::Npy => out.open_npy(resume)?,
        };
        Ok((out, todo))
    }

    fn sample_path(&self, i: usize) -> PathBuf {
        self.path.join(format!("{:06}.png", self.first + i))
    }

    /// Locks the folder, then either checks the job and keeps the whole samples (resume) or
    /// clears the sample files a previous run left (so no file of another job survives).
    fn open_folder(&mut self, resume: bool) -> Result<Vec<Range<usize>>> {
        std::fs::create_dir_all(&self.path)
            .map_err(io(format!("creating directory {}", self.path.display())))?;
        // Beside the folder, not in it: the folder holds only samples.
        let lock = crate::files::hidden_sibling(&self.path, "lock")?;
        let (f, _) = crate::files::open_locked(&lock, &self.path)?;
        self.lock = Some((f, lock));
        let todo = self.folder_todo(resume);
        if todo.is_err() {
            self.release_lock();
        }
        todo
    }

    /// The samples a locked folder still needs (see [`Output::open_folder`]).
    fn folder_todo(&mut self, resume: bool) -> Result<Vec<Range<usize>>> {
        // A record without the range's samples is still of the folder's job (another range's
        // samples may lie there): resumed, it must be this job's too.
        let recorded = self.record.as_ref().is_some_and(|(at, _)| at.exists());
        let any_sample = (0..self.n).any(|i| self.sample_path(i).exists());
        if resume && (any_sample || recorded) {
            if let Some((at, want)) = &self.record {
                job::check_record(at, &self.path, want)?;
            }
            return Ok(runs(self.n, |i| {
                !is_whole_sample(&self.sample_path(i), self.shape, self.range)
            }));
        }
        for i in 0..self.n {
            match std::fs::remove_file(self.sample_path(i)) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io(format!("removing {}", self.sample_path(i).display()))(e)),
            }
        }
        self.write_record(false)?;
        Ok(vec![0..self.n])
    }

    fn write_record(&mut self, complete: bool) -> Result<()> {
        if let Some((at, rec)) = &mut self.record {
            rec.insert("complete".into(), Value::Bool(complete));
            job::write_record(at, rec)?;
            rec.remove("complete");
        }
        Ok(())
    }

    /// Checks that the finished `.npy` at `path` has this run's header and that its job
    /// record says this job completed it.
    fn check_finished(&self, header: &[u8], full: [usize; 4]) -> Result<()> {
        let mut head = vec![0u8; header.len()];
        let same = File::open(&self.path)
            .and_then(|mut f| f.read_exact(&mut head))
            .is_ok()
            && head == header;
        if !same {
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
        let Some((at, want)) = &self.record else {
            return Ok(());
        };
        job::check_record(at, &self.path, want)?;
        let complete = std::fs::read_to_string(at)
            .ok()
            .and_then(|t| serde_json::from_str::<Map<String, Value>>(&t).ok())
            .and_then(|m| m.get("complete").and_then(Value::as_bool))
            .unwrap_or(false);
        if !complete {
            // The record is of a run that never finished; the file is an older one.
            return Err(Error::options(
                format!(
                    "{{0}}: {} was not written by the run its job record describes (that run did not finish); remove it, or run without {{0}}",
                    self.path.display()
                ),
                &["resume"],
            ));
        }
        Ok(())
    }

    /// Opens and locks the partial `.npy` (resuming it after checking the job, or starting it
    /// afresh); returns the ranges still to generate.
    fn open_npy(&mut self, resume: bool) -> Result<Vec<Range<usize>>> {
        let partial = crate::files::hidden_sibling(&self.path, "partial")?;
        let (f, existed) = crate::files::open_locked(&partial, &self.path)?;
        let todo = self.npy_todo(f, &partial, resume);
        if todo.is_err() && !existed {
            let _ = std::fs::remove_file(&partial); // made by this call, holds nothing
        }
        todo
    }

    /// Resumes or starts the locked partial `f` (see [`Output::open_npy`]).
    fn npy_todo(&mut self, mut f: File, partial: &Path, resume: bool) -> Result<Vec<Range<usize>>> {
        let shape = self.shape;
        let full = [self.n, shape[0], shape[1], shape[2]];
        let header = npy_bytes(&full, std::iter::empty());
        let per_sample = 4 * shape.iter().product::<usize>() as u64;
        let ctx = format!("writing {}", partial.display());
        let partial_len = f.metadata().map_err(io(ctx.clone()))?.len();
        let mut done = 0u64;
        if resume && partial_len > 0 {
            // An interrupted run: continue it if it is this job's, at its last whole sample.
            if let Some((at, want)) = &self.record {
                job::check_record(at, &self.path, want)?;
            }
            let mut head = vec![0u8; header.len()];
            if f.read_exact(&mut head).is_err() || head != header {
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
            done = (partial_len - header.len() as u64) / per_sample;
        } else if resume && self.path.exists() {
            // Nothing interrupted: done only if the finished file is this job's, whole.
            self.check_finished(&header, full)?;
            let _ = std::fs::remove_file(partial); // the empty one just created
            return Ok(Vec::new());
        }
        if done == 0 {
            self.write_record(false)?;
        }
        let keep = header.len() as u64 + done * per_sample;
        (|| {
            f.set_len(keep)?;
            f.seek(SeekFrom::Start(0))?;
            f.write_all(&header)?;
            f.seek(SeekFrom::Start(keep))?;
            Ok(())
        })()
        .map_err(io(ctx))?;
        self.npy = Some((f, partial.to_path_buf()));
        self.npy_samples = done as usize;
        Ok(if done as usize >= self.n {
            Vec::new()
        } else {
            vec![done as usize..self.n]
        })
    }

    /// Writes the samples `x` whose first index is `first` (chunks arrive in index order).
    pub(crate) fn write(&mut self, first: usize, x: Array4<f32>) -> Result<()> {
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
                .map_err(|source| Error::PartialWrite {
                    partial: partial.clone(),
                    source,
                })?;
                self.npy_samples += x.shape()[0];
            }
        }
        Ok(())
    }

    /// Gives up after a failed run: a `.npy` partial that holds no sample is removed (there is
    /// nothing to resume); one with samples stays for `--resume`.
    pub(crate) fn abandon(mut self) {
        if let Some((f, partial)) = self.npy.take() {
            if self.npy_samples == 0 {
                // Removed while still locked, so no other writer can have taken it over.
                let _ = std::fs::remove_file(&partial);
                if let Some((at, _)) = &self.record {
                    let _ = std::fs::remove_file(at);
                }
            }
            drop(f);
        }
        self.release_lock();
    }

    fn release_lock(&mut self) {
        if let Some((f, lock)) = self.lock.take() {
            let _ = std::fs::remove_file(lock);
            drop(f);
        }
    }

    /// Completes the output; returns the files it consists of.
    pub(crate) fn finish(mut self) -> Result<Vec<PathBuf>> {
        match self.kind {
            OutKind::Grid => {
                let views: Vec<_> = self.grid.iter().map(|a| a.view()).collect();
                let x = concatenate(Axis(0), &views).map_err(|e| Error::invalid(e.to_string()))?;
                write_atomic(&self.path, &grid_png(x.view(), self.range, self.grid_cols)?)?;
                Ok(vec![self.path])
            }
            OutKind::Folder => {
                self.write_record(true)?;
                self.release_lock();
                Ok((0..self.n).map(|i| self.sample_path(i)).collect())
            }
            OutKind::Npy => {
                if let Some((f, partial)) = self.npy.take() {
                    // Renamed while still locked: a second writer can never see it half done.
                    std::fs::rename(&partial, &self.path).map_err(io(format!(
                        "renaming {} to {}",
                        partial.display(),
                        self.path.display()
                    )))?;
                    drop(f);
                }
                self.write_record(true)?;
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
    if resume && opts.keep_latents {
        // A resumed run makes only the missing samples: their latents alone would not be the
        // output's.
        return Err(Error::options(
            "{0} and {1} exclude each other: a resumed run has only the latents of the samples it makes",
            &["keep_latents", "resume"],
        ));
    }
    let meta = model.metadata().clone();
    let (mut output, todo) = Output::create(
        path,
        opts.first_index..opts.first_index + opts.n,
        opts.shapes(model)?.output,
        meta.data_range,
        resume,
        None,
        Some(job::job_record(model, opts, injected)),
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

/// Writes all of `x` at once (for outputs small enough to hold: reconstructions, strips); a
/// folder names row i by `first + i`, the sample's global index (inpainting's
/// [`crate::SampleOptions::first_index`]; 0 elsewhere).
pub fn write_all(
    x: &Array4<f32>,
    path: &Path,
    range: [f64; 2],
    grid_cols: Option<usize>,
    first: usize,
) -> Result<Vec<PathBuf>> {
    let [n, c, h, w] = [x.shape()[0], x.shape()[1], x.shape()[2], x.shape()[3]];
    let samples = first..first + n;
    let (mut out, _) = Output::create(path, samples, [c, h, w], range, false, grid_cols, None)?;
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
        let (mut out, todo) =
            Output::create(&path, 0..5, [1, 2, 2], [0.0, 1.0], false, None, None).unwrap();
        assert_eq!(todo, vec![0..5]);
        out.write(0, x.slice(ndarray::s![0..2, .., .., ..]).to_owned())
            .unwrap();
        drop(out); // a crash: the partial file holds 2 samples
        let partial = dir.path().join(".x.npy.partial");
        // Half a sample more, as if killed mid-write.
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&partial)
            .unwrap();
        f.write_all(&[0u8; 6]).unwrap();
        assert!(!path.exists());
        let (mut out, todo) =
            Output::create(&path, 0..5, [1, 2, 2], [0.0, 1.0], true, None, None).unwrap();
        assert_eq!(todo, vec![2..5]);
        out.write(2, x.slice(ndarray::s![2..5, .., .., ..]).to_owned())
            .unwrap();
        out.finish().unwrap();
        let back = crate::npy::read_npy(&path).unwrap();
        assert_eq!(back.as_slice().unwrap(), x.as_slice().unwrap());
        // Resuming a complete file does nothing; a different shape is refused.
        let (_, todo) =
            Output::create(&path, 0..5, [1, 2, 2], [0.0, 1.0], true, None, None).unwrap();
        assert!(todo.is_empty());
        assert!(Output::create(&path, 0..6, [1, 2, 2], [0.0, 1.0], true, None, None).is_err());
    }
}
