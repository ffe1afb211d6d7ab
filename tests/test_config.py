import pytest

from engine.config import Settings
from engine.errors import ConfigError


def test_defaults_live_under_the_data_dir(tmp_path):
    s = Settings.load(env={"HISTOSEEK_DATA_DIR": str(tmp_path)})
    assert s.catalog_url == f"sqlite:///{tmp_path / 'catalog.sqlite'}"
    assert s.index_dir == tmp_path / "index"
    assert (s.target_mpp, s.tile_px, s.device, s.precision) == (1.0, 224, "auto", "auto")
    assert s.encoder is None


def test_flags_beat_environment_beat_defaults(tmp_path):
    env = {"HISTOSEEK_CATALOG": "sqlite:///env.sqlite", "HISTOSEEK_ENCODER": "random", "HISTOSEEK_TILE_PX": "256"}
    s = Settings.load(env=env, data_dir=str(tmp_path), catalog_url="sqlite:///flag.sqlite")
    assert s.catalog_url == "sqlite:///flag.sqlite"
    assert s.encoder == "random"
    assert s.tile_px == 256


def test_released_weights_in_the_data_dir_are_the_default_encoder(tmp_path):
    weights = tmp_path / "weights" / "best_ckpt.pth"
    weights.parent.mkdir()
    weights.write_bytes(b"x")
    assert Settings.load(env={}, data_dir=str(tmp_path)).encoder == str(weights)


def test_missing_encoder_says_where_the_weights_go(tmp_path):
    s = Settings.load(env={}, data_dir=str(tmp_path))
    with pytest.raises(ConfigError, match="best_ckpt.pth"):
        s.require_encoder()


@pytest.mark.parametrize(
    "env", [{"HISTOSEEK_PRECISION": "fp16"}, {"HISTOSEEK_TARGET_MPP": "abc"}, {"HISTOSEEK_TILE_PX": "0"}]
)
def test_bad_settings_are_refused(tmp_path, env):
    with pytest.raises(ConfigError):
        Settings.load(env=env, data_dir=str(tmp_path))


def test_unknown_flag_is_a_programming_error():
    with pytest.raises(ValueError):
        Settings.load(env={}, colour="red")


def test_instance_dir_is_under_the_data_dir_unless_named(tmp_path):
    assert Settings.load(env={}, data_dir=str(tmp_path)).instance_dir == tmp_path / "webapp"
    assert (
        Settings.load(env={"HISTOSEEK_INSTANCE_DIR": str(tmp_path / "inst")}, data_dir=str(tmp_path)).instance_dir
        == tmp_path / "inst"
    )
    built = Settings(data_dir=tmp_path, catalog_url="sqlite://", index_dir=tmp_path / "index", encoder=None)
    assert built.instance_dir == tmp_path / "webapp"


def test_the_grid_is_the_encoders_unless_overridden(tmp_path):
    from types import SimpleNamespace

    card = SimpleNamespace(mpp=0.5, input_px=256)
    retccl = SimpleNamespace(name="retccl")  # EncoderInfo: no mpp, no input_px
    plain = Settings.load(env={}, data_dir=str(tmp_path))
    assert (plain.target_mpp_given, plain.tile_px_given) == (None, None)
    assert plain.grid_for(card) == (0.5, 256) and plain.grid_for(retccl) == (1.0, 224) == plain.grid_for()
    assert plain.grid_source(card) == {"target_mpp": "encoder", "tile_px": "encoder"}
    flagged = Settings.load(env={"HISTOSEEK_TILE_PX": "512"}, data_dir=str(tmp_path), target_mpp=1.0)
    assert flagged.grid_for(card) == (1.0, 512) and (flagged.target_mpp, flagged.tile_px) == (1.0, 512)
    assert flagged.grid_source(card) == {"target_mpp": "override", "tile_px": "override"}
    # an override equal to the encoder's own grid is the encoder's grid
    assert flagged.grid_source(retccl) == {"target_mpp": "encoder", "tile_px": "override"}
