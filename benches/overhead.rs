//! Runtime overhead: `generate` (DDIM, S steps, batch B) against S bare ONNX Runtime calls on the
//! same batch, measured side by side in one run, alternating, best of R repetitions each.
//!
//!     cargo bench --bench overhead -- [MODEL] [BATCH] [STEPS] [REPS]
//!
//! Prints figures; never fails on time.

use std::time::Instant;

use edgediff::NetworkOptions;
use edgediff::{generate, Model, SampleOptions, SamplerKind};
use ndarray::Array4;

fn main() -> edgediff::Result<()> {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let model_path = args
        .first()
        .cloned()
        .unwrap_or_else(|| "models/mnist-ddpm.onnx".into());
    let batch: usize = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(64);
    let steps: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(100);
    let reps: usize = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(3);
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let path = if std::path::Path::new(&model_path).exists() {
        model_path.into()
    } else {
        root.join(&model_path)
    };
    let mut model = Model::open_with(&path, &NetworkOptions::default())?;
    let [c, h, w] = model.metadata().sample_shape;
    let x = Array4::<f32>::from_elem((batch, c, h, w), 0.1);
    let opts = SampleOptions {
        sampler: SamplerKind::DDIM,
        steps,
        n: batch,
        batch_size: batch,
        ..Default::default()
    };
    // Warm up both paths once (first-run allocations, thread pool start).
    model.bench_bare_call(x.view(), 500.0)?;
    generate(
        &mut model,
        &SampleOptions {
            steps: 2,
            ..opts.clone()
        },
        None,
        &mut |_, _| {},
    )?;

    let (mut best_bare, mut best_gen) = (f64::INFINITY, f64::INFINITY);
    for _ in 0..reps {
        let t = Instant::now();
        for i in 0..steps {
            model.bench_bare_call(x.view(), (999 - i * 10 % 1000) as f64)?;
        }
        best_bare = best_bare.min(t.elapsed().as_secs_f64());
        let t = Instant::now();
        generate(&mut model, &opts, None, &mut |_, _| {})?;
        best_gen = best_gen.min(t.elapsed().as_secs_f64());
    }
    println!(
        "model {} batch {batch} steps {steps}, best of {reps}",
        path.display()
    );
    println!(
        "  {steps} bare ONNX Runtime calls: {best_bare:.3} s ({:.2} ms/call)",
        1e3 * best_bare / steps as f64
    );
    println!(
        "  edgediff generate (DDIM):   {best_gen:.3} s ({:.2} ms/step)",
        1e3 * best_gen / steps as f64
    );
    println!(
        "  overhead ratio: {:.4} ({:+.2}%)",
        best_gen / best_bare,
        100.0 * (best_gen / best_bare - 1.0)
    );
    Ok(())
}
