"""The encoder loads every accepted checkpoint layout and computes what torchvision computes."""

import logging

import numpy as np
import pytest
import torch

from engine.encoder import RELEASED_RETCCL_SHA256, Encoder, EncoderInfo, file_sha256, load_backbone
from engine.errors import EncoderError
from tests import checkpoints

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def torchvision_reference(model: torch.nn.Module, batch_uint8: torch.Tensor) -> np.ndarray:
    """What RetCCL's get_feature.py computes: ToTensor, ImageNet Normalize, fc = Identity."""
    model = model.eval()
    model.fc = torch.nn.Identity()
    with torch.no_grad():
        return model((batch_uint8.float() / 255 - MEAN) / STD).numpy()


def rel_err(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def cosines(a, b):
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


@pytest.fixture(scope="module")
def resnet50():
    return checkpoints.torchvision_resnet("resnet50", seed=3)


@pytest.fixture(scope="module")
def batch():
    g = torch.Generator().manual_seed(0)
    # smooth random "tissue": low-frequency noise upsampled, so activations are not degenerate
    low = torch.randint(0, 256, (4, 3, 14, 14), generator=g, dtype=torch.uint8).float()
    return torch.nn.functional.interpolate(low, size=(224, 224), mode="bilinear").round().clamp(0, 255).to(torch.uint8)


@pytest.mark.slow
def test_released_layout_fp32_equals_torchvision_and_auto_stays_close(tmp_path, resnet50, batch):
    path = checkpoints.save_released_layout(resnet50, tmp_path / "best_ckpt.pth")
    reference = torchvision_reference(checkpoints.torchvision_resnet("resnet50", seed=3), batch)

    exact = Encoder.from_spec(str(path), device="cpu", precision="fp32")
    assert exact.info.layout == "retccl" and exact.info.architecture == "resnet50" and exact.dim == 2048
    assert exact.info.checkpoint_sha256 == file_sha256(path)
    assert rel_err(exact.embed(batch), reference) < 1e-4

    fast = Encoder.from_spec(str(path), device="cpu", precision="auto")
    out = fast.embed(batch)
    assert out.shape == (4, 2048) and out.dtype == np.float32
    assert cosines(out, reference).min() > 0.999
    # the fast path keeps working for other batch sizes (last, partial batch)
    assert cosines(fast.embed(batch[:3]), reference[:3]).min() > 0.999


@pytest.mark.slow
def test_older_moco_layout_loads_the_same_weights_and_reports_what_it_dropped(tmp_path, resnet50, caplog):
    released, _ = load_backbone(str(checkpoints.save_released_layout(resnet50, tmp_path / "new.pth")))
    with caplog.at_level(logging.INFO, logger="engine.encoder"):
        older, info = load_backbone(str(checkpoints.save_moco_layout(resnet50, tmp_path / "old.pth")))
    assert info.layout == "moco"
    assert "module.encoder_q.fc.0.weight" in info.dropped_keys and "module.queue" in info.dropped_keys
    assert any(k.startswith("module.encoder_k.") for k in info.dropped_keys)
    assert "dropped" in caplog.text
    for (k1, v1), (k2, v2) in zip(released.state_dict().items(), older.state_dict().items()):
        assert k1 == k2 and torch.equal(v1, v2)


def test_torchvision_and_exported_layouts_load_other_architectures(tmp_path):
    model = checkpoints.torchvision_resnet("resnet18", seed=5)
    _, info = load_backbone(str(checkpoints.save_torchvision_layout(model, tmp_path / "tv.pth")))
    assert (info.layout, info.architecture, info.dim) == ("torchvision", "resnet18", 512)
    assert set(info.dropped_keys) == {"fc.weight", "fc.bias"}

    exported = tmp_path / "export.pth"
    torch.save(
        {"format": "histoseek-backbone", "arch": "resnet18", "state_dict": checkpoints.backbone_state(model)}, exported
    )
    loaded, info = load_backbone(str(exported))
    assert (info.layout, info.architecture, info.dropped_keys) == ("histoseek", "resnet18", ())
    assert torch.equal(loaded.conv1.weight, model.conv1.weight)


def test_missing_and_unexpected_keys_are_named(tmp_path):
    state = checkpoints.backbone_state(checkpoints.torchvision_resnet("resnet18"))
    del state["layer4.1.bn2.weight"]
    state["layer4.1.extra.weight"] = torch.zeros(1)
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    with pytest.raises(
        EncoderError, match=r"missing keys \['layer4.1.bn2.weight'\].*unexpected keys \['layer4.1.extra.weight'\]"
    ):
        load_backbone(str(path))


@pytest.mark.parametrize("content", [b"not a checkpoint", b""])
def test_unreadable_checkpoint_is_a_clear_error(tmp_path, content):
    path = tmp_path / "broken.pth"
    path.write_bytes(content)
    with pytest.raises(EncoderError, match="cannot read checkpoint"):
        load_backbone(str(path))


def test_missing_file_says_what_to_pass(tmp_path):
    with pytest.raises(EncoderError, match="random"):
        load_backbone(str(tmp_path / "nope.pth"))


def test_random_encoder_is_seeded_and_flagged():
    a = Encoder.from_spec("random:resnet18", device="cpu", precision="fp32")
    b = Encoder.from_spec("random:resnet18", device="cpu", precision="fp32")
    c = Encoder.from_spec("random:resnet18:7", device="cpu", precision="fp32")
    x = torch.randint(0, 255, (2, 3, 64, 64), dtype=torch.uint8)
    assert np.array_equal(a.embed(x), b.embed(x))
    assert not np.allclose(a.embed(x), c.embed(x))
    assert a.info.is_random and "NOT FOR DIAGNOSIS" in a.info.describe()
    assert a.info.checkpoint_sha256 == b.info.checkpoint_sha256 != c.info.checkpoint_sha256


def test_released_sha256_is_recognised():
    info = EncoderInfo(
        name="RetCCL",
        architecture="resnet50",
        checkpoint_sha256=RELEASED_RETCCL_SHA256,
        dim=2048,
        layout="retccl",
        source="x",
    )
    assert info.is_released_retccl and "released RetCCL" in info.describe()


def test_batch_shape_is_checked():
    enc = Encoder.from_spec("random:resnet18", device="cpu")
    with pytest.raises(ValueError):
        enc.embed(torch.zeros((2, 4, 32, 32), dtype=torch.uint8))
    assert enc.embed(torch.zeros((0, 3, 224, 224), dtype=torch.uint8)).shape == (0, 512)


# --- int8 (issue 14): opt-in only, CPU only, never what "auto" or the settings pick ---------


def test_int8_is_never_the_default_and_refused_unless_asked_for(monkeypatch):
    from engine.config import Settings
    from engine.errors import ConfigError

    enc = Encoder.from_spec("random:resnet18", device="cpu")
    assert enc.precision == "auto"
    # the settings (flags, HISTOSEEK_PRECISION) of search, indexing and the web app refuse it:
    # an int8 index queried by fp32 features, or the reverse, would silently lose neighbours
    with pytest.raises(ConfigError, match="precision"):
        Settings.load(env={"HISTOSEEK_PRECISION": "int8"})
    with pytest.raises(ValueError, match="int8"):
        Encoder.from_spec("random:resnet18", device="cpu", precision="int4")
    # "auto" on this CPU builds no quantised module
    x = torch.randint(0, 255, (2, 3, 64, 64), dtype=torch.uint8)
    enc.embed(x)
    assert "quantized::" not in str(enc._fast.graph)  # the frozen TorchScript graph: fp32 ops only


def test_int8_when_asked_for_is_quantised_and_close_to_fp32():
    exact = Encoder.from_spec("random:resnet18", device="cpu", precision="fp32")
    int8 = Encoder.from_spec("random:resnet18", device="cpu", precision="int8")
    g = torch.Generator().manual_seed(0)
    # smooth random images (a network's activations on white noise are degenerate)
    low = torch.randint(0, 256, (8, 3, 14, 14), dtype=torch.uint8, generator=g).float()
    x = torch.nn.functional.interpolate(low, size=(224, 224), mode="bilinear").round().clamp(0, 255).to(torch.uint8)
    a, b = exact.embed(x), int8.embed(x)
    assert any("quantized" in type(m).__module__ for m in int8._fast.modules())
    assert not np.array_equal(a, b)  # it really is another computation
    assert cosines(a, b).min() > 0.9
