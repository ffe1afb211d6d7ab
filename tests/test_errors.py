"""Errors at the edges: the library names the setting that fixes a problem, the CLI words it
as its option, the web API never shows an option to a web user."""

from __future__ import annotations

import click
import pytest

from engine.cli.common import run_edge
from engine.errors import ConfigError


def refuse():
    raise ConfigError("cannot write to the index folder /x; choose a writable index folder", setting="index_dir")


def test_the_cli_names_the_option_of_the_setting():
    with pytest.raises(click.ClickException) as err:
        run_edge(refuse)
    assert err.value.message.endswith("choose a writable index folder (option --index-dir)")


def test_an_error_without_a_setting_reads_as_it_was_raised():
    with pytest.raises(click.ClickException) as err:
        run_edge(lambda: (_ for _ in ()).throw(ConfigError("plain")))
    assert err.value.message == "plain"


def test_the_web_api_shows_the_message_without_an_option():
    from webapp.errors import message_for

    text = message_for(ConfigError("the index folder cannot be written", setting="index_dir"))
    assert "--" not in text
