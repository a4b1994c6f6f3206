"""`edgediff-train distill-t2i` (latent consistency distillation) and the pipeline recovery
(`edgediff-export recover-pipeline`) its shipped teacher rests on.

- A pipeline recovered from its edgediff export holds the exported weights bit for bit (plain
  and guidance-distilled U-Nets), and the shipped text-to-image folder is recovered.
- The pieces of the LCM loss are diffusers' own: the guidance-scale embedding
  (LatentConsistencyModelPipeline's), the boundary scalings (LCMScheduler's), and the guided
  teacher step (DDIMScheduler.step on the classifier-free-guided noise: guiding x0 and eps as
  LCM does is the same step, the DDIM update being linear in eps).
- The student starts as the teacher exactly (cond_proj zero), whatever timestep_cond it gets.
- A run stopped after every step and resumed is bit for bit the straight run; its pipeline
  exports with a `distillation` record and the lcm default, and the runtime samples it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

import sd_tiny  # noqa: E402
from conftest import ROOT  # noqa: E402
from edgediff_export import distill_t2i, train_t2i  # noqa: E402
from edgediff_export.onnx_pipeline import recover_pipeline  # noqa: E402


def export(src: Path, out: Path) -> Path:
    import os
    env = {**os.environ, "PYTHONPATH": str(ROOT / "exporter" / "src")}
    subprocess.run([sys.executable, "-m", "edgediff_export.export", "diffusers", str(src),
                    "--out", str(out)], check=True, capture_output=True, env=env)
    return out


def states(folder: Path) -> dict[str, dict[str, torch.Tensor]]:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    return {"unet": UNet2DConditionModel.from_pretrained(str(folder / "unet")).state_dict(),
            "vae": AutoencoderKL.from_pretrained(str(folder / "vae")).state_dict(),
            "text_encoder": CLIPTextModel.from_pretrained(str(folder / "text_encoder")).state_dict()}


@pytest.mark.parametrize("cond_dim", [None, 8], ids=["sd", "lcm"])
def test_recovered_pipeline_holds_the_exported_weights(tmp_path: Path, cond_dim) -> None:
    src = sd_tiny.build(tmp_path / "src", seed=3, time_cond_proj_dim=cond_dim)
    with torch.no_grad():  # norms off their 1 / 0 init, so a swapped gamma and beta would show
        from diffusers import UNet2DConditionModel
        unet = UNet2DConditionModel.from_pretrained(str(src / "unet"))
        for m in unet.modules():
            if isinstance(m, (torch.nn.GroupNorm, torch.nn.LayerNorm)):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
        unet.save_pretrained(str(src / "unet"))
    onnx_dir = export(src, tmp_path / "onnx")
    report = recover_pipeline(onnx_dir, tmp_path / "back")
    assert all(err <= 1e-4 for err in report["max_rel_err"].values()), report
    want, got = states(src), states(tmp_path / "back")
    for part in want:
        params = dict(want[part])
        assert set(got[part]) == set(params), part
        for k, v in params.items():
            assert torch.equal(got[part][k], v), f"{part}.{k} differs"
    index = json.loads((tmp_path / "back" / "model_index.json").read_text())
    assert index["_class_name"] == json.loads((src / "model_index.json").read_text())["_class_name"]


def test_recovery_refuses_a_folder_without_graphs(tmp_path: Path) -> None:
    from edgediff_export.diffusers_import import DiffusersImportError

    with pytest.raises(DiffusersImportError, match="no text_encoder/model.onnx"):
        recover_pipeline(tmp_path, tmp_path / "out")


def test_embedding_and_scalings_are_diffusers() -> None:
    from diffusers import LatentConsistencyModelPipeline, LCMScheduler

    w = torch.tensor([0.0, 3.0, 7.5, 14.9])
    for dim in (256, 9):
        ref = LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, w, embedding_dim=dim)
        assert torch.equal(distill_t2i.guidance_embedding(w, dim), ref)
    sched = LCMScheduler(**sd_tiny.SCHEDULER)
    t = torch.tensor([0, 19, 259, 999])
    c_skip, c_out = distill_t2i.boundary_scalings(t)
    for i, ti in enumerate(t.tolist()):
        s, o = sched.get_scalings_for_boundary_condition_discrete(ti)
        # float32 here, float64 there: 1e-7 is float32's rounding of values in [0, 1].
        assert abs(c_skip[i].item() - s) < 1e-7 and abs(c_out[i].item() - o) < 1e-7


def tiny_unet(seed: int = 0):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(block_out_channels=(16, 32), layers_per_block=1, sample_size=8,
                                in_channels=4, out_channels=4, cross_attention_dim=16,
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                                attention_head_dim=4, norm_num_groups=8).eval()


def test_guided_teacher_step_is_diffusers_ddim_step() -> None:
    from diffusers import DDIMScheduler

    teacher = tiny_unet()
    sched = DDIMScheduler(**sd_tiny.SCHEDULER)
    sched.set_timesteps(50)  # prev_timestep = t - 20 in DDIMScheduler.step: LCM's grid step
    abar = sched.alphas_cumprod.float()
    g = torch.Generator().manual_seed(1)
    z = torch.randn(3, 4, 8, 8, generator=g)
    text, empty = torch.randn(3, 77, 16, generator=g), torch.randn(1, 77, 16, generator=g)
    w = torch.tensor([3.0, 7.0, 12.0])
    for t_int in (19, 259, 999):
        t = torch.full((3,), t_int)
        got = distill_t2i.guided_ddim_step(teacher, z, t, abar[(t - 20).clamp(min=0)], text,
                                           empty, w, abar)
        with torch.no_grad():
            eps_c = teacher(z, t, text).sample
            eps_u = teacher(z, t, empty.expand(3, -1, -1)).sample
        for i in range(3):
            guided = eps_c[i:i + 1] + w[i] * (eps_c[i:i + 1] - eps_u[i:i + 1])
            ref = sched.step(guided, t_int, z[i:i + 1], eta=0.0).prev_sample
            # Two float32 evaluation orders of the same step; |z| ~ 1 and x0 ~ 15 |eps| at
            # t = 999, so 1e-4 is a few float32 ulps of the intermediate values.
            assert torch.allclose(got[i:i + 1], ref, atol=1e-4, rtol=0), (t_int, i)


def test_student_starts_as_the_teacher() -> None:
    teacher = tiny_unet(seed=2)
    student = distill_t2i.make_student(teacher, 32).eval()
    g = torch.Generator().manual_seed(0)
    z, text = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 16, generator=g)
    t = torch.tensor([999, 19])
    cond = distill_t2i.guidance_embedding(torch.tensor([3.0, 14.0]), 32)
    with torch.no_grad():
        assert torch.equal(student(z, t, text, timestep_cond=cond).sample, teacher(z, t, text).sample)


def tiny_teacher(root: Path) -> tuple[Path, tuple]:
    """A text-to-image teacher of MNIST's structure trained for a few steps on random digits."""
    rng = np.random.default_rng(0)
    data = rng.uniform(-1, 1, (40, 1, 28, 28)).astype(np.float32), np.arange(40) % 10
    cfg = train_t2i.T2IConfig(vae_steps=2, vae_batch=4, unet_steps=2, unet_batch=4, warmup=1)
    folder = train_t2i.train(root / "teacher", cfg, 100, None, 1, data=data)
    assert folder is not None
    return folder, data


def checkpoint_weights(out: Path) -> dict:
    ck = torch.load(out / "checkpoint.pt", weights_only=False)
    return {k: ck[k] for k in ("student", "target", "ema")}


def test_stopped_runs_equal_the_straight_run_and_export(tmp_path: Path, edgediff_bin: Path) -> None:
    teacher, data = tiny_teacher(tmp_path)

    def cfg() -> distill_t2i.T2IDistillConfig:
        return distill_t2i.T2IDistillConfig(steps=3, batch_size=4, warmup=1)

    distill_t2i.distill(tmp_path / "a", teacher, cfg(), 100, None, 1, data=data)
    # A budget of 0 minutes stops after every step, with a checkpoint; reruns finish it.
    runs = 0
    while not (tmp_path / "b" / "pipeline").exists():
        distill_t2i.distill(tmp_path / "b", teacher, cfg(), 100, 0.0, 1, data=data)
        runs += 1
        assert runs < 10
    assert runs == 3
    a, b = checkpoint_weights(tmp_path / "a"), checkpoint_weights(tmp_path / "b")
    assert all(torch.equal(a[k][n], b[k][n]) for k in a for n in a[k])
    rows = (tmp_path / "b" / "loss.csv").read_text().splitlines()
    assert len(rows) == 1 + 3  # header and steps 0..2, none twice

    with pytest.raises(SystemExit, match="other settings"):
        distill_t2i.distill(tmp_path / "b", teacher, distill_t2i.T2IDistillConfig(
            steps=3, batch_size=4, warmup=1, w_max=9.0), 100, None, 1, data=data)

    student = tmp_path / "a" / "pipeline"
    index = json.loads((student / "model_index.json").read_text())
    assert index["_class_name"] == "LatentConsistencyModelPipeline"
    sc = json.loads((student / "scheduler" / "scheduler_config.json").read_text())
    assert sc["_class_name"] == "LCMScheduler" and sc["original_inference_steps"] == 50
    assert json.loads((student / "unet" / "config.json").read_text())["time_cond_proj_dim"] == 256
    onnx_dir = export(student, tmp_path / "student-onnx")
    meta = json.loads((onnx_dir / "edgediff.json").read_text())
    assert meta["sampling"] == {"sampler": "lcm", "steps": 4}
    record = meta["distillation"]
    assert record["method"] == "latent-consistency-distillation"
    assert record["training"]["steps_done"] == 3
    assert record["teacher"]["sha256"] == distill_t2i.teacher_sha256(teacher)
    assert record["time_grid"][:3] == [0, 19, 39] and record["time_grid"][-1] == 999

    def sample(name: str, *flags: str) -> np.ndarray:
        out = tmp_path / name
        done = subprocess.run([str(edgediff_bin), "sample", "--model", str(onnx_dir), "--prompt",
                               "the number 3", "--steps", "2", "-n", "2", "--out", str(out),
                               *flags], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        return np.load(out)

    x = sample("default.npy")
    assert x.shape == (2, 1, 32, 32) and np.isfinite(x).all()
    # No sampler named: the manifest's lcm at the pipeline's guidance (LCM's 8.5).
    assert np.array_equal(x, sample("lcm.npy", "--sampler", "lcm", "--guidance", "8.5"))
    assert not np.array_equal(x, sample("ddim.npy", "--sampler", "ddim"))

    # --snapshot writes the same pipeline from the checkpoint.
    snap = tmp_path / "snap"
    distill_t2i.main(["--out-dir", str(tmp_path / "a"), "--snapshot", str(snap)])
    assert states(snap)["unet"].keys() == states(student)["unet"].keys()
    assert all(torch.equal(states(snap)["unet"][k], v) for k, v in states(student)["unet"].items())


def test_bad_teachers_exit_with_their_codes(tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit) as e:
        distill_t2i.main(["--pipeline", str(tmp_path), "--out-dir", str(tmp_path / "o")])
    assert e.value.code == 4 and "has no model_index.json" in capsys.readouterr().err
    lcm = sd_tiny.build(tmp_path / "lcm", time_cond_proj_dim=8)
    with pytest.raises(SystemExit) as e:
        distill_t2i.main(["--pipeline", str(lcm), "--out-dir", str(tmp_path / "o")])
    assert e.value.code == 2 and "LatentConsistencyModelPipeline" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        distill_t2i.main(["--pipeline", str(lcm), "--out-dir", str(tmp_path / "o"), "--w-min", "5",
                          "--w-max", "2"])
    assert e.value.code == 2 and "--w-min 5.0 and --w-max 2.0" in capsys.readouterr().err


def test_the_shipped_student_obeys_prompts_in_one_and_four_steps(edgediff_bin: Path, tmp_path: Path) -> None:
    # models/mnist-t2i-lcm's card (tools/check-text-model, 2,000 samples over 20 prompts, no
    # flag but --steps): 99.2% of the 1-step and 99.9% of the 4-step samples are the asked
    # digit. Here 10 per digit for "the number K" with --steps alone (measured: 99 of 100 at
    # 1 step and at 4). The bound fails a student whose default sampler were lost (1 DDIM
    # step of the same student: 10 of 100).
    from edgediff_export.judge import judge
    from edgediff_export.train_t2i import WORDS

    model = ROOT / "models" / "mnist-t2i-lcm"
    meta = json.loads((model / "edgediff.json").read_text())
    assert meta["sampling"] == {"sampler": "lcm", "steps": 4}
    assert meta["distillation"]["method"] == "latent-consistency-distillation"
    for steps in ("1", "4"):
        hits = 0
        for d in range(len(WORDS)):
            out = tmp_path / f"{steps}-{d}.npy"
            done = subprocess.run([str(edgediff_bin), "sample", "--model", str(model), "--prompt",
                                   f"the number {d}", "--steps", steps, "-n", "10", "--seed", "0",
                                   "-q", "--out", str(out)], capture_output=True, text=True)
            assert done.returncode == 0, done.stderr
            r = judge(np.clip(np.load(out), -1, 1), ROOT / "models" / "mnist-classifier.onnx",
                      crop=True)
            hits += int(np.sum(np.array(r["labels"]) == d))
        assert hits >= 90, (steps, hits)
