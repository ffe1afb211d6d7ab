"""Commands read settings through engine.config.Settings (issue 12): `indexer preview` draws
the tiles of the size and resolution `indexer build` would embed, HISTOSEEK_* included."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from click.testing import CliRunner

import indexer.preview
from indexer.cli import main as indexer_cli


@pytest.fixture
def fake_preview(monkeypatch):
    """preview_slide replaced by a recorder: these tests are about the settings it gets."""
    calls = []

    def record(slide, **kwargs):
        calls.append(kwargs)
        return SimpleNamespace(
            image=SimpleNamespace(save=lambda out: None), tiles=[], tissue_fraction=0.0, mpp=0.5, mpp_source="metadata"
        )

    monkeypatch.setattr(indexer.preview, "preview_slide", record)
    for name in ("HISTOSEEK_TARGET_MPP", "HISTOSEEK_TILE_PX"):
        monkeypatch.delenv(name, raising=False)
    return calls


def run_preview(tmp_path, *flags, env=None):
    slide = tmp_path / "slide.tiff"
    slide.write_bytes(b"not read: preview_slide is replaced")
    return CliRunner().invoke(indexer_cli, ["preview", str(slide), "--out", str(tmp_path / "p.png"), *flags], env=env)


def test_preview_reads_target_mpp_and_tile_px_from_the_environment(tmp_path, fake_preview):
    result = run_preview(tmp_path, env={"HISTOSEEK_TARGET_MPP": "0.5", "HISTOSEEK_TILE_PX": "256"})
    assert result.exit_code == 0, result.output
    assert (fake_preview[0]["target_mpp"], fake_preview[0]["tile_px"]) == (0.5, 256)
    assert "tiles of 256 px at 0.5 um/px" in result.output


def test_preview_flags_beat_the_environment_and_defaults_are_builds(tmp_path, fake_preview):
    assert run_preview(tmp_path, "--tile-px", "112", env={"HISTOSEEK_TILE_PX": "256"}).exit_code == 0
    assert run_preview(tmp_path).exit_code == 0
    assert [(c["target_mpp"], c["tile_px"]) for c in fake_preview] == [(1.0, 112), (1.0, 224)]


def test_preview_refuses_a_bad_environment_value_cleanly(tmp_path, fake_preview):
    result = run_preview(tmp_path, env={"HISTOSEEK_TARGET_MPP": "fine"})
    assert result.exit_code == 1 and "bad number in settings" in result.output and not fake_preview
