"""Two DICOM nodes behind HAProxy, started for real with docker-compose (deploy/compose.ha.yml,
issue 18): three scanners (dcmtk ``storescu``) send a study each through HAProxy's published
port, one node is SIGKILLed mid-send, and then

- before any resend: every instance a scanner saw acknowledged is indexed in PostgreSQL within
  30 s (the survivor indexes the dead node's journaled files);
- a new association through HAProxy reaches the survivor;
- after the scanners' resend (storescu again with the whole study): every study is complete,
  scored once per version and its outputs are in Orthanc.

The same images as tests/test_compose.py (same base image, same build steps, so that in CI the
second compose test finds them in the build cache); HAProxy's image is the one new build.
The scanners reach HAProxy through a local relay that passes their bytes on at a set rate (a
scanner on a slow line), so that the kill lands mid-send whatever the machine's speed.
Timings (``-s``) go to bench/out/compose-ha-timing.json. Marker ``compose``.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from tests.support.scanner import acknowledged_files, echoscu, free_port, require_dcmtk, storescu
from tests.test_compose import (  # noqa: F401  (docker_ready: the fixture)
    BASE_IMAGE,
    COMPREHENSIVE_3D_SR,
    ORTHANC_LOGIN,
    REPO,
    SECONDARY_CAPTURE,
    _http_json,
    _run,
    _wait,
    build_stack,
    compose_env,
    docker_ready,
)

COMPOSE_FILES = ["-f", "docker-compose.yml", "-f", "deploy/compose.local.yml", "-f", "deploy/compose.ha.yml"]
COMPOSE = ["/usr/bin/docker-compose", *COMPOSE_FILES]
DOCKER = "/usr/bin/docker"
POSTGRES_PASSWORD = "compose-test-postgres"
SCANNERS = ("SCANNER1", "SCANNER2", "SCANNER3")
SLICES = 40
# The scanners' line: bytes per second per association (a 40-slice 128 x 128 study is ~1.4 MB:
# about 6 s), slow enough for the kill to land mid-send, fast enough to keep the test short.
LINE_RATE = 240_000


def _established(logs: str, calling: str) -> list[str]:
    """Peers (address:port) of the associations ``calling`` established, from a node's log."""
    return re.findall(rf"association from {calling} at (\S+) established", logs)


def test_ha_overlay_nodes_match_the_base_stack():
    """The overlay's nodes carry the base file's settings (the environment is copied there:
    YAML anchors do not cross files), and only HAProxy publishes a port."""
    if not Path(COMPOSE[0]).exists():
        pytest.skip("Debian's docker-compose is not installed")
    env = {**os.environ, "COMPOSE_PROJECT_NAME": "cttriageconfig"}
    result = subprocess.run([*COMPOSE, "config"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    # YAML, read by the Python docker-compose runs on (PyYAML is not a dependency of ours).
    as_json = subprocess.run(["/usr/bin/python3", "-c", "import json, sys, yaml; "
                              "print(json.dumps(yaml.safe_load(sys.stdin)))"], input=result.stdout,
                             capture_output=True, text=True, timeout=60)
    if as_json.returncode != 0:
        pytest.skip(f"no PyYAML beside docker-compose: {as_json.stderr[-300:]}")
    services = json.loads(as_json.stdout)["services"]
    base_env = services["worker-io"]["environment"]
    for name in ("node-a", "node-b"):
        node = services[name]
        extra = set(node["environment"]) - set(base_env)
        assert extra == {"CT_TRIAGE_NODE_ID", "CT_TRIAGE_PROXY_PROTOCOL_FROM"}, name
        assert {k: v for k, v in node["environment"].items() if k in base_env} == base_env, name
        assert node["environment"]["CT_TRIAGE_NODE_ID"] == name
        assert node["environment"]["CT_TRIAGE_PROXY_PROTOCOL_FROM"] == \
            services["haproxy"]["networks"]["default"]["ipv4_address"]
        assert not node.get("ports"), f"{name} must not publish a port"
        assert node["image"] == services["worker-io"]["image"]
        assert node["volumes"] == services["worker-io"]["volumes"]
    assert services["node"]["profiles"] == ["single-node"]  # off: it would publish the same port
    published = {name: svc["ports"] for name, svc in services.items() if svc.get("ports")}
    assert set(published) == {"haproxy", "node", "orthanc"}
    assert all(p.get("host_ip") == "127.0.0.1" if isinstance(p, dict) else str(p).startswith("127.0.0.1:")
               for p in published["orthanc"]), published["orthanc"]


class SlowLine:
    """A local TCP relay to ``port``: the scanner's bytes go on at ``rate`` bytes/s per connection
    (the answers at full speed); when either side closes, both are closed."""

    def __init__(self, port: int, rate: float):
        self.port_to = port
        self.rate = rate
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.port_to), timeout=10)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            for sock in (client, upstream):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                self.sockets.append(sock)
            threading.Thread(target=self._pump, args=(client, upstream, self.rate), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, 0.0), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket, rate: float) -> None:
        try:
            while data := source.recv(16384):
                sink.sendall(data)
                if rate:
                    time.sleep(len(data) / rate)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        for sock in [self.listener, *self.sockets]:
            with contextlib.suppress(OSError):
                sock.close()


class Sender:
    """One scanner: storescu in the background, its output collected line by line."""

    def __init__(self, calling: str, port: int, files: list[Path]):
        self.calling = calling
        self.files = files
        self.lines: list[str] = []
        self.process = storescu(port, files, calling=calling, popen=True)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line)

    @property
    def output(self) -> str:
        return "".join(list(self.lines))

    def acknowledged(self) -> list[str]:
        return acknowledged_files(self.output)

    def wait(self, timeout: float) -> int:
        code = self.process.wait(timeout=timeout)
        self.reader.join(timeout=10)
        return code

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)


def _free_ha_net() -> str:
    """Three octets for CT_TRIAGE_HA_NET whose /24 no Docker network uses."""
    ids = subprocess.run([DOCKER, "network", "ls", "-q"], capture_output=True, text=True, timeout=60).stdout.split()
    used = []
    if ids:
        out = subprocess.run([DOCKER, "network", "inspect", "-f", "{{range .IPAM.Config}}{{.Subnet}} {{end}}", *ids],
                             capture_output=True, text=True, timeout=60).stdout
        used = [ipaddress.ip_network(s) for s in out.split() if "." in s]
    import random

    for _ in range(200):
        prefix = f"172.29.{random.randint(100, 250)}"
        net = ipaddress.ip_network(f"{prefix}.0/24")
        if not any(net.overlaps(other) for other in used):
            return prefix
    pytest.fail(f"no free /24 in 172.29.0.0/16 for the test stack (used: {used})")


@pytest.mark.compose
@pytest.mark.usefixtures("docker_ready")
@pytest.mark.timeout(2400)
def test_two_nodes_behind_haproxy_one_sigkilled_mid_send(tmp_path):
    require_dcmtk()
    timing: dict[str, float] = {}
    started = time.monotonic()
    project = f"cttriageha{uuid.uuid4().hex[:8]}"
    dicom_port, http_port = free_port(), free_port()
    ha_net = _free_ha_net()
    env = compose_env(project, dicom_port, http_port, POSTGRES_PASSWORD=POSTGRES_PASSWORD, CT_TRIAGE_HA_NET=ha_net)
    build_stack(COMPOSE, env, timing)  # the existing compose test's steps: its cached images are reused

    def logs() -> str:
        return _run([*COMPOSE, "logs", "--no-color", "--tail", "80"], env=env, timeout=120, check=False).stdout[-16000:]

    def cid(service: str) -> str:
        return _run([*COMPOSE, "ps", "-q", service], env=env, timeout=60).stdout.strip()

    def container_logs(container: str) -> str:
        result = _run([DOCKER, "logs", container], env=env, timeout=60, check=False)
        return result.stdout + result.stderr

    senders: list[Sender] = []
    line: SlowLine | None = None
    try:
        phase = time.monotonic()
        _run([*COMPOSE, "up", "-d", "--no-build"], env=env, timeout=600)
        # Three studies of 40 slices (128 x 128, 30 % involvement), written while the stack starts.
        phantoms = [tmp_path / f"study{n}" for n in range(3)]
        writers = [subprocess.Popen([sys.executable, "-m", "ct_triage_app.cli", "phantom", str(folder),
                                     "--involvement", "30", "--slices", str(SLICES), "--rows", "128",
                                     "--seed", str(11 + n)], cwd=REPO, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.PIPE)
                   for n, folder in enumerate(phantoms)]
        for writer in writers:
            assert writer.wait(timeout=300) == 0, writer.stderr.read() if writer.stderr else ""
        studies = [sorted(folder.rglob("*.dcm")) for folder in phantoms]
        assert all(len(files) == SLICES for files in studies)

        containers = {service: cid(service) for service in ("node-a", "node-b", "postgres", "haproxy")}
        assert not _run([*COMPOSE, "ps", "-q", "node"], env=env, timeout=60, check=False).stdout.strip(), \
            "the single node must be off in the HA stack"

        def healthy(service: str) -> bool:
            state = _run([DOCKER, "inspect", "-f", "{{.State.Health.Status}}", containers[service]], env=env,
                         timeout=60, check=False).stdout.strip()
            return state == "healthy"

        _wait(lambda: healthy("node-a") and healthy("node-b"), 240, "the nodes did not become healthy", logs)
        _wait(lambda: _http_json(f"http://127.0.0.1:{http_port}/system"), 120, "Orthanc did not answer", logs)

        # HAProxy passes associations to both nodes (leastconn takes turns between idle nodes),
        # with the PROXY v2 header: the nodes see the client's address, not HAProxy's.
        haproxy_address = f"{ha_net}.250"

        def both_nodes_answer_through_haproxy() -> bool:
            echoscu(dicom_port, calling="PROBE")
            return all(_established(container_logs(containers[node]), "PROBE") for node in ("node-a", "node-b"))

        _wait(both_nodes_answer_through_haproxy, 120, "HAProxy did not pass C-ECHOs to both nodes", logs)
        for node in ("node-a", "node-b"):
            peers = _established(container_logs(containers[node]), "PROBE")
            assert peers and not any(peer.startswith(haproxy_address + ":") for peer in peers), \
                f"{node} saw HAProxy's address, not the client's: {peers}"
        timing["up_s"] = time.monotonic() - phase

        def sql(query: str) -> list[list[str]]:
            out = _run([DOCKER, "exec", "-e", f"PGPASSWORD={POSTGRES_PASSWORD}", containers["postgres"], "psql",
                        "-h", "127.0.0.1", "-U", "cttriage", "-d", "cttriage", "-At", "-F", "|", "-c", query],
                       env=env, timeout=60).stdout
            return [row.split("|") for row in out.splitlines() if row]

        def indexed() -> set[str]:
            return {row[0] for row in sql("SELECT sop_instance_uid FROM instances")}

        from pydicom import dcmread

        sop_uid = {str(path): str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)
                   for files in studies for path in files}

        # Three scanners send at once, through the slow line, to HAProxy's published port.
        phase = time.monotonic()
        line = SlowLine(dicom_port, LINE_RATE)
        senders = [Sender(calling, line.port, files) for calling, files in zip(SCANNERS, studies)]

        def all_sending() -> bool:
            for sender in senders:
                if sender.process.poll() is not None:
                    raise AssertionError(f"{sender.calling} ended before the kill:\n{sender.output[-3000:]}")
            return all(len(sender.acknowledged()) >= 6 for sender in senders)

        _wait_fast(all_sending, 180, "the three scanners did not all get going")
        # Which node holds which scanner (the nodes log each association with the caller's AE title).
        holding = {node: [s.calling for s in senders if _established(container_logs(containers[node]), s.calling)]
                   for node in ("node-a", "node-b")}
        victim = "node-a" if holding["node-a"] else "node-b"
        survivor = "node-b" if victim == "node-a" else "node-a"
        assert holding[victim], f"no scanner on either node? {holding}"
        _run([DOCKER, "kill", "-s", "KILL", containers[victim]], env=env, timeout=60)
        killed_at = time.monotonic()
        timing["kill_after_s"] = killed_at - phase
        acked_at_kill = {s.calling: len(s.acknowledged()) for s in senders}
        timing["acknowledged_at_kill"] = sum(acked_at_kill.values())
        print(f"killed {victim} holding {holding[victim]}; acknowledged so far {acked_at_kill}")

        # New associations through HAProxy reach the survivor (timed from the kill, meanwhile).
        echo_after: list[float] = []

        def echo_through_haproxy() -> None:
            while not echo_after and time.monotonic() - killed_at < 60:
                if echoscu(dicom_port, calling="AFTERKILL").returncode == 0:
                    echo_after.append(time.monotonic() - killed_at)
                time.sleep(0.2)

        echo_thread = threading.Thread(target=echo_through_haproxy, daemon=True)
        echo_thread.start()

        # Before any resend: what the killed node acknowledged is indexed by the survivor (from the
        # dead node's journal), and every acknowledged instance within 30 s of the kill.
        on_victim = [s for s in senders if s.calling in holding[victim]]
        for sender in on_victim:
            sender.wait(timeout=60)  # cut off: its output is final
        acknowledged_by_victim = {sop_uid[path] for s in on_victim for path in s.acknowledged()}
        assert acknowledged_by_victim, "the killed node had acknowledged nothing: the kill was not mid-send"
        timing["acknowledged_by_killed_node"] = len(acknowledged_by_victim)
        missing = set(acknowledged_by_victim)
        while missing and time.monotonic() - killed_at < 30:
            missing -= indexed()
            if missing:
                time.sleep(0.3)
        timing["kill_to_recovered_s"] = time.monotonic() - killed_at
        assert not missing, (f"{len(missing)} of the {len(acknowledged_by_victim)} instances {victim} acknowledged "
                             f"not indexed within 30 s of the kill\n{container_logs(containers[survivor])[-6000:]}")

        # The survivor took over the dead node's journal (its orphans duty): one line naming it,
        # with how many instances it indexed for it (0 when the dead node had indexed them all).
        def survivor_recovered() -> str | None:
            found = re.search(rf"(indexed (\d+) instance\(s\) that node {victim} \(|node {victim} \(.*\) is gone; "
                              "nothing it acknowledged)", container_logs(containers[survivor]))
            return found.group(0) if found else None

        recovery = _wait_fast(survivor_recovered, max(1.0, 30 - (time.monotonic() - killed_at)),
                              f"{survivor} did not take over {victim}'s journal")
        timing["kill_to_journal_taken_over_s"] = time.monotonic() - killed_at
        numbers = re.findall(r"indexed (\d+)", recovery)
        timing["indexed_by_survivor_from_journal"] = int(numbers[0]) if numbers else 0

        for sender in senders:
            sender.wait(timeout=300)
        timing["first_round_s"] = time.monotonic() - phase
        line.close()
        cut = {s.calling for s in senders if len(s.acknowledged()) < SLICES}
        assert cut == set(holding[victim]), \
            f"the scanners on {victim} {holding[victim]} should be cut off, those on {survivor} finish: " \
            f"{ {s.calling: len(s.acknowledged()) for s in senders} }"
        for sender in senders:
            if sender.calling not in cut:
                assert sender.process.returncode == 0, sender.output[-3000:]
        acknowledged = {sop_uid[path] for s in senders for path in s.acknowledged()}
        timing["acknowledged_first_round"] = len(acknowledged)
        timing["first_round_instances_per_s"] = len(acknowledged) / timing["first_round_s"]
        echo_thread.join(timeout=70)
        assert echo_after, "no C-ECHO through HAProxy within 60 s of the kill"
        timing["kill_to_echo_s"] = echo_after[0]

        missing = set(acknowledged)
        while missing and time.monotonic() - killed_at < 30:
            missing -= indexed()
            if missing:
                time.sleep(0.5)
        timing["kill_to_indexed_s"] = time.monotonic() - killed_at
        assert not missing, (f"{len(missing)} of {len(acknowledged)} acknowledged instances not indexed within "
                             f"30 s of the kill ({len(missing & acknowledged_by_victim)} of them on {victim})\n"
                             f"{container_logs(containers[survivor])[-6000:]}")

        # The scanners' resend: storescu again with the whole study, straight to HAProxy's port.
        phase = time.monotonic()
        resent = [Sender(s.calling, dicom_port, s.files) for s in senders if s.calling in cut]
        for sender in resent:
            assert sender.wait(timeout=300) == 0, sender.output[-3000:]
            assert len(sender.acknowledged()) == SLICES, sender.output[-3000:]
            assert _established(container_logs(containers[survivor]), sender.calling)
        timing["resend_s"] = time.monotonic() - phase
        timing["resend_instances_per_s"] = SLICES * len(resent) / timing["resend_s"]

        # Every study complete, scored once per version, delivered; its outputs in Orthanc.
        phase = time.monotonic()
        study_uids = [str(dcmread(files[0], stop_before_pixels=True).StudyInstanceUID) for files in studies]
        uid_list = ",".join(f"'{uid}'" for uid in study_uids)

        def delivered() -> bool:
            # All 40 instances indexed (the resend reopens a study cut short: a new version), the
            # series delivered, and a result for the study's current version.
            rows = sql("SELECT st.study_instance_uid, se.state, "
                       "(SELECT count(*) FROM instances i WHERE i.series_fk = se.id), "
                       "(SELECT count(*) FROM results r WHERE r.study_fk = st.id AND r.version = st.version) "
                       f"FROM series se JOIN studies st ON st.id = se.study_fk WHERE st.study_instance_uid IN "
                       f"({uid_list})")
            done = {uid for uid, state, instances, results in rows
                    if state == "delivered" and instances == str(SLICES) and results == "1"}
            return done == set(study_uids) and len(rows) == len(study_uids)

        _wait(delivered, 600, "not every study was scored and delivered", logs)
        counts = dict(sql("SELECT st.study_instance_uid, count(*) FROM instances i JOIN series se ON se.id = "
                          f"i.series_fk JOIN studies st ON st.id = se.study_fk WHERE st.study_instance_uid IN "
                          f"({uid_list}) GROUP BY st.study_instance_uid"))
        assert counts == {uid: str(SLICES) for uid in study_uids}, counts
        assert all(set(sop_uid[str(p)] for p in files) <= {r[0] for r in sql("SELECT sop_instance_uid FROM instances")}
                   for files in studies)
        jobs = sql("SELECT st.study_instance_uid, j.task_name, j.study_version, count(*) FROM jobs j JOIN studies st "
                   f"ON st.id = j.study_fk WHERE st.study_instance_uid IN ({uid_list}) "
                   "GROUP BY st.study_instance_uid, j.task_name, j.study_version")
        assert jobs and all(row[3] == "1" for row in jobs), jobs
        results = sql("SELECT st.study_instance_uid, r.version, r.status, count(*) FROM results r JOIN studies st "
                      f"ON st.id = r.study_fk WHERE st.study_instance_uid IN ({uid_list}) "
                      "GROUP BY st.study_instance_uid, r.version, r.status")
        assert all(row[3] == "1" for row in results), results
        versions = dict(sql(f"SELECT study_instance_uid, version FROM studies WHERE study_instance_uid IN "
                            f"({uid_list})"))
        for uid in study_uids:
            final = [row for row in results if row[0] == uid and row[1] == versions[uid]]
            assert final and final[0][2] == "scored", (uid, results)
            assert len({row[1] for row in results if row[0] == uid}) == len([r for r in results if r[0] == uid])
        timing["study_versions"] = sum(int(v) for v in versions.values())

        def outputs_in_orthanc(study_uid: str) -> bool:
            found = _http_json(f"http://127.0.0.1:{http_port}/tools/find",
                               {"Level": "Instance", "Query": {"StudyInstanceUID": study_uid},
                                "RequestedTags": ["SOPClassUID"], "Expand": True})
            classes = {(item.get("RequestedTags") or {}).get("SOPClassUID") for item in found}
            if None in classes:  # an older Orthanc without RequestedTags
                classes = {_http_json(f"http://127.0.0.1:{http_port}/instances/{item['ID']}/simplified-tags")
                           .get("SOPClassUID") for item in found}
            return {SECONDARY_CAPTURE, COMPREHENSIVE_3D_SR} <= classes

        for uid in study_uids:
            _wait(lambda uid=uid: outputs_in_orthanc(uid), 120, f"the SC and SR of {uid} are not in Orthanc", logs)
        timing["score_and_deliver_s"] = time.monotonic() - phase
    finally:
        for sender in senders:
            sender.stop()
        if line is not None:
            line.close()
        phase = time.monotonic()
        _run([*COMPOSE, "down", "-v", "--remove-orphans"], env=env, timeout=300, check=False)
        timing["down_s"] = time.monotonic() - phase
        timing["total_s"] = time.monotonic() - started
        out = REPO / "bench" / "out"
        out.mkdir(parents=True, exist_ok=True)
        (out / "compose-ha-timing.json").write_text(json.dumps(timing, indent=2))
        print("compose HA test timing:", json.dumps({k: round(v, 2) for k, v in timing.items()}))


def _wait_fast(predicate, timeout: float, what: str):
    """Like _wait, polling every 0.2 s (the kill must land mid-send)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"{what} within {timeout:.0f} s")

