"""`edgediff serve`: stdio and HTTP answers are the bytes `edgediff sample` writes for the same
settings, batched requests the bytes each gives alone, and bad requests, cancellation, client
disconnects and panics are answered while the server goes on serving. Small on purpose: the
shipped models at 4 steps, n <= 3, --threads 1.
"""

from __future__ import annotations

import base64
import json
import os
import re
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from conftest import run_cli

STEPS = "4"


def cli_sample(binary: Path, out: Path, *args: str) -> Path:
    run_cli(binary, "sample", "--threads", "1", "-q", "--steps", STEPS, "--out", str(out), *args)
    return out


def stdio(binary: Path, lines: list[dict | str], *flags: str, env: dict | None = None) -> list[dict]:
    text = "\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n"
    proc = subprocess.run([str(binary), "serve", "--stdio", "--threads", "1", *flags], input=text,
                          capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return [json.loads(line) for line in proc.stdout.splitlines()]


def finals(events: list[dict]) -> dict:
    """The result or error event of each request id."""
    return {e["id"]: e for e in events if e["event"] in ("result", "error")}


class Http:
    """A server on a free loopback port, stopped at exit."""

    def __init__(self, binary: Path, *flags: str, env: dict | None = None):
        self.proc = subprocess.Popen([str(binary), "serve", "--listen", "127.0.0.1:0", "--threads", "1", *flags],
                                     stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})})
        line = self.proc.stderr.readline()
        m = re.search(r"http://127\.0\.0\.1:(\d+)", line)
        assert m, line
        self.port = int(m.group(1))
        threading.Thread(target=self.proc.stderr.read, daemon=True).start()  # drain

    def call(self, method: str, path: str, body=None) -> tuple[int, dict | str]:
        data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", data=data, method=method)
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                status, text = r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            status, text = e.code, e.read().decode()
        return status, (text if path == "/metrics" else json.loads(text))

    def metric(self, name: str) -> float:
        text = self.call("GET", "/metrics")[1]
        m = re.search(rf"^edgediff_{re.escape(name)} (\S+)$", text, re.M)
        return float(m.group(1)) if m else 0.0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.proc.kill()
        self.proc.wait()


def test_stdio_answers_are_the_cli_bytes(edgediff_bin, tmp_path):
    npy = cli_sample(edgediff_bin, tmp_path / "cli.npy", "-n", "3", "--seed", "5")
    folder = cli_sample(edgediff_bin, tmp_path / "cli", "-n", "2", "--seed", "5", "--sampler", "dpm++2m")
    events = stdio(edgediff_bin, [
        {"id": "npy", "n": 3, "seed": 5, "steps": 4, "output": str(tmp_path / "s.npy")},
        {"id": "png", "n": 2, "seed": 5, "steps": 4, "sampler": "dpm++2m"},
        {"id": "tail", "n": 1, "seed": 5, "steps": 4, "first_index": 2, "output": str(tmp_path / "t.npy")},
    ])
    got = finals(events)
    assert got["npy"]["files"] == [str(tmp_path / "s.npy")], got["npy"]
    assert (tmp_path / "s.npy").read_bytes() == npy.read_bytes()
    pngs = [base64.b64decode(b) for b in got["png"]["images"]]
    assert pngs == [(folder / f"{i:06d}.png").read_bytes() for i in range(2)]
    # Sample 2 of the seed's stream, alone, is the last row of the 3-sample run.
    import numpy as np
    assert np.array_equal(np.load(tmp_path / "t.npy")[0], np.load(npy)[2])
    progress = [e for e in events if e["event"] == "progress" and e["id"] == "npy"]
    assert progress and progress[-1]["done"] == progress[-1]["total"]


def test_batched_requests_are_the_bytes_of_each_alone(edgediff_bin, tmp_path):
    a = cli_sample(edgediff_bin, tmp_path / "a.npy", "-n", "2", "--seed", "1")
    b = cli_sample(edgediff_bin, tmp_path / "b.npy", "-n", "1", "--seed", "9")
    with Http(edgediff_bin, "--batch-window-ms", "400") as srv:
        answers = {}

        def post(name, body):
            answers[name] = srv.call("POST", "/v1/samples", body)
        threads = [threading.Thread(target=post, args=("a", {"n": 2, "seed": 1, "steps": 4, "output": str(tmp_path / "sa.npy")})),
                   threading.Thread(target=post, args=("b", {"n": 1, "seed": 9, "steps": 4, "output": str(tmp_path / "sb.npy")}))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert answers["a"][0] == answers["b"][0] == 200, answers
        assert answers["a"][1]["batch_requests"] == 2 and answers["a"][1]["batch_samples"] == 3
        # One batch of 4 steps: 4 network calls for both (alone: 8).
        assert srv.metric("model_calls_total") == 4 and srv.metric("batches_total") == 1
        assert srv.call("GET", "/health")[0] == 200
    assert (tmp_path / "sa.npy").read_bytes() == a.read_bytes()
    assert (tmp_path / "sb.npy").read_bytes() == b.read_bytes()


def test_http_native_and_openai_routes(edgediff_bin, tmp_path):
    folder = cli_sample(edgediff_bin, tmp_path / "cli", "-n", "2", "--seed", "3")
    t2i = cli_sample(edgediff_bin, tmp_path / "t2i", "-n", "1", "--prompt", "a 7")
    with Http(edgediff_bin, "--out-dir", str(tmp_path / "urls")) as srv:
        status, body = srv.call("POST", "/v1/samples", {"id": "mine", "n": 2, "seed": 3, "steps": 4})
        assert status == 200 and body["id"] == "mine", body
        assert [base64.b64decode(x) for x in body["images"]] == [(folder / f"{i:06d}.png").read_bytes() for i in range(2)]
        # OpenAI's images API, the prompt on the shipped text model (no model named). Steps are
        # the model's default (100) there, so the CLI reference is made at those.
        status, body = srv.call("POST", "/v1/images/generations", {"prompt": "a 7", "n": 1, "size": "32x32"})
        assert status == 200 and set(body) == {"created", "data"}, body
        ref = run_cli(edgediff_bin, "sample", "--threads", "1", "-q", "-n", "1", "--prompt", "a 7",
                      "--out", str(tmp_path / "t2i100"))
        assert ref.returncode == 0
        assert base64.b64decode(body["data"][0]["b64_json"]) == (tmp_path / "t2i100" / "000000.png").read_bytes()
        status, body = srv.call("POST", "/v1/images/generations", {"prompt": "a 7", "response_format": "url"})
        assert status == 200 and body["data"][0]["url"].startswith("file://"), body
        assert Path(body["data"][0]["url"][7:]).read_bytes() == (tmp_path / "t2i100" / "000000.png").read_bytes()
        # A native prompt request without a model runs on the text model too.
        status, body = srv.call("POST", "/v1/samples", {"prompt": "a 7", "steps": 4})
        assert status == 200 and base64.b64decode(body["images"][0]) == (t2i / "000000.png").read_bytes()
        status, body = srv.call("POST", "/v1/images/generations", {"prompt": "a", "size": "big"})
        assert status == 400 and body["error"]["code"] == "argument" and body["error"]["param"] == "size", body


def test_cancel_and_disconnect(edgediff_bin, tmp_path):
    with Http(edgediff_bin) as srv:
        answer = {}
        t = threading.Thread(target=lambda: answer.update(r=srv.call(
            "POST", "/v1/samples", {"id": "long", "steps": 1000, "output": str(tmp_path / "long.npy")})))
        t.start()
        while srv.metric("requests_running") < 1:
            time.sleep(0.02)
        assert srv.call("DELETE", "/v1/samples/long")[0] == 200
        t.join(timeout=30)
        assert answer["r"][0] == 409 and answer["r"][1]["code"] == "cancelled", answer
        # Once its batch stops (before the next network call) it is no longer known.
        deadline = time.time() + 10
        while srv.call("DELETE", "/v1/samples/long")[0] != 404:
            assert time.time() < deadline
            time.sleep(0.02)
        # A client that disconnects mid-request: its work is cancelled, nothing written.
        body = json.dumps({"id": "gone", "steps": 1000, "output": str(tmp_path / "gone.npy")}).encode()
        s = socket.create_connection(("127.0.0.1", srv.port))
        s.sendall(b"POST /v1/samples HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        while srv.metric("requests_running") < 1:
            time.sleep(0.02)
        s.close()
        deadline = time.time() + 30
        while 'outcome="cancelled"} 2' not in srv.call("GET", "/metrics")[1]:
            assert time.time() < deadline, "the disconnected request was not cancelled"
            time.sleep(0.05)
        assert srv.call("GET", "/health")[1]["status"] == "ok"
    assert not any(tmp_path.glob("*long*")) and not any(tmp_path.glob("*gone*")), list(tmp_path.iterdir())


BAD = [
    # (request body, HTTP status, code, field)
    (b"{not json", 400, "bad_request", None),
    ({"n": 1, "stpes": 4}, 400, "bad_request", "stpes"),
    ({"n": 1, "steps": "ten"}, 400, "bad_request", "steps"),
    ([1, 2], 400, "bad_request", None),
    ({"model": "/no/such/model.onnx"}, 400, "model", None),
    ({"sampler": "magic"}, 400, "argument", "sampler"),
    ({"n": 100000}, 400, "argument", "n"),
    ({"batch_size": 100000}, 400, "argument", "batch_size"),
    ({"steps": 0}, 400, "argument", "steps"),
    ({"class": 3}, 400, "argument", "class"),
    ({"steps": 4, "output": "OUTDIR/"}, 400, "argument", "output"),
]


def test_bad_requests_are_answered_and_the_server_goes_on(edgediff_bin, tmp_path):
    (tmp_path / "adir.npy").mkdir()
    with Http(edgediff_bin, env={"EDGEDIFF_SERVE_TEST_PANIC": "boom"}) as srv:
        for body, status, code, field in BAD:
            if isinstance(body, dict) and body.get("output") == "OUTDIR/":
                body = {**body, "output": str(tmp_path / "adir.npy")}
            got, answer = srv.call("POST", "/v1/samples", body)
            assert (got, answer["code"], answer["field"]) == (status, code, field), (body, answer)
            assert answer["message"], body
            assert srv.call("GET", "/health")[0] == 200
        # A panic inside a request is an internal error; the next request is served.
        got, answer = srv.call("POST", "/v1/samples", {"id": "boom", "steps": 2})
        assert (got, answer["code"]) == (500, "internal"), answer
        assert srv.call("POST", "/v1/samples", {"steps": 2})[0] == 200
        assert srv.call("GET", "/nowhere")[0] == 404
    assert [p.name for p in tmp_path.iterdir()] == ["adir.npy"] and not any((tmp_path / "adir.npy").iterdir())


def test_stdio_end_of_input_finishes_queued_work(edgediff_bin):
    events = stdio(edgediff_bin, ['{"id": "x", "steps": 2}', '{"id": "y", "steps": 2}', '{"cancel": "y"}',
                                  '{"cancel": "nobody"}'], "--batch-window-ms", "300")
    got = finals(events)
    assert got["x"]["event"] == "result" and got["y"]["code"] == "cancelled", got
    cancels = {e["id"]: e["found"] for e in events if e["event"] == "cancel"}
    assert cancels == {"y": True, "nobody": False}
