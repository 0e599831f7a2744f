"""Bounded load on a local `sdfast serve`: latency percentiles, throughput, errors and server memory per concurrency.

    python benchmarks/load_test.py ENGINE_DIR [--concurrency 1,4,16] [--requests 16] [--steps 4] [--max-queue 8]

It starts the server on a free loopback port (it never sends load anywhere else), then, for each concurrency,
sends the same number of A1111 txt2img requests from that many clients at once. A 429 is the server's deliberate
back-pressure: the client waits its Retry-After and tries again (counted apart, not an error). Everything else
that is not a 200 is an error. The server's RSS is read after each level, so growth across levels shows.
Writes benchmarks/results/load_<model>_<W>x<H>.json.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import platform
import signal
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
MAX_RETRIES = 50


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[max(0, -(-int(q * len(ordered)) // 100) - 1)] if ordered else float("nan")


def one_request(url: str, body: dict) -> tuple[float, int, int]:
    """(seconds until a final answer, final status, 429s received on the way)."""
    started, throttled = time.perf_counter(), 0
    with httpx.Client(timeout=600) as client:
        for _ in range(MAX_RETRIES):
            response = client.post(f"{url}/sdapi/v1/txt2img", json=body)
            if response.status_code != 429:
                return time.perf_counter() - started, response.status_code, throttled
            throttled += 1
            time.sleep(min(float(response.headers.get("Retry-After", "1")), 5.0))
    return time.perf_counter() - started, 429, throttled


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("engine_dir", type=Path)
    parser.add_argument("--concurrency", default="1,4,16")
    parser.add_argument("--requests", type=int, default=16, help="requests per concurrency level (default 16)")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--max-queue", type=int, default=8, help="the server's queue bound (default 8: 16 clients meet 429s)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "sdfast", "serve", str(args.engine_dir), "--port", str(port), "--verify", "size",
                               "--max-queue", str(args.max_queue), "--quiet"], stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while True:
            if server.poll() is not None:
                print(f"load_test: the server exited: {server.stderr.read().strip()}", file=sys.stderr)
                return 2
            try:
                ready = httpx.get(f"{url}/ready", timeout=2)
                if ready.status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                print("load_test: the server did not become ready", file=sys.stderr)
                return 2
            time.sleep(0.5)
        info = ready.json()
        width, height = (int(v) for v in info["size"].split("x"))
        body = {"prompt": "a photograph of an astronaut riding a horse", "steps": args.steps, "width": width, "height": height,
                "sampler_name": "Euler a", "cfg_scale": 7.0}
        one_request(url, {**body, "seed": 0})  # warm-up
        baseline_rss = rss_mib(server.pid)
        runs = []
        for level in levels:
            started = time.perf_counter()
            with ThreadPoolExecutor(level) as pool:
                outcomes = list(pool.map(lambda seed: one_request(url, {**body, "seed": seed}), range(args.requests)))
            wall = time.perf_counter() - started
            latencies = [seconds for seconds, status, _ in outcomes if status == 200]
            run = {
                "concurrency": level, "requests": args.requests, "ok": len(latencies),
                "errors": sum(1 for _, status, _ in outcomes if status != 200),
                "throttled_429": sum(throttled for _, _, throttled in outcomes),
                "p50_s": percentile(latencies, 50), "p95_s": percentile(latencies, 95), "p99_s": percentile(latencies, 99),
                "mean_s": statistics.fmean(latencies) if latencies else None, "throughput_rps": len(latencies) / wall,
                "wall_s": wall, "server_rss_mib": rss_mib(server.pid),
            }
            runs.append(run)
            print(f"load_test: concurrency {level:2d}: p50 {run['p50_s']:.2f} s, p95 {run['p95_s']:.2f} s, p99 {run['p99_s']:.2f} s, "
                  f"{run['throughput_rps']:.2f} req/s, {run['errors']} errors, {run['throttled_429']} x 429, "
                  f"server RSS {run['server_rss_mib']:.0f} MiB", file=sys.stderr, flush=True)
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
    record = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": "python benchmarks/load_test.py " + " ".join(sys.argv[1:]),
        "machine": {"platform": platform.platform(), "cpus": len(__import__("os").sched_getaffinity(0))},
        "server": {**info, "max_queue": args.max_queue},
        "workload": {"steps": args.steps, "sampler": "Euler a", "cfg_scale": 7.0, "endpoint": "/sdapi/v1/txt2img"},
        "server_rss_mib_after_warmup": baseline_rss,
        "runs": runs,
    }
    out = args.out or HERE / "results" / f"load_{info['model']}_{width}x{height}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(runs))
    return 0 if all(run["errors"] == 0 for run in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
