"""Load test of the web app: N concurrent clients against gunicorn on loopback.

Starts `histoseek-web serve` on 127.0.0.1 over the demo archive (built first with
`python -m webapp.demo --no-serve` when missing), creates a bench user and API token with
the `histoseek-web users` CLI, then runs two phases with the same request mix:

  baseline: 1 client (latency without contention)
  load:     --clients clients for --duration seconds

Each client is a thread with its own keep-alive connection, looping over a weighted mix of
what a viewer session does (deep-zoom tiles, matched-region thumbnails, the slide list) and
region searches. Loops are bounded by time and by --max-requests per client. Prints JSON:
per-endpoint count, p50/p95/p99/max latency in ms, error count, requests/s.

    python bench/webapp_load.py --clients 50 --duration 30
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
BENCH_USER, BENCH_PASSWORD = "bench", "bench-load-password"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli(*args: str, stdin: str | None = None, env=None) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "webapp.cli", *args], input=stdin, capture_output=True, text=True, env=env, cwd=REPO
    )
    if done.returncode != 0:
        raise SystemExit(f"histoseek-web {' '.join(args[:2])} failed: {done.stderr.strip()}")
    return done.stdout.strip()


def ensure_demo(demo_dir: Path, encoder: str) -> None:
    if (demo_dir / "catalog.sqlite").exists():
        return
    # Its messages go to stderr: stdout carries only this script's JSON.
    subprocess.run(
        [
            sys.executable,
            "-m",
            "webapp.demo",
            "--no-serve",
            "--dir",
            str(demo_dir),
            "--encoder",
            encoder,
            "--device",
            "cpu",
        ],
        check=True,
        cwd=REPO,
        stdout=sys.stderr,
    )


def start_server(
    settings_args: list[str], port: int, workers: int, threads: int, env, log_path: Path
) -> subprocess.Popen:
    log = open(log_path, "w")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "webapp.cli",
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            str(workers),
            "--threads",
            str(threads),
            *settings_args,
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=REPO,
        start_new_session=True,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit("server exited:\n" + log_path.read_text()[-2000:])
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/login")
            conn.getresponse().read()
            return proc
        except OSError:
            time.sleep(0.3)
    os.killpg(proc.pid, signal.SIGKILL)
    raise SystemExit("server did not start in 120 s")


def multipart(data: bytes, fields: dict) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode() for k, v in fields.items()
    ]
    parts.append(
        f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="q.jpg"\r\nContent-Type: image/jpeg\r\n\r\n'.encode()
        + data
        + f"\r\n--{boundary}--\r\n".encode()
    )
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


class Workload:
    """The request mix, made from the archive as the server reports it."""

    def __init__(self, port: int, token: str, search_share: float):
        self.port, self.headers = port, {"Authorization": f"Bearer {token}"}
        status, body = self.fetch("GET", "/api/v1/slides?status=indexed&per_page=100")
        self.slides = json.loads(body)["slides"]
        if status != 200 or not self.slides:
            raise SystemExit(f"no indexed slides to load-test ({status})")
        self.search_share = search_share
        # The query: a 448 x 448 level-0 crop from the middle of the slide with most tiles.
        s = max(self.slides, key=lambda s: s["tile_count"])
        x, y = max(0, s["width"] // 2 - 224), max(0, s["height"] // 2 - 224)
        status, self.query_jpeg = self.fetch(
            "GET", f"/api/v1/slides/{s['id']}/region.jpg?x={x}&y={y}&w=448&h=448&px=448"
        )
        if status != 200:
            raise SystemExit(f"cannot read the query region ({status})")
        self.query_mpp = s["mpp"]

    def fetch(self, method, path, body=None, headers=None):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
        conn.request(method, path, body=body, headers={**self.headers, **(headers or {})})
        resp = conn.getresponse()
        data = resp.read()
        conn.close()
        return resp.status, data

    def next_request(self, rng: random.Random):
        """(endpoint name, method, path, body, headers)"""
        r = rng.random()
        s = rng.choice(self.slides)
        if r < self.search_share:
            body, ctype = multipart(self.query_jpeg, {"mpp": f"{self.query_mpp:.4f}", "top_k": "10"})
            return "search_region", "POST", "/api/v1/search/region", body, {"Content-Type": ctype}
        r = (r - self.search_share) / (1 - self.search_share)
        if r < 0.6:
            top = int(np.ceil(np.log2(max(s["width"], s["height"]))))  # the full-resolution level
            level = top - rng.randint(0, 3)
            scale = 2 ** (top - level)
            cols = max(1, int(np.ceil(s["width"] / scale / 254)))
            rows = max(1, int(np.ceil(s["height"] / scale / 254)))
            return (
                "dz_tile",
                "GET",
                f"/tiles/{s['id']}_files/{level}/{rng.randrange(cols)}_{rng.randrange(rows)}.jpeg",
                None,
                {},
            )
        if r < 0.85:
            size = 448
            x, y = rng.randrange(max(1, s["width"] - size)), rng.randrange(max(1, s["height"] - size))
            return (
                "region_thumb",
                "GET",
                f"/api/v1/slides/{s['id']}/region.jpg?x={x}&y={y}&w={size}&h={size}&px=160",
                None,
                {},
            )
        return "slides_list", "GET", "/api/v1/slides?per_page=50", None, {}


def run_phase(work: Workload, clients: int, duration_s: float, max_requests: int, seed: int) -> dict:
    results: list[tuple[str, float, bool]] = []
    lock = threading.Lock()
    stop_at = time.monotonic() + duration_s

    def client(i: int):
        rng = random.Random(seed * 1000 + i)
        conn = http.client.HTTPConnection("127.0.0.1", work.port, timeout=120)
        mine = []
        for _ in range(max_requests):
            if time.monotonic() >= stop_at:
                break
            name, method, path, body, headers = work.next_request(rng)
            t0 = time.perf_counter()
            try:
                conn.request(method, path, body=body, headers={**work.headers, **headers})
                resp = conn.getresponse()
                resp.read()
                ok = resp.status == 200
            except (OSError, http.client.HTTPException):
                ok = False
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", work.port, timeout=120)
            mine.append((name, (time.perf_counter() - t0) * 1000, ok))
        conn.close()
        with lock:
            results.extend(mine)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    return summarise(results, clients, wall)


def summarise(results, clients: int, wall_s: float) -> dict:
    def stats(rows):
        ms = np.array([r[1] for r in rows]) if rows else np.zeros(1)
        return {
            "requests": len(rows),
            "errors": sum(not r[2] for r in rows),
            "p50_ms": round(float(np.percentile(ms, 50)), 1),
            "p95_ms": round(float(np.percentile(ms, 95)), 1),
            "p99_ms": round(float(np.percentile(ms, 99)), 1),
            "max_ms": round(float(ms.max()), 1),
        }

    names = sorted({r[0] for r in results})
    return {
        "clients": clients,
        "wall_s": round(wall_s, 1),
        "requests_per_s": round(len(results) / wall_s, 1),
        "all": stats(results),
        "by_endpoint": {n: stats([r for r in results if r[0] == n]) for n in names},
    }


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    ap.add_argument("--clients", type=int, default=50, help="concurrent clients in the load phase")
    ap.add_argument("--duration", type=float, default=30.0, help="seconds of the load phase")
    ap.add_argument("--baseline-duration", type=float, default=10.0, help="seconds of the 1-client baseline phase")
    ap.add_argument("--max-requests", type=int, default=100_000, help="bound on requests per client")
    ap.add_argument("--search-share", type=float, default=0.1, help="fraction of requests that are region searches")
    ap.add_argument("--workers", type=int, default=2, help="gunicorn workers")
    ap.add_argument("--threads", type=int, default=8, help="threads per gunicorn worker")
    ap.add_argument(
        "--demo-dir",
        type=Path,
        default=REPO / "bench" / "out" / "webapp-demo",
        help="demo archive (built with webapp.demo --no-serve when missing)",
    )
    ap.add_argument(
        "--encoder",
        default="random:resnet18",
        help="encoder of the demo archive (the one it was or will be built with)",
    )
    args = ap.parse_args()

    demo = args.demo_dir.resolve()
    ensure_demo(demo, args.encoder)
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "HISTOSEEK_INSTANCE_DIR": tmp}
        settings = [
            "--catalog",
            f"sqlite:///{demo / 'catalog.sqlite'}",
            "--index-dir",
            str(demo / "index"),
            "--device",
            "cpu",
            "--encoder",
            args.encoder,
        ]
        if BENCH_USER not in cli("users", "list", *settings, env=env):
            cli("users", "add", BENCH_USER, "--password-stdin", *settings, stdin=BENCH_PASSWORD + "\n", env=env)
        token = cli("users", "token", BENCH_USER, *settings, env=env)
        port = free_port()
        proc = start_server(settings, port, args.workers, args.threads, env, Path(tmp) / "server.log")
        try:
            work = Workload(port, token, args.search_share)
            run_phase(work, 2, 3.0, 50, seed=0)  # warm-up: encoder and slides loaded in each worker
            baseline = run_phase(work, 1, args.baseline_duration, args.max_requests, seed=1)
            load = run_phase(work, args.clients, args.duration, args.max_requests, seed=2)
        finally:
            os.killpg(proc.pid, signal.SIGINT)
            proc.wait(timeout=30)
    report = {
        "bench": "webapp_load",
        "server": {"gunicorn_workers": args.workers, "threads_per_worker": args.threads, "bind": "127.0.0.1"},
        "archive": {"dir": str(demo), "slides": len(work.slides)},
        "mix": {
            "search_region": args.search_share,
            "dz_tile": round(0.6 * (1 - args.search_share), 3),
            "region_thumb": round(0.25 * (1 - args.search_share), 3),
            "slides_list": round(0.15 * (1 - args.search_share), 3),
        },
        "cpu_cores": os.cpu_count(),
        "baseline_1_client": baseline,
        "load": load,
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
