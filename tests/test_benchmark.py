"""`engine benchmark` end to end, and its numbers against an independent brute force from the
same (cached) features; replicas of UniToPatho and TissueNet; catalog runs on SQLite and
PostgreSQL; the SVM protocol."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image
from sqlalchemy import select

from engine.catalog.db import Catalog
from engine.catalog.models import BenchmarkRun
from engine.cli.main import main
from engine.config import Settings
from engine.encoder import Encoder
from engine.evaluation.benchmark import (
    BenchmarkOptions,
    BenchmarkReport,
    EncoderResult,
    cache_path,
    evaluate,
    run_benchmark,
    store_runs,
    svm_accuracy,
)
from engine.evaluation.datasets import Item, LabelledSet, load_dataset
from engine.evaluation.report import table, write_plot
from engine.vote import majority_vote
from tests.replicas import make_tissuenet_replica, make_unitopatho_replica

ENCODER = "random:resnet18"


def brute_force_report(feats: np.ndarray, labels: list[str], groups: np.ndarray, ks) -> dict:
    """Per query in plain Python: cosine to every other-group item, sort by (-score, index),
    then the DESIGN.md definitions."""
    x = feats / np.linalg.norm(feats, axis=1, keepdims=True)
    out = {}
    rows = []
    for q in range(len(x)):
        ranked = sorted((-float(x[q] @ x[j]), j) for j in range(len(x)) if groups[j] != groups[q])
        rows.append([labels[j] for _, j in ranked])
    for k in ks:
        acc = [labels[q] in r[:k] for q, r in enumerate(rows)]
        mv = [bool(r[:k]) and majority_vote(r[:k])[0] == labels[q] for q, r in enumerate(rows)]
        out[f"acc@{k}"] = np.mean(acc)
        out[f"mv@{k}"] = np.mean(mv)
        out[f"mmv@{k}"] = np.mean([np.mean([m for m, lab in zip(mv, labels) if lab == c]) for c in sorted(set(labels))])
        aps = []
        for q, r in enumerate(rows):
            hits = [i for i, lab in enumerate(r[:k]) if lab == labels[q]]
            aps.append(np.mean([(n + 1) / (i + 1) for n, i in enumerate(hits)]) if hits else 0.0)
        out[f"map@{k}"] = np.mean(aps)
    return out


@pytest.fixture(scope="module")
def patches_run(shared_data, tmp_path_factory):
    """The issue's command on ../shared/data/patches, once for the module."""
    tmp = tmp_path_factory.mktemp("patches")
    catalog = f"sqlite:///{tmp / 'catalog.sqlite'}"
    args = [
        "benchmark",
        "--dataset",
        f"csv:{shared_data / 'patches' / 'labels.csv'}",
        "--label-column",
        "label_nct9",
        "--encoder",
        ENCODER,
        "--data-dir",
        str(tmp / "data"),
        "--catalog",
        catalog,
        "--json",
        str(tmp / "report.json"),
        "--plot",
        str(tmp / "report.png"),
        "--workers",
        "0",
        "--svm",
        # fp32 (eager) skips tracing the fast CPU graph, which costs more than it saves here
        "--precision",
        "fp32",
    ]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    return tmp, catalog, result


def test_cli_prints_table_writes_json_and_png_and_records_the_run(patches_run):
    tmp, catalog, result = patches_run
    assert "| Encoder | Acc@1 | Acc@3 | Acc@5 | MV@5 | mMV@5 | mAP@5 | SVM acc |" in result.output
    assert "query's own image are excluded" in result.output
    assert "Note: 9 rows without a 'label_nct9' value left out." in result.output
    doc = json.loads((tmp / "report.json").read_text())
    enc = doc["encoders"][0]
    assert doc["dataset"]["counts"]["items"] == 66 and doc["parameters"]["exclusion"] == "image"
    assert enc["sha256"] == Encoder.from_spec(ENCODER).info.checkpoint_sha256
    assert set(enc["metrics"]["per_class"]) == set(doc["dataset"]["counts"]["per_class"])
    assert (tmp / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    cat = Catalog(catalog)
    with cat.session() as s:
        runs = s.scalars(select(BenchmarkRun)).all()
    cat.dispose()
    assert [r.id for r in runs] == [enc["catalog_run_id"]]
    assert runs[0].metrics["overall"] == enc["metrics"]["overall"] and runs[0].dataset_kind == "csv"


def test_reported_numbers_equal_brute_force_from_the_cached_features(patches_run, shared_data):
    tmp, _, _ = patches_run
    doc = json.loads((tmp / "report.json").read_text())
    ds = load_dataset(f"csv:{shared_data / 'patches' / 'labels.csv'}", label_column="label_nct9")
    settings = Settings.load(data_dir=str(tmp / "data"), env={})
    feats = np.load(cache_path(settings, ds, Encoder.from_spec(ENCODER, precision="fp32"), 224, None))
    expected = brute_force_report(feats, ds.labels, ds.groups("image"), (1, 3, 5))
    got = doc["encoders"][0]["metrics"]["overall"]
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, abs=1e-12), key


def test_second_run_reuses_the_feature_cache(patches_run, shared_data):
    tmp, catalog, _ = patches_run
    ds = load_dataset(f"csv:{shared_data / 'patches' / 'labels.csv'}", label_column="label_nct9")
    settings = Settings.load(data_dir=str(tmp / "data"), catalog_url=catalog, precision="fp32", env={})
    report = run_benchmark(settings, ds, [ENCODER], BenchmarkOptions(ks=(1, 2), workers=0, progress=False))
    assert report.results[0].cached


def _tiny_set(labels, slides):
    items = [
        Item(key=str(i), label=lab, path=None, slide=s, patient=s) for i, (lab, s) in enumerate(zip(labels, slides))
    ]
    return LabelledSet("csv", "tiny.csv", items, label_column="label")


def test_evaluate_by_hand_with_ties_and_slide_exclusion():
    # 1-d "features" on the unit circle: rows 0-2 identical (exact score ties)
    feats = np.array([[1, 0], [1, 0], [1, 0], [0.6, 0.8], [0, 1]], np.float32)
    ds = _tiny_set(["a", "b", "a", "b", "b"], ["s1", "s2", "s3", "s1", "s4"])
    r = evaluate(feats, ds, (1, 3), "slide")["overall"]
    # query 0 (a, s1): others 1,2 tie at 1.0 -> order 1, 2; then 4 (0.0); row 3 is s1 -> [b, a, b]
    # query 1 (b): [0 a, 2 a, 3 b]; query 2 (a): [0 a, 1 b, 3 b]; query 3 (b, s1): [1 b, 2 a, 4 b]
    # query 4 (b): [3 b, 0 a, 1 b]
    assert r["acc@1"] == pytest.approx(3 / 5)
    assert r["acc@3"] == pytest.approx(5 / 5)
    # MV@3: q0 b (miss), q1 a (miss), q2 b (miss), q3 b (hit), q4 b (hit)
    assert r["mv@3"] == pytest.approx(2 / 5)
    assert r["mmv@3"] == pytest.approx((0 / 2 + 2 / 3) / 2)


def test_unitopatho_and_tissuenet_replicas_report(shared_data, tmp_path):
    uni = make_unitopatho_replica(tmp_path, shared_data, slides_per_class=2, images_per_slide=1)
    tn = make_tissuenet_replica(tmp_path, shared_data)
    # fp32 skips tracing the fast CPU graph, which costs more than it saves on ~40 patches
    settings = Settings.load(
        data_dir=str(tmp_path / "data"), catalog_url=f"sqlite:///{tmp_path / 'c.sqlite'}", precision="fp32", env={}
    )
    opts = BenchmarkOptions(ks=(1, 3, 5), workers=0, progress=False)
    for spec, exclusion in ((f"unitopatho:{uni}", "patient"), (f"tissuenet:{tn}", "slide")):
        ds = load_dataset(spec, tile_px=settings.tile_px)
        report = run_benchmark(settings, ds, [ENCODER], opts)
        assert report.parameters["exclusion"] == exclusion
        assert report.parameters["mpp"] == (1.0 if ds.kind == "tissuenet" else None)
        overall = report.results[0].metrics["overall"]
        assert 0 <= overall["acc@1"] <= overall["acc@3"] <= overall["acc@5"] <= 1
        assert f"{ds.kind} data set" in table(report)
        write_plot(report, tmp_path / f"{ds.kind}.png")
    ids = store_runs(settings.catalog_url, report)
    assert len(ids) == 1


def _tiny_folder(root):
    rng = np.random.default_rng(0)
    for cls in ("a", "b"):
        for i in range(3):
            (root / cls).mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(root / cls / f"{i}.png")
    return root


def test_several_encoders_in_one_table(tmp_path):
    _tiny_folder(tmp_path / "set")
    catalog = f"sqlite:///{tmp_path / 'c.sqlite'}"
    args = [
        "benchmark",
        "--dataset",
        f"folder:{tmp_path / 'set'}",
        "--encoder",
        ENCODER,
        "--encoder",
        ENCODER + ":1",
        "--k",
        "1,2",
        "--data-dir",
        str(tmp_path / "d"),
        "--catalog",
        catalog,
        "--json",
        str(tmp_path / "r.json"),
        "--workers",
        "0",
        "--precision",
        "fp32",
    ]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "| random:resnet18:0 |" in result.output and "| random:resnet18:1 |" in result.output
    doc = json.loads((tmp_path / "r.json").read_text())
    assert [e["name"] for e in doc["encoders"]] == ["random:resnet18:0", "random:resnet18:1"]
    assert doc["encoders"][0]["sha256"] != doc["encoders"][1]["sha256"]
    assert "recorded as benchmark run(s) 1, 2" in result.output


def test_unreachable_catalog_is_a_clear_error_and_the_json_is_kept(tmp_path):
    _tiny_folder(tmp_path / "set")
    args = [
        "benchmark",
        "--dataset",
        f"folder:{tmp_path / 'set'}",
        "--encoder",
        ENCODER,
        "--k",
        "1",
        "--data-dir",
        str(tmp_path / "d"),
        "--catalog",
        "postgresql+psycopg://nobody:secret@127.0.0.1:1/none",
        "--json",
        str(tmp_path / "r.json"),
        "--workers",
        "0",
        "--precision",
        "fp32",
    ]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1 and "cannot open the catalog" in result.output and "secret" not in result.output
    assert json.loads((tmp_path / "r.json").read_text())["encoders"][0]["catalog_run_id"] is None


def test_mpp_needs_known_patch_resolution(tmp_path):
    _tiny_folder(tmp_path / "set")
    result = CliRunner().invoke(
        main,
        [
            "benchmark",
            "--dataset",
            f"folder:{tmp_path / 'set'}",
            "--encoder",
            ENCODER,
            "--mpp",
            "0.5",
            "--data-dir",
            str(tmp_path / "d"),
        ],
    )
    assert result.exit_code == 1 and "no known mpp" in result.output


def test_cli_refuses_patient_exclusion_without_patients(tmp_path, shared_data):
    result = CliRunner().invoke(
        main,
        [
            "benchmark",
            "--dataset",
            f"folder:{shared_data / 'patches' / 'kather2016'}",
            "--encoder",
            ENCODER,
            "--exclude",
            "patient",
            "--data-dir",
            str(tmp_path),
        ],
    )
    assert result.exit_code != 0 and "no patient id" in result.output and "--exclude slide" in result.output


def test_cli_bad_k_and_missing_encoder(tmp_path):
    runner = CliRunner()
    result = runner.invoke(
        main, ["benchmark", "--dataset", f"folder:{tmp_path}", "--k", "0,x"], env={"HISTOSEEK_ENCODER": ""}
    )
    assert result.exit_code == 2 and "--k" in result.output
    (tmp_path / "a").mkdir()
    result = runner.invoke(
        main,
        ["benchmark", "--dataset", f"folder:{tmp_path}", "--data-dir", str(tmp_path / "d")],
        env={"HISTOSEEK_ENCODER": ""},
    )
    assert result.exit_code == 1 and "no encoder given" in result.output


def test_svm_keeps_groups_whole():
    rng = np.random.default_rng(0)
    # two classes, 10 slides each of 5 near-duplicate patches: a split that leaked slides
    # would score (nearly) perfectly by recognising the slide; grouped folds must stay at chance
    centres = rng.normal(size=(20, 64))
    feats = np.repeat(centres, 5, axis=0) + 0.01 * rng.normal(size=(100, 64))
    labels = ["a" if i % 2 else "b" for i in range(20) for _ in range(5)]
    slides = [f"s{i}" for i in range(20) for _ in range(5)]
    ds = _tiny_set(labels, slides)
    grouped = svm_accuracy(feats, ds, "slide", folds=5)
    leaky = svm_accuracy(feats, ds, "image", folds=5)
    assert leaky["accuracy"] > 0.9
    assert grouped["accuracy"] < 0.75  # labels are random per slide: nothing to learn across slides
    assert grouped["folds"] == 5 and set(grouped["per_class"]) == {"a", "b"}


def test_runs_are_stored_on_every_catalog(catalog_url):
    feats = np.eye(4, dtype=np.float32)
    ds = _tiny_set(["a", "a", "b", "b"], ["s1", "s2", "s3", "s4"])
    metrics = evaluate(feats, ds, (1,), "slide")
    report = BenchmarkReport(
        ds,
        {"k": [1], "exclusion": "slide", "exclusion_text": "x"},
        [EncoderResult({"name": "e", "sha256": "0" * 64, "random": True}, metrics, None, False, 0.0)],
        "now",
    )
    ids = store_runs(catalog_url, report)
    cat = Catalog(catalog_url)
    with cat.session() as s:
        run = s.get(BenchmarkRun, ids[0])
        assert run.encoder_name == "e" and run.metrics["overall"]["acc@1"] == metrics["overall"]["acc@1"]
    cat.dispose()


def test_a_card_beside_retccl_in_one_report(tmp_path):
    """Issue 15.4: `engine benchmark --encoder random:resnet18 --encoder CARD`: one table with a
    row each, one JSON, one plot, a catalog run each marked as one comparison, and the web
    app's side-by-side group of them."""
    from tests.test_encoder_grid import vit_tiny_card
    from webapp.archive import benchmark_json, list_benchmarks
    from webapp.plots import comparisons

    _tiny_folder(tmp_path / "set")
    card = vit_tiny_card(tmp_path / "card")
    catalog = f"sqlite:///{tmp_path / 'c.sqlite'}"
    args = ["benchmark", "--dataset", f"folder:{tmp_path / 'set'}", "--encoder", ENCODER, "--encoder", str(card)]
    args += ["--k", "1,2", "--data-dir", str(tmp_path / "d"), "--catalog", catalog, "--workers", "0"]
    args += ["--json", str(tmp_path / "r.json"), "--plot", str(tmp_path / "r.png"), "--precision", "fp32"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    rows = [line for line in result.output.splitlines() if line.startswith("| ") and "Encoder" not in line]
    assert [r.split("|")[1].strip() for r in rows] == ["random:resnet18:0", "vit-tiny-test"]
    assert "every encoder embeds the same patches and split" in result.output
    doc = json.loads((tmp_path / "r.json").read_text())
    assert [(e["name"], e["native_mpp"], e["input_px"]) for e in doc["encoders"]] == [
        ("random:resnet18:0", 1.0, 224),
        ("vit-tiny-test", 0.5, 224),
    ]
    assert doc["parameters"]["comparison"]["encoders"] == ["random:resnet18:0", "vit-tiny-test"]
    assert (tmp_path / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    cat = Catalog(catalog)
    try:
        runs = [benchmark_json(r) for r in list_benchmarks(cat)]
    finally:
        cat.dispose()
    assert len(runs) == 2 and len({json.dumps(r["parameters"], sort_keys=True) for r in runs}) == 1
    groups = comparisons(runs)
    assert len(groups) == 1 and [r["encoder_name"] for r in groups[0]["rows"]] == ["random:resnet18:0", "vit-tiny-test"]
    assert "acc@1" in groups[0]["metrics"] and str(groups[0]["svg"]).startswith("<svg")
    assert str(groups[0]["svg"]).count("<rect") >= 2 * len(groups[0]["metrics"])


def test_runs_of_one_encoder_or_other_protocols_are_not_compared():
    from webapp.plots import comparisons

    def run(i, name, protocol="retccl", path="p"):
        params = {"protocol": protocol, "k": [1], "exclusion": "image", "label_column": "label", "mpp": None}
        metrics = {"overall": {"acc@1": 0.5 + i / 10}}
        return {
            "id": i,
            "dataset_kind": "csv",
            "dataset_path": path,
            "encoder_name": name,
            "encoder_sha256": name,
            "parameters": params,
            "metrics": metrics,
            "created_at": None,
        }

    assert comparisons([run(2, "a"), run(1, "a")]) == []
    assert comparisons([run(2, "a"), run(1, "b", protocol="sish")]) == []
    assert comparisons([run(2, "a"), run(1, "b", path="q")]) == []
    (group,) = comparisons([run(3, "a"), run(2, "b"), run(1, "a")])  # newest of each encoder
    assert [r["id"] for r in group["rows"]] == [2, 3]
    assert "<script" not in str(comparisons([run(2, "<script>x"), run(1, "b")])[0]["svg"])
