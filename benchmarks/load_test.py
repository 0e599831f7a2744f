"""Bounded load on a local `sdfast serve`: latency percentiles, throughput, errors and server memory per concurrency.

    python benchmarks/load_test.py ENGINE_DIR [--concurrency 1,4,16] [--requests 16] [--steps 4] [--max-queue 8]
                                   [--ray --replicas 1,2]

It starts the server on a free loopback port (it never sends load anywhere else), then, for each concurrency,
sends the same number of A1111 txt2img requests from that many clients at once. A 429 is the server's deliberate
back-pressure: the client waits its Retry-After and tries again (counted apart, not an error). Everything else
that is not a 200 is an error. The server's RSS (its whole process tree: on Ray, the cluster it started and the
replicas) is read after each level, so growth across levels shows. With --ray, each replica count is a server of its
own (`sdfast serve --ray --replicas N`, the CPUs split evenly: one intra-op thread per replica on 2 cores).
Writes benchmarks/results/load_<model>_<W>x<H>[_ray].json.
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
import tempfile
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
    """The resident memory of ``pid`` and every process below it."""
    children: dict[int, list[int]] = {}
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            fields = dict(line.split(":", 1) for line in status.read_text().splitlines() if ":" in line)
        except OSError:
            continue
        children.setdefault(int(fields["PPid"]), []).append(int(fields["Pid"]))
    total, todo = 0, [pid]
    while todo:
        current = todo.pop()
        todo.extend(children.get(current, []))
        try:
            total += next(int(line.split()[1]) for line in Path(f"/proc/{current}/status").read_text().splitlines() if line.startswith("VmRSS:"))
        except (OSError, StopIteration):
            pass
    return total / 1024


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
    parser.add_argument("--ray", action="store_true", help="serve on Ray Serve (sdfast serve --ray)")
    parser.add_argument("--replicas", default="1", help="with --ray: replica counts to measure, one server each (e.g. 1,2)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    cpus = len(__import__("os").sched_getaffinity(0))
    servers = []
    for replicas in [int(n) for n in args.replicas.split(",")] if args.ray else [None]:
        extra = ["--ray", "--replicas", str(replicas), "--cpus-per-replica", f"{cpus / replicas:g}"] if replicas else []
        outcome = load_one_server(args, levels, extra)
        if outcome is None:
            return 2
        servers.append({"replicas": replicas, **outcome})
    info = servers[0]["info"]
    width, height = (int(v) for v in info["size"].split("x"))
    record = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": "python benchmarks/load_test.py " + " ".join(sys.argv[1:]),
        "machine": {"platform": platform.platform(), "cpus": cpus},
        "server": {**info, "max_queue": args.max_queue},
        "workload": {"steps": args.steps, "sampler": "Euler a", "cfg_scale": 7.0, "endpoint": "/sdapi/v1/txt2img"},
        **({"ray": [{"replicas": s["replicas"], "server_rss_mib_after_warmup": s["baseline_rss"], "runs": s["runs"]} for s in servers]}
           if args.ray else {"server_rss_mib_after_warmup": servers[0]["baseline_rss"], "runs": servers[0]["runs"]}),
    }
    out = args.out or HERE / "results" / f"load_{info['model']}_{width}x{height}{'_ray' if args.ray else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    runs = [run for s in servers for run in s["runs"]]
    print(json.dumps(runs))
    return 0 if all(run["errors"] == 0 for run in runs) else 1


def load_one_server(args, levels: list[int], extra: list[str]) -> dict | None:
    """Start a server (``extra``: its --ray arguments), run every level, stop it: its info, warm RSS and runs."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tempfile.TemporaryFile("w+")  # a file, not a pipe: a chatty server (Ray's logs) never blocks on a full pipe
    server = subprocess.Popen([sys.executable, "-m", "sdfast", "serve", str(args.engine_dir), "--port", str(port), "--verify", "size",
                               "--max-queue", str(args.max_queue), "--quiet", *extra], stderr=log, text=True)
    label = f"{extra[2]} replica(s) on Ray" if extra else "one server"
    try:
        deadline = time.monotonic() + 300
        while True:
            if server.poll() is not None:
                log.seek(0)
                print(f"load_test: the server exited: {log.read().strip()[-2000:]}", file=sys.stderr)
                return None
            try:
                ready = httpx.get(f"{url}/ready", timeout=2)
                if ready.status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                print("load_test: the server did not become ready", file=sys.stderr)
                return None
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
            print(f"load_test: {label}, concurrency {level:2d}: p50 {run['p50_s']:.2f} s, p95 {run['p95_s']:.2f} s, p99 {run['p99_s']:.2f} s, "
                  f"{run['throughput_rps']:.2f} req/s, {run['errors']} errors, {run['throttled_429']} x 429, "
                  f"server RSS {run['server_rss_mib']:.0f} MiB", file=sys.stderr, flush=True)
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()
    return {"info": info, "baseline_rss": baseline_rss, "runs": runs}


if __name__ == "__main__":
    sys.exit(main())
