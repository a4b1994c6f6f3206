"""The C library: header in sync with the exports, the example built against the static and
the shared library and compared byte for byte with the CLI, the interface checks of
tests/c/capi_check.c (errors, cancellation, buffers, two threads on one handle), pkg-config,
and both programs under valgrind: no invalid reads or writes and nothing definitely, indirectly
or possibly lost once the handles are freed (ONNX Runtime's own self-overlapping memcpy is
and ld.so's over-reading strncmp are suppressed by tests/c/valgrind-ort.supp; what stays
reachable is the process-wide runtime).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess

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
    declared = set(re.findall(r"\b(edgediff_\w+)\s*\(", HEADER.read_text()))
    rust = set(re.findall(r'extern "C" fn (edgediff_\w+)', (ROOT / "runtime" / "src" / "capi.rs").read_text()))
    assert declared == rust
    nm = subprocess.run(["nm", "-D", "--defined-only", str(LIB / "libedgediff.so")], capture_output=True,
                        text=True, check=True).stdout
    exported = set(re.findall(r" T (edgediff_\w+)$", nm, re.M))
    assert declared <= exported, declared - exported


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
                            ("capi_check", ROOT / "tests" / "c" / "capi_check.c", [str(tiny_models["linear"])])]:
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
