"""diffusers UNet2DModel folders imported by `edgediff-export diffusers`, sampled by the runtime.

Each test builds a small random UNet2DModel and a scheduler, saves them with save_pretrained,
exports the folder through the CLI entry point, samples with the edgediff binary from given
noise, and compares with diffusers' own pipeline (or its scheduler's step loop where the
pipeline cannot pass class labels) driving the *PyTorch* U-Net from the same noise. That checks
the export, the metadata mapping (schedule, prediction type, conditioning) and the sampler
together against an independent implementation.

Tolerance 1e-4 max abs: the ONNX network in float32 against PyTorch in float32 differs by
~1e-6 per call (the export check's figure), and diffusers keeps its alpha-bar tables in
float32 while the runtime uses float64; over 10 steps those stay well below 1e-4, while any
mapping error (a wrong schedule kind, prediction type or label) moves samples by O(0.1).
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from conftest import run_cli
from edgediff_export.export import main as export_main
from edgediff_export.schedules import betas_for

diffusers = pytest.importorskip("diffusers")
from edgediff_export import diffusers_import as di  # noqa: E402  (needs diffusers only lazily)

TOL = 1e-4
N, STEPS = 3, 10


def tiny_unet(seed: int, channels: int = 1, num_class_embeds: int | None = None, **kw):
    torch.manual_seed(seed)
    return diffusers.UNet2DModel(**kw,
        sample_size=8, in_channels=channels, out_channels=channels, block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        layers_per_block=1, norm_num_groups=4, attention_head_dim=8, num_class_embeds=num_class_embeds)


def export_cli(*args: str) -> dict:
    """`edgediff-export diffusers ARGS`, run in this process (no second torch import)."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        export_main(["diffusers", *map(str, args)])
    return json.loads(buf.getvalue())


def noises(seed: int, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((N, *shape)).astype(np.float32),
            rng.standard_normal((STEPS, N, *shape)).astype(np.float32))


def sample_runtime(binary: Path, model: Path, tmp: Path, sampler: str, spacing: str,
                   init: np.ndarray, step_noise: np.ndarray, *extra: str) -> np.ndarray:
    np.save(tmp / "init.npy", init)
    np.save(tmp / "steps.npy", step_noise)
    run_cli(binary, "sample", "--model", str(model), "--sampler", sampler, "--steps", str(STEPS),
            "--spacing", spacing, "--init-noise", str(tmp / "init.npy"), "--step-noise",
            str(tmp / "steps.npy"), "-o", str(tmp / "out.npy"), "-q", *extra)
    return np.load(tmp / "out.npy")


def inject_noise(monkeypatch, pipeline_cls, scheduler, init: np.ndarray, step_noise: np.ndarray) -> None:
    """The pipeline's initial noise is `init`; the scheduler's i-th draw is step_noise[i]."""
    pipe_mod = __import__(pipeline_cls.__module__, fromlist=["randn_tensor"])
    monkeypatch.setattr(pipe_mod, "randn_tensor", lambda shape, **kw: torch.from_numpy(init.copy()))
    sched_mod = __import__(type(scheduler).__module__, fromlist=["randn_tensor"])
    calls = iter(range(STEPS))
    monkeypatch.setattr(sched_mod, "randn_tensor",
                        lambda shape, **kw: torch.from_numpy(step_noise[next(calls)].copy()))


def run_pipeline(pipe, **kwargs) -> tuple[np.ndarray, np.ndarray]:
    """The pipeline's images and its last scheduler step's sample before post-processing.

    The pipelines return (x / 2 + 0.5).clamp(0, 1), which hides every difference in pixels the
    clamp flattens; the raw final sample is compared too.
    """
    step, raw = pipe.scheduler.step, []

    def recording_step(*args, **kw):
        out = step(*args, **kw)
        raw.append(out.prev_sample)
        return out
    pipe.scheduler.step = recording_step
    images = pipe(batch_size=N, num_inference_steps=STEPS, output_type="pt", **kwargs).images
    return images.numpy(), raw[-1].numpy()


def compare(got: np.ndarray, images: np.ndarray, raw: np.ndarray, what: str) -> None:
    scale = max(1.0, float(np.abs(raw).max()))
    err_raw = float(np.abs(got - raw).max())
    err_img = float(np.abs(np.clip(got / 2 + 0.5, 0.0, 1.0) - images).max())
    print(f"{what}: max abs difference {err_raw:.2e} on samples up to {scale:.1f}, "
          f"{err_img:.2e} on the pipeline's [0, 1] images")
    # A random network drives epsilon-prediction samples far out of the data range (x0 =
    # (x - sigma eps) / alpha with alpha ~ 0.02 at the first step), where float32 rounding is
    # relative: the tolerance is 1e-4 relative to the largest value.
    assert err_raw <= TOL * scale
    assert err_img <= TOL


def test_ddim_pipeline_folder_epsilon_matches_ddim_pipeline(edgediff_bin, tmp_path, monkeypatch):
    # A pipeline folder as DDIMPipeline.save_pretrained writes it: linear betas, epsilon,
    # leading spacing (DDIMScheduler's defaults), without clipping (the DDPM test clips).
    scheduler = diffusers.DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=False)
    pipe = diffusers.DDIMPipeline(unet=tiny_unet(0, channels=3), scheduler=scheduler)
    pipe.save_pretrained(tmp_path / "pipe")
    result = export_cli("--unet", tmp_path / "pipe", "--out", tmp_path / "m.onnx")
    assert result["prediction"] == "epsilon" and result["schedule"]["kind"] == "linear"
    assert result["hints"] == ["timestep_spacing leading: pass --spacing leading"]
    print(f"export check: max abs diff {result['max_abs_diff']:.2e}")

    init, step_noise = noises(1, (3, 8, 8))
    got = sample_runtime(edgediff_bin, tmp_path / "m.onnx", tmp_path, "ddim", "leading", init, step_noise)
    inject_noise(monkeypatch, diffusers.DDIMPipeline, pipe.scheduler, init, step_noise)
    compare(got, *run_pipeline(pipe, eta=0.0), "DDIM pipeline parity")


def test_ddpm_scaled_linear_with_step_noise_matches_ddpm_pipeline(edgediff_bin, tmp_path, monkeypatch):
    # scaled_linear (Stable Diffusion's betas) maps to the runtime's quadratic kind; DDPM draws
    # fresh noise each step, injected into diffusers so both sides use the same. A learned
    # time embedding (a table of T rows) makes the timestep input int64.
    scheduler = diffusers.DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085,
                                        beta_end=0.012, clip_sample=True)
    unet = tiny_unet(1, time_embedding_type="learned", num_train_timesteps=1000)
    pipe = diffusers.DDPMPipeline(unet=unet, scheduler=scheduler)
    pipe.save_pretrained(tmp_path / "pipe")
    result = export_cli("--unet", tmp_path / "pipe", "--out", tmp_path / "m.onnx")
    assert result["schedule"] == {"kind": "quadratic", "num_train_timesteps": 1000,
                                  "beta_start": 0.00085, "beta_end": 0.012}
    assert "clip_sample: pass --clip-x0" in result["hints"]
    timestep = onnx.load(str(tmp_path / "m.onnx")).graph.input[1]
    assert timestep.name == "timestep" and timestep.type.tensor_type.elem_type == onnx.TensorProto.INT64

    init, step_noise = noises(2, (1, 8, 8))
    got = sample_runtime(edgediff_bin, tmp_path / "m.onnx", tmp_path, "ddpm", "leading",
                         init, step_noise, "--clip-x0")
    inject_noise(monkeypatch, diffusers.DDPMPipeline, pipe.scheduler, init, step_noise)
    compare(got, *run_pipeline(pipe), "DDPM pipeline parity")

    # The ODE likelihood sees such a network only at rounded times: it says so.
    np.save(tmp_path / "x.npy", np.zeros((1, 1, 8, 8), np.float32))
    proc = run_cli(edgediff_bin, "likelihood", "--model", str(tmp_path / "m.onnx"), "--data",
                   str(tmp_path / "x.npy"), "--steps", "2", "-q")
    assert "takes integer timesteps" in proc.stderr, proc.stderr


def test_bare_unet_folder_v_prediction_cosine_class_guidance(edgediff_bin, tmp_path):
    # A bare UNet2DModel folder and a separate scheduler config; v-prediction on the cosine
    # (squaredcos_cap_v2) schedule; 4 class embeddings whose last is the null label. With
    # --guidance the runtime evaluates the class and the null label: a wrong null label or a
    # wrong prediction type moves the result far beyond the tolerance.
    unet = tiny_unet(2, num_class_embeds=4)
    unet.save_pretrained(tmp_path / "unet")
    config = dict(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction",
                  clip_sample=False, set_alpha_to_one=True, steps_offset=0, timestep_spacing="trailing")
    diffusers.DDIMScheduler(**config).save_config(tmp_path / "sched")
    result = export_cli("--unet", tmp_path / "unet", "--scheduler", tmp_path / "sched" / "scheduler_config.json",
                        "--null-class", "last", "--out", tmp_path / "m.onnx")
    assert result["prediction"] == "v" and result["schedule"]["kind"] == "cosine"
    assert result["conditioning"] == {"type": "class", "num_classes": 3, "null_label": 3}

    k, w = 1, 2.0
    init, step_noise = noises(3, (1, 8, 8))
    got = sample_runtime(edgediff_bin, tmp_path / "m.onnx", tmp_path, "ddim", "trailing", init,
                         step_noise, "--class", str(k), "--guidance", str(w))

    # The reference: diffusers' DDIM scheduler stepping the PyTorch U-Net with guidance mixed
    # in v (an affine map of eps at fixed x, so mixing v or eps is the same).
    sched = diffusers.DDIMScheduler.from_pretrained(tmp_path / "sched")
    sched.set_timesteps(STEPS)
    x = torch.from_numpy(init)
    with torch.no_grad():
        for t in sched.timesteps:
            v_c = unet(x, t, class_labels=torch.full((N,), k)).sample
            v_u = unet(x, t, class_labels=torch.full((N,), 3)).sample
            x = sched.step(v_u + w * (v_c - v_u), t, x, eta=0.0).prev_sample
    err = float(np.abs(got - x.numpy()).max())
    print(f"guided v-prediction parity: max abs difference {err:.2e} (|x| up to {np.abs(got).max():.1f})")
    assert err <= TOL

    # The float16 copy (what --precision fp16 writes; diffusers' attention has casts the plain
    # converter breaks): the same bound as tests/test_edge.py, mean |diff| < 0.05 for fp16's
    # 2^-11 rounding per operation, and it must differ at all (it really ran in fp16).
    from edgediff_export.precision import write_fp16
    write_fp16(tmp_path / "m.onnx", tmp_path / "m16.onnx")
    half = sample_runtime(edgediff_bin, tmp_path / "m16.onnx", tmp_path, "ddim", "trailing", init,
                          step_noise, "--class", str(k), "--guidance", str(w))
    diff = np.abs(half - x.numpy())
    print(f"fp16 copy: samples mean |diff| {diff.mean():.1e}, max {diff.max():.1e}")
    assert 0 < diff.mean() < 0.05


@pytest.mark.parametrize("beta_schedule", list(di.BETA_SCHEDULES))
def test_schedule_mapping_reproduces_diffusers_betas(beta_schedule):
    # The metadata's kind and parameters, expanded by the exporter's (float64) formulas, give
    # diffusers' own float32 betas: agreement to float32 rounding (a few ulp, 1.2e-7 each:
    # linspace, then squaring or the logistic, each round).
    config = dict(beta_schedule=beta_schedule, beta_start=0.00085, beta_end=0.012, num_train_timesteps=500)
    theirs = diffusers.DDPMScheduler(**config).betas.double().numpy()
    meta = di.schedule_from_config(config)
    ours = betas_for(meta["kind"], meta["num_train_timesteps"], meta.get("beta_start", 1e-4),
                     meta.get("beta_end", 0.02))
    assert np.max(np.abs(ours - theirs) / theirs) <= 4 * np.finfo(np.float32).eps
    # trained_betas equal to a closed form is accepted as that form.
    assert di.schedule_from_config({**config, "trained_betas": theirs.tolist()})["kind"] == meta["kind"]


def test_trained_betas_without_closed_form_is_refused():
    betas = np.linspace(1e-4, 0.02, 100) * (1 + 0.1 * np.sin(np.arange(100)))
    with pytest.raises(di.DiffusersImportError, match="no explicit beta table"):
        di.schedule_from_config({"trained_betas": betas.tolist(), "num_train_timesteps": 100})


def test_class_conditioning_mapping():
    # 'last': the last embedding is the unconditional label; 'none': all are classes and the
    # contract's null label lies past the table (a run without --class fails in the network).
    cfg = {"num_class_embeds": 5}
    assert di.conditioning_from_config(cfg, "last") == {"type": "class", "num_classes": 4, "null_label": 4}
    assert di.conditioning_from_config(cfg, "none") == {"type": "class", "num_classes": 5, "null_label": 5}
    assert di.conditioning_from_config({}, None) is None
    with pytest.raises(di.DiffusersImportError, match="no num_class_embeds"):
        di.conditioning_from_config({}, "last")


def _config_only(folder: Path, config: dict) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def _with_scheduler(folder: Path, **overrides) -> Path:
    (folder / "scheduler").mkdir(parents=True, exist_ok=True)
    diffusers.DDPMScheduler(**overrides).save_config(folder / "scheduler")
    return folder


@pytest.mark.parametrize("setup,args,message", [
    (lambda t: t.mkdir() or t, [], "neither model_index.json .* nor config.json"),
    (lambda t: _config_only(t / "unet", {"_class_name": "UNet2DConditionModel", "sample_size": 8,
                                         "cross_attention_dim": 32}) and t / "unet", [],
     "UNet2DConditionModel \\(text-conditioned"),
    (lambda t: _with_scheduler(t) and (t / "model_index.json").write_text(
        json.dumps({"unet": ["diffusers", "UNet2DConditionModel"]})) and t, [], "UNet2DConditionModel"),
    (lambda t: _config_only(t / "unet", {"_class_name": "UNet2DModel", "sample_size": 8}) and _with_scheduler(t)
     and t / "unet", [], "no weights .* save_pretrained"),
    (lambda t: _config_only(t / "unet", {"_class_name": "UNet2DModel", "sample_size": 8}) and t / "unet", [],
     "pass --scheduler"),
    (lambda t: _config_only(t / "unet", {"_class_name": "UNet2DModel", "sample_size": 8, "in_channels": 3,
                                         "out_channels": 6}) and _with_scheduler(t) and t / "unet", [],
     "3 input but 6 output channels"),
    (lambda t: _config_only(t / "unet", {"_class_name": "UNet2DModel", "sample_size": 8,
                                         "time_embedding_type": "fourier"}) and _with_scheduler(t) and t / "unet",
     [], "fourier"),
    (lambda t: _config_only(t / "unet", {"_class_name": "UNet2DModel", "sample_size": 8, "num_class_embeds": 10})
     and _with_scheduler(t) and t / "unet", [], "pass --null-class last .* or --null-class none"),
    (lambda t: _config_only(t / "unet", {"_class_name": "UNet2DModel", "sample_size": 8})
     and _with_scheduler(t, beta_schedule="laplace") and t / "unet", [], "beta_schedule 'laplace' is not supported"),
    (lambda t: _config_only(t / "unet", {"_class_name": "UNet2DModel", "sample_size": 8})
     and _with_scheduler(t, rescale_betas_zero_snr=True) and t / "unet", [], "rescale_betas_zero_snr"),
    (lambda t: _config_only(t / "unet", {"_class_name": "UNet2DModel", "sample_size": 8}) and t / "unet",
     ["--scheduler", "nowhere"], "no scheduler config at nowhere"),
], ids=["no-config", "conditional-unet", "conditional-pipeline", "no-weights", "no-scheduler",
        "learned-variance", "fourier", "class-no-null", "laplace", "zero-snr", "scheduler-missing"])
def test_unsupported_folders_are_refused_with_the_fix(tmp_path, capsys, setup, args, message):
    folder = setup(tmp_path / "model")
    with pytest.raises(SystemExit) as exit_info:
        export_main(["diffusers", "--unet", str(folder), "--out", str(tmp_path / "m.onnx"), *args])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("edgediff-export diffusers: error: ")
    import re
    assert re.search(message, err), err
    assert not (tmp_path / "m.onnx").exists()
