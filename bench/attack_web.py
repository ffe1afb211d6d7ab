"""Re-run the red-team attacks of issue 11 (web findings 7, 9, 10, 11) against a real
`histoseek-web serve` on 127.0.0.1 and print the results as JSON (docs/security.md).

    python bench/attack_web.py                  # a fresh catalog in a temporary folder
    python bench/attack_web.py --workdir /tmp/atk --slow-clients 10

It builds a small catalog (a few slide rows, one whose file is missing, one benchmark run,
users `victim`, `alice`, `mallory`), starts the server with HOME and XDG_RUNTIME_DIR inside the
work folder (so a gunicorn control socket would show there), and attacks it over HTTP only.
Clients on other addresses come from 127.0.0.2 and 127.0.0.3 (all of 127/8 is loopback).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PASSWORD = "correct horse"


class Browser:
    """A tiny HTTP client with one cookie jar and a fixed source address."""

    def __init__(self, port: int, source: str = "127.0.0.1", timeout: float = 30):
        self.port, self.source, self.timeout, self.cookies = port, source, timeout, {}

    def request(self, method, path, body=None, headers=None):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=self.timeout, source_address=(self.source, 0))
        headers = dict(headers or {})
        if self.cookies:
            headers["Cookie"] = "; ".join(f"{k}={v}" for k, v in self.cookies.items())
        conn.request(method, path, body=body, headers=headers)
        response = conn.getresponse()
        data = response.read()
        for value in response.headers.get_all("Set-Cookie") or []:
            name, _, rest = value.partition("=")
            self.cookies[name] = rest.split(";", 1)[0]
        conn.close()
        return response.status, response.headers, data.decode("utf-8", "replace")

    def csrf(self, path="/login"):
        return re.search(r'name="csrf_token" value="([^"]+)"', self.request("GET", path)[2]).group(1)

    def login(self, username, password=PASSWORD):
        token = self.csrf()
        form = urllib.parse.urlencode({"username": username, "password": password, "csrf_token": token})
        return self.request("POST", "/login", form, {"Content-Type": "application/x-www-form-urlencoded"})[0]

    def logout(self):
        token = self.csrf("/account")
        return self.request(
            "POST",
            "/logout",
            urllib.parse.urlencode({"csrf_token": token}),
            {"Content-Type": "application/x-www-form-urlencoded"},
        )[0]


def build_catalog(workdir: Path) -> tuple[str, str]:
    from engine.catalog import Catalog, models
    from webapp import users

    url = f"sqlite:///{workdir / 'catalog.sqlite'}"
    catalog = Catalog(url)
    with catalog.session() as s:
        s.add_all(
            [
                models.Slide(
                    path=str(workdir / "slides" / "gone.svs"), fingerprint="a" * 64, status="indexed", tile_count=1
                ),
                models.Slide(path="/archive/case_7.svs", fingerprint="b" * 64, status="pending"),
                *[
                    models.Slide(path=f"/archive/s{i:03d}.svs", fingerprint=f"{i:064d}", status="pending")
                    for i in range(20)
                ],
            ]
        )
        s.add(models.BenchmarkRun(dataset_kind="flat", dataset_path="y", encoder_name="e", metrics={"acc@1": 0.5}))
    for name in ("victim", "alice", "mallory"):
        users.create_user(catalog, name, PASSWORD)
    token = users.issue_token(catalog, "mallory")
    catalog.dispose()
    return url, token


def start(workdir: Path, url: str, port: int, args) -> subprocess.Popen:
    home = workdir / "home"
    (home / "run").mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "HOME": str(home),
        "XDG_RUNTIME_DIR": str(home / "run"),
        "HISTOSEEK_INSTANCE_DIR": str(workdir / "instance"),
    }
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
        str(args.workers),
        "--threads",
        str(args.threads),
        "--catalog",
        url,
        "--index-dir",
        str(workdir / "index"),
        "--encoder",
        "random:resnet18",
        "--device",
        "cpu",
    ]
    return launch(cmd, env, port, workdir / f"server-{port}.log")


def launch(cmd: list[str], env: dict, port: int, log_path: Path, wait_s: float = 120) -> subprocess.Popen:
    """Start a server command in its own process group and wait until it answers /login."""
    log = open(log_path, "a")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + wait_s
    while True:
        try:
            if Browser(port, timeout=2).request("GET", "/login")[0] == 200:
                return proc
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit("server did not start:\n" + log_path.read_text()[-3000:])
        time.sleep(0.3)


def stop(proc):
    os.killpg(proc.pid, signal.SIGINT)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def audit_counts(url: str, username: str) -> dict:
    import sqlalchemy as sa

    from engine.catalog import Catalog, models

    catalog = Catalog(url)
    with catalog.session() as s:
        rows = s.scalars(
            sa.select(models.AuditEvent).where(models.AuditEvent.action.in_(["login_failed", "login_throttled"]))
        ).all()
    catalog.dispose()
    return dict(Counter(e.action for e in rows if (e.detail or {}).get("username") == username))


def attack_concurrent_logins(port, url, n=60):
    browsers = [Browser(port) for _ in range(n)]
    tokens = [b.csrf() for b in browsers]
    barrier = threading.Barrier(n)
    codes = []

    def go(browser, token):
        form = urllib.parse.urlencode({"username": "victim", "password": "wrong guess", "csrf_token": token})
        barrier.wait()
        codes.append(browser.request("POST", "/login", form, {"Content-Type": "application/x-www-form-urlencoded"})[0])

    threads = [threading.Thread(target=go, args=pair) for pair in zip(browsers, tokens)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    counts = Counter(codes)
    return {
        "tries": n,
        "password_checked_401": counts.get(401, 0),
        "refused_429": counts.get(429, 0),
        "other": {k: v for k, v in counts.items() if k not in (401, 429)},
        "audit_rows": audit_counts(url, "victim"),
    }


def attack_lockout(port, tries=15):
    stranger = Browser(port, source="127.0.0.2")
    codes = Counter(stranger.login("alice", "guess guess") for _ in range(tries))
    return {"stranger_tries": dict(codes), "alice_from_own_address": Browser(port, source="127.0.0.3").login("alice")}


def attack_huge_ids(port, token):
    api = Browser(port)
    auth = {"Authorization": f"Bearer {token}"}
    page = Browser(port, source="127.0.0.4")
    page.login("mallory")
    results = {}
    for value in (2**63, 2**64, 10**30):
        for path in (
            f"/api/v1/slides/{value}",
            f"/api/v1/slides/{value}/thumbnail.jpg",
            f"/tiles/{value}.dzi",
            f"/api/v1/benchmarks/{value}",
        ):
            results[path] = api.request("GET", path, headers=auth)[0]
        for path in (f"/viewer/{value}", f"/benchmarks/{value}"):
            results[path] = page.request("GET", path)[0]
    return {"statuses": dict(Counter(results.values())), "server_errors": [p for p, c in results.items() if c >= 500]}


def attack_json(port, token):
    api = Browser(port)
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    bodies = {
        "slide_id 1e20": '{"slide_id": 1e20}',
        "slide_id 1e308": '{"slide_id": 1e308}',
        "slide_id Infinity": '{"slide_id": Infinity}',
        "top_k Infinity": '{"slide_id": 1, "top_k": Infinity}',
        "nested 5000": "[" * 5000 + "]" * 5000,
    }
    out = {}
    for name, body in bodies.items():
        status, _, text = api.request("POST", "/api/v1/search/slide", body, headers)
        try:
            message = json.loads(text).get("message")
        except ValueError:
            message = text[:120]
        out[name] = {"status": status, "message": message}
    return out


def attack_viewer_boxes(port):
    browser = Browser(port, source="127.0.0.5")
    browser.login("mallory")
    inf = browser.request("GET", "/viewer/1?box=inf,0,10,10")[0]
    status, _, page = browser.request("GET", "/viewer/1?box=0,0,10,10,nan")
    return {"box inf": inf, "box score nan": status, "NaN in page": "NaN" in page}


def attack_copied_cookie(port, url):
    from engine.catalog import Catalog
    from webapp import users

    owner = Browser(port, source="127.0.0.6")
    owner.login("mallory")
    thief = Browser(port)
    thief.cookies = dict(owner.cookies)
    before = thief.request("GET", "/api/v1/me")[0]
    owner.logout()
    after_logout = thief.request("GET", "/api/v1/me")[0]
    owner.login("mallory")
    thief.cookies = dict(owner.cookies)
    catalog = Catalog(url)
    users.set_password(catalog, "mallory", PASSWORD)  # `histoseek-web users passwd`
    catalog.dispose()
    after_passwd = thief.request("GET", "/api/v1/me")[0]
    return {"copy before logout": before, "copy after logout": after_logout, "copy after passwd": after_passwd}


def attack_operator_errors(port, token, workdir):
    api = Browser(port)
    auth = {"Authorization": f"Bearer {token}"}
    _, _, text = api.request("GET", "/api/v1/slides/1/thumbnail.jpg", headers=auth)
    message = json.loads(text).get("message", "")
    total = json.loads(api.request("GET", "/api/v1/slides?per_page=500", headers=auth)[2])["total"]
    underscore = json.loads(api.request("GET", "/api/v1/slides?per_page=500&q=_", headers=auth)[2])["total"]
    percent = json.loads(api.request("GET", "/api/v1/slides?per_page=500&q=%25", headers=auth)[2])["total"]
    page = Browser(port, source="127.0.0.7")
    page.login("alice")
    return {
        "error message": message,
        "shows server path": str(workdir) in message,
        "shows memory address": bool(re.search(r"0x[0-9a-f]{6,}", message)),
        "archive total": total,
        "q=_ matches": underscore,
        "q=% matches": percent,
        "Cache-Control /": page.request("GET", "/")[1].get("Cache-Control"),
        "Cache-Control /api/v1/me": api.request("GET", "/api/v1/me", headers=auth)[1].get("Cache-Control"),
        "Cache-Control static": page.request("GET", "/static/style.css")[1].get("Cache-Control"),
    }


def attack_slow_bodies(port, n):
    """n connections announce a 1,000-byte POST /login body and send one byte a second;
    how long does an honest GET /login wait meanwhile?"""
    socks = []
    stop_flag = threading.Event()
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall(
            b"POST /login HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: 1000\r\n\r\nu"
        )
        socks.append(s)

    def trickle():
        while not stop_flag.wait(1.0):
            for s in socks:
                try:
                    s.send(b"u")
                except OSError:
                    pass

    threading.Thread(target=trickle, daemon=True).start()
    time.sleep(0.5)
    started = time.monotonic()
    try:
        status = Browser(port, timeout=45).request("GET", "/login")[0]
    except (TimeoutError, socket.timeout):
        status = "no answer within 45 s"
    waited = round(time.monotonic() - started, 1)
    stop_flag.set()
    answers = []
    for s in socks:
        s.settimeout(5)
        try:
            answers.append(s.recv(64).split(b" ", 2)[1].decode() or "closed")
        except (OSError, IndexError):
            answers.append("no answer")
        s.close()
    return {"slow clients": n, "GET /login": status, "waited_s": waited, "slow clients got": dict(Counter(answers))}


def control_sockets(workdir: Path) -> list[str]:
    return [str(p.relative_to(workdir)) for p in (workdir / "home").rglob("*.ctl")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--workdir", type=Path, default=None, help="folder for the catalog and server logs (default: a temporary one)"
    )
    parser.add_argument(
        "--workers", type=int, default=1, help="gunicorn workers (1 makes the slow-body attack deterministic)"
    )
    parser.add_argument("--threads", type=int, default=8, help="threads per worker")
    parser.add_argument("--slow-clients", type=int, default=10)
    args = parser.parse_args()
    workdir = (args.workdir or Path(tempfile.mkdtemp(prefix="histoseek-attack-"))).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    url, token = build_catalog(workdir)
    port, port2 = free_port(), free_port()
    proc = start(workdir, url, port, args)
    second = None
    try:
        results = {"server": {"workers": args.workers, "threads": args.threads}}
        sockets_first = control_sockets(workdir)
        second = start(workdir, url, port2, args)
        results["control sockets"] = {
            "after first server": sockets_first,
            "after second server": control_sockets(workdir),
        }
        stop(second)
        second = None
        results["concurrent wrong logins"] = attack_concurrent_logins(port, url)
        results["lockout from another address"] = attack_lockout(port)
        results["huge ids"] = attack_huge_ids(port, token)
        results["json bodies"] = attack_json(port, token)
        results["viewer boxes"] = attack_viewer_boxes(port)
        results["copied cookie"] = attack_copied_cookie(port, url)
        results["operator errors"] = attack_operator_errors(port, token, workdir)
        results["slow bodies"] = attack_slow_bodies(port, args.slow_clients)
    finally:
        if second is not None:
            stop(second)
        stop(proc)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
