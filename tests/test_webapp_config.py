"""One configuration for the web app (issue 12): `histoseek-web serve` and gunicorn's
`webapp:create_app()` read the same settings, in one function (webapp.load_config), with the
instance folder (secret key, histoseek.cfg) under the data dir the command was given; and
errors of the server's set-up reach web users in words meant for them."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

import engine.errors as E
from engine.config import Settings
from engine.errors import ConfigError
from tests.test_webapp import PASSWORD
from webapp import create_app, errors, load_config, server, users
from webapp.cli import main as web_cli
from webapp.state import AppState


@pytest.fixture
def clean_env(tmp_path, monkeypatch):
    """No HISTOSEEK_* variables from the caller; the default data dir lies under tmp_path."""
    import os

    for name in list(os.environ):
        if name.startswith("HISTOSEEK_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    return tmp_path / "xdg" / "histoseek"


def serve_and_build_worker_app(monkeypatch, *args):
    """Run `histoseek-web serve ARGS` with gunicorn replaced by what one of its workers does
    (HistoseekServer.load): the CLI result and the worker's app."""
    seen = {}

    def fake_run_gunicorn(settings, *, app_config=None, **options):
        monkeypatch.setattr(server, "warm_search_engine", lambda app: None)
        seen["app"] = server.HistoseekServer(settings, {}, app_config).load()

    monkeypatch.setattr(server, "run_gunicorn", fake_run_gunicorn)
    result = CliRunner().invoke(web_cli, ["serve", *args, "--encoder", "random:resnet18", "--device", "cpu"])
    return result, seen.get("app")


def dispose(*apps):
    for app in apps:
        if app is not None:
            app.extensions["histoseek"].catalog.dispose()


def test_serve_data_dir_holds_the_instance_folder_and_secret_key(clean_env, tmp_path, monkeypatch):
    data = tmp_path / "archive-data"
    result, app = serve_and_build_worker_app(monkeypatch, "--data-dir", str(data))
    try:
        assert result.exit_code == 0, result.output
        key = data / "webapp" / "secret_key"
        assert key.is_file()
        assert not (clean_env / "webapp").exists()  # the default data dir is left alone
        assert app.instance_path == str((data / "webapp").resolve())
        assert app.config["SECRET_KEY"] == key.read_text().strip()
    finally:
        dispose(app)


def test_histoseek_cfg_and_environment_apply_alike_under_serve_and_gunicorn(clean_env, tmp_path, monkeypatch):
    data = tmp_path / "archive-data"
    (data / "webapp").mkdir(parents=True)
    (data / "webapp" / "histoseek.cfg").write_text("MAX_TOP_K = 7\nLOGIN_MAX_FAILURES = 3\nSLIDES_PER_PAGE = 40\n")
    monkeypatch.setenv("HISTOSEEK_SLIDES_PER_PAGE", "20")  # the environment beats the file
    monkeypatch.setenv("HISTOSEEK_SESSION_COOKIE_SECURE", "true")
    result, served = serve_and_build_worker_app(monkeypatch, "--data-dir", str(data))
    assert result.exit_code == 0, result.output
    # gunicorn 'webapp:create_app()' with the same settings in the environment
    monkeypatch.setenv("HISTOSEEK_DATA_DIR", str(data))
    monkeypatch.setenv("HISTOSEEK_ENCODER", "random:resnet18")
    monkeypatch.setenv("HISTOSEEK_DEVICE", "cpu")
    direct = create_app()
    try:
        for app in (served, direct):
            assert (app.config["MAX_TOP_K"], app.config["LOGIN_MAX_FAILURES"], app.config["SLIDES_PER_PAGE"]) == (
                7,
                3,
                20,
            )
            assert app.config["SESSION_COOKIE_SECURE"] is True
        for name in ("SECRET_KEY", "INSTANCE_PATH", "MAX_CONTENT_LENGTH", "TRUSTED_PROXIES"):
            assert served.config[name] == direct.config[name], name
        assert served.config["SETTINGS"] == direct.config["SETTINGS"]
    finally:
        dispose(served, direct)


def test_engine_settings_in_histoseek_cfg_are_refused_by_both_entry_points(clean_env, tmp_path, monkeypatch):
    # gunicorn used CATALOG from the file and `serve` ignored it: now neither reads it
    data = tmp_path / "archive-data"
    (data / "webapp").mkdir(parents=True)
    (data / "webapp" / "histoseek.cfg").write_text(f"CATALOG = 'sqlite:///{tmp_path / 'other.sqlite'}'\n")
    result, app = serve_and_build_worker_app(monkeypatch, "--data-dir", str(data))
    assert result.exit_code == 1 and app is None
    assert "HISTOSEEK_CATALOG" in result.output
    monkeypatch.setenv("HISTOSEEK_DATA_DIR", str(data))
    with pytest.raises(ConfigError, match="HISTOSEEK_CATALOG"):
        create_app()


@pytest.mark.parametrize(
    "cfg, env, message",
    [
        ("MAX_TOP_KK = 5\n", {}, "unknown setting MAX_TOP_KK"),
        ("", {"HISTOSEEK_MAX_TOP_K": "many"}, "HISTOSEEK_MAX_TOP_K must be a whole number"),
        ("", {"HISTOSEEK_SESSION_COOKIE_SECURE": "yes"}, "must be true or false"),
        ("MAX_UPLOAD_PIXELS = 'a lot'\n", {}, "must be a whole number"),
    ],
)
def test_bad_web_settings_fail_at_start_naming_their_source(tmp_path, cfg, env, message):
    settings = Settings.load(env={}, data_dir=str(tmp_path), encoder="random:resnet18")
    settings.instance_dir.mkdir(parents=True)
    (settings.instance_dir / "histoseek.cfg").write_text(cfg)
    with pytest.raises(ConfigError, match=message):
        load_config({"SETTINGS": settings}, env=env)


def test_documented_environment_settings_are_read(tmp_path):
    settings = Settings.load(env={}, data_dir=str(tmp_path), encoder="random:resnet18")
    env = {
        "HISTOSEEK_TRUSTED_PROXIES": "1",
        "HISTOSEEK_REQUEST_BODY_TIMEOUT": "2",
        "HISTOSEEK_MAX_CONTENT_LENGTH": "1048576",
        "HISTOSEEK_PERMANENT_SESSION_LIFETIME": "3600",
        "HISTOSEEK_TEST_POSTGRES": "not a web setting",
    }
    config = load_config({"SETTINGS": settings}, env=env)
    assert (config["TRUSTED_PROXIES"], config["REQUEST_BODY_TIMEOUT"], config["MAX_CONTENT_LENGTH"]) == (1, 2, 1048576)
    assert config["PERMANENT_SESSION_LIFETIME"].total_seconds() == 3600
    assert "TEST_POSTGRES" not in config
    assert config["INSTANCE_PATH"] == str((tmp_path / "webapp").resolve())


def test_instance_dir_environment_moves_the_instance_folder(tmp_path):
    settings = Settings.load(env={"HISTOSEEK_INSTANCE_DIR": str(tmp_path / "inst")}, data_dir=str(tmp_path / "data"))
    assert settings.instance_dir == tmp_path / "inst"
    config = load_config({"SETTINGS": settings}, env={})
    assert (tmp_path / "inst" / "secret_key").read_text().strip() == config["SECRET_KEY"]


# -- errors at the edge -------------------------------------------------------------------


def test_every_error_kind_has_a_status_and_set_up_problems_have_web_wording():
    kinds = [
        k
        for k in vars(E).values()
        if isinstance(k, type) and issubclass(k, E.HistoseekError) and k is not E.HistoseekError
    ]
    for kind in kinds:
        assert kind in errors.STATUS, kind
        if errors.STATUS[kind] >= 500:
            assert kind in errors.EDGE_MESSAGES, kind
    assert errors.status_for(E.QueryError("x")) == 422 and errors.status_for(E.ImageError("x")) == 400
    assert errors.status_for(E.NotFound("x")) == 404
    assert errors.status_for(E.EncoderError("x")) == errors.status_for(E.ConfigError("x")) == 503


def test_a_missing_encoder_is_told_to_web_users_without_cli_flags(tmp_path, monkeypatch):
    settings = Settings.load(env={}, data_dir=str(tmp_path / "data"), catalog_url=f"sqlite:///{tmp_path / 'c.sqlite'}")
    app = create_app({"TESTING": True, "SETTINGS": settings})
    try:
        users.create_user(app.extensions["histoseek"].catalog, "path", PASSWORD)
        monkeypatch.setattr(AppState, "search_engine", lambda self, encoder=None: settings.require_encoder())
        client = app.test_client()
        token = users.issue_token(app.extensions["histoseek"].catalog, "path")
        response = client.post(
            "/api/v1/search/slide", json={"slide_id": 1}, headers={"Authorization": f"Bearer {token}"}
        )
        assert response.status_code == 503 and response.json["error"] == "config"
        message = response.json["message"]
        assert "--encoder" not in message and "HISTOSEEK_" not in message and "administrator" in message
    finally:
        dispose(app)


def test_bad_user_names_and_passwords_are_query_errors(tmp_path):
    from engine.catalog import Catalog

    catalog = Catalog(f"sqlite:///{tmp_path / 'u.sqlite'}")
    try:
        with pytest.raises(E.QueryError, match="at least 8"):
            users.create_user(catalog, "dora", "short")
        with pytest.raises(E.QueryError, match="letters, digits"):
            users.create_user(catalog, "d", "long enough pw")
    finally:
        catalog.dispose()
