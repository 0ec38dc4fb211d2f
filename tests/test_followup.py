"""Follow-up studies end to end (issue 12): one phantom patient scanned twice, sent with storescu.

The daemon (node + embedded worker) scores each study; the second is compared with the
first. Priors from a PACS: Orthanc holds the earlier study, ct-triage finds it with
C-FIND, C-MOVEs it to itself, scores it as a prior and issues a new result version.
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pytest
from sqlalchemy import func, select

from ct_triage_tools.followup import follow_up_copy, write_patient_phantom
from db import followup as fdb
from db import repository, views
from db.models import Delivery, Job, Result, Study, UpsWorkitem
from tests.support import orthanc as orthanc_support
from tests.support.orthanc import OrthancServer
from tests.support.scanner import require_dcmtk, storescu
from tests.test_node import wait_for
from worker.followup.priors import comparison_summary
from worker.scoring.result import category_for

T0 = dt.datetime(2026, 11, 27, 9, 30)
LATER = T0 + dt.timedelta(hours=36)


@pytest.fixture(autouse=True)
def _tools():
    require_dcmtk()


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> dict[int, Path]:
    root = tmp_path_factory.mktemp("followup")
    out = {}
    for percent in (20, 21, 25, 32, 45):
        write_patient_phantom(root / str(percent), percent)
        out[percent] = root / str(percent)
    return out


def result_of(running, study_uid: str, version: int | None = None) -> Result | None:
    with running.session() as session:
        query = select(Result).join(Study).where(Study.study_instance_uid == study_uid)
        if version is not None:
            query = query.where(Result.version == version)
        return session.scalar(query.order_by(Result.version.desc()).limit(1))


def scan(running, phantom: Path, folder: Path, when: dt.datetime, issuer: str | None = None) -> str:
    """Send one re-stamped phantom; wait for its result; return its Study Instance UID."""
    paths = follow_up_copy(phantom, folder, when, issuer=issuer)
    assert storescu(running.port, paths).returncode == 0
    uid = json.loads((phantom / "ground_truth.json").read_text())["study_instance_uid"]
    wait_for(lambda: result_of(running, uid), timeout=180, interval=0.3)
    return uid


def test_20_then_32_percent_in_36_hours_is_progression(start_serve, database_url, phantoms, tmp_path, monkeypatch,
                                                       capsys):
    running = start_serve(database_url)
    first = scan(running, phantoms[20], tmp_path / "a", T0)
    second = scan(running, phantoms[32], tmp_path / "b", LATER)
    before, after = result_of(running, first), result_of(running, second)
    assert before.category == "CT-1" and before.priority == "LOW" and before.reason is None
    assert category_for(after.involvement_percent) == "CT-2"  # the share alone says moderate
    assert after.category == "CT-3" and after.priority == "HIGH", after.reason
    assert after.reason.startswith("progression") and after.version == 1  # already in the first version
    with running.session() as session:
        rows = fdb.comparisons_of(session, after.id)
        summary = comparison_summary(session, after.id)
        status = repository.result_status(session)
        changes = dict(session.execute(select(Result.id, fdb.change_column(Result.id))).all())
        listed = {row.study_instance_uid: row.change_since_prior for row in views.worklist_rows(session)}
    assert changes == {before.id: None, after.id: "progression"}
    assert listed == {first: None, second: "progression"}  # the `worklist` view (migration 0008)
    assert len(rows) == 1 and rows[0].progression and rows[0].trend == "progression"
    assert rows[0].hours == pytest.approx(36) and rows[0].prior_result_fk == before.id
    assert rows[0].relative_percent >= 50 and rows[0].delta_points > 5 and rows[0].differences is None
    assert summary["progression"] and summary["category_from_percent"] == "CT-2"
    assert summary["prior_date"].startswith("2026-11-27") and summary["hours"] == pytest.approx(36)
    assert status[0].study_instance_uid == second and status[0].priority == "HIGH"
    # `ct-triage status` marks the progression
    from ct_triage_app.cli import main

    monkeypatch.setenv("CT_TRIAGE_DATABASE_URL", database_url)
    monkeypatch.setenv("CT_TRIAGE_VAR_DIR", str(tmp_path / "var"))
    capsys.readouterr()
    assert main(["status", "--wide"]) == 0
    results = capsys.readouterr().out.split("RESULTS", 1)[1]
    line = next(line for line in results.splitlines() if second in line)
    assert "PROGRESSION +" in line and "/36 h" in line and line.startswith("HIGH")
    assert next(line for line in results.splitlines() if first in line).split()[6] == "-"
    assert main(["status"]) == 0  # the compact view marks it too
    compact = capsys.readouterr().out.split("RESULTS", 1)[1].splitlines()
    assert [line.split()[0] for line in compact if "PROGRESSION +" in line] == ["HIGH"]


def test_20_then_21_percent_is_stable_and_stays_low(start_serve, sqlite_url, phantoms, tmp_path):
    running = start_serve(sqlite_url)
    scan(running, phantoms[20], tmp_path / "a", T0)
    second = result_of(running, scan(running, phantoms[21], tmp_path / "b", LATER))
    assert (second.category, second.priority) == ("CT-1", "LOW")
    assert second.reason.startswith("stable")
    with running.session() as session:
        assert comparison_summary(session, second.id)["trend"] == "stable"


def test_45_then_25_percent_is_improvement_category_from_current_share(start_serve, sqlite_url, phantoms, tmp_path):
    running = start_serve(sqlite_url)
    scan(running, phantoms[45], tmp_path / "a", T0)
    second = result_of(running, scan(running, phantoms[25], tmp_path / "b", LATER))
    assert second.reason.startswith("improvement")
    assert second.category == category_for(second.involvement_percent)
    with running.session() as session:
        summary = comparison_summary(session, second.id)
    assert summary["trend"] == "improvement" and summary["delta_points"] < -5 and not summary["progression"]


def test_same_patient_id_with_another_issuer_is_not_a_prior(start_serve, sqlite_url, phantoms, tmp_path):
    running = start_serve(sqlite_url)
    scan(running, phantoms[20], tmp_path / "a", T0, issuer="HOSPITAL-A")
    second = result_of(running, scan(running, phantoms[32], tmp_path / "b", LATER, issuer="HOSPITAL-B"))
    assert second.category == category_for(second.involvement_percent) == "CT-2" and second.reason is None
    with running.session() as session:
        assert comparison_summary(session, second.id) is None
        assert session.scalar(select(func.count(fdb.Comparison.id))) == 0


def test_prior_from_orthanc_found_retrieved_scored_compared_even_after_an_outage(
        start_serve, sqlite_url, phantoms, tmp_path):
    orthanc_support.require_orthanc()
    prior_files = follow_up_copy(phantoms[20], tmp_path / "prior", T0)
    current_files = follow_up_copy(phantoms[32], tmp_path / "current", LATER)
    # the same Patient ID from another issuing authority: another patient, never retrieved
    stranger_files = follow_up_copy(phantoms[45], tmp_path / "stranger", T0 + dt.timedelta(hours=12),
                                    issuer="ELSEWHERE")
    stranger_uid = json.loads((phantoms[45] / "ground_truth.json").read_text())["study_instance_uid"]
    prior_uid = json.loads((phantoms[20] / "ground_truth.json").read_text())["study_instance_uid"]
    current_uid = json.loads((phantoms[32] / "ground_truth.json").read_text())["study_instance_uid"]
    from tests.support.scanner import free_port

    our_port = free_port()
    archive = OrthancServer(tmp_path / "archive", aet="ARCHIVE", known_aets={"CTTRIAGE": ("127.0.0.1", our_port)},
                            accept_unknown=True)
    with archive, OrthancServer(tmp_path / "pacs", aet="PACS") as pacs:
        assert storescu(archive.dicom_port, prior_files + stranger_files, called="ARCHIVE").returncode == 0
        archive.stop()  # the archive is down when the current study comes in
        running = start_serve(sqlite_url, port=our_port, destinations=[str(pacs.destination)],
                        prior_sources=[str(archive.destination)], retry_base_s=1)
        assert storescu(running.port, current_files).returncode == 0

        def delivered(version):
            with running.session() as session:
                return session.scalar(select(Delivery).join(Result).join(Study)
                                      .where(Study.study_instance_uid == current_uid, Result.version == version,
                                             Delivery.state == "delivered"))
        # On time without the archive: version 1, from the current share alone, delivered.
        wait_for(lambda: delivered(1), timeout=180, interval=0.3)
        first = result_of(running, current_uid, 1)
        assert first.category == "CT-2" and first.reason is None

        def search_waiting():  # between two attempts (an attempt in progress shows "searching")
            with running.session() as session:
                search = session.scalar(select(fdb.PriorSearch))
                return search if search is not None and search.state == "retrying" else None
        search = wait_for(search_waiting, timeout=120, interval=0.1)
        assert "connect" in (search.last_error or "") and search.found == 0

        archive.start()  # back: the search retries, finds the prior, moves it, it is scored, v2 follows
        wait_for(lambda: delivered(2), timeout=240, interval=0.5)
        second = result_of(running, current_uid, 2)
        assert second.category == "CT-3" and second.priority == "HIGH" and second.reason.startswith("progression")
        assert second.involvement_percent == first.involvement_percent  # the study was not scored again
        assert second.job_fk is None and second.result_json != first.result_json
        with running.session() as session:
            assert session.scalar(select(func.count(Job.id)).join(Study)
                                  .where(Study.study_instance_uid == current_uid)) == 1
        prior = result_of(running, prior_uid)
        with running.session() as session:
            search = session.scalar(select(fdb.PriorSearch))
            prior_row = session.scalar(select(fdb.PriorStudy))
            assert search.state == "done" and search.found == 2 and search.requested == 1 and search.attempts >= 2
            assert session.scalar(select(func.count(Study.id)).where(Study.study_instance_uid == stranger_uid)) == 0
            assert prior_row.study_instance_uid == prior_uid and prior_row.state == "scored"
            assert prior.status == "scored" and session.scalar(
                select(func.count(Delivery.id)).where(Delivery.result_fk == prior.id)) == 0
            worklist = [r.study_instance_uid for r in repository.result_status(session)]
            assert worklist == [current_uid]  # the prior is not on the worklist
            listed = {r.study_instance_uid: r.change_since_prior for r in views.worklist_rows(session)}
            assert listed == {current_uid: "progression"}  # nor in the `worklist` view
            # UPS: the comparison-only version 2 replaces version 1's workitem; the prior has none.
            items = {w.study_version: (w.state, w.priority) for w in session.scalars(
                select(UpsWorkitem).where(UpsWorkitem.study_instance_uid == current_uid))}
            assert items == {1: ("CANCELED", "MEDIUM"), 2: ("SCHEDULED", "HIGH")}, items
            assert session.scalar(select(func.count(UpsWorkitem.id))
                                  .where(UpsWorkitem.study_instance_uid == prior_uid)) == 0
            assert comparison_summary(session, second.id)["prior_study_instance_uid"] == prior_uid
        # The PACS holds both versions' outputs for the current study, nothing for the prior.
        descriptions = sorted(s["MainDicomTags"].get("SeriesNumber", "") for s in pacs.series_of_study(current_uid))
        assert len(descriptions) >= 4
        assert pacs.series_of_study(prior_uid) == []
