"""Shared fixtures: databases (SQLite and PostgreSQL), an in-process DICOM node, real data."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest

from tests.support.data import SHARED_DATA, missing_data

REPO_ROOT = Path(__file__).resolve().parents[1]
POSTGRES_ADMIN_URL = os.environ.get("CT_TRIAGE_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("CT_TRIAGE_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")


def _unavailable(what: str, exc: Exception):
    # In CI every service must be there: a missing one is a failure, not a skip.
    if os.environ.get("CI"):
        pytest.fail(f"{what} unavailable in CI: {exc}")
    pytest.skip(f"{what} unavailable: {exc}")


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        missing_data(f"real test data not found at {SHARED_DATA} (clone beside shared/)")
    return SHARED_DATA


@pytest.fixture
def postgres_url():
    """A fresh PostgreSQL database for one test, dropped afterwards."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    admin = create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    name = f"cttriage_{uuid.uuid4().hex[:12]}"
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    except Exception as exc:  # connection refused, auth: not this test's subject
        admin.dispose()
        _unavailable("PostgreSQL", exc)
    url = make_url(POSTGRES_ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    yield url
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'db' / 'ct-triage.sqlite'}"
    return request.getfixturevalue("postgres_url")


@pytest.fixture
def sqlite_url(tmp_path):
    return f"sqlite:///{tmp_path / 'db' / 'ct-triage.sqlite'}"


@pytest.fixture
def redis_url():
    import redis

    client = redis.Redis.from_url(REDIS_URL)
    try:
        client.ping()
    except Exception as exc:
        _unavailable("Redis", exc)
    client.flushdb()
    yield REDIS_URL
    client.flushdb()


def make_settings(tmp_path: Path, database_url: str, **overrides):
    from ct_triage.settings import Settings
    from tests.support.scanner import free_port

    values = dict(var_dir=tmp_path / "var", database_url=database_url, storage_dir=tmp_path / "storage",
                  bind_address="127.0.0.1", port=free_port(), stable_age_s=2.0, poll_interval_s=0.2,
                  min_free_disk_mb=1)
    values.update(overrides)
    return Settings.from_env({}, **values)


class RunningNode:
    def __init__(self, settings, engine, session_factory, node):
        self.settings = settings
        self.engine = engine
        self.session_factory = session_factory
        self.node = node

    @property
    def port(self) -> int:
        return self.node.port

    def session(self):
        # Rows are written by the node's background indexer: read after it caught up.
        self.node.store.indexer.flush()
        return self.session_factory()


@pytest.fixture
def start_node(tmp_path):
    """start_node(database_url, **settings) -> RunningNode; stopped at teardown."""
    from ct_triage.contract import make_publisher
    from ct_triage.runtime import open_database
    from dicom_node import DicomNode

    started = []

    def _start(database_url: str, **overrides) -> RunningNode:
        settings = make_settings(tmp_path, database_url, **overrides)
        engine, session_factory = open_database(settings)
        node = DicomNode(settings, session_factory, make_publisher(settings.broker_url))
        node.start()
        running = RunningNode(settings, engine, session_factory, node)
        started.append(running)
        return running

    yield _start
    for running in started:
        running.node.stop()
        running.engine.dispose()


@pytest.fixture
def start_serve(start_node):
    """start_serve(database_url, **settings) -> RunningNode with an embedded worker in this
    process, as `ct-triage serve` composes them; both stopped at teardown."""
    from ct_triage.contract import EmbeddedPublisher
    from worker.tasks.context import WorkerContext
    from worker.tasks.embedded import EmbeddedConsumer

    consumers = []

    def _start(database_url: str, **overrides) -> RunningNode:
        running = start_node(database_url, **overrides)
        consumer = EmbeddedConsumer(WorkerContext(running.settings, running.session_factory, EmbeddedPublisher()),
                                    poll_interval_s=0.2)
        consumer.start()
        consumers.append(consumer)
        return running

    yield _start
    for consumer in consumers:
        consumer.stop()


@pytest.fixture(scope="module")
def ct(request):
    """The module's synthetic chest CT: ``make_chest_ct(**CHEST_CT)`` with the module's ``CHEST_CT``."""
    from tests.support.ct_datasets import make_chest_ct

    return make_chest_ct(**request.module.CHEST_CT)


@pytest.fixture(scope="module")
def result(ct):
    """A scored result consistent with ``ct`` (numbers from its masks)."""
    return ct.score_result()
