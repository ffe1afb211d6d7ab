"""The compact re-ranking store (issue 18) against exact float32 search; converting an index
from the float16 full-dim layout; slides added after training; interrupted builds resume;
the drift check; the online swap of a rebuilt index."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import engine.index.lifecycle as lifecycle
from engine.index import CompressedIndex, exact_search, open_index, recall_at_k
from engine.index.convert import convert, drift_check, rebuild
from engine.index.synthetic import ClusteredVectors
from engine.shards import ShardEncoder, write_shard

DIM = 512  # PCA-256 of 512-d: the compact store drops half the dimensions, as at 2048-d
N = 20_000

pytestmark = pytest.mark.usefixtures("one_faiss_thread")


@pytest.fixture(scope="module")
def data():
    gen = ClusteredVectors(dim=DIM, tiles_per_slide=500, n_classes=10, n_patterns=12, seed=7)
    ids, xb = gen.chunk(0, N)
    return ids * 3 + 5, xb, gen.queries(200, N, seed=9), gen


def build(folder: Path, ids, xb, store: str, key: str = "all") -> CompressedIndex:
    index = CompressedIndex.train(folder, xb, nlist=64, m=16, store=store)
    index.manifest["nprobe"] = 16  # a quarter of the lists, as at archive scale
    index.add(ids, xb, key=key)
    index.save()
    return index


@pytest.fixture(scope="module")
def legacy(data, tmp_path_factory) -> Path:
    """An index in the layout written before issue 18: float16 full vectors, no "rerank"
    key in the manifest."""
    ids, xb, _, _ = data
    folder = tmp_path_factory.mktemp("legacy")
    build(folder, ids, xb, "f16")
    manifest = json.loads((folder / "manifest.json").read_text())
    del manifest["rerank"]
    (folder / "manifest.json").write_text(json.dumps(manifest))
    assert (folder / "vectors.f16").stat().st_size == N * DIM * 2
    return folder


def test_compact_store_recall_against_exact(data, tmp_path):
    ids, xb, xq, _ = data
    _, I_exact = exact_search(xq, xb, ids, 10)
    recalls = {}
    for store in ("pca-f16", "pca-sq8", "f16"):
        index = build(tmp_path / store, ids, xb, store)
        D, I = index.search(xq, 10)
        recalls[store] = recall_at_k(I, I_exact, 10)
        assert np.all(np.diff(D, axis=1) <= 1e-6)
        if store != "f16":
            assert index.disk_bytes() == N * 512  # 512 B per tile (256 x 2 B, or 512 x 1 B)
            # scores of the coded vectors stay close to the exact cosine similarities
            top = np.array([xb[np.flatnonzero(ids == i)[0]] @ q for i, q in zip(I[:, 0], xq)])
            np.testing.assert_allclose(D[:, 0], top, atol=0.02)
    assert CompressedIndex.open(tmp_path / "pca-f16").manifest["rerank"]["kind"] == "pca-f16"  # the default
    assert recalls["pca-f16"] >= 0.95 and recalls["pca-sq8"] >= 0.9, recalls


def test_converted_index_answers_as_before(data, legacy, tmp_path):
    ids, xb, xq, _ = data
    top = tmp_path / "compressed"
    shutil.copytree(legacy, top)
    old = CompressedIndex.open(top)
    assert old.rowstore.codec.kind == "f16" and old.disk_bytes() == N * DIM * 2
    D_old, I_old = old.search(xq, 10)
    C_old = old.ivfpq.candidates(xq, old.shortlist, old.nprobe)

    # converting into the same layout changes nothing at all
    same = convert(top, "f16")
    D_same, I_same = same.search(xq, 10)
    np.testing.assert_array_equal(I_same, I_old)
    np.testing.assert_array_equal(D_same, D_old)

    new = convert(top, "pca-f16")
    reopened = CompressedIndex.open(top)  # the pointer names the new generation
    assert reopened.folder == new.folder != top and reopened.manifest["rerank"]["kind"] == "pca-f16"
    assert reopened.disk_bytes() == N * 512 and reopened.manifest["shards"] == old.manifest["shards"]
    # the same IVF-PQ codes: identical candidate rows for every query, so only the re-ranking
    # precision differs (float16 of 512 dims vs of their 256-d PCA rotation)
    np.testing.assert_array_equal(reopened.ivfpq.candidates(xq, old.shortlist, old.nprobe), C_old)
    D_new, I_new = reopened.search(xq, 10)
    assert recall_at_k(I_new, I_old, 10) >= 0.95
    assert np.mean(I_new[:, 0] == I_old[:, 0]) >= 0.95
    np.testing.assert_allclose(D_new, D_old, atol=0.02)
    # the index opened before the swap still answers, and does not save over the new one
    np.testing.assert_array_equal(old.search(xq, 10)[1], I_old)
    old.save()
    assert CompressedIndex.open(top).folder == new.folder


def test_slide_added_after_training_is_found(data, tmp_path):
    ids, xb, _, gen = data
    index = build(tmp_path, ids, xb, "pca-f16")
    trained_n = index.manifest["trained_n"]
    new_ids, new_xb = gen.chunk(N, N + 500)  # a slide the index was not trained on
    new_ids = new_ids * 3 + 5
    index.add(new_ids, new_xb, key="new-slide")
    index.save()
    reopened = CompressedIndex.open(tmp_path)
    assert reopened.manifest["trained_n"] == trained_n and reopened.ntotal == N + 500
    D, I = reopened.search(new_xb[:100], 1)
    assert np.mean(I[:, 0] == new_ids[:100]) >= 0.95 and np.median(D[:, 0]) > 0.98
    assert reopened.remove_shard("new-slide") == 500
    assert not np.isin(reopened.search(new_xb[:100], 10)[1], new_ids).any()


@pytest.fixture(scope="module")
def shards(data, tmp_path_factory) -> dict[str, Path]:
    ids, xb, _, _ = data
    enc = ShardEncoder("test", "0" * 64, DIM, 1.0, 224)
    folder = tmp_path_factory.mktemp("shards")
    paths = {}
    for s in range(5):
        sl = slice(s * 4000, (s + 1) * 4000)
        sha = write_shard(folder / f"shard-{s}.faiss", ids[sl], xb[sl], enc)
        paths[f"shard-{s}.faiss:{sha}"] = folder / f"shard-{s}.faiss"
    return paths


class Crash(Exception):
    pass


def crash_after(monkeypatch, calls: int):
    """read_shard raises after `calls` calls, as a killed build would stop."""
    real = lifecycle.read_shard
    count = {"n": 0}

    def read(*args):
        count["n"] += 1
        if count["n"] > calls:
            raise Crash
        return real(*args)

    monkeypatch.setattr(lifecycle, "read_shard", read)


def test_interrupted_build_resumes(data, shards, tmp_path, monkeypatch):
    ids, xb, xq, _ = data
    folder = tmp_path / "compressed"
    # 5 checked reads before training, then one per shard added: stop after 2 are in
    crash_after(monkeypatch, 5 + 2)
    with pytest.raises(Crash):
        open_index("compressed", DIM, shards, folder=folder, save_every_s=0)
    monkeypatch.undo()
    half = CompressedIndex.open(folder)  # consistent: the shards saved before the crash
    assert half.ntotal == 8000 and len(half.keys) == 2
    trained_n = half.manifest["trained_n"]

    def no_training(*args, **kwargs):
        raise AssertionError("a resumed build must not train again")

    monkeypatch.setattr(CompressedIndex, "train", no_training)
    index = open_index("compressed", DIM, shards, folder=folder, save_every_s=0)
    assert index.ntotal == N and index.keys == set(shards) and index.manifest["trained_n"] == trained_n
    _, I_exact = exact_search(xq, xb, ids, 10)
    assert recall_at_k(index.search(xq, 10)[1], I_exact, 10) >= 0.95


def test_online_rebuild_resumes_and_swaps(data, legacy, shards, tmp_path, monkeypatch):
    ids, xb, xq, _ = data
    top = tmp_path / "compressed"
    shutil.copytree(legacy, top)
    serving = CompressedIndex.open(top)
    before = serving.search(xq, 10)[1]
    crash_after(monkeypatch, 5 + 3)
    with pytest.raises(Crash):
        rebuild(top, DIM, shards, save_every_s=0)
    monkeypatch.undo()
    # the old index is still the one the folder opens, and answers as before
    assert CompressedIndex.open(top).folder == top
    np.testing.assert_array_equal(CompressedIndex.open(top).search(xq, 10)[1], before)
    building = top / json.loads((top / "building.json").read_text())["folder"]
    assert CompressedIndex.open(building).ntotal == 12_000
    index = rebuild(top, DIM, shards, save_every_s=0)
    assert index.folder == building and CompressedIndex.open(top).folder == building
    assert not (top / "building.json").exists() and (top / "vectors.f16").exists()  # kept until the next swap
    report = drift_check(CompressedIndex.open(top), shards, n_queries=100)
    assert report["recall_at_10"] >= 0.95 and not report["retrain"], report
    assert report["store"] == "pca-f16"


def test_drift_check_says_when_retraining_pays(legacy, shards, tmp_path):
    shutil.copytree(legacy, tmp_path / "c")
    index = CompressedIndex.open(tmp_path / "c")
    index.nprobe = 1  # a degraded index: one list of 64 probed
    report = drift_check(index, shards, n_queries=100)
    assert report["recall_at_10"] < 0.95 and report["retrain"], report


def test_indexer_reindex_command(tmp_path):
    """`indexer reindex` builds the index of the catalog's encoder aside and swaps it in;
    `--check` measures it; `--convert` rewrites its row store only."""
    from click.testing import CliRunner

    from engine.config import Settings
    from engine.encoder import Encoder
    from engine.shards import encoder_dir
    from indexer.cli import main
    from tests.test_search_index import fill_archive

    url, index_dir = f"sqlite:///{tmp_path / 'catalog.sqlite'}", tmp_path / "index"
    settings = Settings.load(env={}, catalog_url=url, index_dir=str(index_dir), device="cpu")
    catalog, _, (shard_enc, _, _) = fill_archive(settings, Encoder.from_spec("random:resnet18", device="cpu"), 8)
    catalog.dispose()
    args = ["--catalog", url, "--index-dir", str(index_dir)]
    folder = encoder_dir(index_dir, shard_enc) / "compressed"
    result = CliRunner().invoke(main, ["reindex", *args])
    assert result.exit_code == 0, result.output
    built = CompressedIndex.open(folder)
    assert built.folder.parent == folder and built.ntotal == 12_000
    result = CliRunner().invoke(main, ["reindex", "--check", "--queries", "50", *args])
    assert result.exit_code == 0, result.output
    (report,) = json.loads(result.output)
    assert report["recall_at_10"] >= 0.95 and report["retrain"] is False
    result = CliRunner().invoke(main, ["reindex", "--convert", "--store", "pca-sq8", *args])
    assert result.exit_code == 0, result.output
    converted = CompressedIndex.open(folder)
    assert converted.manifest["rerank"]["kind"] == "pca-sq8" and converted.ntotal == 12_000
