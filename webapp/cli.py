"""`histoseek-web`: serve the web app with gunicorn and manage its users."""

from __future__ import annotations

import sys

import click

from engine.cli.common import handle_errors, run_edge, settings_options, setup_logging
from engine.config import Settings
from engine.errors import QueryError


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("-v", "--verbose", count=True, help="More logging.")
def main(verbose: int) -> None:
    """histoseek web app: search the archive in a browser or through the JSON API.

    Every page needs a login: create the first user with `histoseek-web users add NAME --admin`,
    then `histoseek-web serve`. Settings come from flags, then HISTOSEEK_* environment
    variables, then defaults; the web app's own settings (upload limits, login throttling,
    ...) also from histoseek.cfg in its instance folder (HISTOSEEK_INSTANCE_DIR, default
    <data dir>/webapp). docs/webapp.md lists them.
    """
    setup_logging(verbose)


def _catalog(settings: Settings):
    from engine.catalog import Catalog

    return run_edge(Catalog, settings.catalog_url)


@main.command()
@click.option(
    "--host", default="127.0.0.1", show_default=True, help="Address to listen on (127.0.0.1: this machine only)."
)
@click.option("--port", default=8000, show_default=True, help="TCP port.")
@click.option(
    "--workers", default=2, show_default=True, help="gunicorn worker processes (each loads the encoder and index)."
)
@click.option(
    "--threads", default=16, show_default=True, help="Threads per worker (slide tiles are served concurrently)."
)
@click.option("--timeout", default=120, show_default=True, help="Seconds before a silent worker is restarted.")
@click.option("--access-log/--no-access-log", default=False, help="Log each request to stderr.")
@click.option(
    "--control-socket",
    type=click.Path(dir_okay=False),
    default=None,
    help="Open gunicorn's control socket (gunicornc) at this path; off by default.",
)
@settings_options
@handle_errors
def serve(host, port, workers, threads, timeout, access_log, control_socket, settings: Settings) -> None:
    """Serve the web app with gunicorn (gthread workers) until interrupted.

    Example: histoseek-web serve --catalog sqlite:///archive/catalog.sqlite --index-dir archive/index --port 8000

    Anyone but this machine should reach it through a reverse proxy that terminates TLS and
    buffers request bodies (docs/webapp.md has an nginx example; then set
    HISTOSEEK_TRUSTED_PROXIES=1).
    """
    from webapp import load_config
    from webapp.server import run_gunicorn

    _catalog(settings).dispose()  # bring the schema to head once, before workers start
    # what every worker reads again (webapp.create_app): a bad setting stops here, with one
    # message, and the instance folder's secret key exists before the workers start
    load_config({"SETTINGS": settings})
    click.echo(
        f"histoseek web app on http://{host}:{port}/  (catalog {settings.catalog_url}, encoder {settings.encoder or 'not set'})",
        err=True,
    )
    run_gunicorn(
        settings,
        host=host,
        port=port,
        workers=workers,
        threads=threads,
        timeout=timeout,
        access_log=access_log,
        control_socket=control_socket,
    )


@main.group()
def users() -> None:
    """Create users, set passwords, issue API tokens, revoke and disable users."""


@users.command("add")
@click.argument("username")
@click.option("--admin", is_flag=True, help="May read the audit log.")
@click.option("--password-stdin", is_flag=True, help="Read the password from standard input instead of prompting.")
@settings_options
@handle_errors
def users_add(username, admin, password_stdin, settings: Settings) -> None:
    """Create USERNAME (asks for a password of at least 8 characters)."""
    from webapp import users as u

    password = _read_password(password_stdin)
    try:
        u.create_user(_catalog(settings), username, password, is_admin=admin)
    except QueryError as exc:
        raise click.BadParameter(str(exc)) from None
    click.echo(f"created user {username}{' (admin)' if admin else ''}")


@users.command("passwd")
@click.argument("username")
@click.option("--password-stdin", is_flag=True, help="Read the password from standard input instead of prompting.")
@settings_options
@handle_errors
def users_passwd(username, password_stdin, settings: Settings) -> None:
    """Set a new password for USERNAME."""
    from webapp import users as u

    try:
        u.set_password(_catalog(settings), username, _read_password(password_stdin))
    except QueryError as exc:
        raise click.BadParameter(str(exc)) from None
    click.echo(f"password of {username} changed")


@users.command("token")
@click.argument("username")
@settings_options
@handle_errors
def users_token(username, settings: Settings) -> None:
    """Print a new API token for USERNAME (replaces the old one; store it, it is shown once).

    Use it as `curl -H "Authorization: Bearer TOKEN" http://127.0.0.1:8000/api/v1/slides`.
    """
    from webapp import users as u

    click.echo(u.issue_token(_catalog(settings), username))


@users.command("revoke")
@click.argument("username")
@settings_options
@handle_errors
def users_revoke(username, settings: Settings) -> None:
    """End every session of USERNAME (all browsers, copied cookies too) and drop its API token.

    The user can log in again with their password; to stop that too, `users disable`.
    """
    from webapp import users as u

    u.revoke(_catalog(settings), username)
    click.echo(f"sessions and API token of {username} revoked")


@users.command("disable")
@click.argument("username")
@settings_options
@handle_errors
def users_disable(username, settings: Settings) -> None:
    """Disable USERNAME: no login, session or API token of it works until `users enable`."""
    from webapp import users as u

    u.set_disabled(_catalog(settings), username, True)
    click.echo(f"{username} disabled")


@users.command("enable")
@click.argument("username")
@settings_options
@handle_errors
def users_enable(username, settings: Settings) -> None:
    """Enable USERNAME again (it logs in anew: its old sessions stay ended)."""
    from webapp import users as u

    u.set_disabled(_catalog(settings), username, False)
    click.echo(f"{username} enabled")


@users.command("list")
@settings_options
@handle_errors
def users_list(settings: Settings) -> None:
    """List users: name, role, API token, created, and whether disabled."""
    from webapp import users as u

    for user in u.list_users(_catalog(settings)):
        state = "disabled" if user.disabled else "active"
        click.echo(
            f"{user.username}\t{'admin' if user.is_admin else 'user'}\t{'token' if user.api_token_hash else 'no token'}\t{user.created_at:%Y-%m-%d}\t{state}"
        )


def _read_password(from_stdin: bool) -> str:
    if from_stdin:
        return sys.stdin.readline().rstrip("\n")
    return click.prompt("Password", hide_input=True, confirmation_prompt=True)


if __name__ == "__main__":
    main()
