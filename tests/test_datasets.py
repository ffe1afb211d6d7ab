"""Benchmark data set loaders: folder, csv, and the UniToPatho / TissueNet replicas in their
published layouts (built from the real CSV rows in ../shared/data/datasets)."""

from __future__ import annotations

import csv
import dataclasses

import numpy as np
import pytest
from PIL import Image

from engine.errors import DatasetError
from engine.evaluation.datasets import load_dataset
from engine.evaluation.datasets.reading import ItemImages, rescale_centre
from engine.evaluation.datasets.tissuenet import parse_square, patch_grid
from tests.replicas import make_tissuenet_replica, make_unitopatho_replica


def _png(path, colour, size=32):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), colour).save(path)
    return path


def test_folder_per_class(tmp_path):
    for cls, colour in (("01_TUMOR", (200, 50, 90)), ("07_ADIPOSE", (250, 250, 250))):
        for i in range(2):
            _png(tmp_path / cls / "sub" / f"{i}.png", colour)
    (tmp_path / "01_TUMOR" / "notes.txt").write_text("not an image")
    ds = load_dataset(f"folder:{tmp_path}")
    assert ds.labels == ["01_TUMOR"] * 2 + ["07_ADIPOSE"] * 2
    assert ds.strictest_exclusion() == "image"
    assert ds.groups("image").tolist() == [0, 1, 2, 3]
    with pytest.raises(DatasetError, match="no slide id"):
        ds.groups("slide")


def test_folder_kather2016_names_give_the_source_image_as_slide(shared_data):
    ds = load_dataset(f"folder:{shared_data / 'patches' / 'kather2016'}")
    assert len(ds.items) == 24 and len(ds.classes) == 8
    assert ds.strictest_exclusion() == "slide"
    assert ds.items[0].slide == "CRC-Prim-HE-07"  # 1A11_CRC-Prim-HE-07_022.tif_Row_601_Col_151.tif


def test_folder_without_class_folders_is_a_clear_error(tmp_path):
    _png(tmp_path / "loose.png", (0, 0, 0))
    with pytest.raises(DatasetError, match="class sub-folders"):
        load_dataset(f"folder:{tmp_path}")


def _write_csv(path, rows, fields):
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)


def test_csv_relative_paths_label_column_and_groups(tmp_path):
    for i in range(4):
        _png(tmp_path / "img" / f"{i}.png", (i * 40, 0, 0))
    rows = [
        {"path": "img/0.png", "label": "a", "label2": "x", "slide": "s1", "patient": "p1", "mpp_um": "0.5"},
        {"path": "img/1.png", "label": "a", "label2": "", "slide": "s1", "patient": "p1", "mpp_um": "unknown"},
        {"path": "img/2.png", "label": "b", "label2": "y", "slide": "s2", "patient": "p1", "mpp_um": "0.5"},
        {"path": "img/3.png", "label": "b", "label2": "y", "slide": "s3", "patient": "p2", "mpp_um": "0.5"},
    ]
    _write_csv(tmp_path / "t.csv", rows, list(rows[0]))
    ds = load_dataset(f"csv:{tmp_path / 't.csv'}")
    assert ds.labels == ["a", "a", "b", "b"]
    assert ds.items[0].mpp == 0.5 and ds.items[1].mpp is None
    assert ds.strictest_exclusion() == "patient"
    assert ds.groups("slide").tolist() == [0, 0, 1, 2]
    assert ds.groups("patient").tolist() == [0, 0, 0, 1]
    ds2 = load_dataset(f"csv:{tmp_path / 't.csv'}", label_column="label2")
    assert ds2.labels == ["x", "y", "y"] and "1 rows without" in ds2.notes[0]
    with pytest.raises(DatasetError, match="columns are: path, label"):
        load_dataset(f"csv:{tmp_path / 't.csv'}", label_column="nope")


def test_csv_missing_images_are_named(tmp_path):
    _write_csv(tmp_path / "t.csv", [{"path": "gone.png", "label": "a"}], ["path", "label"])
    with pytest.raises(DatasetError, match="gone.png"):
        load_dataset(f"csv:{tmp_path / 't.csv'}")


@pytest.mark.parametrize("spec", ["nope:/tmp", "csv", "csv:/definitely/not/here.csv"])
def test_bad_specs(spec):
    with pytest.raises(DatasetError):
        load_dataset(spec)


def test_rescale_centre_crops_at_the_asked_resolution():
    img = Image.new("RGB", (200, 100), (10, 20, 30))
    out = rescale_centre(img, 0.5, 0.25, 150)  # 400 x 200 after rescaling
    assert out.size == (150, 150)
    with pytest.raises(DatasetError, match="--mpp <="):
        rescale_centre(img, 0.5, 1.0, 150)


def test_parse_square_and_centred_grid_by_hand():
    square = parse_square("POLYGON ((100 200, 100 500, 400 500, 400 200, 100 200))")
    assert square == (100, 200, 400, 500)
    # 300 px square, 140 px patches: 2 x 2, 10 px margin each side; top = height - y_max
    assert patch_grid(square, 1000, 140) == [(110, 510), (250, 510), (110, 650), (250, 650)]
    assert patch_grid(square, 1000, 301) == []


@pytest.fixture(scope="module")
def replicas(shared_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("replicas")
    return make_unitopatho_replica(root, shared_data), make_tissuenet_replica(root, shared_data)


def test_unitopatho_replica_layout_and_loader(replicas):
    folder, _ = replicas
    assert folder.name == "7000_224" and folder.parent.name == "unitopath-public"
    with open(folder / "train.csv") as fh:
        header = fh.readline().strip().split(",")
    assert header == [
        "image_id",
        "top_label_name",
        "top_label",
        "type_name",
        "type",
        "grade_name",
        "grade",
        "wsi",
        "roi",
        "mpp",
        "x",
        "y",
        "w",
        "h",
    ]
    ds = load_dataset(f"unitopatho:{folder}")
    assert ds.classes == ["HP", "NORM", "TA.HG", "TA.LG", "TVA.HG", "TVA.LG"]
    assert all(i.slide == i.path.name.split(".ndpi")[0] == i.patient for i in ds.items)
    assert ds.strictest_exclusion() == "patient"
    assert ds.items[0].mpp == pytest.approx(31.25, rel=1e-3)  # 15855 px at 0.4415 um/px in 224 px
    assert any("," in i.path.name and "(" in i.path.name for i in ds.items)
    grade = load_dataset(f"unitopatho:{folder}", label_column="grade_name")
    assert grade.classes == ["HG", "LG"] and len(grade.items) == len(ds.items) - 8  # HP, NORM left out
    with pytest.raises(DatasetError, match="7000_224"):
        load_dataset(f"unitopatho:{folder.parent}")


def test_tissuenet_replica_patches_land_on_the_painted_squares(replicas):
    _, root = replicas
    ds = load_dataset(f"tissuenet:{root}", mpp=1.0, tile_px=64)
    assert ds.strictest_exclusion() == "slide"
    assert len(ds.classes) == 4 and len(ds.counts()["per_class"]) == 4
    with open(next(root.glob("train_metadata*.csv"))) as fh:
        height = {r["filename"]: int(r["height"]) for r in csv.DictReader(fh)}
    with open(next(root.glob("train_annotations*.csv"))) as fh:
        first = next(csv.DictReader(fh))
    x0, y0, x1, y1 = parse_square(first["geometry"])
    item = next(i for i in ds.items if i.key == first["annotation_id"] + "#0")
    # the first patch sits at the square's top-left corner (plus the centring margin), in a
    # frame whose y runs down from the top: y_image = height - y_max
    margin = ((x1 - x0) - (x1 - x0) // item.box[2] * item.box[2]) / 2
    assert item.box[:2] == (round(x0 + margin), round(height[first["filename"]] - y1 + margin))

    def is_glass(img):
        return (np.abs(np.asarray(img, float) - 245).max(axis=2) < 3).mean() > 0.5

    # tissue was painted only inside the (y-flipped) squares: every patch must show tissue,
    # while the same boxes read without the flip land mostly on plain glass
    reader = ItemImages(ds.items, 64)
    assert not any(is_glass(reader.image(i)) for i in ds.items)
    assert len(reader._slides) <= 4 < len({i.slide for i in ds.items})  # old slides were closed
    unflipped = [
        dataclasses.replace(i, box=(i.box[0], height[i.slide] - i.box[1] - i.box[2], i.box[2])) for i in ds.items
    ]
    assert np.mean([is_glass(reader.image(i)) for i in unflipped]) > 0.5


def test_tissuenet_mpp_too_coarse_for_the_square_is_explained(replicas):
    _, root = replicas
    with pytest.raises(DatasetError, match="does not fit"):
        load_dataset(f"tissuenet:{root}", mpp=2.0, tile_px=224)


def test_tissuenet_missing_slides_are_left_out_with_a_note(replicas, tmp_path):
    _, root = replicas
    partial = tmp_path / "tn"
    (partial / "tif_images").mkdir(parents=True)
    for f in root.glob("*.csv"):
        (partial / f.name).write_bytes(f.read_bytes())
    keep = sorted((root / "tif_images").iterdir())[0]
    (partial / "tif_images" / keep.name).symlink_to(keep)
    ds = load_dataset(f"tissuenet:{partial}")
    assert {i.slide for i in ds.items} == {keep.name}
    assert any("not present were left out" in n for n in ds.notes)
    (partial / "tif_images" / keep.name).unlink()
    with pytest.raises(DatasetError, match="none of the"):
        load_dataset(f"tissuenet:{partial}")
