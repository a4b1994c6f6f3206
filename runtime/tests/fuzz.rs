//! Property-based fuzzing of the parsers that read untrusted input: the `edgediff` metadata
//! (JSON in a model file), the `.npy` reader and the PNG/mask reader. Each must return Ok or a
//! clear Err for any input, never panic, and accept what it wrote. Inputs are random bytes and,
//! more usefully, valid files with random mutations (byte flips, truncations, insertions).
//!
//! Cases per property: 1,000 in `cargo test`; `tools/fuzz` runs many more (PROPTEST_CASES).
//! Any crash found becomes a fixed regression case in `regressions` below.

use edgediff::image::{read_png, sample_png};
use edgediff::metadata::ModelMetadata;
use edgediff::npy::{npy_bytes, parse_npy};
use edgediff::schedule::Schedule;
use edgediff::spacing::spaced_levels;
use ndarray::Array3;
use proptest::prelude::*;

const META: &str = r#"{"conditioning": null, "data_range": [-1.0, 1.0], "description": "d", "extra": {}, "format_version": 1, "name": "m", "prediction": "epsilon", "sample_shape": [1, 28, 28], "schedule": {"beta_end": 0.02, "beta_start": 0.0001, "kind": "linear", "num_train_timesteps": 1000}, "time_input": "index"}"#;

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000)
}

/// A mutation of `base`: up to 8 edits, each a byte overwrite, a deletion or an insertion,
/// then possibly a truncation.
fn mutated(base: Vec<u8>) -> impl Strategy<Value = Vec<u8>> {
    let len = base.len().max(1);
    (
        prop::collection::vec((0..len, any::<u8>(), 0u8..3), 0..8),
        prop::option::of(0..len),
    )
        .prop_map(move |(edits, cut)| {
            let mut b = base.clone();
            for (at, byte, kind) in edits {
                let at = at.min(b.len());
                match kind {
                    0 if at < b.len() => b[at] = byte,
                    1 if at < b.len() => {
                        b.remove(at);
                    }
                    _ => b.insert(at, byte),
                }
            }
            if let Some(c) = cut {
                b.truncate(c);
            }
            b
        })
}

/// The schedule of metadata a model would open with: parsed, checked field by field, and
/// usable by samplers.
fn accepted(text: &str) -> Option<Schedule> {
    Schedule::from_spec(&ModelMetadata::from_json(text).ok()?.schedule).ok()
}

fn valid_npy() -> Vec<u8> {
    npy_bytes(&[2, 1, 3, 3], (0..18).map(|i| i as f32 * 0.25))
}

fn valid_png() -> Vec<u8> {
    let x = Array3::from_shape_fn((1, 5, 4), |(_, i, j)| (i * 4 + j) as f32 / 20.0);
    sample_png(x.view(), [0.0, 1.0]).expect("encodes")
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(cases()))]

    #[test]
    fn npy_reader_never_panics_on_bytes(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        let _ = parse_npy(&bytes);
    }

    #[test]
    fn npy_reader_never_panics_on_mutations(bytes in mutated(valid_npy())) {
        if let Ok(a) = parse_npy(&bytes) {
            // Whatever it accepts is a consistent array.
            prop_assert_eq!(a.len(), a.shape().iter().product::<usize>());
        }
    }

    #[test]
    fn metadata_parser_never_panics_on_text(text in ".{0,200}") {
        let _ = ModelMetadata::from_json(&text);
    }

    #[test]
    fn metadata_parser_never_panics_on_mutations(bytes in mutated(META.as_bytes().to_vec())) {
        // What it accepts must also build a schedule and space steps over it without panicking.
        if let Some(schedule) = accepted(&String::from_utf8_lossy(&bytes)) {
            for spacing in ["trailing", "leading", "linspace", "karras", "logsnr"] {
                let _ = spaced_levels(&schedule, spacing.parse().expect("known"), 10);
            }
        }
    }

    #[test]
    fn schedules_never_panic_on_extreme_parameters(
        kind in 0usize..4, t in 1usize..5000, a in 1e-12f64..1.0, b in 1e-12f64..1.0,
        lo in 1e-6f64..10.0, hi in 1.0f64..1e6,
    ) {
        let (a, b) = (a.min(b), a.max(b).min(0.999_999));
        let text = match kind {
            0 => format!(r#"{{"kind":"linear","num_train_timesteps":{t},"beta_start":{a},"beta_end":{b}}}"#),
            1 => format!(r#"{{"kind":"sigmoid","num_train_timesteps":{t},"beta_start":{a},"beta_end":{b}}}"#),
            2 => format!(r#"{{"kind":"vp","beta_min":{a},"beta_max":{}}}"#, a + hi),
            _ => format!(r#"{{"kind":"ve","sigma_min":{lo},"sigma_max":{}}}"#, lo + hi),
        };
        let meta = META.replace(
            r#"{"beta_end": 0.02, "beta_start": 0.0001, "kind": "linear", "num_train_timesteps": 1000}"#,
            &text,
        );
        if let Some(schedule) = accepted(&meta) {
            for spacing in ["trailing", "karras", "logsnr"] {
                let _ = spaced_levels(&schedule, spacing.parse().expect("known"), 7);
            }
        }
    }

    #[test]
    fn png_reader_never_panics_on_bytes(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        let _ = read_png(&bytes, [1, 5, 4], [0.0, 1.0]);
    }

    #[test]
    fn png_reader_never_panics_on_mutations(bytes in mutated(valid_png())) {
        if let Ok(x) = read_png(&bytes, [1, 5, 4], [0.0, 1.0]) {
            prop_assert!(x.iter().all(|v| (0.0..=1.0).contains(v)));
        }
    }
}

#[test]
fn valid_inputs_are_accepted() {
    assert!(parse_npy(&valid_npy()).is_ok());
    assert!(ModelMetadata::from_json(META).is_ok());
    assert!(read_png(&valid_png(), [1, 5, 4], [0.0, 1.0]).is_ok());
}

/// Inputs that once crashed (add each crash the fuzzer finds).
#[test]
fn regressions() {
    // Found by schedules_never_panic_on_extreme_parameters: betas 0.055..0.61 over 1721 steps
    // underflow alpha_bar to 0, the spacing then asked for the time of sigma/alpha = NaN, and
    // the lookup indexed table[0 - 1]. Such metadata is now refused.
    let meta = META.replace(
        r#""beta_end": 0.02, "beta_start": 0.0001, "kind": "linear", "num_train_timesteps": 1000"#,
        r#""beta_end": 0.6084029653588663, "beta_start": 0.0548853971477611, "kind": "linear", "num_train_timesteps": 1721"#,
    );
    let spec = ModelMetadata::from_json(&meta).unwrap().schedule;
    let err = Schedule::from_spec(&spec).unwrap_err();
    assert!(err.contains("alpha_bar"), "{err}");
    let lookup = accepted(META).unwrap();
    assert_eq!(lookup.t_for_sbar(f64::NAN), 0.0);

    let cases: &[&[u8]] = &[
        b"\x93NUMPY\x02\x00\xff\xff\xff\xff", // a v2 header length past the end
        b"\x93NUMPY\x01\x00\x10\x00{'shape': (",
    ];
    for c in cases {
        let _ = parse_npy(c);
    }
}
