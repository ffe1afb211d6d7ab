"""Shared fixtures: catalogs on SQLite and PostgreSQL, the shared real data, small
checkpoints made here, and a folder for test outputs (screenshots, plots)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import sqlalchemy as sa

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
TEST_OUTPUT = REPO / "test-output"
POSTGRES_ENV = "HISTOSEEK_TEST_POSTGRES"


def in_ci() -> bool:
    return bool(os.environ.get("CI"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data: real slides and patches. Missing: a failure in CI, a skip elsewhere."""
    if not SHARED_DATA.is_dir():
        if in_ci():
            pytest.fail(f"CI is set but {SHARED_DATA} is missing: CI must have ../shared beside the checkout")
        pytest.skip("../shared/data is not here (fresh clone); these tests need the shared real data")
    return SHARED_DATA


@pytest.fixture
def test_output(request) -> Path:
    """A per-test folder under test-output/ that is kept after the run."""
    out = TEST_OUTPUT / request.node.name.replace("/", "_").replace("[", "_").replace("]", "")
    out.mkdir(parents=True, exist_ok=True)
    return out


def _reset_postgres(url: str) -> None:
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.execute(sa.text("DROP SCHEMA IF EXISTS public CASCADE"))
        conn.execute(sa.text("CREATE SCHEMA public"))
    engine.dispose()


def postgres_url() -> str | None:
    url = os.environ.get(POSTGRES_ENV)
    if not url:
        if in_ci():
            pytest.fail(f"CI is set but {POSTGRES_ENV} is not: .ci/run must start PostgreSQL and set it")
        pytest.skip(f"set {POSTGRES_ENV}=postgresql+psycopg://... to run catalog tests on PostgreSQL")
    return url


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def catalog_url(request, tmp_path) -> str:
    """An empty catalog database URL, on SQLite and (when configured) PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'catalog.sqlite'}"
    url = postgres_url()
    _reset_postgres(url)
    return url


@pytest.fixture(scope="module")
def one_faiss_thread():
    """FAISS on one thread for a module: the test machine's cores are shared, and OpenMP
    spinning on busy cores makes small searches much slower."""
    import faiss

    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)


@pytest.fixture
def sqlite_url(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'catalog.sqlite'}"
