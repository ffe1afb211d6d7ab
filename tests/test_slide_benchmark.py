"""`engine benchmark --archive`: every labelled indexed slide a slide query against the rest,
its patient excluded; figures against a plain computation from the search engine's own
answers; the run in the catalog and the plot, as for the patch benchmark."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from sqlalchemy import select

from engine.catalog.db import Catalog
from engine.catalog.models import BenchmarkRun
from engine.cli.main import main
from engine.evaluation.datasets import Item
from engine.evaluation.slide_benchmark import _groups, neighbour_rows, score_slides
from tests.indexed_archive import make_indexed_archive
from tests.synthetic_slides import tissue_blobs, write_pyramidal_tiff

ENCODER = "random:resnet18"


def plain_scores(labels, patients, ranked, kmax, exclude_patient=True):
    """Per query in plain Python: drop own patient (or own slide) and unlabelled ids, then MV@k,
    mMV@k, AP@k (normalised by the relevant results retrieved) and macro-F1@k."""
    index = {sid: q for q, sid in enumerate(ranked)}
    out_rows = []
    for q, sid in enumerate(ranked):
        kept = []
        for other in ranked[sid]:
            if other not in index:
                continue
            r = index[other]
            same = patients[r] == patients[q] if exclude_patient and patients[q] else r == q
            if not same:
                kept.append(labels[r])
        out_rows.append(kept[:kmax])
    return out_rows


def vote(row):
    if not row:
        return None
    counts = {x: row.count(x) for x in row}
    return next(x for x in row if counts[x] == max(counts.values()))


def test_scores_equal_a_plain_computation_with_ties_short_lists_and_patients():
    # slide ids 10..15; 99 is an unlabelled slide the search may return
    labels = ["a", "a", "b", "b", "c", "a"]
    patients = ["p1", "p1", "p2", None, "p3", "p4"]
    ids = [10, 11, 12, 13, 14, 15]
    answers = {
        10: [11, 12, 99, 14, 13, 15],
        11: [10, 14, 12],
        12: [13, 99],
        13: [12, 10, 11, 14, 15],
        14: [15, 10, 12, 13, 11],
        15: [],
    }
    items = [
        Item(key=str(i), label=lab, path=None, slide=str(i), patient=p) for i, lab, p in zip(ids, labels, patients)
    ]
    groups, no_patient = _groups(items, "patient")
    assert no_patient == 1
    rows = neighbour_rows([answers[i] for i in ids], items, groups, 3)
    got = score_slides(labels, rows, (1, 3), "sish")
    plain = plain_scores(labels, patients, {i: answers[i] for i in ids}, 3)
    # q10 drops 11 (same patient) and 99: [b(12), c(14), b(13)]
    assert plain[0] == ["b", "c", "b"]
    for k in (1, 3):
        mv = [vote(row[:k]) == lab for row, lab in zip(plain, labels)]
        assert got["overall"][f"mv@{k}"] == pytest.approx(np.mean(mv))
        per_class = [np.mean([m for m, lab in zip(mv, labels) if lab == c]) for c in sorted(set(labels))]
        assert got["overall"][f"mmv@{k}"] == pytest.approx(np.mean(per_class))
        aps = []
        for row, lab in zip(plain, labels):
            hits = [i for i, x in enumerate(row[:k]) if x == lab]
            aps.append(np.mean([(n + 1) / (i + 1) for n, i in enumerate(hits)]) if hits else 0.0)
        assert got["overall"][f"map@{k}"] == pytest.approx(np.mean(aps))
    assert got["queries_short_of_k"] == sum(len(r) < 3 for r in plain)
    assert got["queries_without_results"] == sum(not r for r in plain) == 1
    assert set(got["protocols"]) == {"retccl", "sish", "yottixel"}
    assert got["protocol"]["figures"] == got["protocols"]["sish"]


@pytest.fixture(scope="module")
def labelled_archive(tmp_path_factory):
    """Six small synthetic slides of four patients, two diagnoses, indexed."""
    tmp = tmp_path_factory.mktemp("slide-benchmark")
    files, rows = [], []
    for i in range(6):
        path = write_pyramidal_tiff(tmp / f"s{i}.tiff", tissue_blobs(900, 1100, seed=i), mpp=1.0)
        files.append(path)
        rows.append(
            {
                "slide": path.name,
                "diagnosis": "adeno" if i % 2 else "squamous",
                "patient": f"P{i // 2 if i < 4 else i}",
                "site": "lung",
            }
        )
    rows[-1]["diagnosis"] = ""  # one indexed slide without a label
    settings = make_indexed_archive(tmp / "archive", files, metadata_rows=rows)
    return tmp, settings


def test_cli_archive_benchmark_reports_stores_and_agrees_with_the_search_engine(labelled_archive):
    tmp, settings = labelled_archive
    out = tmp / "slides.json"
    args = [
        "benchmark",
        "--archive",
        "--label-column",
        "diagnosis",
        "--k",
        "1,3",
        "--encoder",
        ENCODER,
        "--catalog",
        settings.catalog_url,
        "--index-dir",
        str(settings.index_dir),
        "--data-dir",
        str(settings.data_dir),
        "--device",
        "cpu",
        "--json",
        str(out),
        "--plot",
        str(tmp / "slides.png"),
    ]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "| Encoder | MV@1 | MV@3 | mMV@3 | mAP@3 | macro-F1@3 |" in result.output
    assert "Query time per slide: p50" in result.output and "SISH ~18 s" in result.output
    assert "1 indexed slides without a 'diagnosis' value left out" in result.output
    doc = json.loads(out.read_text())
    enc = doc["encoders"][0]
    assert (
        doc["dataset"]["kind"] == "archive"
        and doc["dataset"]["counts"]["items"] == 5
        and doc["parameters"]["exclusion"] == "patient"
    )
    assert (
        enc["metrics"]["query_time"]["queries"] == 5
        and enc["metrics"]["query_time"]["p95_s"] >= enc["metrics"]["query_time"]["p50_s"]
    )
    assert (tmp / "slides.png").read_bytes()[:4] == b"\x89PNG"

    # the same figures from the search engine's answers, computed here
    from engine.search import SearchEngine

    engine = SearchEngine(settings)
    cat = Catalog(settings.catalog_url)
    with cat.session() as s:
        from engine.catalog.models import Slide

        slides = s.execute(select(Slide.id, Slide.diagnosis, Slide.patient).order_by(Slide.id)).all()
        runs = s.scalars(select(BenchmarkRun)).all()
    cat.dispose()
    labelled = [(sid, d, p) for sid, d, p in slides if d]
    ranked = {
        sid: [h.slide["id"] for h in engine.search_slide(sid, top_k=len(slides), exclude_self=True).results]
        for sid, _, _ in labelled
    }
    plain = plain_scores([d for _, d, _ in labelled], [p for _, _, p in labelled], ranked, 3)
    labels = [d for _, d, _ in labelled]
    for k in (1, 3):
        mv = [vote(row[:k]) == lab for row, lab in zip(plain, labels)]
        assert enc["metrics"]["overall"][f"mv@{k}"] == pytest.approx(np.mean(mv)), k
    assert [r.id for r in runs] == [enc["catalog_run_id"]] and runs[0].dataset_kind == "archive"
    assert runs[0].metrics["query_time"]["queries"] == 5


def test_cli_archive_and_dataset_are_exclusive(tmp_path):
    result = CliRunner().invoke(main, ["benchmark", "--encoder", ENCODER, "--data-dir", str(tmp_path)])
    assert result.exit_code != 0 and "either --dataset" in result.output


def test_web_benchmarks_page_shows_the_slide_run_protocol_and_query_time(labelled_archive):
    from tests.test_webapp import PASSWORD, login, make_app
    from webapp import users

    tmp, settings = labelled_archive
    args = [
        "benchmark",
        "--archive",
        "--protocol",
        "yottixel",
        "--k",
        "1,3",
        "--encoder",
        ENCODER,
        "--catalog",
        settings.catalog_url,
        "--index-dir",
        str(settings.index_dir),
        "--data-dir",
        str(settings.data_dir),
        "--device",
        "cpu",
        "--plot",
        str(tmp / "web.png"),
    ]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    app = make_app(tmp / "web", settings.catalog_url)
    users.create_user(app.extensions["histoseek"].catalog, "path", PASSWORD)
    client = app.test_client()
    assert login(client).status_code == 302
    listing = client.get("/benchmarks").text
    assert "archive" in listing and "yottixel" in listing and "macro_f1@3" in listing and "s/query" in listing
    run_id = max(r["id"] for r in client.get("/api/v1/benchmarks").json["runs"])
    detail = client.get(f"/benchmarks/{run_id}").text
    assert "Protocol: yottixel" in detail and 'id="query-time"' in detail and "SISH ~18.0 s" in detail
    plot = client.get(f"/benchmarks/{run_id}/plot.png")
    assert plot.status_code == 200 and plot.mimetype == "image/png"
