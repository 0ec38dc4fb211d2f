"""The worklist page, its JSON API, /metrics and the token gate, over real HTTP (uvicorn thread)."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from ct_triage.errors import ConfigError
from ct_triage.runtime import open_database
from ct_triage.settings import Settings
from dashboard.server import DashboardServer, start_dashboard
from tests.conftest import make_settings
from tests.support.dashboard import WORKLIST_ORDER, seed_dashboard
from tests.support.scanner import free_port

TOKEN = "s3cret-token-0123456789"
PATIENT_DATA = ("Doe", "Jane", "PAT-0001", "19500101")


@pytest.fixture
def dashboard(tmp_path, sqlite_url):
    servers, engines = [], []

    def _start(database_url=sqlite_url, seed=True, **overrides):
        settings = make_settings(tmp_path, database_url, http_port=free_port(), **overrides)
        engine, factory = open_database(settings)
        engines.append(engine)
        studies = seed_dashboard(factory) if seed else {}
        server = DashboardServer(settings, factory)
        assert server.start()
        servers.append(server)
        return server, studies

    yield _start
    for server in servers:
        server.stop()
    for engine in engines:
        engine.dispose()


def client(server, **kwargs) -> httpx.Client:
    return httpx.Client(base_url=f"http://127.0.0.1:{server.port}", timeout=30, **kwargs)


def test_api_worklist_is_in_reading_order_without_patient_data(dashboard):
    server, studies = dashboard()
    with client(server) as http:
        response = http.get("/api/worklist")
        page = http.get("/")
    assert response.status_code == 200 and response.headers["cache-control"] == "no-store"
    rows = response.json()["studies"]
    by_uid = {s.uid: key for key, s in studies.items()}
    assert [by_uid[r["study_instance_uid"]] for r in rows] == WORKLIST_ORDER
    assert [r["priority"] for r in rows] == ["HIGH"] * 2 + ["MEDIUM"] * 4 + ["LOW"]
    first = rows[0]
    assert (first["category"], first["state"], first["involvement_percent_left"]) == ("CT-3", "delivered", 58.0)
    assert first["thumbnail"].startswith(f"/thumbnails/{studies['A'].uid}.png")
    for text in (response.text, page.text):
        for item in PATIENT_DATA:
            assert item not in text
    assert "patient" not in response.text.lower()
    # DICOM text is escaped in the page, never markup
    assert "CT CHEST &lt;b&gt;A&lt;/b&gt;" in page.text and "<b>A</b>" not in page.text
    assert "default-src 'none'" in page.headers["content-security-policy"]
    order = [page.text.index(f'data-uid="{studies[k].uid}"') for k in WORKLIST_ORDER]
    assert order == sorted(order)


def test_api_study_validates_the_uid_and_shows_versions(dashboard):
    server, studies = dashboard()
    with client(server) as http:
        for bad in ("1.02.3", "abc", "1..2", "1.2." + "3" * 70, "%2e%2e%2fetc"):
            assert http.get(f"/api/studies/{bad}").status_code in (400, 404), bad
            assert http.get(f"/thumbnails/{bad}.png").status_code in (400, 404), bad
        assert http.get("/api/studies/1.02.3").status_code == 400
        assert http.get("/api/studies/1.2.3.4").status_code == 404
        detail = http.get(f"/api/studies/{studies['C'].uid}").json()
        picture = http.get(f"/thumbnails/{studies['D'].uid}.png")
    assert detail["version"] == 2 and detail["category"] == "CT-2"
    assert [(v["version"], v["superseded"], v["category"]) for v in detail["versions"]] == [
        (1, True, "CT-1"), (2, False, "CT-2")]
    assert detail["versions"][1]["received_to_scored_s"] == pytest.approx(40.5, abs=0.01)
    assert detail["deliveries"] == [{"destination": "PACS0@127.0.0.1:4242", "state": "retrying", "attempts": 3,
                                     "last_error": "connection refused"}]
    assert picture.status_code == 200 and picture.headers["content-type"] == "image/png"
    assert picture.content.startswith(b"\x89PNG")


def test_without_a_token_only_loopback_host_names_are_answered(dashboard):
    server, _ = dashboard()
    with client(server) as http:
        for host in ("127.0.0.1", f"127.0.0.1:{server.port}", "localhost:8080", "[::1]:8080"):
            assert http.get("/api/worklist", headers={"Host": host}).status_code == 200, host
        for host in ("rebind.example.org", f"rebind.example.org:{server.port}", "10.0.0.5", ""):
            assert http.get("/api/worklist", headers={"Host": host}).status_code == 400, host


def database_dump(server) -> list[str]:
    import sqlite3

    path = server.settings.effective_database_url.removeprefix("sqlite:///")
    with sqlite3.connect(path) as conn:
        return list(conn.iterdump())


def test_nothing_but_get_and_head_and_nothing_is_written(dashboard):
    server, studies = dashboard()
    before = database_dump(server)
    with client(server) as http:
        for path in ("/", "/api/worklist", f"/api/studies/{studies['A'].uid}", "/metrics", "/healthz",
                     f"/thumbnails/{studies['A'].uid}.png", f"/summaries/{studies['B'].uid}.png",
                     "/chart/turnaround.svg", "/static/worklist.js", f"/?token={TOKEN}"):
            assert http.get(path).status_code == 200, path
            assert http.head(path).status_code == 200, path
            for method in ("POST", "PUT", "PATCH", "DELETE"):
                assert http.request(method, path).status_code == 405, (method, path)
    assert database_dump(server) == before


def test_metrics_parse_and_count_the_studies(dashboard, postgres_url):
    server, _ = dashboard(postgres_url)
    with client(server) as http:
        response = http.get("/metrics")
    assert response.headers["content-type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    assert samples[("ct_triage_database_up", ())] == 1
    assert samples[("ct_triage_studies_received_total", ())] == 7
    assert samples[("ct_triage_instances_rejected_total", ())] == 1
    results = {labels: v for (name, labels), v in samples.items() if name == "ct_triage_results_total"}
    assert results[(("category", "CT-1"), ("priority", "LOW"), ("status", "scored"))] == 2  # v1 of C and B
    assert results[(("category", ""), ("priority", "MEDIUM"), ("status", "failed"))] == 1
    assert samples[("ct_triage_queue_depth", (("queue", "scoring"), ("state", "queued")))] == 1
    assert samples[("ct_triage_deliveries", (("state", "failed"),))] == 1
    assert samples[("ct_triage_turnaround_seconds", (("interval", "received_to_scored"), ("quantile", "0.5")))] \
        == pytest.approx(40.5, abs=0.01)
    assert samples[("ct_triage_storage_free_bytes", ())] > 0


def test_token_is_required_off_localhost(tmp_path, sqlite_url, dashboard):
    with pytest.raises(ConfigError, match="HTTP_TOKEN"):
        make_settings(tmp_path, sqlite_url, http_host="0.0.0.0")
    with pytest.raises(ConfigError, match="16 characters"):
        make_settings(tmp_path, sqlite_url, http_host="0.0.0.0", http_token="short")
    assert Settings.from_env({"CT_TRIAGE_HTTP_TOKEN": TOKEN}).effective()["http_token"] == "***"

    server, _ = dashboard(http_host="0.0.0.0", http_token=TOKEN)
    with client(server) as http:
        assert http.get("/healthz").status_code == 200
        assert http.get("/favicon.ico").headers["content-type"] == "image/svg+xml"
        for path in ("/", "/api/worklist", "/metrics", "/chart/turnaround.svg"):
            denied = http.get(path)
            assert denied.status_code == 401 and "worklist" not in denied.text, path
        assert http.get("/api/worklist", headers={"Authorization": "Bearer wrong-token-0123456789"}).status_code == 401
        assert http.get("/api/worklist", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
        redirect = http.get(f"/?token={TOKEN}")
        assert redirect.status_code == 303 and redirect.headers["location"] == "/"
    with client(server) as http:  # no cookie yet: a path like //host never redirects off this server
        raw_path = f"//evil.example/?token={TOKEN}".encode()
        url = httpx.URL(f"http://127.0.0.1:{server.port}/").copy_with(raw_path=raw_path)
        assert http.get(url).headers["location"] == "/evil.example/"
        cookie = redirect.headers["set-cookie"]
        assert "HttpOnly" in cookie and "SameSite=strict" in cookie.replace("Strict", "strict")
        assert http.get("/api/worklist", headers={"Host": "ct-triage.hospital.example"}).status_code == 200
    with client(server, cookies={"ct_triage_token": TOKEN}) as http:
        assert http.get("/").status_code == 200


def test_a_busy_port_leaves_the_node_running_without_the_page(tmp_path, sqlite_url, caplog):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        settings = make_settings(tmp_path, sqlite_url, http_port=busy.getsockname()[1])
        engine, factory = open_database(settings)
        with caplog.at_level(logging.ERROR, logger="ct_triage.dashboard"):
            assert start_dashboard(settings, factory) is None
        engine.dispose()
    assert "cannot listen" in caplog.text
    assert start_dashboard(make_settings(tmp_path, sqlite_url, http_port=0), factory) is None


def test_serve_and_node_processes_serve_the_page_and_refuse_an_open_bind(tmp_path, sqlite_url):
    from tests.support.daemon import Daemon
    from tests.test_node import wait_for
    from tests.test_node_process import node_env

    http_port = free_port()
    env = node_env(tmp_path, sqlite_url, free_port(), http_port=http_port)
    for role in ("serve", "node"):
        daemon = Daemon([role], env, tmp_path / f"{role}.log").start()
        try:
            def page_up(daemon=daemon):
                try:
                    return httpx.get(f"http://127.0.0.1:{http_port}/api/worklist", timeout=5).status_code == 200
                except httpx.HTTPError:
                    assert daemon.process.poll() is None, daemon.log()
                    return False
            wait_for(page_up, timeout=90, interval=0.3)
        finally:
            assert daemon.stop() == 0, daemon.log()
        assert "worklist page on http://127.0.0.1" in daemon.log()

    open_bind = node_env(tmp_path, sqlite_url, free_port(), http_host="0.0.0.0")
    refused = subprocess.run([sys.executable, "-m", "ct_triage_app.cli", "node"], capture_output=True, text=True,
                             timeout=60, env={**os.environ, **open_bind})
    assert refused.returncode == 2 and "CT_TRIAGE_HTTP_TOKEN" in refused.stderr


def test_the_dashboard_imports_only_the_database_settings_and_the_renderer():
    from tests.test_boundaries import _in, _show, import_edges, project_modules

    allowed = ("dashboard", "db", "ct_triage", "dicom_node.uids", "worker.outputs.render", "worker.scoring.result")
    edges = import_edges(project_modules())
    bad = [e for e in edges if _in(e.source, ("dashboard",)) and not _in(e.target, allowed)]
    bad += [e for e in edges if _in(e.target, ("dashboard",)) and not _in(e.source, ("dashboard",))
            and not (e.source == "ct_triage_app.cli" and e.in_function)]
    assert not bad, _show(bad)
    code = "import sys, dashboard.app, dashboard.server; print('torch' in sys.modules, 'pynetdicom' in sys.modules)"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert loaded.stdout.split() == ["False", "False"]


def test_a_database_that_does_not_answer_gives_503_and_metrics_say_so(tmp_path, sqlite_url, caplog):
    from sqlalchemy import create_engine
    from sqlalchemy.orm import sessionmaker

    # A session factory whose database is gone: a PostgreSQL port nobody listens on.
    dead = create_engine(f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/none",
                         connect_args={"connect_timeout": 2})
    server = DashboardServer(make_settings(tmp_path, sqlite_url, http_port=free_port()), sessionmaker(dead))
    assert server.start()
    try:
        with client(server) as http, caplog.at_level(logging.WARNING, logger="ct_triage.dashboard"):
            for path in ("/", "/api/worklist", "/api/studies/1.2.3"):
                response = http.get(path)
                assert response.status_code == 503 and "Traceback" not in response.text, path
            metrics = http.get("/metrics")
        assert metrics.status_code == 200 and "ct_triage_database_up 0.0" in metrics.text
        assert "database unavailable" in caplog.text
    finally:
        server.stop()
        dead.dispose()


def test_each_series_shows_number_kernel_thickness_and_a_twin_left_out_is_no_failure(dashboard):
    from sqlalchemy import select

    from db.models import Series, Study
    from db.session import session_scope
    from worker.scoring.select import not_selected_reason

    server, studies = dashboard()
    uid = studies["F"].uid
    with session_scope(server.session_factory) as session:
        study = session.scalar(select(Study).where(Study.study_instance_uid == uid))
        scored = study.series[0]
        scored.series_number, scored.series_description = 2, "LUNG 1.0"
        scored.convolution_kernel, scored.slice_thickness = "L", 1.0
        twin = Series(series_instance_uid=f"{uid}.2", study_fk=study.id, modality="CT",
                      sop_class_uid=scored.sop_class_uid, series_number=3, series_description="SOFT <i>1.0</i>",
                      convolution_kernel="B", slice_thickness=1.0, instance_count=3, version=1,
                      state="not_applicable", flags_json="[]")
        twin.state_reason = not_selected_reason(twin, scored)
        session.add(twin)
    with client(server) as http:
        rows = {r["study_instance_uid"]: r for r in http.get("/api/worklist").json()["studies"]}
        one = http.get(f"/api/studies/{uid}").json()
        page = http.get("/").text
    assert rows[uid]["series"] == one["series"]
    lung, soft = one["series"]
    assert (lung["series_number"], lung["description"], lung["convolution_kernel"], lung["slice_thickness_mm"],
            lung["shown_state"]) == (2, "LUNG 1.0", "L", 1.0, "scored")
    assert (soft["series_number"], soft["convolution_kernel"], soft["state"], soft["shown_state"]) == (
        3, "B", "not_applicable", "not selected")
    assert soft["reason"] == 'kernel B is not a lung kernel; series 2 "LUNG 1.0" (lung kernel L, 1 mm) scored'
    assert [s["shown_state"] for s in rows[studies["E"].uid]["series"]] == ["failed"]
    # the page: one line per series; the twin in grey (sr-not-selected), its text escaped
    row = page[page.index(f'data-uid="{uid}"'):]
    row = row[:row.index("</tr>")]
    assert 'class="state st-scored"' in row and "st-failed" not in row and "st-not_applicable" not in row
    assert '<span class="sub series sr-scored">#2 LUNG 1.0 \u00b7 L \u00b7 1 mm: scored</span>' in row
    assert 'class="sub series sr-not-selected"' in row and "SOFT &lt;i&gt;1.0&lt;/i&gt; \u00b7 B" in row
    assert ": not selected (kernel B is not a lung kernel" in row and "<i>" not in row


@pytest.mark.security
def test_token_reads_and_failures_reach_the_audit_trail_from_another_address(dashboard):
    """From 127.0.0.3 (another host as far as the page can tell): every failed token is a User
    Authentication failure (at most 10 a minute per address), reads with the token are one Query
    message per client per aggregation window, and the token itself is never recorded."""
    from sqlalchemy import select

    from db.models import AuditEvent

    server, _ = dashboard(http_host="0.0.0.0", http_token=TOKEN)
    transport = httpx.HTTPTransport(local_address="127.0.0.3")
    with httpx.Client(base_url=f"http://127.0.0.1:{server.port}", timeout=30, transport=transport) as http:
        assert http.get("/api/worklist").status_code == 401
        assert http.get("/api/worklist", headers={"Authorization": "Bearer wrong-token-0123456789"}).status_code == 401
        for _ in range(12):
            assert http.get("/", headers={"Authorization": "Bearer guess-0123456789abcdef"}).status_code == 401
        for path in ("/", "/api/worklist", "/metrics"):
            assert http.get(path, headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
    with server.session_factory() as session:
        events = list(session.scalars(select(AuditEvent).order_by(AuditEvent.id)))
    failures = [e for e in events if e.kind == "authentication_failure"]
    reads = [e for e in events if e.kind == "http_read"]
    assert len(failures) == 10 and all(e.source_address == "127.0.0.3" and e.outcome == 4 for e in failures)
    assert len(reads) == 1 and reads[0].source_address == "127.0.0.3"
    assert all(TOKEN not in e.message_xml and "wrong-token" not in e.message_xml for e in events)
