"""docker-compose started for real: build the images (from a Debian base made from the
mirror: no Docker Hub), start the stack with Debian's docker-compose, send a phantom study
to the node's published DICOM port with storescu, find the SC and SR in Orthanc through its
REST API, then ``docker-compose down -v``.

Slow (image builds: minutes on a cold cache), so it has its own marker: ``pytest -m compose``.
The durations of each phase are printed (``-s``) and written to bench/out/compose-timing.json.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

from tests.support.scanner import free_port, require_dcmtk, storescu

REPO = Path(__file__).resolve().parents[1]
BASE_IMAGE = os.environ.get("CT_TRIAGE_BASE_IMAGE", "ct-triage/debian:bookworm")
COMPOSE = ["/usr/bin/docker-compose", "-f", "docker-compose.yml", "-f", "deploy/compose.local.yml"]
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"

pytestmark = pytest.mark.compose


def _unavailable(what: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"{what} (CI must run the compose test)")
    pytest.skip(what)


def _run(args, *, env, timeout, check=True) -> subprocess.CompletedProcess:
    result = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({result.returncode}):\n{result.stdout[-4000:]}\n"
                             f"{result.stderr[-4000:]}")
    return result


ORTHANC_LOGIN = ("ctadmin", "compose-test-orthanc")


def _http_json(url: str, body: dict | None = None, login: tuple[str, str] | None = ORTHANC_LOGIN):
    import base64

    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method="POST" if data else "GET")
    if login is not None:
        request.add_header("Authorization", "Basic " + base64.b64encode(":".join(login).encode()).decode())
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def _wait(predicate, timeout: float, what: str, logs):
    deadline = time.monotonic() + timeout
    last_error = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except Exception as exc:  # not up yet
            last_error = exc
        time.sleep(2)
    raise AssertionError(f"{what} within {timeout:.0f} s (last error: {last_error})\n{logs()}")


@pytest.fixture(scope="module")
def docker_ready():
    if os.geteuid() != 0 and not shutil.which("docker"):
        _unavailable("Docker is not installed")
    result = subprocess.run(["bash", str(REPO / "deploy/ensure-docker.sh")], capture_output=True, text=True,
                            timeout=900)
    if result.returncode != 0:
        _unavailable(f"no Docker Engine: {result.stderr[-2000:]}")
    if not Path(COMPOSE[0]).exists():
        _unavailable("Debian's docker-compose is not installed")


def compose_env(project: str, dicom_port: int, http_port: int, **extra: str) -> dict[str, str]:
    """The environment a compose test runs docker-compose with: its own project, free ports, the
    Debian base image, classic builds (cached layers shared between the compose tests), passwords."""
    return {**os.environ, "COMPOSE_PROJECT_NAME": project, "CT_TRIAGE_BASE_IMAGE": BASE_IMAGE,
            "CT_TRIAGE_DICOM_PORT": str(dicom_port), "ORTHANC_HTTP_PORT": str(http_port),
            "CT_TRIAGE_STABLE_AGE_S": "3", "DOCKER_BUILDKIT": "0", "COMPOSE_DOCKER_CLI_BUILD": "0",
            "ORTHANC_PASSWORD": ORTHANC_LOGIN[1], "REDIS_PASSWORD": "compose-test-redis", **extra}


def build_stack(compose: list[str], env: dict[str, str], timing: dict[str, float]) -> None:
    """The Debian base image (made once), the build context, then the stack's images (cached)."""
    phase = time.monotonic()
    _run(["bash", "deploy/make-base-image.sh", BASE_IMAGE], env=env, timeout=1200)
    _run(["bash", "deploy/prepare-context.sh"], env=env, timeout=300)
    timing["base_image_s"] = time.monotonic() - phase
    phase = time.monotonic()
    _run([*compose, "build"], env=env, timeout=2400)
    timing["build_s"] = time.monotonic() - phase


def test_compose_stack_scores_a_study_and_delivers_to_orthanc(docker_ready, tmp_path):
    require_dcmtk()
    timing: dict[str, float] = {}
    started = time.monotonic()
    project = f"cttriagetest{uuid.uuid4().hex[:8]}"
    dicom_port, http_port = free_port(), free_port()
    env = compose_env(project, dicom_port, http_port)
    build_stack(COMPOSE, env, timing)

    def logs() -> str:
        return _run([*COMPOSE, "logs", "--no-color", "--tail", "60"], env=env, timeout=120, check=False).stdout[-12000:]

    # The phantom: 40 slices of 128 x 128 at 30 % involvement (CT-2), written while the stack starts.
    phantom = tmp_path / "phantom"
    try:
        phase = time.monotonic()
        _run([*COMPOSE, "up", "-d", "--no-build"], env=env, timeout=600)
        subprocess.run([sys.executable, "-m", "ct_triage_app.cli", "phantom", str(phantom), "--involvement", "30",
                        "--slices", "40", "--rows", "128", "--seed", "3"], check=True, capture_output=True,
                       cwd=REPO, timeout=300)

        def node_healthy() -> bool:
            cid = _run([*COMPOSE, "ps", "-q", "node"], env=env, timeout=60).stdout.strip()
            state = _run(["/usr/bin/docker", "inspect", "-f", "{{.State.Health.Status}}", cid], env=env,
                         timeout=60, check=False).stdout.strip()
            return state == "healthy"

        _wait(node_healthy, 180, "the node did not become healthy", logs)
        _wait(lambda: _http_json(f"http://127.0.0.1:{http_port}/system"), 120, "Orthanc did not answer", logs)
        # The example PACS's REST API needs its login (issue 17): without it, 401.
        with pytest.raises(urllib.error.HTTPError) as refused:
            _http_json(f"http://127.0.0.1:{http_port}/system", login=None)
        assert refused.value.code == 401
        # Redis answers only with the password the node and workers carry in their broker URL.
        redis_cid = _run([*COMPOSE, "ps", "-q", "redis"], env=env, timeout=60).stdout.strip()
        unauthenticated = _run(["/usr/bin/docker", "exec", redis_cid, "sh", "-c",
                                "unset REDISCLI_AUTH; redis-cli ping"], env=env, timeout=60, check=False)
        assert "NOAUTH" in unauthenticated.stdout + unauthenticated.stderr
        timing["up_s"] = time.monotonic() - phase

        phase = time.monotonic()
        files = sorted(phantom.rglob("*.dcm"))
        assert len(files) == 40
        sent = storescu(dicom_port, files)
        output = sent.stdout + sent.stderr
        assert sent.returncode == 0, output[-3000:]
        assert output.count("Received Store Response (Success)") == 40, output[-3000:]
        timing["send_s"] = time.monotonic() - phase

        from pydicom import dcmread

        study_uid = str(dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
        phase = time.monotonic()

        def outputs_in_orthanc():
            found = _http_json(f"http://127.0.0.1:{http_port}/tools/find",
                               {"Level": "Instance", "Query": {"StudyInstanceUID": study_uid},
                                "RequestedTags": ["SOPClassUID"], "Expand": True})
            classes = {}
            for item in found:
                tags = _http_json(f"http://127.0.0.1:{http_port}/instances/{item['ID']}/simplified-tags")
                classes.setdefault(tags.get("SOPClassUID"), []).append(tags)
            if SECONDARY_CAPTURE in classes and COMPREHENSIVE_3D_SR in classes:
                return classes
            return None

        classes = _wait(outputs_in_orthanc, 420, "the SC and SR did not reach Orthanc", logs)
        timing["score_and_deliver_s"] = time.monotonic() - phase
        sr = classes[COMPREHENSIVE_3D_SR][0]
        assert sr["StudyInstanceUID"] == study_uid
        assert all(sc["StudyInstanceUID"] == study_uid for sc in classes[SECONDARY_CAPTURE])
        assert all(sc["SeriesDescription"].startswith("AI COVID-19 triage") for sc in classes[SECONDARY_CAPTURE])
        # The phantom itself was never sent to Orthanc: only our outputs are there.
        assert set(classes) <= {SECONDARY_CAPTURE, COMPREHENSIVE_3D_SR, "1.2.840.10008.5.1.4.1.1.66.4"}  # + SEG

        # Graceful stop of the daemons: SIGTERM, exit 0 well within compose's 15 s grace.
        phase = time.monotonic()
        _run([*COMPOSE, "stop", "node", "worker-gpu", "worker-io"], env=env, timeout=120)
        timing["stop_s"] = time.monotonic() - phase
        for service in ("node", "worker-gpu", "worker-io"):
            cid = _run([*COMPOSE, "ps", "-q", service], env=env, timeout=60).stdout.strip()
            code = _run(["/usr/bin/docker", "inspect", "-f", "{{.State.ExitCode}}", cid], env=env, timeout=60).stdout
            assert code.strip() == "0", f"{service} exited with {code.strip()}\n{logs()}"
    finally:
        phase = time.monotonic()
        _run([*COMPOSE, "down", "-v", "--remove-orphans"], env=env, timeout=300, check=False)
        timing["down_s"] = time.monotonic() - phase
        timing["total_s"] = time.monotonic() - started
        out = REPO / "bench" / "out"
        out.mkdir(parents=True, exist_ok=True)
        (out / "compose-timing.json").write_text(json.dumps(timing, indent=2))
        print("compose test timing:", json.dumps({k: round(v, 1) for k, v in timing.items()}))
