"""Regression tests for the web-app findings of the red-team run (issue 11, items 7, 9, 10 and
the web part of 11): sessions that outlived logout, 500s from huge or non-finite numbers and
deep JSON, login throttling under concurrency and across addresses, leaky error texts, LIKE
wildcards, Cache-Control, gunicorn's control socket and slow-body clients.

Real Flask app on real SQLite (and PostgreSQL with HISTOSEEK_TEST_POSTGRES), real threads,
and a real `histoseek-web serve` (gunicorn) for the server-level findings."""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter

import pytest
import sqlalchemy as sa
from click.testing import CliRunner

from engine.catalog import models
from engine.config import Settings
from engine.errors import QueryError
from tests.conftest import _reset_postgres as reset_postgres
from tests.conftest import postgres_url
from webapp import create_app, users
from webapp.cli import main as web_cli
from webapp.errors import public_message
from webapp.server import gunicorn_options

PASSWORD = "correct horse"
HUGE_IDS = (2**63, 2**64, 10**30, int("9" * 400))


@pytest.fixture(scope="module", params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def app(request, tmp_path_factory):
    """One app per module and database; each test uses its own user names and client
    addresses, so their login counters do not meet."""
    tmp_path = tmp_path_factory.mktemp("security")
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'catalog.sqlite'}"
    else:
        url = postgres_url()
        reset_postgres(url)
    settings = Settings.load(env={}, data_dir=str(tmp_path / "data"), catalog_url=url, encoder="random:resnet18")
    app = create_app({"TESTING": True, "SETTINGS": settings, "INSTANCE_PATH": str(tmp_path / "instance")})
    catalog = app.extensions["histoseek"].catalog
    with catalog.session() as s:
        s.add_all(
            [
                models.Slide(
                    path=str(tmp_path / "slides" / "gone.svs"), fingerprint="a" * 64, status="indexed", tile_count=1
                ),
                models.Slide(path="/archive/case_7.svs", fingerprint="b" * 64, status="pending"),
                models.Slide(path="/archive/case7.svs", fingerprint="c" * 64, status="pending", label="100% tumour"),
                models.Slide(path="/archive/other.svs", fingerprint="d" * 64, status="pending"),
            ]
        )
        s.add(models.BenchmarkRun(dataset_kind="flat", dataset_path="y", encoder_name="e", metrics={"acc@1": 0.5}))
    app.config["CATALOG_URL"] = url
    app.config["TMP"] = tmp_path
    yield app
    catalog.dispose()


def catalog_of(app):
    return app.extensions["histoseek"].catalog


def ensure_user(app, username: str) -> None:
    """Create the user unless an earlier parametrisation of the test did."""
    try:
        users.create_user(catalog_of(app), username, PASSWORD)
    except QueryError:  # exists already
        pass


def client_at(app, address: str):
    client = app.test_client()
    client.environ_base["REMOTE_ADDR"] = address
    return client


def login(client, username, password=PASSWORD):
    page = client.get("/login").text
    token = re.search(r'name="csrf_token" value="([^"]+)"', page).group(1)
    return client.post("/login", data={"username": username, "password": password, "csrf_token": token})


def logout(client):
    token = re.search(r'name="csrf_token" value="([^"]+)"', client.get("/account").text).group(1)
    return client.post("/logout", data={"csrf_token": token})


def copy_of(app, client):
    """A second client holding a copy of `client`'s session cookie (a stolen cookie)."""
    thief = app.test_client()
    thief.set_cookie("session", client.get_cookie("session").value)
    return thief


def audit_rows(app, action: str, username: str) -> list[dict]:
    with catalog_of(app).session() as s:
        return [
            e.detail
            for e in s.scalars(sa.select(models.AuditEvent).where(models.AuditEvent.action == action))
            if e.detail.get("username") == username
        ]


def token_client(app, username: str):
    token = users.issue_token(catalog_of(app), username)
    client = app.test_client()
    client.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {token}"
    return client


# -- 7: sessions outlive logout ---------------------------------------------------------


def test_copied_session_cookie_is_refused_after_logout(app):
    users.create_user(catalog_of(app), "s7logout", PASSWORD)
    client = client_at(app, "10.7.0.1")
    assert login(client, "s7logout").status_code == 302
    thief = copy_of(app, client)
    assert thief.get("/api/v1/me").json["username"] == "s7logout"
    assert logout(client).status_code == 302
    assert thief.get("/api/v1/me").status_code == 401
    assert thief.get("/").status_code == 302  # back to the login page
    # a fresh login works and yields a working session again
    assert login(client, "s7logout").status_code == 302
    assert client.get("/api/v1/me").status_code == 200


def test_password_change_ends_existing_sessions(app):
    users.create_user(catalog_of(app), "s7passwd", PASSWORD)
    client = client_at(app, "10.7.0.2")
    assert login(client, "s7passwd").status_code == 302
    users.set_password(catalog_of(app), "s7passwd", "a brand new password")
    assert client.get("/api/v1/me").status_code == 401
    assert login(client, "s7passwd", "a brand new password").status_code == 302


def test_cli_revoke_drops_token_and_sessions(app):
    users.create_user(catalog_of(app), "s7revoke", PASSWORD)
    browser = client_at(app, "10.7.0.3")
    assert login(browser, "s7revoke").status_code == 302
    script = token_client(app, "s7revoke")
    assert script.get("/api/v1/me").status_code == 200
    result = CliRunner().invoke(web_cli, ["users", "revoke", "s7revoke", "--catalog", app.config["CATALOG_URL"]])
    assert result.exit_code == 0 and "revoked" in result.output
    assert script.get("/api/v1/me").status_code == 401
    assert browser.get("/api/v1/me").status_code == 401
    listing = CliRunner().invoke(web_cli, ["users", "list", "--catalog", app.config["CATALOG_URL"]]).output
    assert re.search(r"^s7revoke\tuser\tno token\t.*\tactive$", listing, re.M), listing


def test_cli_disable_blocks_login_token_and_session(app):
    users.create_user(catalog_of(app), "s7disable", PASSWORD)
    browser = client_at(app, "10.7.0.4")
    assert login(browser, "s7disable").status_code == 302
    script = token_client(app, "s7disable")
    cli = ["--catalog", app.config["CATALOG_URL"]]
    assert CliRunner().invoke(web_cli, ["users", "disable", "s7disable", *cli]).exit_code == 0
    assert browser.get("/api/v1/me").status_code == 401
    refused = script.get("/api/v1/me")
    assert refused.status_code == 401 and "disabled" in refused.json["message"]
    assert login(client_at(app, "10.7.0.5"), "s7disable").status_code == 401  # right password, disabled
    listing = CliRunner().invoke(web_cli, ["users", "list", *cli]).output
    assert re.search(r"^s7disable\t.*\tdisabled$", listing, re.M), listing
    assert CliRunner().invoke(web_cli, ["users", "enable", "s7disable", *cli]).exit_code == 0
    assert browser.get("/api/v1/me").status_code == 401  # enabling does not revive old sessions
    assert script.get("/api/v1/me").status_code == 200  # the token was not revoked, only blocked
    assert login(client_at(app, "10.7.0.6"), "s7disable").status_code == 302


# -- 9: unhandled input ------------------------------------------------------------------


def int_routes(app):
    for rule in app.url_map.iter_rules():
        if rule.endpoint != "static" and rule.arguments - {"fmt"}:
            yield rule


def fill(rule, value) -> str:
    url = rule.rule
    for name in rule.arguments:
        url = re.sub(rf"<(?:[a-z]+:)?{name}>", "jpeg" if name == "fmt" else str(value), url)
    return url


def test_huge_ids_in_urls_are_404_not_500(app):
    users.create_user(catalog_of(app), "s9ids", PASSWORD)
    api = token_client(app, "s9ids")
    browser = client_at(app, "10.9.0.1")
    assert login(browser, "s9ids").status_code == 302
    checked = 0
    for rule in int_routes(app):
        client = api if rule.rule.startswith(("/api/", "/tiles/")) else browser
        for value in (*HUGE_IDS, 2**31, 2**31 - 1):  # past the INTEGER keys; the largest valid id exists nowhere either
            response = client.get(fill(rule, value))
            assert response.status_code == 404, (rule.rule, value, response.status_code, response.text[:200])
            checked += 1
    assert checked >= 5 * 8  # slides, region, thumbnail, dzi, tile, viewer, benchmarks, plot


NON_FINITE_BODIES = [
    ('{"slide_id": 1e20}', "slide_id"),
    ('{"slide_id": 1e308}', "slide_id"),
    ('{"slide_id": 1e400}', "JSON"),
    ('{"slide_id": Infinity}', "JSON"),
    ('{"slide_id": -Infinity}', "JSON"),
    ('{"slide_id": NaN}', "JSON"),
    ('{"slide_id": 9223372036854775808}', "slide_id"),
    ('{"slide_id": 2.5}', "slide_id"),
    ('{"slide_id": true}', "slide_id"),
    ('{"slide_id": 1, "top_k": Infinity}', "JSON"),
    ('{"slide_id": 1, "top_k": 1e308}', "top_k"),
    ('{"slide_id": 1, "top_k": "inf"}', "top_k"),
]


@pytest.mark.parametrize("body,names", NON_FINITE_BODIES)
def test_non_finite_and_huge_numbers_in_json_are_400(app, body, names):
    ensure_user(app, "s9json")
    response = token_client(app, "s9json").post("/api/v1/search/slide", data=body, content_type="application/json")
    assert response.status_code == 400, (body, response.status_code, response.text[:300])
    assert names in response.json["message"], response.json


@pytest.mark.parametrize(
    "field,value",
    [
        ("slide_id", "inf"),
        ("slide_id", "1e20"),
        ("slide_id", "99999999999999999999"),
        ("top_k", "nan"),
        ("top_k", "inf"),
    ],
)
def test_non_finite_numbers_in_forms_are_400(app, field, value):
    ensure_user(app, "s9form")
    data = {"slide_id": "1", field: value}
    response = token_client(app, "s9form").post("/api/v1/search/slide", data=data)
    assert response.status_code == 400 and field in response.json["message"], response.text[:300]


def test_region_search_refuses_non_finite_mpp(app):
    users.create_user(catalog_of(app), "s9mpp", PASSWORD)
    client = token_client(app, "s9mpp")
    for value in ("nan", "inf", "-inf", "1e400"):
        response = client.post("/api/v1/search/region", data={"mpp": value})
        assert response.status_code == 400 and "mpp" in response.json["message"], (value, response.text[:200])


def test_deeply_nested_json_is_400_not_500(app):
    users.create_user(catalog_of(app), "s9deep", PASSWORD)
    client = token_client(app, "s9deep")
    for body in (
        "[" * 5000 + "]" * 5000,
        '{"a":' * 5000 + "1" + "}" * 5000,
        '{"slide_id": 1, "filters": ' + "[" * 40 + "]" * 40 + "}",
    ):
        response = client.post("/api/v1/search/slide", data=body, content_type="application/json")
        assert response.status_code == 400, response.text[:200]
        assert "nested deeper than 32" in response.json["message"]
    # brackets inside strings are text, not nesting
    shallow = json.dumps({"filters": {"site": "[" * 100}})
    response = client.post("/api/v1/search/slide", data=shallow, content_type="application/json")
    assert response.status_code == 400 and "choose a slide" in response.json["message"]


def test_viewer_refuses_or_ignores_non_finite_boxes(app):
    users.create_user(catalog_of(app), "s9box", PASSWORD)
    client = client_at(app, "10.9.0.2")
    assert login(client, "s9box").status_code == 302
    with catalog_of(app).session() as s:
        slide_id = s.scalar(sa.select(models.Slide.id).where(models.Slide.path.like("%gone.svs")))
    for box in ("inf,0,10,10", "0,nan,10,10", "0,0,1e400,10", "0,0,10,99999999999"):
        assert client.get(f"/viewer/{slide_id}?box={box}").status_code == 400, box
    page = client.get(f"/viewer/{slide_id}?box=0,0,10,10,nan")
    assert page.status_code == 200
    boxes = json.loads(
        re.search(r'<script type="application/json" id="viewer-boxes">(.*?)</script>', page.text, re.S).group(1)
    )
    assert boxes == [{"x": 0, "y": 0, "w": 10, "h": 10, "score": None, "match": "features"}]
    assert client.get("/archive?page=" + "9" * 30).status_code == 200


# -- 10: login throttling -----------------------------------------------------------------


def test_concurrent_wrong_logins_check_exactly_the_limit(app):
    """60 threads try a wrong password at once: exactly LOGIN_MAX_FAILURES of them get their
    password checked (401); the rest are refused before it (429). Counting from the audit log
    let 19 of 60 through."""
    users.create_user(catalog_of(app), "s10victim", PASSWORD)
    limit = app.config["LOGIN_MAX_FAILURES"]
    clients = [client_at(app, "10.10.0.1") for _ in range(60)]
    tokens = [re.search(r'name="csrf_token" value="([^"]+)"', c.get("/login").text).group(1) for c in clients]
    barrier = threading.Barrier(len(clients))
    statuses = []

    def attempt(client, token):
        barrier.wait()
        statuses.append(
            client.post(
                "/login", data={"username": "s10victim", "password": "wrong guess", "csrf_token": token}
            ).status_code
        )

    threads = [threading.Thread(target=attempt, args=pair) for pair in zip(clients, tokens)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert Counter(statuses) == {401: limit, 429: 60 - limit}
    assert len(audit_rows(app, "login_failed", "s10victim")) == limit
    throttled = audit_rows(app, "login_throttled", "s10victim")
    assert sorted(r["key"] for r in throttled) == ["addr", "user"]  # one row per key, not 50


def test_stranger_cannot_lock_out_a_user_from_another_address(app, monkeypatch):
    monkeypatch.setitem(app.config, "LOGIN_MAX_FAILURES", 3)
    users.create_user(catalog_of(app), "s10alice", PASSWORD)
    stranger = client_at(app, "10.10.1.66")
    limit = app.config["LOGIN_MAX_FAILURES"]
    codes = [login(stranger, "s10alice", "guess guess").status_code for _ in range(limit + 3)]
    assert codes == [401] * limit + [429] * 3
    assert login(stranger, "s10alice").status_code == 429  # even the right password, from there
    assert login(client_at(app, "10.10.1.1"), "s10alice").status_code == 302


def test_one_address_cannot_try_many_user_names(app, monkeypatch):
    monkeypatch.setitem(app.config, "LOGIN_MAX_FAILURES_PER_ADDRESS", 4)
    users.create_user(catalog_of(app), "s10bob", PASSWORD)
    sprayer = client_at(app, "10.10.2.66")
    assert [login(sprayer, f"s10name{i}", "guess guess").status_code for i in range(5)] == [401] * 4 + [429]
    assert len(audit_rows(app, "login_throttled", "s10name4")) == 1
    assert login(client_at(app, "10.10.2.1"), "s10bob").status_code == 302


def test_failed_login_audit_rows_are_bounded_and_success_resets(app, monkeypatch):
    monkeypatch.setitem(app.config, "LOGIN_MAX_FAILURES", 3)
    users.create_user(catalog_of(app), "s10carol", PASSWORD)
    client = client_at(app, "10.10.3.1")
    assert [login(client, "s10carol", "nope nope").status_code for _ in range(2)] == [401, 401]
    assert login(client, "s10carol").status_code == 302  # a success forgives earlier failures
    codes = [login(client_at(app, "10.10.3.1"), "s10carol", "nope nope").status_code for _ in range(12)]
    assert codes == [401] * 3 + [429] * 9
    assert len(audit_rows(app, "login_failed", "s10carol")) == 5
    assert len(audit_rows(app, "login_throttled", "s10carol")) == 1


# -- 11: operator errors (web) -----------------------------------------------------------


def test_error_messages_hide_server_paths_and_memory_addresses(app):
    message = "cannot open /srv/archive/2024/case 1/x.svs: <openslide.OpenSlide object at 0x7f3a2c1d9e50> at /srv/idx/shard_1.faiss"
    assert public_message(message) == "cannot open case 1/x.svs: <openslide.OpenSlide object> at shard_1.faiss"
    assert (
        public_message("see http://127.0.0.1:8000/api/v1/slides and relative/x.svs")
        == "see http://127.0.0.1:8000/api/v1/slides and relative/x.svs"
    )
    users.create_user(catalog_of(app), "s11err", PASSWORD)
    client = token_client(app, "s11err")
    with catalog_of(app).session() as s:
        slide_id = s.scalar(sa.select(models.Slide.id).where(models.Slide.path.like("%gone.svs")))
    for url in (
        f"/api/v1/slides/{slide_id}/thumbnail.jpg",
        f"/tiles/{slide_id}.dzi",
        f"/api/v1/slides/{slide_id}/region.jpg",
    ):
        response = client.get(url)
        assert 400 <= response.status_code < 500, (url, response.status_code)
        text = response.json["message"]
        assert str(app.config["TMP"]) not in text and not re.search(r"0x[0-9a-f]{6,}", text), text
        assert "gone.svs" in text  # still says which slide


def test_archive_search_text_is_not_a_like_pattern(app):
    users.create_user(catalog_of(app), "s11like", PASSWORD)
    client = token_client(app, "s11like")

    def names(q):
        return sorted(
            s["name"] for s in client.get("/api/v1/slides", query_string={"q": q, "per_page": 500}).json["slides"]
        )

    assert names("_7") == ["case_7.svs"]
    assert names("%") == ["case7.svs"]  # its label is "100% tumour"
    assert names("\\") == []
    assert client.get("/archive?q=_").status_code == 200


def test_pages_and_api_are_no_store_static_files_cacheable(app):
    users.create_user(catalog_of(app), "s11cache", PASSWORD)
    client = client_at(app, "10.11.0.1")
    assert client.get("/login").headers["Cache-Control"] == "no-store"
    assert login(client, "s11cache").status_code == 302
    for url in ("/", "/archive", "/api/v1/me", "/api/v1/slides", "/api/v1/slides/999999"):
        assert client.get(url).headers.get("Cache-Control") == "no-store", url
    static = client.get("/static/style.css") if os.path.exists(os.path.join(app.static_folder, "style.css")) else None
    if static is None:
        name = next(
            n for n in sorted(os.listdir(app.static_folder)) if os.path.isfile(os.path.join(app.static_folder, n))
        )
        static = client.get(f"/static/{name}")
    assert static.status_code == 200 and "no-store" not in static.headers.get("Cache-Control", "")


def test_gunicorn_options_bound_requests_and_own_no_shared_control_socket():
    options = gunicorn_options("127.0.0.1", 8000, 2, 16, 120, False)
    assert options["control_socket_disable"] is True and "control_socket" not in options
    assert options["limit_request_line"] >= 8190 and options["limit_request_fields"] <= 100
    chosen = gunicorn_options("127.0.0.1", 8000, 2, 16, 120, False, control_socket="/run/hs/a.ctl")
    assert chosen["control_socket_disable"] is False and chosen["control_socket"] == "/run/hs/a.ctl"


# -- server level: real gunicorn ------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(tmp_path, catalog_url, *, threads: int, env_extra: dict):
    port = free_port()
    home = tmp_path / "home"
    (home / "run").mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "HOME": str(home),
        "XDG_RUNTIME_DIR": str(home / "run"),
        "HISTOSEEK_INSTANCE_DIR": str(tmp_path / "instance"),
        **env_extra,
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
        "1",
        "--threads",
        str(threads),
        "--catalog",
        catalog_url,
        "--index-dir",
        str(tmp_path / "index"),
        "--encoder",
        "random:resnet18",
        "--device",
        "cpu",
    ]
    log = open(tmp_path / f"server-{port}.log", "w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(base + "/login", timeout=2).read()
            return proc, port, log
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail("the web server did not start:\n" + (tmp_path / f"server-{port}.log").read_text()[-3000:])
            time.sleep(0.3)


def stop_server(proc, log):
    os.killpg(proc.pid, signal.SIGINT)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    log.close()


def slow_body(port: int) -> socket.socket:
    """A POST /login that announces 1,000 bytes of body and sends one."""
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(
        "POST /login HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: 1000\r\n\r\nu".encode()
    )
    return sock


@pytest.mark.slow
def test_slow_bodies_do_not_stall_the_server_and_no_control_socket_is_taken(tmp_path):
    url = f"sqlite:///{tmp_path / 'catalog.sqlite'}"
    proc, port, log = start_server(tmp_path, url, threads=4, env_extra={"HISTOSEEK_REQUEST_BODY_TIMEOUT": "2"})
    try:
        # gunicorn >= 25 would have created its shared control socket here
        assert not (tmp_path / "home" / "run" / "gunicorn.ctl").exists()
        assert not (tmp_path / "home" / ".gunicorn").exists()
        slow = [slow_body(port) for _ in range(10)]
        done = threading.Event()

        def trickle():  # a byte each, twice a second: alive, but never finished
            while not done.wait(0.5):
                for sock in slow:
                    try:
                        sock.send(b"u")
                    except OSError:
                        pass

        threading.Thread(target=trickle, daemon=True).start()
        time.sleep(0.5)  # all ten are inside the app, waiting for their bodies
        started = time.monotonic()
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/login", timeout=30) as response:
            assert response.status == 200
        waited = time.monotonic() - started
        done.set()
        # 10 slow bodies on 4 threads, each dropped after 2 s: three rounds at most
        assert waited < 8, waited
        answers = []
        for sock in slow:
            sock.settimeout(10)
            answers.append(sock.recv(100).split(b" ", 2)[1])
            sock.close()
        assert answers == [b"408"] * 10, answers
    finally:
        stop_server(proc, log)


def test_login_counter_starts_over_after_its_window(app):
    catalog = catalog_of(app)
    keys = users.throttle_keys("s10window", "10.10.4.1")
    window = dt.timedelta(minutes=5)
    assert users.count_login_try(catalog, keys, window) == [1, 1]
    assert users.count_login_try(catalog, keys, window) == [2, 2]
    with catalog.session() as s:  # as if the last try were six minutes ago
        six_minutes_ago = dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=6)
        s.execute(
            sa.update(models.LoginThrottle)
            .where(models.LoginThrottle.key.in_(keys))
            .values(window_start=six_minutes_ago)
        )
    assert users.count_login_try(catalog, keys, window) == [1, 1]
    assert users.count_login_try(catalog, keys, window) == [2, 2]
