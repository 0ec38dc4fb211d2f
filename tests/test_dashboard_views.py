"""The dashboard views (migration 0003) give the same rows on SQLite and PostgreSQL."""

from __future__ import annotations

from collections import Counter

import pytest
from sqlalchemy import inspect, select, text

from ct_triage.runtime import open_database
from db import views
from db.migrate import alembic_config
from tests.conftest import make_settings
from tests.support.dashboard import (
    DELIVERY_S,
    QUEUE_WAIT_S,
    RECEIVE_TO_STABLE_S,
    SCORING_S,
    WORKLIST_ORDER,
    seed_dashboard,
)


@pytest.fixture
def seeded(tmp_path, database_url):
    engine, factory = open_database(make_settings(tmp_path, database_url))
    studies = seed_dashboard(factory)
    yield engine, factory, studies
    engine.dispose()


def test_the_migration_creates_every_view_with_the_declared_columns(seeded):
    engine, _, _ = seeded
    inspector = inspect(engine)
    assert set(inspector.get_view_names()) >= {v.name for v in views.ALL_VIEWS}
    with engine.connect() as conn:
        for view in views.ALL_VIEWS:
            columns = list(conn.execute(text(f"SELECT * FROM {view.name} LIMIT 0")).keys())
            assert columns == [c.name for c in view.columns], view.name


def test_worklist_orders_current_versions_by_priority_then_arrival(seeded):
    _, factory, studies = seeded
    with factory() as session:
        rows = views.worklist_rows(session)
    by_uid = {s.uid: key for key, s in studies.items()}
    assert [by_uid[r.study_instance_uid] for r in rows] == WORKLIST_ORDER
    for row in rows:
        spec = studies[by_uid[row.study_instance_uid]]
        assert (row.state, row.priority, row.category) == (spec.state, spec.priority, spec.category), spec.key
        assert row.accession_number == spec.accession
        assert row.waiting_s == pytest.approx(spec.minutes_ago * 60, abs=30)
        assert row.arrived_at.tzinfo is not None
    c = next(r for r in rows if r.study_instance_uid == studies["C"].uid)
    assert c.version == 2 and c.category == "CT-2"  # the superseded CT-1 version is gone
    assert (c.involvement_percent_left, c.involvement_percent_right) == (30.0, 36.0)
    e = next(r for r in rows if r.study_instance_uid == studies["E"].uid)
    assert e.reason.startswith("series rejected")
    d = next(r for r in rows if r.study_instance_uid == studies["D"].uid)
    assert d.reason == "not scored yet" and d.result_id is None
    with factory() as session:
        recent = views.worklist_rows(session, received_within_s=45 * 60)
    assert {r.study_instance_uid for r in recent} == {studies[k].uid for k in "DFG"}


def test_turnaround_has_every_interval_in_seconds(seeded):
    _, factory, studies = seeded
    with factory() as session:
        rows = [dict(r) for r in session.execute(select(views.turnaround)).mappings()]
    assert len(rows) == 6  # five current results + the superseded version of C
    assert sum(r["superseded"] for r in rows) == 1
    for row in rows:
        assert row["receive_to_stable_s"] == pytest.approx(RECEIVE_TO_STABLE_S, abs=0.01)
        assert row["queue_wait_s"] == pytest.approx(QUEUE_WAIT_S, abs=0.01)
        assert row["scoring_s"] == pytest.approx(SCORING_S, abs=0.01)
        assert row["received_to_scored_s"] == pytest.approx(RECEIVE_TO_STABLE_S + QUEUE_WAIT_S + SCORING_S,
                                                             abs=0.01)
    a = next(r for r in rows if r["study_instance_uid"] == studies["A"].uid)
    assert a["delivery_s"] == pytest.approx(DELIVERY_S, abs=0.01)
    assert a["received_to_delivered_s"] == pytest.approx(RECEIVE_TO_STABLE_S + QUEUE_WAIT_S + SCORING_S + DELIVERY_S,
                                                          abs=0.01)
    assert sum(r["delivered_at"] is not None for r in rows) == 1


def test_throughput_hourly_counts_every_event_once(seeded):
    _, factory, _ = seeded
    with factory() as session:
        rows = [dict(r) for r in session.execute(select(views.throughput_hourly)).mappings()]
    totals = Counter()
    for row in rows:
        assert row["hour"].minute == 0 and row["hour"].second == 0 and row["hour"].tzinfo is not None
        totals.update({k: v for k, v in row.items() if k != "hour"})
    assert totals == Counter(studies_received=7, studies_scored=5, studies_failed=1, studies_not_applicable=0,
                             studies_delivered=1, instances_received=21, instances_rejected=1)


def test_category_mix_counts_current_versions(seeded):
    _, factory, _ = seeded
    with factory() as session:
        rows = session.execute(select(views.category_mix_daily)).mappings().all()
    mix = Counter()
    for row in rows:
        assert (row["day"].hour, row["day"].minute) == (0, 0)
        mix[row["category"]] += row["studies"]
    assert mix == Counter({"CT-1": 1, "CT-2": 1, "CT-3": 1, "CT-4": 1, "failed": 1})


def test_failures_list_rejections_failed_scoring_and_deliveries_with_reasons(seeded):
    _, factory, studies = seeded
    with factory() as session:
        rows = session.execute(select(views.failures).order_by(views.failures.c.kind)).mappings().all()
    kinds = {r["kind"]: r for r in rows}
    assert sorted(kinds) == ["delivery_failed", "delivery_retrying", "rejected_instance", "scoring_failed"]
    assert kinds["rejected_instance"]["status_code"] == 0xC210 and kinds["rejected_instance"]["peer"] == "SCANNER"
    assert kinds["scoring_failed"]["study_instance_uid"] == studies["E"].uid
    assert kinds["delivery_failed"]["reason"].startswith("association rejected")
    assert kinds["delivery_retrying"]["reason"] == "connection refused"
    assert all(r["at"] is not None and r["reason"] for r in rows)


def test_queue_depth_shows_what_waits_where(seeded):
    _, factory, _ = seeded
    with factory() as session:
        rows = session.execute(select(views.queue_depth)).mappings().all()
    depth = {(r["queue"], r["state"]): r for r in rows}
    assert {k: r["items"] for k, r in depth.items()} == {("series", "receiving"): 1, ("scoring", "queued"): 1,
                                                         ("delivery", "retrying"): 1}
    assert depth[("series", "receiving")]["oldest_waiting_s"] == pytest.approx(0, abs=30)


def test_downgrade_drops_the_views(tmp_path, sqlite_url):
    from alembic import command

    engine, _ = open_database(make_settings(tmp_path, sqlite_url))
    config = alembic_config(sqlite_url)
    command.downgrade(config, "0002")
    assert not set(inspect(engine).get_view_names()) & {v.name for v in views.ALL_VIEWS}
    command.upgrade(config, "head")
    assert set(inspect(engine).get_view_names()) >= {v.name for v in views.ALL_VIEWS}
    engine.dispose()
