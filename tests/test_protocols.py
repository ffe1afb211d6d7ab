"""The peers' protocols (retccl, sish, yottixel) against a plain, separate computation of each
figure from the same neighbour lists: written out per query in plain Python, sharing no helper
with engine.evaluation (macro-F1 through scikit-learn's classification_report, as Yottixel
reports it); ties, missing results and queries with fewer than k results included. Then the
CLI on the shared patches against `engine features` of the same encoder."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from sklearn.metrics import classification_report

from engine.cli.main import main
from engine.evaluation.metrics import MISSING, encode_labels
from engine.evaluation.protocols import PROTOCOLS, protocol_figures

ENCODER = "random:resnet18"


# ---- the plain computations: one query at a time, lists of string labels ------------------


def plain_vote(ranked: list[str]) -> str | None:
    """Majority label; a tie goes to the tied label seen first in rank order."""
    if not ranked:
        return None
    counts: dict[str, int] = {}
    for lab in ranked:
        counts[lab] = counts.get(lab, 0) + 1
    top = max(counts.values())
    for lab in ranked:
        if counts[lab] == top:
            return lab
    raise AssertionError


def plain_mmv(truth: list[str], rows: list[list[str]], k: int) -> float:
    per_class: dict[str, list[bool]] = {}
    for lab, row in zip(truth, rows):
        per_class.setdefault(lab, []).append(plain_vote(row[:k]) == lab)
    return sum(sum(v) / len(v) for v in per_class.values()) / len(per_class)


def plain_sish_map(truth: list[str], rows: list[list[str]], k: int) -> float:
    """SISH eval.py: (1/k) x the sum of precision@i at each relevant rank i <= k."""
    total = 0.0
    for lab, row in zip(truth, rows):
        relevant, s = 0, 0.0
        for i, got in enumerate(row[:k], start=1):
            if got == lab:
                relevant += 1
                s += relevant / i
        total += s / k
    return total / len(truth)


def plain_figures(protocol: str, truth: list[str], rows: list[list[str]], ks) -> dict[str, float]:
    ks = sorted(ks)
    out = {}
    if protocol == "retccl":
        for k in ks:
            out[f"acc@{k}"] = sum(lab in row[:k] for lab, row in zip(truth, rows)) / len(truth)
        out[f"mMV@{ks[-1]}"] = plain_mmv(truth, rows, ks[-1])
    elif protocol == "sish":
        for k in ks:
            out[f"mMV@{k}"] = plain_mmv(truth, rows, k)
        for k in ks:
            out[f"mAP@{k}"] = plain_sish_map(truth, rows, k)
    else:
        for k in ks:
            predicted = [plain_vote(row[:k]) or "<none>" for row in rows]
            labels = sorted(set(truth) | {p for p in predicted if p != "<none>"})
            report = classification_report(truth, predicted, labels=labels, output_dict=True, zero_division=0)
            out[f"macro_f1@{k}"] = report["macro avg"]["f1-score"]
    return out


def engine_figures(protocol: str, truth: list[str], rows: list[list[str]], ks) -> dict[str, float]:
    codes, classes = encode_labels(truth)
    index = {c: i for i, c in enumerate(classes)}
    width = max(ks)
    neigh = np.full((len(rows), width), MISSING, np.int64)
    for q, row in enumerate(rows):
        for j, lab in enumerate(row[:width]):
            neigh[q, j] = index.get(lab, len(classes) + 7)  # a label no query has
    return protocol_figures(protocol, codes, neigh, ks)


# ---- neighbour lists by hand --------------------------------------------------------------

TRUTH = ["a", "a", "a", "b", "b", "c", "c", "d"]
ROWS = [
    ["b", "a", "b", "a", "c"],  # 2-2 tie: b ranked first wins
    ["a", "b", "b", "c", "a"],
    ["c", "c"],  # fewer than k results
    ["a", "b", "c", "d", "b"],  # 1-1-1-1 tie at k = 4: a wins
    [],  # nothing left after the exclusion
    ["c", "e", "e", "c", "c"],  # a label no query has
    ["d", "d", "c", "a", "c"],
    ["a", "a", "d", "d", "d"],
]


@pytest.mark.parametrize("protocol", sorted(PROTOCOLS))
@pytest.mark.parametrize("ks", [(1, 3, 5), (5,), (2, 4), (5, 10)])
def test_protocol_figures_equal_a_plain_computation(protocol, ks):
    if max(ks) > 5:
        rows = [row + ["a", "b"] * 3 for row in ROWS]  # long lists: all but the short ones
        rows[2], rows[4] = ROWS[2], ROWS[4]
    else:
        rows = ROWS
    got = engine_figures(protocol, TRUTH, rows, ks)
    want = plain_figures(protocol, TRUTH, rows, ks)
    assert list(got) == list(want)
    for key in want:
        assert got[key] == pytest.approx(want[key], abs=1e-12), key


def test_hand_values_of_ties_and_short_queries():
    sish = engine_figures("sish", TRUTH, ROWS, (5,))
    # AP@5 with SISH's 1/5: relevant ranks q0 2,4; q1 1,5; q2 none; q3 2,5; q4 nothing
    # retrieved; q5 1,4,5; q6 3,5; q7 3,4,5
    aps = [
        (1 / 2 + 2 / 4) / 5,
        (1 + 2 / 5) / 5,
        0,
        (1 / 2 + 2 / 5) / 5,
        0,
        (1 + 2 / 4 + 3 / 5) / 5,
        (1 / 3 + 2 / 5) / 5,
        (1 / 3 + 2 / 4 + 3 / 5) / 5,
    ]
    assert sish["mAP@5"] == pytest.approx(sum(aps) / 8)
    yot = engine_figures("yottixel", TRUTH, ROWS, (1,))
    # top-1 predictions: b a c a (none) c d a for the truths a a a b b c c d
    # F1 = 2TP / (2TP + FP + FN): a 2/6; b 0; c 2/4; d 0
    assert yot["macro_f1@1"] == pytest.approx((1 / 3 + 0 + 1 / 2 + 0) / 4)


# ---- the CLI on the shared patches against `engine features` ------------------------------


@pytest.fixture(scope="module")
def patches_features(shared_data, tmp_path_factory):
    """Features of the labelled patches by `engine features` (same encoder, fp32)."""
    import csv

    tmp = tmp_path_factory.mktemp("protocol-features")
    table = shared_data / "patches" / "labels.csv"
    with open(table, newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r["label_nct9"]]
    paths = [str(table.parent / r["path"]) for r in rows]
    label_of = {p: r["label_nct9"] for p, r in zip(paths, rows)}
    out = tmp / "feats.npy"
    result = CliRunner().invoke(
        main,
        [
            "features",
            *paths,
            "--out",
            str(out),
            "--encoder",
            ENCODER,
            "--precision",
            "fp32",
            "--workers",
            "0",
            "--data-dir",
            str(tmp / "d"),
        ],
    )
    assert result.exit_code == 0, result.output
    feats = np.load(out)
    sidecar = json.loads(out.with_suffix(".json").read_text())
    assert sidecar["rows"] == len(paths) == 66 and not sidecar["skipped"]
    return tmp, table, feats, [label_of[p] for p in sidecar["paths"]]


def plain_neighbour_lists(feats: np.ndarray, labels: list[str]) -> list[list[str]]:
    """Leave-one-image-out: cosine to every other row, best first, ties by row order."""
    x = feats / np.linalg.norm(feats, axis=1, keepdims=True)
    return [
        [labels[j] for _, j in sorted((-float(x[q] @ x[j]), j) for j in range(len(x)) if j != q)] for q in range(len(x))
    ]


@pytest.mark.parametrize("protocol", ["yottixel", "sish"])
def test_cli_protocol_figures_equal_an_independent_computation_from_engine_features(protocol, patches_features):
    tmp, table, feats, labels = patches_features
    report = tmp / f"{protocol}.json"
    args = [
        "benchmark",
        "--dataset",
        f"csv:{table}",
        "--label-column",
        "label_nct9",
        "--protocol",
        protocol,
        "--json",
        str(report),
        "--encoder",
        ENCODER,
        "--precision",
        "fp32",
        "--workers",
        "0",
        "--no-store",
        "--data-dir",
        str(tmp / "bench"),
    ]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert f"Protocol: {protocol}" in result.output
    doc = json.loads(report.read_text())
    assert doc["protocol"]["name"] == protocol and doc["parameters"]["protocol"] == protocol
    got = doc["encoders"][0]["metrics"]["protocol"]["figures"]
    ks = doc["parameters"]["k"]
    assert ks == ([5, 10] if protocol == "sish" else [1, 3, 5])
    # the data set order differs from `engine features`' sorted order; figures must not care
    # except through score ties, which random features on distinct images do not have
    want = plain_figures(protocol, labels, plain_neighbour_lists(feats, labels), ks)
    assert set(got) == set(want)
    for key in want:
        assert got[key] == pytest.approx(want[key], abs=1e-6), key
    if protocol == "yottixel":
        assert set(got) == {"macro_f1@1", "macro_f1@3", "macro_f1@5"}
    else:
        assert set(got) == {"mMV@5", "mMV@10", "mAP@5", "mAP@10"}


def test_default_protocol_is_retccl_with_todays_figures(tmp_path):
    from engine.evaluation.benchmark import evaluate
    from engine.evaluation.datasets import Item, LabelledSet

    feats = np.array([[1, 0], [1, 0], [1, 0], [0.6, 0.8], [0, 1]], np.float32)
    items = [
        Item(key=str(i), label=lab, path=None, slide=s, patient=s)
        for i, (lab, s) in enumerate(zip(["a", "b", "a", "b", "b"], ["s1", "s2", "s3", "s1", "s4"]))
    ]
    r = evaluate(feats, LabelledSet("csv", "tiny.csv", items, label_column="label"), (1, 3), "slide")
    assert r["protocol"]["name"] == "retccl"
    figures = r["protocol"]["figures"]
    assert figures == {"acc@1": r["overall"]["acc@1"], "acc@3": r["overall"]["acc@3"], "mMV@3": r["overall"]["mmv@3"]}
