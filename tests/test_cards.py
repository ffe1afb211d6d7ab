"""Encoder cards: a timm ViT from a card computes what timm computes, pools as documented,
loads every weights layout, refuses downloads, and the presets build (on the meta device)."""

from __future__ import annotations

import socket

import numpy as np
import pytest
import torch

timm = pytest.importorskip("timm")

from engine.card_models import PRESET_DIMS, preset_names  # noqa: E402
from engine.cards import CardEncoder, build_card_model, card_dim, card_from_spec, is_card_spec, load_card, preset_card  # noqa: E402
from engine.errors import EncoderError  # noqa: E402
from engine.files import file_sha256  # noqa: E402
from tests.checkpoints import VIT_ARCH as ARCH  # noqa: E402
from tests.checkpoints import vit_model as make_model  # noqa: E402
from tests.checkpoints import write_card  # noqa: E402

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def rel_err(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def vit(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vit")
    model = make_model()
    torch.save(model.state_dict(), folder / "weights.pth")
    return model, folder


@pytest.fixture(scope="module")
def batch():
    g = torch.Generator().manual_seed(0)
    low = torch.randint(0, 256, (2, 3, 14, 14), generator=g, dtype=torch.uint8).float()
    return torch.nn.functional.interpolate(low, size=(224, 224), mode="bilinear").round().clamp(0, 255).to(torch.uint8)


def reference_input(batch):
    return (batch.float() / 255 - MEAN) / STD


def test_card_fp32_equals_timm_and_auto_stays_close(vit, batch):
    model, folder = vit
    card_path = write_card(folder)
    with torch.no_grad():
        reference = model(reference_input(batch)).numpy()
    exact = CardEncoder.from_spec(str(card_path), device="cpu", precision="fp32")
    out = exact.embed(batch)
    assert out.shape == (2, 384) and out.dtype == np.float32 and exact.dim == 384
    assert rel_err(out, reference) < 1e-4
    info = exact.info
    assert info.checkpoint_sha256 == file_sha256(folder / "weights.pth")
    assert (info.name, info.architecture, info.layout, info.mpp, info.input_px) == (
        "vit-s-test",
        ARCH,
        "card",
        0.5,
        224,
    )
    assert info.normalisation == {
        "mean": [0.485, 0.456, 0.406],
        "std": [0.229, 0.224, 0.225],
        "input_px": 224,
        "pooling": "model",
    }

    fast = CardEncoder.from_spec(str(card_path), device="cpu", precision="auto")
    fast.warm_up()
    got = fast.embed(batch)
    cos = (got * reference).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(reference, axis=1)
    assert got.shape == (2, 384) and cos.min() > 0.999
    # tiles of another size are resized to input_px first
    assert fast.embed(torch.nn.functional.interpolate(batch.float(), size=(256, 256)).to(torch.uint8)).shape == (2, 384)
    assert fast.embed(batch[:0]).shape == (0, 384)
    with pytest.raises(EncoderError, match="int8"):
        CardEncoder.from_spec(str(card_path), device="cpu", precision="int8")


def test_cls_and_cls_mean_pooling_equal_a_hand_computation(vit, batch):
    model, folder = vit
    x = reference_input(batch)
    with torch.no_grad():
        tokens = model.forward_features(x)
    cls, _ = build_card_model(load_card(write_card(folder, "cls.json", pooling="cls")))
    both, info = build_card_model(load_card(write_card(folder, "both.json", pooling="cls+mean")))
    with torch.no_grad():
        assert torch.allclose(cls(x), tokens[:, 0], rtol=1e-4, atol=1e-5)
        assert torch.allclose(both(x), torch.cat([tokens[:, 0], tokens[:, 1:].mean(1)], -1), rtol=1e-4, atol=1e-5)
    assert info.dim == 768 and info.pooling == "cls+mean"


def test_cls_mean_excludes_register_tokens(tmp_path, batch):
    model = make_model(seed=3, depth=2, reg_tokens=4, no_embed_class=True)
    assert model.num_prefix_tokens == 5
    torch.save(model.state_dict(), tmp_path / "weights.pth")
    kwargs = {"num_classes": 0, "depth": 2, "reg_tokens": 4, "no_embed_class": True}
    pooled, info = build_card_model(load_card(write_card(tmp_path, kwargs=kwargs, pooling="cls+mean")))
    x = reference_input(batch)
    with torch.no_grad():
        tokens = model.forward_features(x)
        hand = torch.cat([tokens[:, 0], tokens[:, 5:].mean(1)], -1)
        assert torch.allclose(pooled(x), hand, rtol=1e-4, atol=1e-5)
    assert info.dim == 768


def test_safetensors_and_a_state_dict_under_a_key_load_the_same_weights(vit, batch, tmp_path):
    from safetensors.torch import save_file

    model, folder = vit
    save_file(model.state_dict(), str(tmp_path / "model.safetensors"))
    torch.save({"model": model.state_dict(), "epoch": 3}, tmp_path / "ckpt.pth")
    x = reference_input(batch)
    with torch.no_grad():
        reference = model(x)
        for fields in (
            {"weights": "model.safetensors"},
            {"weights": str(tmp_path / "ckpt.pth"), "state_dict_key": "model"},
        ):
            pooled, info = build_card_model(load_card(write_card(tmp_path, **fields)))
            assert torch.allclose(pooled(x), reference, rtol=1e-5, atol=1e-6)
            assert info.checkpoint_sha256 == file_sha256(tmp_path / fields["weights"])
    with pytest.raises(EncoderError, match="state_dict_key"):
        build_card_model(load_card(write_card(tmp_path, weights="ckpt.pth")))
    with pytest.raises(EncoderError, match="has no key 'nope'"):
        build_card_model(load_card(write_card(tmp_path, weights="ckpt.pth", state_dict_key="nope")))


def test_missing_and_unexpected_keys_are_named(vit, tmp_path):
    model, _ = vit
    state = dict(model.state_dict())
    del state["blocks.0.attn.qkv.weight"]
    state["extra.weight"] = torch.zeros(3)
    torch.save(state, tmp_path / "weights.pth")
    with pytest.raises(EncoderError) as err:
        build_card_model(load_card(write_card(tmp_path)))
    assert "blocks.0.attn.qkv.weight" in str(err.value) and "extra.weight" in str(err.value)
    assert "card.json" in str(err.value)
    # ignore_keys drops what the card says is not the backbone (and records it)
    state = dict(model.state_dict(), **{"extra.weight": torch.zeros(3)})
    torch.save(state, tmp_path / "weights.pth")
    _, info = build_card_model(load_card(write_card(tmp_path, ignore_keys=["extra."])))
    assert info.dropped_keys == ("extra.weight",)
    state = dict(model.state_dict(), **{"pos_embed": torch.zeros(1, 50, 384)})
    torch.save(state, tmp_path / "weights.pth")
    with pytest.raises(EncoderError, match="pos_embed"):
        build_card_model(load_card(write_card(tmp_path)))


@pytest.mark.parametrize(
    "fields, field",
    [
        ({"kwargs": {"pretrained": True}}, "kwargs.pretrained"),
        ({"kwargs": {"pretrained_cfg_overlay": {"file": "x"}}}, "kwargs.pretrained_cfg_overlay"),
        ({"architecture": "hf-hub:MahmoodLab/UNI"}, "architecture"),
        ({"weights": "hf-hub:MahmoodLab/UNI"}, "weights"),
    ],
)
def test_downloads_are_refused_with_a_pointer_to_the_weights_file(tmp_path, fields, field):
    with pytest.raises(EncoderError) as err:
        load_card(write_card(tmp_path, **fields))
    message = str(err.value)
    assert f"field {field!r}" in message and "card.json" in message and "weights file" in message


@pytest.mark.parametrize(
    "fields, field",
    [
        ({"mean": [0.5, 0.5]}, "mean"),
        ({"std": [124, 116, 104]}, "std"),
        ({"pooling": "avg"}, "pooling"),
        ({"input_px": "224"}, "input_px"),
        ({"library": "open_clip"}, "library"),
        ({"kwargs": {"mlp_layer": "Bogus"}}, "kwargs.mlp_layer"),
        ({"wieghts": "x.pth"}, "wieghts"),
        ({"weights": "model.onnx"}, "weights"),
    ],
)
def test_bad_fields_name_the_file_and_the_field(tmp_path, fields, field):
    with pytest.raises(EncoderError, match=f"card.json: field '{field}'"):
        load_card(write_card(tmp_path, **fields))


def test_build_errors_name_the_field(vit, tmp_path):
    _, folder = vit
    with pytest.raises(EncoderError, match="field 'input_px'"):
        build_card_model(load_card(write_card(folder, "px.json", input_px=256)))
    with pytest.raises(EncoderError, match="field 'architecture'.*vit_small_patch16_224"):
        build_card_model(load_card(write_card(folder, "arch.json", architecture="vit_smal_patch16_224")))
    with pytest.raises(EncoderError, match="field 'pooling'.*'cls' or 'cls\\+mean'"):
        card_dim(load_card(write_card(tmp_path, kwargs={"num_classes": 0, "global_pool": ""})))
    with pytest.raises(EncoderError, match="field 'weights'.*not found"):
        build_card_model(load_card(write_card(tmp_path, weights="absent.pth")))


def test_building_a_card_touches_no_network(vit, batch, monkeypatch):
    _, folder = vit

    def refuse(*args, **kwargs):
        raise AssertionError("network access while building a card")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    encoder = CardEncoder.from_spec(str(write_card(folder, "net.json")), device="cpu", precision="fp32")
    assert encoder.embed(batch).shape == (2, 384)


def test_preset_specs():
    card = card_from_spec("preset:UNI:/models/uni/pytorch_model.bin")
    assert (card.name, card.architecture, str(card.weights), card.source) == (
        "UNI",
        "vit_large_patch16_224",
        "/models/uni/pytorch_model.bin",
        "preset:uni",
    )
    assert card_from_spec("preset:gigapath:/w.bin").name == "Prov-GigaPath"
    assert (
        is_card_spec("preset:uni:/w.bin")
        and is_card_spec("cards/uni.json")
        and not is_card_spec("random")
        and not is_card_spec("best_ckpt.pth")
    )
    with pytest.raises(EncoderError, match="virchow2"):
        card_from_spec("preset:virchow3:/w.bin")
    with pytest.raises(EncoderError, match="preset:NAME:WEIGHTS_PATH"):
        card_from_spec("preset:uni")


@pytest.mark.parametrize("name", preset_names())
def test_preset_builds_on_the_meta_device_with_its_published_width(name):
    card = preset_card(name, "/nowhere/weights.bin")
    assert card_dim(card) == PRESET_DIMS[name]
    with torch.device("meta"):
        from engine.cards import create_backbone

        model = create_backbone(card)
    assert model.patch_embed.img_size == (224, 224)
    if name == "virchow2":
        assert model.num_prefix_tokens == 5


def test_engine_features_with_a_card_equals_timm(vit, tmp_path):
    """The whole command: `engine features --encoder CARD.json --precision fp32` on image
    files gives what timm's own forward gives for the same pixels."""
    from click.testing import CliRunner
    from PIL import Image

    from engine.cli.main import main

    model, folder = vit
    card = write_card(folder, filename="features-card.json")
    tiles = tmp_path / "tiles"
    tiles.mkdir()
    rng = np.random.default_rng(3)
    arrays = []
    for i in range(3):
        low = rng.integers(0, 256, (14, 14, 3), dtype=np.uint8)
        arr = np.asarray(Image.fromarray(low).resize((224, 224), Image.Resampling.BILINEAR))
        Image.fromarray(arr).save(tiles / f"t{i}.png")
        arrays.append(arr)
    out = tmp_path / "f.npy"
    args = ["features", str(tiles), "--encoder", str(card), "--precision", "fp32", "--out", str(out), "--workers", "0"]
    result = CliRunner().invoke(main, [*args, "--data-dir", str(tmp_path)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    batch = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
    with torch.no_grad():
        expected = model(reference_input(batch)).numpy()
    assert rel_err(np.load(out), expected) < 1e-4
