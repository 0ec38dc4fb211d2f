"""Every SQL query of the provisioned Grafana dashboard runs on PostgreSQL and returns rows.

Grafana itself cannot be installed here; its PostgreSQL data source sends the panel's
rawSql after expanding its macros, which this test does the same way for the ones
the dashboard uses ($__timeFilter), over the last 24 hours.
"""

from __future__ import annotations

import json
import re
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import text

from ct_triage.runtime import open_database
from db.types import utcnow
from tests.conftest import make_settings
from tests.support.dashboard import seed_dashboard

GRAFANA = Path(__file__).resolve().parents[1] / "deploy" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "ct-triage.json"
MACRO = re.compile(r"\$__(\w+)\(([^)]*)\)")


def expand_macros(sql: str, start, end) -> str:
    """Grafana's PostgreSQL macros the dashboard uses; any other one fails the test."""
    def replace(match: re.Match) -> str:
        name, arg = match.group(1), match.group(2).strip()
        if name == "timeFilter":
            return f"{arg} BETWEEN '{start:%Y-%m-%dT%H:%M:%SZ}' AND '{end:%Y-%m-%dT%H:%M:%SZ}'"
        raise AssertionError(f"macro $__{name} is not expanded by this test")
    expanded = MACRO.sub(replace, sql)
    assert "$" not in expanded, expanded
    return expanded


def panel_queries() -> list[tuple[str, str]]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [(panel["title"], t["rawSql"]) for panel in dashboard["panels"] for t in panel.get("targets", [])]


def test_dashboard_json_is_provisioned_against_the_ct_triage_data_source():
    dashboard = json.loads(DASHBOARD.read_text())
    datasource = (GRAFANA / "provisioning" / "datasources" / "ct-triage.yaml").read_text()
    uid = re.search(r"^\s+uid:\s*(\S+)", datasource, re.M).group(1)
    kind = re.search(r"^\s+type:\s*(\S+)", datasource, re.M).group(1)
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)) and dashboard["uid"] == "ct-triage-ops"
    for panel in dashboard["panels"]:
        for item in (panel, *panel["targets"]):
            assert item["datasource"] == {"type": kind, "uid": uid}, panel["title"]
    provider = (GRAFANA / "provisioning" / "dashboards" / "ct-triage.yaml").read_text()
    assert "/etc/grafana/dashboards/ct-triage" in provider
    titles = " ".join(p["title"].lower() for p in dashboard["panels"])
    for topic in ("queue depth", "turnaround p50 / p95", "throughput", "category mix", "failures"):
        assert topic in titles


def test_every_dashboard_query_returns_rows_on_postgresql(tmp_path, postgres_url):
    engine, factory = open_database(make_settings(tmp_path, postgres_url))
    seed_dashboard(factory)
    now = utcnow()
    queries = panel_queries()
    assert len(queries) >= 10
    try:
        with engine.connect() as conn:
            for title, sql in queries:
                rows = conn.execute(text(expand_macros(sql, now - timedelta(hours=24), now + timedelta(minutes=1))
                                         )).all()
                assert rows, f"panel {title!r} returned no rows"
                assert any(v is not None for v in rows[0]), f"panel {title!r} returned only NULLs"
    finally:
        engine.dispose()


def test_macro_expansion_rejects_what_grafana_would_do_differently():
    with pytest.raises(AssertionError):
        expand_macros("SELECT $__timeGroup(at, 1h) FROM failures", utcnow(), utcnow())


def test_the_compose_overlay_publishes_the_page_with_a_token_and_mounts_the_provisioning(tmp_path):
    """``docker-compose config`` merges deploy/compose.grafana.yml onto the stack (no Docker daemon needed)."""
    import os
    import shutil
    import subprocess

    compose = shutil.which("docker-compose")
    if compose is None:
        pytest.skip("docker-compose not installed")
    root = DASHBOARD.parents[3]
    args = [compose, "-f", "docker-compose.yml", "-f", "deploy/compose.grafana.yml", "config"]
    env = {**os.environ, "CT_TRIAGE_HTTP_TOKEN": "0123456789abcdef-token", "GRAFANA_ADMIN_PASSWORD": "pw"}
    merged = subprocess.run(args, cwd=root, env=env, capture_output=True, text=True, timeout=60)
    assert merged.returncode == 0, merged.stderr
    for expected in ("CT_TRIAGE_HTTP_HOST: 0.0.0.0", "CT_TRIAGE_HTTP_TOKEN: 0123456789abcdef-token",
                     "127.0.0.1:8080:8080"):
        assert expected in merged.stdout, expected
    provider = (GRAFANA / "provisioning" / "dashboards" / "ct-triage.yaml").read_text()
    mount = re.search(r"path:\s*(\S+)", provider).group(1)
    assert f"target: {mount}" in merged.stdout or f":{mount}:" in merged.stdout
    without_token = {k: v for k, v in env.items() if k != "CT_TRIAGE_HTTP_TOKEN"}
    refused = subprocess.run(args, cwd=root, env=without_token, capture_output=True, text=True, timeout=60)
    assert refused.returncode != 0 and "CT_TRIAGE_HTTP_TOKEN" in refused.stderr
