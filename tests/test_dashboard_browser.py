"""The worklist page in headless Chromium, fed by three phantom studies scored end to end.

Three phantom studies of different severity go through the node and the embedded
worker (what `ct-triage serve` composes) with dcmtk's storescu as the scanner, LOW
first and HIGH last; then the page must list them HIGH, MEDIUM, LOW, every thumbnail
must load (the real rendered overview, red lesion regions included), the browser
console must stay free of errors, the page must refresh itself, the token must be
enforced when bound off localhost, and /metrics must count the three studies.

The browser is Debian's ``chromium`` driven by Debian's ``chromium-driver`` through
selenium, both given by path; selenium-manager (which would download a browser) is
patched to fail the test if anything calls it. The screenshot goes to the test's
tmp folder, and to ``$CT_TRIAGE_SCREENSHOT_DIR`` when set (how docs/worklist-page.png
was made).
"""

from __future__ import annotations

import io
import os
import shutil
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families
from pydicom import dcmread
from sqlalchemy import func, select

from ct_triage.contract import EmbeddedPublisher
from dashboard.server import DashboardServer
from db.models import Result
from tests.support.scanner import free_port, require_dcmtk, storescu
from tests.test_node import wait_for
from worker.tasks.context import WorkerContext
from worker.tasks.embedded import EmbeddedConsumer

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--hide-scrollbars", "--window-size=1360,1180")
TOKEN = "browser-token-0123456789abcdef"
# Sent in this order (LOW first): the page must still put HIGH on top.
SEVERITIES = [("low", 8.0, "CT-1", "LOW"), ("medium", 35.0, "CT-2", "MEDIUM"), ("high", 60.0, "CT-3", "HIGH")]
PHANTOM = dict(slices=60, rows=192, slice_spacing_mm=5.0)


@pytest.fixture(autouse=True)
def _tools():
    require_dcmtk()
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    if missing:
        pytest.fail(f"{', '.join(missing)} missing: apt-get install chromium chromium-driver (.ci/run and ./dev do)")


@pytest.fixture
def no_selenium_manager(monkeypatch):
    from selenium.webdriver.common.selenium_manager import SeleniumManager

    def refuse(*args, **kwargs):
        raise AssertionError("selenium-manager was called: it would download a browser")

    monkeypatch.setattr(SeleniumManager, "binary_paths", refuse)
    monkeypatch.setenv("SE_OFFLINE", "true")


@pytest.fixture
def browser(tmp_path, no_selenium_manager):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path / 'chromium-profile'}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER), log_output=str(tmp_path / "cd.log")),
                              options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def console_errors(driver) -> list[dict]:
    return [entry for entry in driver.get_log("browser") if entry["level"] in ("SEVERE", "ERROR")]


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> list[tuple[Path, dict]]:
    from ct_triage_tools.phantom import write_phantom

    out = []
    for i, (name, percent, _, _) in enumerate(SEVERITIES):
        folder = tmp_path_factory.mktemp(f"phantom_{name}")
        out.append((folder, write_phantom(folder, percent, seed=11 + i, **PHANTOM)))
    return out


@pytest.fixture(scope="module")
def scored_deployment(tmp_path_factory, phantoms):
    """Node + embedded worker (as `ct-triage serve`) with the three studies scored; shared by the tests."""
    from ct_triage.contract import make_publisher
    from ct_triage.runtime import open_database
    from dicom_node import DicomNode
    from tests.conftest import RunningNode, make_settings

    tmp = tmp_path_factory.mktemp("deployment")
    settings = make_settings(tmp, f"sqlite:///{tmp / 'db' / 'ct-triage.sqlite'}")
    engine, session_factory = open_database(settings)
    node = DicomNode(settings, session_factory, make_publisher(""))
    node.start()
    running = RunningNode(settings, engine, session_factory, node)
    consumer = EmbeddedConsumer(WorkerContext(settings, session_factory, EmbeddedPublisher()), poll_interval_s=0.2)
    consumer.start()
    try:
        for folder, _ in phantoms:
            assert storescu(running.port, sorted(folder.rglob("*.dcm"))).returncode == 0

        def all_scored():
            with running.session() as session:
                return session.scalar(select(func.count(Result.id))) == len(phantoms)
        wait_for(all_scored, timeout=600, interval=0.5)
        yield running
    finally:
        consumer.stop()
        node.stop()
        engine.dispose()


def start_page(running, **overrides) -> DashboardServer:
    from ct_triage.settings import Settings

    values = {**{k: getattr(running.settings, k) for k in ("var_dir", "database_url", "storage_dir")},
              "http_port": free_port(), "http_refresh_s": 1.0, **overrides}
    server = DashboardServer(Settings.from_env({}, **values), running.session_factory)
    assert server.start()
    return server


def save_screenshot(driver, tmp_path: Path, name: str) -> Path:
    import base64

    shot = driver.execute_cdp_cmd("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True})
    path = tmp_path / name
    path.write_bytes(base64.b64decode(shot["data"]))
    if os.environ.get("CT_TRIAGE_SCREENSHOT_DIR"):
        shutil.copy(path, Path(os.environ["CT_TRIAGE_SCREENSHOT_DIR"]) / name)
    return path


def worklist_snapshot(driver) -> list[dict]:
    """The worklist rows as the browser shows them, read in one script (refreshes replace the nodes)."""
    return driver.execute_script("""
        return Array.from(document.querySelectorAll('#worklist-body tr.row')).map(function (r) {
          var img = r.querySelector('img');
          return {uid: r.dataset.uid, priority: r.dataset.priority, text: r.innerText, src: img.src,
                  loaded: img.complete && img.naturalWidth > 0};
        });""")


def red_share(png: bytes) -> float:
    pixels = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)
    red = (pixels[..., 0] > 150) & (pixels[..., 0] - pixels[..., 1] > 60) & (pixels[..., 0] - pixels[..., 2] > 60)
    return float(red.mean())


def test_page_lists_scored_studies_by_priority_with_thumbnails(scored_deployment, browser, phantoms, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    running = scored_deployment
    server = start_page(running)
    base = f"http://127.0.0.1:{server.port}"
    try:
        browser.get(base + "/")
        WebDriverWait(browser, 30).until(lambda d: len(worklist_snapshot(d)) == 3)
        # Thumbnails render once (a few seconds each); the page refreshes every second meanwhile.
        WebDriverWait(browser, 120).until(lambda d: all(r["loaded"] for r in worklist_snapshot(d)))
        rows = worklist_snapshot(browser)
        assert [r["priority"] for r in rows] == ["HIGH", "MEDIUM", "LOW"]
        truth_by_uid = {truth["study_instance_uid"]: (cat, prio) for (_, truth), (_, _, cat, prio)
                        in zip(phantoms, SEVERITIES, strict=True)}
        for row in rows:
            category, priority = truth_by_uid[row["uid"]]
            assert priority == row["priority"]
            assert category in row["text"] and "%" in row["text"] and "R " in row["text"] and "L " in row["text"]
        # The thumbnails are the rendered overviews, with the lesions in red for the sicker studies.
        with httpx.Client(base_url=base, timeout=120) as http:
            shares = {row["priority"]: red_share(http.get(row["src"]).content) for row in rows}
            metrics = http.get("/metrics").text
        assert shares["HIGH"] > shares["LOW"] and shares["HIGH"] > 0.01, shares
        # No patient data beyond what the worklist needs.
        source = dcmread(sorted(phantoms[0][0].rglob("*.dcm"))[0], stop_before_pixels=True)
        for item in (str(source.PatientName), source.PatientID, source.get("PatientBirthDate", "")):
            if item:
                assert item not in browser.page_source
        # It refreshes itself.
        updated = "return document.getElementById('updated').textContent"
        before = browser.execute_script(updated)
        WebDriverWait(browser, 30).until(lambda d: d.execute_script(updated) != before)
        assert len(worklist_snapshot(browser)) == 3
        assert browser.find_elements(By.CSS_SELECTOR, "#chart svg circle.point")
        shot = save_screenshot(browser, tmp_path, "worklist-page.png")
        assert shot.stat().st_size > 20_000
        assert console_errors(browser) == []
    finally:
        server.stop()

    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(metrics) for s in family.samples}
    assert samples[("ct_triage_studies_received_total", ())] == 3
    by_category = {dict(labels)["category"]: v for (name, labels), v in samples.items()
                   if name == "ct_triage_results_total"}
    assert by_category == {"CT-1": 1, "CT-2": 1, "CT-3": 1}


def test_page_needs_the_token_when_bound_off_localhost(scored_deployment, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    server = start_page(scored_deployment, http_host="0.0.0.0", http_token=TOKEN)
    base = f"http://127.0.0.1:{server.port}"
    try:
        browser.get(base + "/")
        assert "401" in browser.find_element(By.TAG_NAME, "body").text
        assert not browser.find_elements(By.CSS_SELECTOR, "#worklist-body")
        browser.get(base + "/api/worklist")
        assert "studies" not in browser.page_source
        browser.get_log("browser")  # the two 401s above are expected console entries
        browser.get(f"{base}/?token={TOKEN}")
        WebDriverWait(browser, 30).until(lambda d: len(worklist_snapshot(d)) == 3)
        assert "token" not in browser.current_url
        WebDriverWait(browser, 120).until(lambda d: all(r["loaded"] for r in worklist_snapshot(d)))
        assert console_errors(browser) == []
    finally:
        server.stop()
