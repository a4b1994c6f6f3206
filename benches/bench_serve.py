"""Load and faults of `edgediff serve` (issue 15 part 4), loopback only, bounded in count and
time. Prints:

1. throughput of one `edgediff sample` process per request (the same client concurrency) and of
   the server under C concurrent clients x R requests (default model, --steps, n 1), side by side;
2. that every server response arrived and was 200, and that sampled results are the CLI's bytes
   for the same request (the CLI baseline's seeds are some of the server's);
3. the server's RSS at start, mid-run, end and its peak (sampled every 0.2 s);
4. the server SIGKILLed mid-load and restarted on the same port: which requests were lost (only
   those in flight, each client told by a connection error) and that the rest were answered.

    .venv/bin/python benches/bench_serve.py                      # 8 x 100, 10 steps
    .venv/bin/python benches/bench_serve.py --clients 2 --requests 5 --cli-requests 4   # quick
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(binary: Path, port: int, threads: int) -> subprocess.Popen:
    proc = subprocess.Popen([str(binary), "serve", "--listen", f"127.0.0.1:{port}", "--threads", str(threads)],
                            stderr=subprocess.PIPE, text=True)
    line = proc.stderr.readline()
    if "listening" not in line:
        raise SystemExit(f"the server did not start: {line}{proc.stderr.read()}")
    threading.Thread(target=proc.stderr.read, daemon=True).start()
    return proc


def post(port: int, body: dict, timeout: float = 120) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", "/v1/samples", json.dumps(body), {"Content-Type": "application/json"})
        r = conn.getresponse()
        return r.status, json.loads(r.read())
    finally:
        conn.close()


def rss_mib(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def request_body(client: int, k: int, steps: int) -> dict:
    return {"id": f"c{client}-{k}", "n": 1, "steps": steps, "seed": client * 100_000 + k}


def cli_baseline(binary: Path, tmp: Path, clients: int, per_client: int, steps: int, threads: int) -> tuple[float, dict]:
    """`clients` concurrent loops, each running one `edgediff sample` per request; returns the
    requests per second and the PNG bytes by seed."""
    pngs: dict[int, bytes] = {}

    def loop(c: int) -> None:
        for k in range(per_client):
            seed = request_body(c, k, steps)["seed"]
            out = tmp / f"cli-{seed}"
            subprocess.run([str(binary), "sample", "-n", "1", "--steps", str(steps), "--seed", str(seed),
                            "--threads", str(threads), "-q", "--out", str(out)], check=True)
            pngs[seed] = (out / "000000.png").read_bytes()
    start = time.perf_counter()
    ts = [threading.Thread(target=loop, args=(c,)) for c in range(clients)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return clients * per_client / (time.perf_counter() - start), pngs


def load(port: int, pid: int, clients: int, per_client: int, steps: int, deadline: float) -> dict:
    results: dict[str, tuple[int, dict]] = {}
    rss: list[tuple[float, float]] = []
    done = threading.Event()

    def sample_rss() -> None:
        while not done.is_set():
            rss.append((time.perf_counter(), rss_mib(pid)))
            time.sleep(0.2)

    def client(c: int) -> None:
        for k in range(per_client):
            if time.perf_counter() > deadline:
                return
            body = request_body(c, k, steps)
            results[body["id"]] = post(port, body)
    sampler = threading.Thread(target=sample_rss)
    sampler.start()
    start = time.perf_counter()
    ts = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    secs = time.perf_counter() - start
    done.set()
    sampler.join()
    return {"results": results, "seconds": secs, "rss": rss}


def kill_and_restart(binary: Path, port: int, clients: int, per_client: int, steps: int, threads: int,
                     kill_after: float) -> None:
    """Clients send requests one after another; the server is SIGKILLed after `kill_after`
    seconds and restarted on the same port. A request that was sent and then lost its
    connection is reported lost (the client is told by the connection error); one refused while
    the server was down was never sent, and is sent again."""
    server = {"proc": start_server(binary, port, threads)}
    lost, ok, refused = [], [], 0
    lock = threading.Lock()
    killed_at = {}

    def client(c: int) -> None:
        nonlocal refused
        k = 0
        while k < per_client:
            body = request_body(c, k, steps)
            t0 = time.perf_counter()
            try:
                status, _ = post(port, body)
                with lock:
                    ok.append((body["id"], status))
                k += 1
            except ConnectionRefusedError:
                with lock:
                    refused += 1
                time.sleep(0.1)
            except (ConnectionResetError, http.client.RemoteDisconnected, BrokenPipeError) as e:
                with lock:
                    lost.append((body["id"], t0, time.perf_counter(), type(e).__name__))
                k += 1
    ts = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in ts:
        t.start()
    time.sleep(kill_after)
    killed_at["t"] = time.perf_counter()
    server["proc"].kill()
    server["proc"].wait()
    killed_at["dead"] = time.perf_counter()
    time.sleep(0.5)
    server["proc"] = start_server(binary, port, threads)
    for t in ts:
        t.join()
    server["proc"].kill()
    server["proc"].wait()
    # In flight: sent before the process was gone (the kernel still takes connections in the
    # milliseconds between the signal and the exit) and cut after the signal.
    kt, dead = killed_at["t"], killed_at["dead"]
    in_flight = all(t0 <= dead and t1 >= kt for _, t0, t1, _ in lost)
    print(f"kill/restart: {clients} clients x {per_client} requests; killed at {kill_after:.1f}s, restarted 0.5s later")
    print(f"  answered after all: {len(ok)} ({sum(s == 200 for _, s in ok)} ok), lost: {len(lost)} "
          f"(each sent before the server was gone and cut by the kill: {in_flight}; errors: {sorted({e for *_, e in lost})}), "
          f"refused while down and sent again: {refused}")
    late = [(n, t0 - kt) for n, t0, _, _ in lost if t0 > kt]
    print(f"  the kill took {1e3 * (dead - kt):.0f} ms; lost requests sent in that time: {late}")
    print(f"  every request accounted for: {len(ok) + len(lost) == clients * per_client}; "
          f"clients that lost any: {len({n.split('-')[0] for n, *_ in lost})} of {clients}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", type=Path, default=ROOT / "target" / "release" / "edgediff")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=100, help="per client")
    ap.add_argument("--cli-requests", type=int, default=3, help="CLI processes per client for the baseline")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1, help="ONNX Runtime threads, server and CLI alike")
    ap.add_argument("--time-limit", type=float, default=420, help="seconds for the server load")
    ap.add_argument("--kill-requests", type=int, default=20, help="per client, for the kill/restart run")
    ap.add_argument("--kill-only", action="store_true", help="only the kill/restart run")
    args = ap.parse_args()
    if args.kill_only:
        kill_and_restart(args.bin, free_port(), args.clients, args.kill_requests, args.steps, args.threads, 3.0)
        return
    if not args.bin.exists():
        raise SystemExit(f"{args.bin} missing: cargo build --release")
    print(f"edgediff serve bench: {args.clients} clients, default model, {args.steps} steps, n 1, "
          f"--threads {args.threads}, binary {args.bin}")
    with tempfile.TemporaryDirectory() as tmp:
        cli_rps, pngs = cli_baseline(args.bin, Path(tmp), args.clients, args.cli_requests, args.steps, args.threads)
    port = free_port()
    proc = start_server(args.bin, port, args.threads)
    try:
        r = load(port, proc.pid, args.clients, args.requests, args.steps, time.perf_counter() + args.time_limit)
        metrics = http.client.HTTPConnection("127.0.0.1", port)
        metrics.request("GET", "/metrics")
        text = metrics.getresponse().read().decode()
    finally:
        proc.kill()
        proc.wait()
    results = r["results"]
    asked = args.clients * args.requests
    good = sum(s == 200 and len(b.get("images", [])) == 1 for s, b in results.values())
    serve_rps = len(results) / r["seconds"]
    print(f"CLI, one process per request: {args.clients * args.cli_requests} requests, {cli_rps:.2f} requests/s")
    print(f"server: {len(results)} of {asked} requests sent in {r['seconds']:.1f}s, {good} answered 200 with an image; "
          f"{serve_rps:.2f} requests/s = {serve_rps / cli_rps:.1f}x the CLI")
    same = [base64.b64decode(results[request_body(c, k, args.steps)["id"]][1]["images"][0]) == pngs[request_body(c, k, args.steps)["seed"]]
            for c in range(args.clients) for k in range(args.cli_requests)
            if request_body(c, k, args.steps)["id"] in results]
    print(f"results equal to the CLI's bytes for the same request: {sum(same)} of {len(same)} compared")
    batch = [line for line in text.splitlines() if line.startswith(("edgediff_batches_total", "edgediff_model_calls_total"))]
    print(f"server metrics: {', '.join(batch)}")
    rss = [m for _, m in r["rss"]]
    if rss:
        print(f"server RSS MiB: start {rss[0]:.1f}, mid {rss[len(rss) // 2]:.1f}, end {rss[-1]:.1f}, peak {max(rss):.1f}")
    kill_and_restart(args.bin, free_port(), args.clients, args.kill_requests, args.steps, args.threads,
                     kill_after=max(0.5, 0.4 * args.kill_requests * args.clients / max(serve_rps, 1e-9)))
    if good != len(results) or not all(same):
        sys.exit(1)


if __name__ == "__main__":
    main()
