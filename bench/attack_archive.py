"""Re-run the red-team attacks of issue 11 that need an indexed archive (findings 1-6) against
a real `histoseek-web serve` and the real `indexer` CLI, and print the results as JSON
(docs/security.md). The web-only attacks (7, 9-11) are in bench/attack_web.py.

    python bench/attack_archive.py                       # a temporary work folder
    python bench/attack_archive.py --workdir /tmp/arch --fuzz 2000 --crash-rounds 5

What it does, in order, over HTTP and subprocesses only:
  crash        a freshly started worker gets its first region searches 8 at once (finding 1)
  upload       a 6300 x 6300 JPEG at mpp 4 and a 1,250,000 x 32 PNG at mpp 3.5 (finding 2),
               with the worker's peak resident memory
  fuzz         bit-flipped and truncated PNG/JPEG uploads: status counts (no 5xx expected)
  id_reuse     the highest slide is viewed, removed, a new file indexed (finding 3)
  builds       two `indexer build` runs on different folders, one catalog, at once (finding 4)
  shard        a shard with a corrupt header (finding 5): search, verify, build, verify
  slide_file   an indexed slide file overwritten with another's bytes (finding 6)
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import io
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from attack_web import PASSWORD, Browser, free_port, launch, stop  # noqa: E402

from engine.pyramid_tiff import write_pyramidal_tiff  # noqa: E402

ENCODER = "random:resnet18"
Image.MAX_IMAGE_PIXELS = None  # this script makes the oversized uploads itself


def slide_rgb(seed: int, px: int = 2048) -> np.ndarray:
    """A slide-like RGB array: glass with textured pink-purple blobs."""
    rng = np.random.default_rng(seed)
    rgb = np.full((px, px, 3), 240, np.uint8)
    yy, xx = np.mgrid[0:px, 0:px]
    for _ in range(3):
        cy, cx, r = rng.uniform(0.3, 0.7) * px, rng.uniform(0.3, 0.7) * px, rng.uniform(0.15, 0.25) * px
        inside = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        base = np.array([200, 110, 170]) + rng.integers(-30, 30, 3)
        rgb[inside] = np.clip(base + rng.integers(-40, 40, (int(inside.sum()), 3)), 0, 255)
    return rgb


def make_slides(folder: Path, seeds) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    return [write_pyramidal_tiff(folder / f"case-{seed:03d}.tiff", slide_rgb(seed), mpp=0.5) for seed in seeds]


class Archive:
    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.url = f"sqlite:///{workdir / 'catalog.sqlite'}"
        self.index = workdir / "index"
        self.common = ["--catalog", self.url, "--index-dir", str(self.index)]

    def cli(self, *args, check=False) -> subprocess.CompletedProcess:
        proc = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True)
        if check and proc.returncode:
            raise SystemExit(f"{' '.join(args)} failed:\n{proc.stderr[-3000:]}")
        return proc

    def build(self, folder: Path, check=False) -> subprocess.CompletedProcess:
        return self.cli(
            "indexer",
            "build",
            str(folder),
            *self.common,
            "--encoder",
            ENCODER,
            "--device",
            "cpu",
            "--workers",
            "0",
            "--no-progress",
            check=check,
        )

    def verify(self) -> subprocess.CompletedProcess:
        return self.cli("indexer", "verify", *self.common)

    def token(self) -> str:
        from engine.catalog import Catalog
        from webapp import users

        catalog = Catalog(self.url)
        try:
            users.create_user(catalog, "attacker", PASSWORD)
        except ValueError:
            pass
        token = users.issue_token(catalog, "attacker")
        catalog.dispose()
        return token

    def serve(self, port: int, threads: int = 8) -> subprocess.Popen:
        env = {**os.environ, "HISTOSEEK_INSTANCE_DIR": str(self.workdir / "instance")}
        cmd = [
            sys.executable,
            "-m",
            "webapp.cli",
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
            "--threads",
            str(threads),
            *self.common,
            "--encoder",
            ENCODER,
            "--device",
            "cpu",
        ]
        return launch(cmd, env, port, self.workdir / "server.log")


def multipart(data: bytes, fields: dict, filename: str = "region.png") -> tuple[bytes, dict]:
    boundary = "histoseekattack" + os.urandom(6).hex()
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode() for k, v in fields.items()
    ]
    parts.append(
        f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{filename}"\r\nContent-Type: application/octet-stream\r\n\r\n'.encode()
        + data
        + b"\r\n"
    )
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), {
        "Content-Type": f"multipart/form-data; boundary={boundary}"
    }


def region_search(port: int, token: str, data: bytes, mpp: float, timeout: float = 120) -> tuple[int | str, float]:
    body, headers = multipart(data, {"mpp": mpp, "top_k": 5})
    headers["Authorization"] = f"Bearer {token}"
    start = time.perf_counter()
    try:
        status = Browser(port, timeout=timeout).request("POST", "/api/v1/search/region", body, headers)[0]
    except Exception as exc:  # a dead worker closes the connection without a response
        status = type(exc).__name__
    return status, time.perf_counter() - start


def png(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "PNG")
    return buf.getvalue()


def jpeg(rgb: np.ndarray, quality: int = 85) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def worker_peak_rss_mb(server: subprocess.Popen) -> float:
    """Peak resident memory (VmHWM) of the server's processes, largest of them."""
    peaks = []
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            text = status.read_text()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
        if int(fields.get("PPid", "0").strip()) == server.pid or status.parent.name == str(server.pid):
            peaks.append(int(fields.get("VmHWM", "0 kB").split()[0]) / 1024)
    return round(max(peaks, default=0.0), 1)


def attack_crash(arch: Archive, token: str, crop: bytes, rounds: int, concurrency: int = 8) -> dict:
    outcomes = Counter()
    for _ in range(rounds):
        port = free_port()
        server = arch.serve(port)
        try:
            with cf.ThreadPoolExecutor(concurrency) as pool:
                for status, _ in pool.map(
                    lambda _, port=port: region_search(port, token, crop, 1.0), range(concurrency)
                ):
                    outcomes[str(status)] += 1
            outcomes["server_alive_after"] += int(
                server.poll() is None and Browser(port).request("GET", "/login")[0] == 200
            )
        finally:
            stop(server)
    return {"rounds": rounds, "concurrent_first_searches": concurrency, "outcomes": dict(outcomes)}


def attack_upload(port: int, server, token: str) -> dict:
    rng = np.random.default_rng(0)
    big = jpeg(rng.integers(120, 220, (6300, 6300, 3), dtype=np.uint8), quality=30)
    strip = png(np.full((32, 1_250_000, 3), 200, np.uint8))
    out = {"worker_peak_rss_mb_before": worker_peak_rss_mb(server)}
    for name, data, mpp in (("jpeg_6300x6300_mpp4", big, 4.0), ("png_1250000x32_mpp3.5", strip, 3.5)):
        status, seconds = region_search(port, token, data, mpp)
        out[name] = {
            "upload_bytes": len(data),
            "status": status,
            "seconds": round(seconds, 2),
            "worker_peak_rss_mb": worker_peak_rss_mb(server),
        }
    return out


def attack_fuzz(port: int, token: str, base: list[bytes], n: int, seed: int = 0) -> dict:
    rng = random.Random(seed)

    def mutate(i: int) -> bytes:
        data = bytearray(base[i % len(base)])
        if i % 3 == 0:
            return bytes(data[: rng.randrange(1, len(data))])  # truncated
        for _ in range(rng.randint(1, 16)):  # bit flips, most in the header where parsers branch
            pos = rng.randrange(min(len(data), 512)) if rng.random() < 0.7 else rng.randrange(len(data))
            data[pos] ^= 1 << rng.randrange(8)
        return bytes(data)

    statuses = Counter()
    with cf.ThreadPoolExecutor(4) as pool:
        for status, _ in pool.map(lambda i: region_search(port, token, mutate(i), 1.0), range(n)):
            statuses[str(status)] += 1
    server_errors = sum(v for k, v in statuses.items() if not k.isdigit() or int(k) >= 500)
    return {"uploads": n, "statuses": dict(statuses), "server_errors": server_errors}


def slides_json(port: int, token: str) -> list[dict]:
    status, _, body = Browser(port).request(
        "GET", "/api/v1/slides?per_page=500", headers={"Authorization": f"Bearer {token}"}
    )
    doc = json.loads(body)
    return doc.get("slides", doc) if isinstance(doc, dict) else doc


def attack_id_reuse(arch: Archive, port: int, token: str, folder: Path) -> dict:
    auth = {"Authorization": f"Bearer {token}"}
    get = lambda path: Browser(port).request("GET", path, headers=auth)[0]  # noqa: E731
    highest = max(s["id"] for s in slides_json(port, token))
    before = {
        "dzi": get(f"/tiles/{highest}.dzi"),
        "thumbnail": get(f"/api/v1/slides/{highest}/thumbnail.jpg"),
    }  # warms the worker's caches
    arch.cli("indexer", "remove", str(highest), *arch.common, check=True)
    after_remove = {
        path: get(path)
        for path in (
            f"/api/v1/slides/{highest}",
            f"/tiles/{highest}.dzi",
            f"/api/v1/slides/{highest}/thumbnail.jpg",
            f"/api/v1/slides/{highest}/region.jpg?x=0&y=0&w=512&h=512",
        )
    }
    make_slides(folder, [500])
    arch.build(folder)
    new_id = max(s["id"] for s in slides_json(port, token))
    return {
        "removed_id": highest,
        "before_remove": before,
        "after_remove": after_remove,
        "new_slide_id": new_id,
        "id_reused": new_id == highest,
        "old_id_after_new_build": {"api": get(f"/api/v1/slides/{highest}"), "dzi": get(f"/tiles/{highest}.dzi")},
    }


def attack_concurrent_builds(arch: Archive, port: int, token: str, crop: bytes) -> dict:
    folders = [arch.workdir / "archive-b", arch.workdir / "archive-c"]
    make_slides(folders[0], range(20, 24))
    make_slides(folders[1], range(30, 34))
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "indexer",
                "build",
                str(f),
                *arch.common,
                "--encoder",
                ENCODER,
                "--device",
                "cpu",
                "--workers",
                "0",
                "--no-progress",
            ],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for f in folders
    ]
    codes = [p.wait() for p in procs]
    verify = arch.verify()
    return {
        "build_exit_codes": codes,
        "verify_exit_code": verify.returncode,
        "verify_tail": verify.stdout.strip().splitlines()[-1:] + verify.stderr.strip().splitlines()[-1:],
        "region_search_after": region_search(port, token, crop, 1.0)[0],
    }


def attack_damaged_shard(arch: Archive, port: int, token: str, crop: bytes, folder: Path) -> dict:
    shard = sorted(arch.index.rglob("*.faiss"))[0]
    with open(shard, "r+b") as fh:  # a corrupt header: FAISS cannot read it
        fh.write(b"\xff" * 64)
    searches = [region_search(port, token, crop, 1.0)[0] for _ in range(3)]
    verify = arch.verify()
    build = arch.build(folder)
    verify_after = arch.verify()
    return {
        "shard": shard.name,
        "region_searches": searches,
        "verify_exit_code": verify.returncode,
        "build_exit_code": build.returncode,
        "build_tail": build.stdout.strip().splitlines()[-2:],
        "verify_after_build_exit_code": verify_after.returncode,
        "region_search_after_repair": region_search(port, token, crop, 1.0)[0],
    }


def attack_changed_slide_file(arch: Archive, port: int, token: str, folder: Path) -> dict:
    auth = {"Authorization": f"Bearer {token}"}
    victim = sorted(folder.glob("*.tiff"))[0]
    donor = make_slides(arch.workdir / "elsewhere", [600])[0]  # content the catalog has never seen
    rows = {s["path"]: s["id"] for s in slides_json(port, token)}
    victim_id = next(i for p, i in rows.items() if Path(p).name == victim.name)
    first = Browser(port).request("GET", f"/api/v1/slides/{victim_id}/thumbnail.jpg", headers=auth)[0]
    shutil.copyfile(donor, victim)
    served = Browser(port).request("GET", f"/api/v1/slides/{victim_id}/thumbnail.jpg", headers=auth)[0]
    verify = arch.verify()
    arch.build(folder)
    rows_for_path = [s for s in slides_json(port, token) if Path(s["path"]).name == victim.name]
    return {
        "thumbnail_before": first,
        "thumbnail_after_overwrite": served,
        "verify_exit_code": verify.returncode,
        "rows_for_path_after_build": len(rows_for_path),
        "statuses_for_path": sorted(s.get("status", "?") for s in rows_for_path),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, help="work folder (default: a temporary one, removed afterwards)")
    parser.add_argument("--crash-rounds", type=int, default=3)
    parser.add_argument("--fuzz", type=int, default=400, help="mutated uploads to send")
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="histoseek-attack-"))
    workdir.mkdir(parents=True, exist_ok=True)
    arch = Archive(workdir)
    folder = workdir / "archive-a"
    make_slides(folder, range(5))
    arch.build(folder, check=True)
    token = arch.token()
    crop = png(slide_rgb(2)[800:1248, 800:1248])
    report = {"crash": attack_crash(arch, token, crop, args.crash_rounds)}
    port = free_port()
    server = arch.serve(port)
    try:
        report["upload"] = attack_upload(port, server, token)
        report["fuzz"] = attack_fuzz(port, token, [crop, jpeg(slide_rgb(3)[600:1048, 600:1048])], args.fuzz)
        report["id_reuse"] = attack_id_reuse(arch, port, token, folder)
        report["builds"] = attack_concurrent_builds(arch, port, token, crop)
        report["shard"] = attack_damaged_shard(arch, port, token, crop, folder)
        report["slide_file"] = attack_changed_slide_file(arch, port, token, folder)
        report["server_alive_at_end"] = server.poll() is None
    finally:
        stop(server)
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
