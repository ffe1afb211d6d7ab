"""engine mil: attention MIL on the tile features of real (synthetic-content) indexed
archives: real SQLite catalogs and FAISS shards written by the indexer's writer."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa
from click.testing import CliRunner

from engine.catalog import Catalog, models
from engine.cli.main import main as engine_cli
from engine.errors import DatasetError, EncoderError
from engine.mil import MilOptions, load_bags, train_run
from engine.mil.cv import make_folds
from engine.mil.predict import load_run, predict_indexed
from engine.mil.report import store_run
from engine.mil.train import TrainOptions
from tests.mil_archive import make_feature_archive, patients, synthetic_encoder

FAST = TrainOptions(hidden=64, attention=32, lr=2e-3, max_epochs=30, patience=5)


def options(folds=5, **train) -> MilOptions:
    return MilOptions(folds=folds, device="cpu", progress=False, train=TrainOptions(**{**FAST.__dict__, **train}))


@pytest.fixture(scope="module")
def learnable(tmp_path_factory):
    """60 slides of 30 patients; tumour slides carry the signal in 3 of their 30 tiles. A
    quick run (2 epochs) in tmp/run for the tests of the run folder and contract."""
    tmp = tmp_path_factory.mktemp("mil")
    settings, signal = make_feature_archive(tmp, patients(30), n_tiles=30, n_signal=3)
    bags = load_bags(settings.catalog_url, settings.index_dir, "diagnosis")
    train_run(bags, tmp / "run", options(max_epochs=1))
    return {"tmp": tmp, "settings": settings, "signal": signal, "bags": bags}


@pytest.fixture(scope="module")
def trained(learnable):
    report = train_run(learnable["bags"], learnable["tmp"] / "trained", options())
    return {**learnable, "report": report}


def test_bags_come_from_the_index_with_their_contract(learnable):
    bags = learnable["bags"]
    assert len(bags.bags) == 60 and bags.classes == ("normal", "tumour")
    assert all(b.features.shape == (30, 32) for b in bags.bags)
    np.testing.assert_allclose(
        np.linalg.norm(bags.bags[0].features, axis=1), 1.0, atol=1e-5
    )  # as stored: L2-normalised
    c = bags.contract
    assert (c.encoder_name, c.dim, c.label_column, c.classes) == (
        "synthetic-encoder",
        32,
        "diagnosis",
        ("normal", "tumour"),
    )
    assert len(c.encoder_sha256) == 64


def test_folds_never_share_a_patient(learnable):
    bags = learnable["bags"]
    folds, _ = make_folds(bags.y, bags.groups, 5, seed=3)
    assert sorted(np.concatenate(folds).tolist()) == list(range(len(bags.bags)))
    for test in folds:
        train = np.setdiff1d(np.arange(len(bags.bags)), test)
        assert not set(bags.groups[test]) & set(bags.groups[train])
        assert set(bags.y[test]) == {0, 1}
    saved = json.loads((learnable["tmp"] / "run" / "folds.json").read_text())["folds"]
    patient_of = {b.slide_id: b.group for b in bags.bags}
    fold_patients = [{patient_of[s] for s in fold} for fold in saved]
    assert all(not a & b for i, a in enumerate(fold_patients) for b in fold_patients[i + 1 :])


@pytest.mark.slow
def test_learns_the_label_from_a_few_tiles_and_attends_to_them(trained):
    learnable = trained
    report, run_dir = trained["report"], trained["tmp"] / "trained"
    metrics = report["metrics"]
    assert len(metrics["folds"]) == 5
    assert metrics["overall"]["auc"] >= 0.95, metrics["overall"]
    assert all(f["auc"] is not None and f["confusion"] for f in metrics["folds"])
    assert sum(map(sum, metrics["pooled"]["confusion"])) == 60
    assert (run_dir / "roc.png").stat().st_size > 5_000
    assert json.loads((run_dir / "report.json").read_text())["metrics"]["overall"] == metrics["overall"]
    ckpt = __import__("torch").load(run_dir / "fold-0" / "model.pt", weights_only=True)
    assert ckpt["contract"]["encoder_sha256"] == learnable["bags"].contract.encoder_sha256 and ckpt["contract"][
        "classes"
    ] == ["normal", "tumour"]
    # the evidence tiles are the most attended ones of every tumour slide
    run, settings = load_run(run_dir), learnable["settings"]
    catalog = Catalog(settings.catalog_url)
    hits = []
    for slide_id, tiles in list(learnable["signal"].items())[:20]:
        if not len(tiles):
            continue
        answer = predict_indexed(catalog, settings.index_dir, run, slide_id)
        assert answer["prediction"] == "tumour"
        top = sorted(range(len(answer["tiles"])), key=lambda i: -answer["tiles"][i]["attention"])[: len(tiles)]
        ids = [int(slide_id) * (1 << 20) + i for i in top]
        hits.append(len(set(ids) & set(tiles.tolist())) / len(tiles))
    catalog.dispose()
    assert np.mean(hits) >= 0.9, hits


@pytest.mark.slow
def test_shuffled_labels_give_chance_auc(tmp_path):
    rng = np.random.default_rng(7)
    # the signal follows the true labels; the recorded diagnosis is shuffled within each
    # true class (half of each gets each label), so the features say nothing about it (a
    # plain permutation of 60 labels agrees with the truth on ~36 by chance, and the model
    # rightly finds that: AUC ~0.67)
    settings, _ = make_feature_archive(tmp_path, patients(60), slides_per_patient=1, n_tiles=20, n_signal=3, seed=5)
    catalog = Catalog(settings.catalog_url)
    with catalog.session() as s:
        slides = s.scalars(sa.select(models.Slide).order_by(models.Slide.id)).all()
        for true in ("normal", "tumour"):
            group = [sl for sl in slides if sl.diagnosis == true]
            for sl, label in zip(group, rng.permutation(["normal", "tumour"] * (len(group) // 2))):
                sl.diagnosis = str(label)
    catalog.dispose()
    bags = load_bags(settings.catalog_url, settings.index_dir, "diagnosis")
    report = train_run(bags, tmp_path / "run", options(max_epochs=15))
    assert abs(report["metrics"]["overall"]["auc"] - 0.5) <= 0.15, report["metrics"]["overall"]


def test_rerun_skips_finished_folds_and_retrains_a_missing_one(learnable, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(learnable["tmp"] / "run", run)
    stamps = {p: p.stat().st_mtime_ns for p in run.glob("fold-*/result.json")}
    (run / "fold-2" / "result.json").unlink()
    report = train_run(learnable["bags"], run, options(max_epochs=1))
    for path, stamp in stamps.items():
        assert (path.stat().st_mtime_ns == stamp) == (path.parent.name != "fold-2")
    assert len(report["metrics"]["folds"]) == 5
    with pytest.raises(DatasetError, match="holds another run"):
        train_run(learnable["bags"], run, options(hidden=32))
    assert not list(run.rglob(".*.tmp*")), "atomic_output leaves no temp files"


def test_predicting_an_index_of_another_encoder_is_refused(learnable, tmp_path):
    other, _ = make_feature_archive(tmp_path, patients(4), n_tiles=12, n_signal=2, encoder_name="another-encoder")
    run = load_run(learnable["tmp"] / "run")
    catalog = Catalog(other.catalog_url)
    with pytest.raises(EncoderError, match="another-encoder.*trained on synthetic-encoder"):
        predict_indexed(catalog, other.index_dir, run, 1)
    catalog.dispose()


def test_clear_errors_for_unusable_labels(learnable, tmp_path):
    settings = learnable["settings"]
    with pytest.raises(DatasetError, match="gives 0 class"):
        load_bags(settings.catalog_url, settings.index_dir, "collection")  # no slide has one
    one, _ = make_feature_archive(tmp_path, [("A", "normal"), ("B", "tumour"), ("C", "normal")], n_tiles=10, n_signal=1)
    bags = load_bags(one.catalog_url, one.index_dir, "diagnosis")
    with pytest.raises(DatasetError, match="only 1 patient"):
        train_run(bags, tmp_path / "run", options())


def test_cli_train_predict_and_catalog_run(tmp_path):
    """`engine mil train` then `engine mil predict`, as a user runs them (3 classes: OvR AUC)."""
    settings, _ = make_feature_archive(
        tmp_path, patients(12, labels=("a", "b", "c")), slides_per_patient=1, n_tiles=12, n_signal=2
    )
    args = ["--catalog", settings.catalog_url, "--index-dir", str(settings.index_dir), "--device", "cpu"]
    out = tmp_path / "run"
    result = CliRunner().invoke(
        engine_cli,
        [
            "mil",
            "train",
            "--label-column",
            "diagnosis",
            "--folds",
            "2",
            "--epochs",
            "3",
            "--out",
            str(out),
            "--quiet",
            *args,
        ],
    )
    assert result.exit_code == 0, result.output
    assert "mean ± sd" in result.output and "one-vs-rest macro" in result.output
    catalog = Catalog(settings.catalog_url)
    with catalog.session() as s:
        runs = s.scalars(sa.select(models.BenchmarkRun)).all()
    assert len(runs) == 1 and runs[0].dataset_kind == "mil" and runs[0].parameters["classes"] == ["a", "b", "c"]
    assert "auc" in runs[0].metrics["overall"] and len(runs[0].metrics["folds"]) == 2
    # a rerun of the finished run updates the same catalog row
    assert (
        CliRunner()
        .invoke(
            engine_cli,
            [
                "mil",
                "train",
                "--label-column",
                "diagnosis",
                "--folds",
                "2",
                "--epochs",
                "3",
                "--out",
                str(out),
                "--quiet",
                *args,
            ],
        )
        .exit_code
        == 0
    )
    with catalog.session() as s:
        assert s.scalar(sa.select(sa.func.count(models.BenchmarkRun.id))) == 1
    catalog.dispose()
    result = CliRunner().invoke(
        engine_cli, ["mil", "predict", "--run", str(out), "--slide", "1", "--json", str(tmp_path / "p.json"), *args]
    )
    assert result.exit_code == 0, result.output
    answer = json.loads((tmp_path / "p.json").read_text())
    assert set(answer["probabilities"]) == {"a", "b", "c"} and abs(sum(answer["probabilities"].values()) - 1) < 1e-4
    assert len(answer["tiles"]) == 12 and abs(sum(t["attention"] for t in answer["tiles"]) - 1) < 1e-4
    bad = CliRunner().invoke(
        engine_cli,
        ["mil", "train", "--label-column", "diagnosis", "--out", str(tmp_path / "r2"), "--encoder", "nope", *args],
    )
    assert bad.exit_code != 0 and "matches 0 of the encoders" in bad.output


def test_web_benchmarks_page_run_page_and_attention_api(learnable):
    """The Benchmarks page lists the MIL run, its page shows folds, confusion matrix and ROC
    plot, the viewer offers the attention layer and the API returns every tile's attention."""
    import re

    from webapp import create_app, users

    settings, tmp = learnable["settings"], learnable["tmp"]
    report = json.loads((tmp / "run" / "report.json").read_text())
    run_id = store_run(
        settings.catalog_url,
        tmp / "run",
        report["contract"],
        {
            "label_column": "diagnosis",
            "group": "patient",
            "folds": 5,
            "classes": ["normal", "tumour"],
            "counts": report["counts"],
        },
        report["metrics"],
        None,
    )
    app = create_app({"TESTING": True, "SETTINGS": settings, "INSTANCE_PATH": str(tmp / "instance")})
    catalog = app.extensions["histoseek"].catalog
    users.create_user(catalog, "pathologist", "mil test password")
    client = app.test_client()
    token = re.search(r'name="csrf_token" value="([^"]+)"', client.get("/login").text).group(1)
    assert (
        client.post(
            "/login", data={"username": "pathologist", "password": "mil test password", "csrf_token": token}
        ).status_code
        == 302
    )

    page = client.get("/benchmarks").text
    assert 'id="mil-runs"' in page and f"#{run_id}" in page and "normal, tumour" in page
    detail = client.get(f"/benchmarks/{run_id}").text
    assert 'id="mil-folds"' in detail and 'id="mil-confusion"' in detail and "± " in detail
    png = client.get(f"/benchmarks/{run_id}/plot.png")
    assert png.status_code == 200 and png.data[:4] == b"\x89PNG"

    slide_id = next(iter(learnable["signal"]))
    viewer = client.get(f"/viewer/{slide_id}").text
    assert 'id="attention-toggle"' in viewer and f'<option value="{run_id}">' in viewer
    doc = client.get(f"/api/v1/mil/{run_id}/slides/{slide_id}/attention").get_json()
    assert doc["run"] == run_id and doc["classes"] == ["normal", "tumour"] and len(doc["tiles"]) == 30
    assert abs(sum(t["attention"] for t in doc["tiles"]) - 1) < 1e-4 and max(t["rank"] for t in doc["tiles"]) == 1.0
    assert str(tmp) not in json.dumps(doc), "no server paths in answers"
    missing = client.get(f"/api/v1/mil/{run_id + 100}/slides/{slide_id}/attention")
    assert missing.status_code == 404 and set(missing.get_json()) == {"error", "message"}
    app.extensions["histoseek"].catalog.dispose()


def test_demo_mil_run_is_small_and_recorded_once(tmp_path):
    """The demo's run (label: site, each slide its own group) on six indexed slides of one
    patient, as `python -m webapp.demo` makes it; a second build updates the same run."""
    import time

    from webapp.demo import demo_mil_run

    sites = [
        ("CMU-1a", "demo site A"),
        ("CMU-1b", "demo site A"),
        ("CMU-1c", "demo site B"),
        ("CMU-1d", "demo site A"),
        ("CMU-1e", "demo site B"),
        ("CMU-1f", "demo site A"),
    ]
    settings, _ = make_feature_archive(
        tmp_path, sites, slides_per_patient=1, n_tiles=30, n_signal=3, positive="demo site B", label_column="site"
    )
    t0 = time.perf_counter()
    first = demo_mil_run(settings, tmp_path / "mil-site", "site")
    assert time.perf_counter() - t0 < 10
    assert demo_mil_run(settings, tmp_path / "mil-site", "site") == first
    catalog = Catalog(settings.catalog_url)
    with catalog.session() as s:
        run = s.get(models.BenchmarkRun, first)
    catalog.dispose()
    assert run.dataset_kind == "mil" and run.parameters["label_column"] == "site" and len(run.metrics["folds"]) == 2


@pytest.mark.slow
def test_predicting_a_new_slide_file_embeds_it_like_the_indexer(tmp_path):
    """`engine mil predict --slide PATH` on a file that is not in the index tiles it on the
    run's grid and embeds it with the run's encoder: on a file that IS indexed, its tiles and
    its answer must agree with predicting from the stored vectors. Another encoder is refused."""
    from engine.mil.predict import predict_file
    from tests.indexed_archive import make_indexed_archive
    from tests.synthetic_slides import tissue_blobs, write_pyramidal_tiff

    slides = [
        write_pyramidal_tiff(tmp_path / f"s{i}.tiff", tissue_blobs(1536, 1536, seed=i), mpp=0.5) for i in range(4)
    ]
    rows = [{"slide": p.name, "diagnosis": "a" if i % 2 else "b"} for i, p in enumerate(slides)]
    settings = make_indexed_archive(tmp_path / "arch", slides, "random:resnet18", rows)
    bags = load_bags(settings.catalog_url, settings.index_dir, "diagnosis", group="slide")
    train_run(
        bags,
        tmp_path / "run",
        MilOptions(
            folds=2,
            group="slide",
            device="cpu",
            progress=False,
            train=TrainOptions(hidden=16, attention=8, max_epochs=3, patience=2),
        ),
    )
    run = load_run(tmp_path / "run")
    catalog = Catalog(settings.catalog_url)
    with catalog.session() as s:
        slide_id = s.scalar(sa.select(models.Slide.id).where(models.Slide.path.like("%s1.tiff")))
    stored = predict_indexed(catalog, settings.index_dir, run, slide_id)
    catalog.dispose()
    fresh = predict_file(slides[1], run, "random:resnet18", device="cpu")
    assert [(t["x"], t["y"], t["size"]) for t in fresh["tiles"]] == [
        (t["x"], t["y"], t["size"]) for t in stored["tiles"]
    ]
    for label, p in stored["probabilities"].items():
        assert fresh["probabilities"][label] == pytest.approx(p, abs=0.02)
    att_fresh = np.array([t["attention"] for t in fresh["tiles"]])
    att_stored = np.array([t["attention"] for t in stored["tiles"]])
    assert np.abs(att_fresh - att_stored).max() < 0.05
    with pytest.raises(EncoderError, match="give that encoder"):
        predict_file(slides[1], run, "random:resnet34", device="cpu")


def test_a_catalog_of_two_encoders_gives_each_encoders_own_bags(tmp_path):
    """With a second encoder's vectors beside the first (indexer build --encoder B), MIL
    reads the bags of the encoder it is given -- its own tiles only, never both -- and asks
    which one when none is given; predicting reads the run's encoder's vectors."""
    from engine.encoder import l2_normalise
    from engine.slides import SlideInfo
    from engine.tiling import TileBox
    from indexer.writer import commit_slide

    settings, _ = make_feature_archive(tmp_path, patients(6), n_tiles=9, n_signal=2, dim=32)
    catalog = Catalog(settings.catalog_url)
    second, shard_encoder = synthetic_encoder(catalog, "second-encoder", 16, target_mpp=2.0)
    with catalog.session() as s:
        slide_ids = list(s.scalars(sa.select(models.Slide.id).order_by(models.Slide.id)))
    rng = np.random.default_rng(5)
    info = SlideInfo(Path("s.svs"), "synthetic", 896, 896, 0.5, "metadata", (1.0,))
    boxes = [TileBox(448 * (i % 2), 448 * (i // 2), 448, 1.0) for i in range(4)]
    for sid in slide_ids:
        vectors = l2_normalise(rng.standard_normal((4, 16)).astype(np.float32))
        commit_slide(catalog, settings.index_dir, shard_encoder, second, sid, info, boxes, vectors)
    catalog.dispose()

    with pytest.raises(DatasetError, match="several encoders.*synthetic-encoder.*second-encoder"):
        load_bags(settings.catalog_url, settings.index_dir, "diagnosis")
    first = load_bags(settings.catalog_url, settings.index_dir, "diagnosis", encoder="synthetic-encoder")
    other = load_bags(settings.catalog_url, settings.index_dir, "diagnosis", encoder="second-encoder")
    assert len(first.bags) == len(other.bags) == len(slide_ids)
    assert all(b.features.shape == (9, 32) for b in first.bags)
    assert all(b.features.shape == (4, 16) for b in other.bags)
    assert not set(first.bags[0].tile_ids) & set(other.bags[0].tile_ids)
    assert other.contract.encoder_name == "second-encoder" and other.contract.dim == 16

    train_run(other, tmp_path / "run", options(folds=2, max_epochs=1))
    catalog = Catalog(settings.catalog_url)
    try:
        answer = predict_indexed(catalog, settings.index_dir, load_run(tmp_path / "run"), slide_ids[0])
    finally:
        catalog.dispose()
    assert len(answer["tiles"]) == 4  # the second encoder's tiles, not the first's 9
