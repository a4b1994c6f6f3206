"""The C library: header in sync with the exports, the example built against the static and
the shared library and compared byte for byte with the CLI, the interface checks of
tests/c/capi_check.c (errors, cancellation, buffers, two threads on one handle), the typed
parameter structs of tests/c/params_check.c against the CLI (prompts, img2img and the rest on
pipelines in tests/c/text_check.c, image sizes in tests/c/size_check.c), pkg-config, and the programs
under valgrind: no invalid reads or writes and nothing definitely, indirectly
or possibly lost once the handles are freed (ONNX Runtime's own self-overlapping memcpy is
and ld.so's over-reading strncmp are suppressed by tests/c/valgrind-ort.supp; what stays
reachable is the process-wide runtime).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess

import numpy as np
import pytest

from conftest import ROOT, run_cli

HEADER = ROOT / "runtime" / "include" / "edgediff.h"
LIB = ROOT / "target" / "debug"


@pytest.fixture(scope="module")
def env(edgediff_bin):  # edgediff_bin builds the libraries too
    e = dict(os.environ)
    e.setdefault("ORT_DYLIB_PATH", str(ROOT / ".ort" / "libonnxruntime.so.1.32.0"))
    return e


def build(src, out, shared: bool) -> None:
    libs = ([f"-L{LIB}", f"-Wl,-rpath,{LIB}", "-ledgediff"] if shared
            else [str(LIB / "libedgediff.a"), "-ldl", "-lpthread", "-lm"])
    subprocess.run(["gcc", "-Wall", "-Wextra", "-Werror", str(src), f"-I{HEADER.parent}", *libs,
                    "-lpthread", "-o", str(out)], check=True)


def test_header_declares_exactly_the_exported_functions(edgediff_bin):
    text = HEADER.read_text()
    # The *_init functions are static inline in the header (they pass the caller's sizeof to
    # the exported *_init_sized), so they are declared but not exported.
    inline = set(re.findall(r"static inline int (edgediff_\w+)\s*\(", text))
    assert inline == {f"edgediff_{k}_params_init" for k in ("model", "sample", "likelihood", "calibrate")}
    declared = set(re.findall(r"\b(edgediff_\w+)\s*\(", text)) - inline
    assert {f"{name}_sized" for name in inline} <= declared
    rust = set(re.findall(r'extern "C" fn (edgediff_\w+)', (ROOT / "runtime" / "src" / "capi.rs").read_text()))
    assert declared == rust
    nm = subprocess.run(["nm", "-D", "--defined-only", str(LIB / "libedgediff.so")], capture_output=True,
                        text=True, check=True).stdout
    exported = set(re.findall(r" T (edgediff_\w+)$", nm, re.M))
    assert declared <= exported, declared - exported


def _fields(body: str, c: bool) -> list[tuple[str, int]]:
    """(name, size in bytes on 64-bit targets) of each field of a struct body."""
    body = re.sub(r"/\*.*?\*/", "", body, flags=re.S) if c else re.sub(r"//.*", "", body)
    fields = []
    for decl in filter(None, (d.strip() for d in body.split(";" if c else ","))):
        name, ty = (re.findall(r"\w+", decl)[-1], decl) if c else decl.removeprefix("pub ").split(":", 1)
        four = re.fullmatch(r"\s*int\s+\w+", ty) if c else ty.strip() in ("c_int", "i32")
        fields.append((name.strip(), 4 if four else 8))
    return fields


def test_header_structs_match_the_rust_structs():
    """Field for field, in order and size: the library copies callers' bytes into these."""
    header = HEADER.read_text()
    rust = (ROOT / "runtime" / "src" / "capi.rs").read_text()
    pairs = 0
    for c_name, body in re.findall(r"typedef struct (edgediff_\w+) \{(.*?)\} \1;", header, re.S):
        rust_name = "".join(w.capitalize() for w in c_name.split("_"))
        m = re.search(rf"pub struct {rust_name} \{{(.*?)\n\}}", rust, re.S)
        assert m, rust_name
        assert _fields(body, c=True) == _fields(m.group(1), c=False), c_name
        pairs += 1
    assert pairs == 7


@pytest.mark.parametrize("shared", [False, True])
def test_c_example_matches_the_cli(edgediff_bin, tiny_models, tmp_path, env, shared):
    grid = tmp_path / "grid"
    build(ROOT / "examples" / "c" / "grid.c", grid, shared)
    model = str(tiny_models["linear"])
    subprocess.run([str(grid), str(tmp_path / "c.png"), model, "16", "10", "3", "dpm++2m"], check=True, env=env)
    run_cli(edgediff_bin, "sample", "--model", model, "-n", "16", "--steps", "10", "--seed", "3",
            "--sampler", "dpm++2m", "-q", "--out", str(tmp_path / "cli.png"))
    assert (tmp_path / "c.png").read_bytes() == (tmp_path / "cli.png").read_bytes()
    # The embedded default model, through a NULL path.
    subprocess.run([str(grid), str(tmp_path / "d.npy"), "-", "4", "5", "0"], check=True, env=env)
    run_cli(edgediff_bin, "sample", "-n", "4", "--steps", "5", "-q", "--out", str(tmp_path / "dcli.npy"))
    assert (tmp_path / "d.npy").read_bytes() == (tmp_path / "dcli.npy").read_bytes()


def test_c_interface_checks(tiny_models, tmp_path, env):
    check = tmp_path / "capi_check"
    build(ROOT / "tests" / "c" / "capi_check.c", check, shared=False)
    proc = subprocess.run([str(check), str(tiny_models["linear"])], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "all passed" in proc.stdout


def test_typed_params_match_the_cli(edgediff_bin, tiny_models, tmp_path, env):
    """tests/c/params_check.c through the typed structs; its files and figures against the CLI's
    for the same settings."""
    exe = tmp_path / "params_check"
    build(ROOT / "tests" / "c" / "params_check.c", exe, shared=False)
    out = tmp_path / "c"
    out.mkdir()
    model = str(tiny_models["linear"])
    proc = subprocess.run([str(exe), model, str(out)], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "params_check: all passed" in proc.stdout
    figures = {line.split()[0]: [float(v) for v in line.split()[1:]] for line in proc.stdout.splitlines()
               if line.split()[0] in ("likelihood", "calibrate", "invert")}

    def cli(*args):
        return run_cli(edgediff_bin, *args, "--model", model, "-q", env=env).stdout

    cli("sample", "--sampler", "dpm++2m", "--steps", "6", "-n", "3", "--seed", "5", "--batch-size", "2",
        "--out", str(tmp_path / "sample.npy"))
    assert (out / "sample.npy").read_bytes() == (tmp_path / "sample.npy").read_bytes()
    # C's first_index 2 with n 2 is the CLI's --first-index 2 -n 2, and rows 2..4 of its -n 4.
    cli("sample", "--sampler", "dpm++2m", "--steps", "6", "-n", "2", "--first-index", "2", "--seed", "5",
        "--batch-size", "2", "--out", str(tmp_path / "range.npy"))
    assert (out / "range.npy").read_bytes() == (tmp_path / "range.npy").read_bytes()
    cli("sample", "--sampler", "dpm++2m", "--steps", "6", "-n", "4", "--seed", "5", "--batch-size", "2",
        "--out", str(tmp_path / "four.npy"))
    assert np.load(tmp_path / "four.npy")[2:].tobytes() == np.load(out / "range.npy").tobytes()
    cli("sample", "--steps", "5", "-n", "2", "--seed", "9", "--spacing", "karras", "--rho", "5",
        "--dynamic-threshold", "0.9", "--threshold-max", "2", "--out", str(tmp_path / "karras.npy"))
    assert (out / "karras.npy").read_bytes() == (tmp_path / "karras.npy").read_bytes()
    cli("sample", "--steps", "10", "-n", "3", "--out", str(tmp_path / "images.npy"))
    assert (out / "images.npy").read_bytes() == (tmp_path / "images.npy").read_bytes()
    cli("invert", "--image", str(out / "images.npy"), "--steps", "10", "--out", str(tmp_path / "noise.npy"))
    noise = np.load(tmp_path / "noise.npy")
    assert np.array_equal(np.fromfile(out / "noise.f32", np.float32).reshape(noise.shape), noise)
    lik = json.loads(cli("likelihood", "--data", str(out / "images.npy"), "-n", "2", "--steps", "4", "--json"))
    assert figures["likelihood"] == [lik["log_density_mean"], lik["bits_per_dim_mean"]]
    cal = json.loads(cli("calibrate", "--steps", "3", "--pilot", "8", "--teacher-steps", "8", "--max-evals", "6",
                         "--batch-size", "8", "--json"))
    assert figures["calibrate"] == cal["timesteps"]
    # Inpainting with strength and init_noise: `edgediff inpaint --strength --init-noise`.
    images = np.fromfile(out / "inpaint-images.f32", np.float32).reshape(3, 1, 8, 8)
    np.save(tmp_path / "inpaint-images.npy", images)
    np.save(tmp_path / "inpaint-mask.npy", np.fromfile(out / "inpaint-mask.f32", np.float32).reshape(3, 1, 8, 8))
    np.save(tmp_path / "inpaint-noise.npy", np.fromfile(out / "inpaint-noise.f32", np.float32).reshape(3, 1, 8, 8))
    cli("inpaint", "--image", str(tmp_path / "inpaint-images.npy"), "--mask", str(tmp_path / "inpaint-mask.npy"),
        "--sampler", "dpm++2m", "--steps", "6", "--seed", "5", "--batch-size", "2", "--strength", "0.6",
        "--init-noise", str(tmp_path / "inpaint-noise.npy"), "--out", str(tmp_path / "inpaint.npy"))
    inpainted = np.load(tmp_path / "inpaint.npy")
    assert (out / "inpaint-out.f32").read_bytes() == inpainted.tobytes()
    assert np.abs(inpainted - images).max() > 1e-3  # the masked pixels were filled
    # The fitted sampler's calibration file, saved and sampled from through C, as the CLI does.
    fitted = json.loads(cli("calibrate", "--sampler", "fitted", "--steps", "3", "--pilot", "8", "--teacher-steps", "8",
                            "--max-evals", "6", "--starts", "2", "--batch-size", "8", "--json"))
    saved = json.loads((out / "fitted.json").read_text())
    assert (saved["timesteps"], saved["coefficients"]) == (fitted["timesteps"], fitted["coefficients"])
    cli("sample", "--calibration", str(out / "fitted.json"), "-n", "2", "--out", str(tmp_path / "fitted.npy"))
    assert (out / "fitted.npy").read_bytes() == (tmp_path / "fitted.npy").read_bytes()


def test_prompts_through_c_match_the_cli(edgediff_bin, tmp_path, env):
    """tests/c/text_check.c: prompt, negative prompt and guidance through the typed struct on
    the tiny text-to-image pipeline (tests/sd_tiny.py), byte for byte against the CLI, for
    sampling and for latent inpainting; img2img (init_image, strength 0.6; one image for all
    samples and one each), the final latents (latents_out vs --latents-out), one prompt per
    sample (prompts vs --prompts FILE) and inpainting with strength 0.6 and init_noise, each
    byte for byte against the CLI; the request API, older struct sizes and bad values of every
    field (refused naming it, the buffers untouched) are checked in the program."""
    pytest.importorskip("diffusers")
    import sd_tiny
    pipe = sd_tiny.exported()
    exe = tmp_path / "text_check"
    build(ROOT / "tests" / "c" / "text_check.c", exe, shared=False)
    proc = subprocess.run([str(exe), str(pipe), str(tmp_path)], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "text_check: all passed" in proc.stdout
    assert "prompt on MNIST: invalid argument: prompt" in proc.stdout
    run_cli(edgediff_bin, "sample", "--model", str(pipe), "--prompt", "a lighthouse at dusk", "--negative-prompt",
            "blurry low quality", "--guidance", "7.5", "--sampler", "dpm++2m", "--steps", "4", "-n", "2",
            "--seed", "3", "-q", "--out", str(tmp_path / "cli.npy"), env=env)
    cli = np.load(tmp_path / "cli.npy")
    assert cli.shape == (2, 3, 16, 16) and cli.dtype == np.float32
    assert (tmp_path / "text.f32").read_bytes() == cli.tobytes()
    image = np.fromfile(tmp_path / "inpaint-image.f32", np.float32).reshape(1, 3, 16, 16)
    mask = np.fromfile(tmp_path / "inpaint-mask.f32", np.float32).reshape(1, 1, 16, 16)
    np.save(tmp_path / "image.npy", image)
    np.save(tmp_path / "mask.npy", mask)
    run_cli(edgediff_bin, "inpaint", "--model", str(pipe), "--prompt", "a lighthouse at dusk",
            "--negative-prompt", "blurry low quality", "--guidance", "7.5", "--sampler", "dpm++2m",
            "--steps", "4", "--seed", "3", "--image", str(tmp_path / "image.npy"), "--mask",
            str(tmp_path / "mask.npy"), "-q", "--out", str(tmp_path / "inpaint.npy"), env=env)
    assert (tmp_path / "inpaint-out.f32").read_bytes() == np.load(tmp_path / "inpaint.npy").tobytes()
    assert "latents_out on MNIST: invalid argument: latents_out applies to text-to-image pipelines" in proc.stdout

    def raw(name, *shape):
        return np.fromfile(tmp_path / f"{name}.f32", np.float32).reshape(shape)

    common = ["--model", str(pipe), "--negative-prompt", "blurry low quality", "--guidance", "7.5",
              "--sampler", "dpm++2m", "--seed", "3", "-q"]
    # img2img at strength 0.6 with the latents: one image for both samples, then one each.
    images = raw("img2img-images", 2, 3, 16, 16)
    np.save(tmp_path / "one.npy", images[:1])
    np.save(tmp_path / "each.npy", images)
    for name, image in (("one", "one.npy"), ("each", "each.npy")):
        run_cli(edgediff_bin, "sample", *common, "--prompt", "a lighthouse at dusk", "--steps", "5", "-n", "2",
                "--image", str(tmp_path / image), "--strength", "0.6", "--latents-out", str(tmp_path / f"{name}-z.npy"),
                "--out", str(tmp_path / f"{name}-cli.npy"), env=env)
        assert raw(f"img2img-{name}", 2, 3, 16, 16).tobytes() == np.load(tmp_path / f"{name}-cli.npy").tobytes(), name
    z = np.load(tmp_path / "one-z.npy")
    assert z.shape == (2, 4, 8, 8)
    assert raw("img2img-one-latents", 2, 4, 8, 8).tobytes() == z.tobytes()
    assert np.load(tmp_path / "img2img-file.npy").tobytes() == np.load(tmp_path / "one-cli.npy").tobytes()
    # The two runs differ (the second image is another), and img2img is not plain sampling.
    assert np.abs(np.load(tmp_path / "one-cli.npy")[1] - np.load(tmp_path / "each-cli.npy")[1]).max() > 1e-3
    assert np.abs(np.load(tmp_path / "one-cli.npy") - cli).max() > 1e-3
    # One prompt per sample: the CLI's -n is the file's three lines.
    (tmp_path / "p.txt").write_text("a lighthouse at dusk\na red dog\nthe sea\n", encoding="utf-8")
    run_cli(edgediff_bin, "sample", *common, "--prompts", str(tmp_path / "p.txt"), "--steps", "4", "--batch-size", "2",
            "--out", str(tmp_path / "prompts.npy"), env=env)
    assert raw("prompts", 3, 3, 16, 16).tobytes() == np.load(tmp_path / "prompts.npy").tobytes()
    # Inpainting at strength 0.6 from the given latent noise.
    np.save(tmp_path / "noise.npy", raw("inpaint-s-noise", 1, 4, 8, 8))
    run_cli(edgediff_bin, "inpaint", *common, "--prompt", "a lighthouse at dusk", "--steps", "4",
            "--image", str(tmp_path / "image.npy"), "--mask", str(tmp_path / "mask.npy"), "--strength", "0.6",
            "--init-noise", str(tmp_path / "noise.npy"), "--out", str(tmp_path / "inpaint-s.npy"), env=env)
    inpainted = np.load(tmp_path / "inpaint-s.npy")
    assert raw("inpaint-s-out", 1, 3, 16, 16).tobytes() == inpainted.tobytes()
    assert np.abs(inpainted - np.load(tmp_path / "inpaint.npy")).max() > 1e-3  # strength and noise were read


def test_image_sizes_through_c_match_the_cli(edgediff_bin, tmp_path, env):
    """tests/c/size_check.c: height/width 16x32 on the tiny pipeline (8x16 latents; its own
    size is 16x16) byte for byte against `edgediff sample --height 16 --width 32` from the same
    latent noise (and --latents-out), img2img of a 16x32 image and inpainting one; the shapes
    function, the request keys, older struct sizes, one side alone and bad sizes (not a
    multiple, models/mnist-t2i's fixed-size graphs, a pixel model, inversion) in the program."""
    pytest.importorskip("diffusers")
    import sd_tiny
    pipe = sd_tiny.exported()
    exe = tmp_path / "size_check"
    build(ROOT / "tests" / "c" / "size_check.c", exe, shared=False)
    proc = subprocess.run([str(exe), str(pipe), str(ROOT / "models" / "mnist-t2i"), str(tmp_path)],
                          capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "size_check: all passed" in proc.stdout
    print(proc.stdout)

    def raw(name, *shape):
        return np.fromfile(tmp_path / f"{name}.f32", np.float32).reshape(shape)

    def cli(*args):
        run_cli(edgediff_bin, *args, "--model", str(pipe), "--prompt", "a lighthouse at dusk", "--negative-prompt",
                "blurry low quality", "--guidance", "7.5", "--sampler", "ddim", "--steps", "4", "--seed", "3", "-q",
                env=env)
        return np.load(tmp_path / "cli.npy")

    np.save(tmp_path / "noise.npy", raw("size-noise", 2, 4, 8, 16))
    sampled = cli("sample", "--height", "16", "--width", "32", "--init-noise", str(tmp_path / "noise.npy"),
                  "--latents-out", str(tmp_path / "z.npy"), "--out", str(tmp_path / "cli.npy"))
    assert sampled.shape == (2, 3, 16, 32)
    assert raw("size", 2, 3, 16, 32).tobytes() == sampled.tobytes()
    assert raw("size-latents", 2, 4, 8, 16).tobytes() == np.load(tmp_path / "z.npy").tobytes()
    # img2img and inpainting take their files' size: no --height/--width.
    image = raw("size-image", 1, 3, 16, 32)
    np.save(tmp_path / "image.npy", image)
    np.save(tmp_path / "mask.npy", raw("size-mask", 1, 1, 16, 32))
    img2img = cli("sample", "-n", "2", "--image", str(tmp_path / "image.npy"), "--strength", "0.6",
                  "--out", str(tmp_path / "cli.npy"))
    assert raw("size-img2img", 2, 3, 16, 32).tobytes() == img2img.tobytes()
    assert np.abs(img2img - sampled).max() > 1e-3  # the image was read
    inpainted = cli("inpaint", "--image", str(tmp_path / "image.npy"), "--mask", str(tmp_path / "mask.npy"),
                    "--out", str(tmp_path / "cli.npy"))
    assert raw("size-inpaint", 1, 3, 16, 32).tobytes() == inpainted.tobytes()
    assert np.abs(inpainted - image)[..., 16:].max() > 1e-3  # the masked half was filled


def test_pkg_config_builds_an_application(tmp_path, env):
    subprocess.run([str(ROOT / "tools" / "install-c"), str(tmp_path / "prefix"), "debug"], check=True,
                   capture_output=True)
    e = dict(env, PKG_CONFIG_PATH=str(tmp_path / "prefix" / "lib" / "pkgconfig"))
    flags = subprocess.run(["pkg-config", "--cflags", "--libs", "edgediff"], capture_output=True,
                           text=True, env=e, check=True).stdout.split()
    subprocess.run(["gcc", str(ROOT / "examples" / "c" / "grid.c"), *flags, "-o", str(tmp_path / "app")],
                   check=True)
    out = subprocess.run([str(tmp_path / "app")], capture_output=True, text=True, env=e)
    assert out.returncode == 2 and "usage" in out.stderr


@pytest.mark.skipif(shutil.which("valgrind") is None, reason="valgrind is not installed")
def test_under_valgrind(tiny_models, tmp_path, env):
    for name, src, args in [("grid", ROOT / "examples" / "c" / "grid.c",
                             [str(tmp_path / "g.png"), str(tiny_models["linear"]), "4", "3"]),
                            ("capi_check", ROOT / "tests" / "c" / "capi_check.c", [str(tiny_models["linear"])]),
                            ("params_check", ROOT / "tests" / "c" / "params_check.c",
                             [str(tiny_models["linear"]), str(tmp_path)])]:
        exe = tmp_path / name
        build(src, exe, shared=False)
        proc = subprocess.run(["valgrind", "--leak-check=full", "--errors-for-leak-kinds=definite,indirect,possible",
                               "--error-exitcode=99", f"--suppressions={ROOT / 'tests' / 'c' / 'valgrind-ort.supp'}",
                               str(exe), *args], capture_output=True, text=True, env=env)
        summary = [line.split("== ", 1)[-1] for line in proc.stderr.splitlines()
                   if "ERROR SUMMARY" in line or "lost:" in line]
        print(name, summary)
        assert proc.returncode == 0, proc.stderr[-3000:]
        text = " ".join(summary)
        assert "ERROR SUMMARY: 0 errors" in text
        for kind in ("definitely", "indirectly", "possibly"):
            # valgrind omits the leak lines when nothing at all is left on the heap.
            assert f"{kind} lost: 0 bytes" in text or "lost:" not in text, text
