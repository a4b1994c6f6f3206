//! Property: the CLI's argument validation on random argument vectors. Whatever the flags and
//! values, `edgediff` never panics or aborts, exits with a code of the README's table, and
//! leaves no output file unless it succeeded. The vocabulary mixes valid, absurd and malformed
//! values of every option `sample`, `interpolate` and `inpaint` take; a vector that passes
//! validation is cheap by construction (tiny n and steps), so every case finishes in a second.
//!
//! Cases: 64 in `cargo test` (each runs the binary); `PROPTEST_CASES` sets more.

use std::path::Path;
use std::process::Command;

use proptest::prelude::*;

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(64)
}

/// (flag, values it is tried with); an empty value list is a switch.
const FLAGS: &[(&str, &[&str])] = &[
    (
        "--sampler",
        &[
            "ddim",
            "ddpm",
            "pc",
            "adaptive",
            "ode-adaptive",
            "unipc",
            "magic",
            "",
        ],
    ),
    (
        "--steps",
        &[
            "0",
            "1",
            "2",
            "3",
            "1001",
            "-3",
            "nan",
            "18446744073709551616",
        ],
    ),
    ("--spacing", &["trailing", "karras", "logsnr", "odd"]),
    ("--rho", &["7", "0", "-1", "inf"]),
    ("--timesteps", &["999,500,1", "1,500", "", "x", "999,999"]),
    ("--eta", &["0", "1", "2", "-1", "nan"]),
    ("--order", &["0", "1", "3", "9"]),
    ("--snr", &["0.16", "0", "-1", "inf"]),
    ("--rtol", &["1e-2", "0", "-1", "1e-300", "nan"]),
    ("--atol", &["1e-2", "0", "1e-300"]),
    ("--min-steps", &["0", "2", "900"]),
    ("--max-steps", &["0", "3", "18446744073709551615"]),
    ("-n", &["0", "1", "2", "99999999999", "x"]),
    ("--batch-size", &["0", "1", "100000000000"]),
    ("--seed", &["0", "18446744073709551615", "-1"]),
    ("--class", &["0", "-1", "99"]),
    ("--guidance", &["3", "-1", "nan"]),
    ("--clip-x0", &[]),
    ("--dynamic-threshold", &["0.995", "0", "2", "nan"]),
    ("--threshold-max", &["1", "0.5", "inf"]),
    ("--init-noise", &["NOISE", "MISSING", "GARBAGE"]),
    ("--step-noise", &["STEPNOISE", "NOISE"]),
    ("--resume", &[]),
    ("--threads", &["0", "1", "100000"]),
    ("--provider", &["cpu", "cuda", "vulkan"]),
    ("--fallback", &["cpu", "gpu"]),
    ("--no-mmap", &[]),
    ("--frames", &["0", "2", "3", "100000000"]),
    ("--jumps", &["0", "1", "9999"]),
    ("--resample", &["0", "1", "18446744073709551615"]),
    ("--bogus", &[]),
];

const COMMANDS: &[&str] = &["sample", "interpolate", "inpaint"];

fn argv() -> impl Strategy<Value = (usize, Vec<(usize, usize)>, usize)> {
    (
        0..COMMANDS.len(),
        prop::collection::vec((0..FLAGS.len(), 0..8usize), 0..7),
        0..3usize,
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn no_panic_no_stray_output((cmd, flags, out_kind) in argv()) {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        // Small, valid inputs the values may name; the default model is [1, 28, 28].
        std::fs::write(d.join("garbage.npy"), b"not npy").unwrap();
        write_npy(&d.join("noise.npy"), &[2, 1, 28, 28]);
        write_npy(&d.join("stepnoise.npy"), &[3, 2, 1, 28, 28]);
        let out = d.join(["o.npy", "o.png", "o"][out_kind]);
        let mut args: Vec<String> = vec![COMMANDS[cmd].into()];
        for (f, v) in flags {
            let (flag, values) = FLAGS[f];
            args.push(flag.into());
            if !values.is_empty() {
                let value = values[v % values.len()];
                args.push(match value {
                    "NOISE" => d.join("noise.npy").display().to_string(),
                    "STEPNOISE" => d.join("stepnoise.npy").display().to_string(),
                    "MISSING" => d.join("missing.npy").display().to_string(),
                    "GARBAGE" => d.join("garbage.npy").display().to_string(),
                    other => other.into(),
                });
            }
        }
        if COMMANDS[cmd] == "inpaint" {
            args.extend(["--image".into(), d.join("noise.npy").display().to_string()]);
            args.extend(["--mask".into(), d.join("noise.npy").display().to_string()]);
        }
        // Keep whatever passes validation cheap: tiny defaults, unless the vector sets them.
        for (flag, value) in [("--steps", "2"), ("-n", "2")] {
            if !args.iter().any(|a| a == flag) && COMMANDS[cmd] == "sample" {
                args.extend([flag.into(), value.into()]);
            }
        }
        if COMMANDS[cmd] != "sample" && !args.iter().any(|a| a == "--steps") {
            args.extend(["--steps".into(), "2".into()]);
        }
        if !args.iter().any(|a| a == "-o" || a == "--out") {
            args.extend(["-o".into(), out.display().to_string()]);
        }
        args.push("-q".into());
        let run = Command::new(env!("CARGO_BIN_EXE_edgediff")).args(&args).output().unwrap();
        let code = run.status.code();
        let stderr = String::from_utf8_lossy(&run.stderr);
        prop_assert!(
            matches!(code, Some(0..=5)),
            "edgediff {:?} ended with {:?} (a panic is 101, an abort a signal):\n{}", args, run.status, stderr
        );
        if code != Some(0) {
            prop_assert!(!out.exists(), "edgediff {:?} failed ({:?}) but left {}", args, code, out.display());
            prop_assert!(stderr.contains("edgediff: error:") || code == Some(1), "{}", stderr);
        }
    }
}

/// A float32 .npy of `shape` holding small finite values.
fn write_npy(path: &Path, shape: &[usize]) {
    let n: usize = shape.iter().product();
    let data = (0..n).map(|i| ((i % 7) as f32 - 3.0) / 3.0);
    std::fs::write(path, edgediff::npy::npy_bytes(shape, data)).unwrap();
}
