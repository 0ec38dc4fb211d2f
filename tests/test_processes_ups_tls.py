"""UPS subscribers and the TLS port with several node processes (`ct-triage node --processes 2`)
and several node hosts: real node processes, real pynetdicom peers, PostgreSQL.

Which process holds an association is read from the node's log: every line of child N says
``[pN]``, and the "association from AET at address:port established" line names the
caller's own port (:func:`process_of`).
"""

from __future__ import annotations

import os
import re
import signal
import ssl
import time

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from db.session import make_engine, make_session_factory
from tests.conftest import make_settings
from tests.support.daemon import Daemon
from tests.support.net import free_port_on, non_loopback_address
from tests.support.pki import Pki
from tests.support.scanner import free_port, require_dcmtk, storescu, write_ct_series
from tests.support.ups import UpsClient, UpsWatcher
from tests.test_node import wait_for
from tests.test_node_process import node_env, queued_series
from tests.test_ups import NO_EXPIRY_H, T0, seed


@pytest.fixture(autouse=True)
def _dcmtk():
    require_dcmtk()  # Daemon.wait_dicom_ready answers with dcmtk's echoscu


LEASE_TAKEN = r"\[p\d+\]: lease \S+ taken"


def local_port(assoc) -> int:
    return assoc.dul.socket.socket.getsockname()[1]


def process_of(node: Daemon, assoc, timeout: float = 10) -> int:
    """The index of the node process holding ``assoc`` (from its "established" log line)."""
    pattern = re.compile(rf"\[p(\d+)\]: association from \S+ at \S+:{local_port(assoc)} established")

    def found():
        matches = pattern.findall(node.log())
        return matches[-1] if matches else None
    return int(wait_for(found, timeout=timeout))


def lease_holder(node: Daemon, duty: str = "ups-notifier") -> int:
    """The process of ``node`` that took ``duty``'s lease last."""
    taken = re.findall(rf"\[p(\d+)\]: lease {duty} taken", node.log())
    assert taken, node.log()[-3000:]
    return int(taken[-1])


def child_pid(node: Daemon, index: int) -> int:
    return int(re.findall(rf"node process {index} started \(pid (\d+)\)", node.log())[-1])


class Database:
    """What tests.test_ups.seed needs: the worker's settings and a session on the node's database."""

    def __init__(self, tmp_path, url: str):
        self.settings = make_settings(tmp_path, url, worklist_expiry_h=NO_EXPIRY_H)
        self.engine = make_engine(url)
        self.factory = make_session_factory(self.engine)

    def session(self):
        return self.factory()


def start_node(tmp_path, url: str, port: int, watchers: dict[str, int], *args: str, log: str = "node.log",
               **extra) -> Daemon:
    subscribers = ",".join(f"{ae}@127.0.0.1:{p}" for ae, p in watchers.items())
    env = node_env(tmp_path, url, port, ups_subscribers=subscribers, worklist_expiry_h=NO_EXPIRY_H,
                   worklist_aes=",".join(watchers), **extra)
    return Daemon(["node", *args], env, tmp_path / log).start()


def subscribers_on_every_process(node: Daemon, port: int, names: list[str], processes: int = 2
                                 ) -> dict[str, tuple[UpsClient, int]]:
    """Open associations (kept open) as ``names`` until every process holds at least one."""
    clients: dict[str, tuple[UpsClient, int]] = {}
    for name in names:
        client = UpsClient(port, ae_title=name)
        clients[name] = (client, process_of(node, client.assoc))
        if {p for _, p in clients.values()} == set(range(processes)):
            return clients
    raise AssertionError(f"associations did not reach every process: {[(n, p) for n, (_, p) in clients.items()]}")


def assert_reported_once(watchers: dict[str, UpsWatcher], uid: str, states: list[str]) -> None:
    for watcher in watchers.values():
        watcher.wait_for_state(uid, states[-1])
    time.sleep(1.5)  # no second copy arrives
    got = {name: watcher.states(uid) for name, watcher in watchers.items()}
    assert got == {name: states for name in watchers}, got


# -- UPS subscribers ---------------------------------------------------------------------------------
def test_ups_subscribers_on_every_process_get_each_report_once(tmp_path, postgres_url):
    """Global subscriptions made on associations held by process 0 and by process 1 (and a
    per-workitem one on process 1): each subscriber gets every state report, once."""
    names = [f"SUB{i}" for i in range(6)]
    ports = {name: free_port() for name in names}
    watchers = {name: UpsWatcher(p, ae_title=name) for name, p in ports.items()}
    port = free_port()
    node = start_node(tmp_path, postgres_url, port, ports, "--processes", "2")
    db = Database(tmp_path, postgres_url)
    clients: dict[str, tuple[UpsClient, int]] = {}
    try:
        node.wait_dicom_ready(port)
        wait_for(lambda: "2 node processes accepting" in node.log(), timeout=60)
        clients = subscribers_on_every_process(node, port, names)
        for name, (client, _) in clients.items():
            assert client.subscribe(name) == 0
        holder = lease_holder(node)
        uid = seed(db, "1.2.826.0.1.3680043.8.498.91", category="CT-3", percent=55.0, arrived=T0)
        subscribed = {name: watchers[name] for name in clients}
        for watcher in subscribed.values():
            watcher.wait_for_state(uid, "SCHEDULED")
        # A per-workitem subscription from an association on the process without the notifier.
        client = next(c for c, where in clients.values() if where != holder)
        extra = next(n for n in names if n not in clients)
        per_item = UpsClient(port, ae_title=extra)
        try:
            assert per_item.subscribe(extra, uid) == 0
        finally:
            per_item.close()
        subscribed[extra] = watchers[extra]
        watchers[extra].wait_for_state(uid, "SCHEDULED")  # its initial state report
        status, _ = client.claim(uid)  # through the process that does not hold the notifier lease
        assert status == 0
        assert_reported_once(subscribed, uid, ["SCHEDULED", "IN PROGRESS"])
    finally:
        for client, _ in clients.values():
            client.close()
        node.stop()
        db.engine.dispose()
        for watcher in watchers.values():
            watcher.stop()
    assert "[p0]" in node.log() and "[p1]" in node.log()


def test_ups_reports_go_on_after_the_process_holding_the_notifier_is_killed(tmp_path, postgres_url):
    """SIGKILL to the process that sends the N-EVENT-REPORTs: the supervisor restarts it and the
    next state change still reaches the subscriber (whichever process now holds the lease)."""
    ports = {"WATCHER": free_port()}
    watcher = UpsWatcher(ports["WATCHER"])
    port = free_port()
    node = start_node(tmp_path, postgres_url, port, ports, "--processes", "2")
    db = Database(tmp_path, postgres_url)
    try:
        node.wait_dicom_ready(port)
        wait_for(lambda: "2 node processes accepting" in node.log(), timeout=60)
        with UpsClient(port, ae_title="WATCHER") as client:
            assert client.subscribe("WATCHER") == 0
        uid = seed(db, "1.2.826.0.1.3680043.8.498.92", category="CT-2", percent=25.0, arrived=T0)
        watcher.wait_for_state(uid, "SCHEDULED")
        holder = lease_holder(node)
        victim = child_pid(node, holder)
        os.kill(victim, signal.SIGKILL)
        wait_for(lambda: f"node process {holder} started" in node.log().split(f"(pid {victim}) exited")[-1],
                 timeout=30)
        wait_for(lambda: node.log().count(f"[p{holder}]: ct-triage node ready") == 2, timeout=30)
        with UpsClient(port, ae_title="WATCHER") as client:
            status, _ = client.claim(uid)
            assert status == 0
        try:
            watcher.wait_for_state(uid, "IN PROGRESS", timeout=20)
        except AssertionError:
            leases = re.findall(LEASE_TAKEN, node.log())
            raise AssertionError(f"no IN PROGRESS report after the notifier's process was killed; {leases}") from None
        time.sleep(1.5)
        assert watcher.states(uid) == ["SCHEDULED", "IN PROGRESS"]
    finally:
        node.stop()
        db.engine.dispose()
        watcher.stop()


def test_ups_subscribers_on_two_hosts_get_each_report_once(tmp_path, postgres_url):
    """Host A (2 processes) and host B (1 process) share the database: subscribers hold their
    associations on A's two processes and on B; a change made through B reaches each once."""
    names = ["SUBA0", "SUBA1", "SUBA2", "SUBA3", "SUBB"]
    ports = {name: free_port() for name in names}
    watchers = {name: UpsWatcher(p, ae_title=name) for name, p in ports.items()}
    port_a, port_b = free_port(), free_port()
    host_a = start_node(tmp_path, postgres_url, port_a, ports, "--processes", "2", log="a.log", node_id="host-a")
    host_b = start_node(tmp_path, postgres_url, port_b, ports, log="b.log", node_id="host-b")
    db = Database(tmp_path, postgres_url)
    clients: dict[str, tuple[UpsClient, int]] = {}
    try:
        host_a.wait_dicom_ready(port_a)
        host_b.wait_dicom_ready(port_b)
        wait_for(lambda: "2 node processes accepting" in host_a.log(), timeout=60)
        clients = subscribers_on_every_process(host_a, port_a, names[:4])
        clients["SUBB"] = (UpsClient(port_b, ae_title="SUBB"), -1)
        for name, (client, _) in clients.items():
            assert client.subscribe(name) == 0
        uid = seed(db, "1.2.826.0.1.3680043.8.498.93", category="CT-4", percent=80.0, arrived=T0)
        subscribed = {name: watchers[name] for name in clients}
        for watcher in subscribed.values():
            watcher.wait_for_state(uid, "SCHEDULED")
        status, _ = clients["SUBB"][0].claim(uid)
        assert status == 0
        assert_reported_once(subscribed, uid, ["SCHEDULED", "IN PROGRESS"])
    finally:
        for client, _ in clients.values():
            client.close()
        host_a.stop()
        host_b.stop()
        db.engine.dispose()
        for watcher in watchers.values():
            watcher.stop()
    logs = host_a.log() + host_b.log()
    assert len(re.findall(r"lease ups-notifier taken", logs)) == 1, "the notifier lease moved or was taken twice"


def test_studies_are_still_queued_after_process_0_is_killed(tmp_path, postgres_url):
    """The completeness tracker moves with its lease too: after SIGKILL to process 0, a series
    sent to the node is settled and queued once (before, the sibling held the lease without
    running the tracker, and nothing was scored until the whole node restarted)."""
    port = free_port()
    node = Daemon(["node", "--processes", "2"], node_env(tmp_path, postgres_url, port), tmp_path / "node.log").start()
    engine = make_engine(postgres_url)
    try:
        node.wait_dicom_ready(port)
        wait_for(lambda: "2 node processes accepting" in node.log(), timeout=60)
        holder = lease_holder(node, "completeness")
        os.kill(child_pid(node, holder), signal.SIGKILL)
        wait_for(lambda: node.log().count(f"[p{holder}]: ct-triage node ready") == 2, timeout=30)  # restarted
        series = write_ct_series(tmp_path / "s", 5, rows=32, columns=32, seed=71)
        assert storescu(port, series.paths).returncode == 0
        row = queued_series(make_session_factory(engine))
        assert row.instance_count == 5
    finally:
        node.stop()
        engine.dispose()


# -- the TLS port ---------------------------------------------------------------------------------
def _tls_context(pki: Pki) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki.ca))
    context.check_hostname = True
    return context


def _echo_association(address: str, port: int, tls: ssl.SSLContext | None, source: str, source_port: int = 0):
    ae = AE(ae_title="SCANNER")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    ae.add_requested_context(Verification)
    return ae.associate(address, port, ae_title="CTTRIAGE", bind_address=(source, source_port),
                        tls_args=(tls, "localhost") if tls is not None else None)


def _refused_by(node: Daemon, source_port: int) -> str | None:
    """The index (text) of the process that refused the TLS handshake of ``source_port``'s connection."""
    found = re.findall(rf"\[p(\d+)\]: connection from \S+:{source_port} refused: TLS handshake failed", node.log())
    return found[-1] if found else None


def test_tls_port_with_two_processes(tmp_path, postgres_url):
    """CT_TRIAGE_TLS_PORT beside the plain port, two processes: TLS associations succeed on both
    processes, again and again, from the loopback and (where this machine has one) a
    non-loopback address; plain TCP on the TLS port is refused by both; the plain port still
    answers plain associations."""
    pki = Pki(tmp_path / "pki")
    key, cert = pki.issue("node")
    port, tls_port = free_port(), free_port()
    outside = non_loopback_address()
    node = Daemon(["node", "--processes", "2"],
                  node_env(tmp_path, postgres_url, port, tls_cert=cert, tls_key=key, tls_port=tls_port,
                           bind_address="0.0.0.0" if outside else "127.0.0.1"), tmp_path / "node.log").start()
    context = _tls_context(pki)
    sources = [("127.0.0.1", "127.0.0.1")] + ([(outside, outside)] if outside else [])
    held = []
    try:
        node.wait_dicom_ready(port)
        wait_for(lambda: "2 node processes accepting" in node.log(), timeout=60)
        seen: dict[tuple[str, int], int] = {}
        for round_ in range(3):
            for address, source in sources:
                for _ in range(2):  # two held at once: the second goes to the less busy process
                    assoc = _echo_association(address, tls_port, context, source)
                    assert assoc.is_established, f"TLS association {round_} from {source} refused:\n" \
                                                 f"{node.log()[-3000:]}"
                    held.append(assoc)
                    process = process_of(node, assoc)
                    assert assoc.send_c_echo().Status == 0
                    seen[(source, process)] = seen.get((source, process), 0) + 1
                for assoc in held:
                    assoc.release()
                held.clear()
        for _, source in sources:
            assert {p for (s, p) in seen if s == source} == {0, 1}, seen
        # Plain DICOM on the TLS port: refused, whichever process takes the connection.
        refused_by: set[int] = set()
        for attempt in range(16):
            address, source = sources[attempt % len(sources)]
            source_port = free_port_on(source)
            assoc = _echo_association(address, tls_port, None, source, source_port)
            assert not assoc.is_established, "a plain association was accepted on the TLS port"
            refused_by.add(int(wait_for(lambda p=source_port: _refused_by(node, p), timeout=10)))
            if refused_by == {0, 1} and attempt >= len(sources):
                break
        assert refused_by == {0, 1}, refused_by
        plain = _echo_association("127.0.0.1", port, None, "127.0.0.1")
        assert plain.is_established
        plain.release()
    finally:
        for assoc in held:
            if assoc.is_established:
                assoc.abort()
        node.stop()
    log = node.log()
    assert f"listening on {'0.0.0.0' if outside else '127.0.0.1'}:{tls_port} (TLS)" in log
    assert log.count(f":{tls_port} (TLS)") == 2  # each process serves it


def test_tls_required_with_two_processes(tmp_path, postgres_url):
    """CT_TRIAGE_TLS_REQUIRED: the one port speaks TLS in both processes; plain TCP is refused."""
    pki = Pki(tmp_path / "pki")
    key, cert = pki.issue("node")
    port = free_port()
    node = Daemon(["node", "--processes", "2"],
                  node_env(tmp_path, postgres_url, port, tls_cert=cert, tls_key=key, tls_required="true"),
                  tmp_path / "node.log").start()
    context = _tls_context(pki)
    try:
        def tls_ready():
            assoc = _echo_association("127.0.0.1", port, context, "127.0.0.1")
            if assoc.is_established:
                assoc.release()
                return True
            assert node.process.poll() is None, node.log()[-3000:]
            return False
        wait_for(tls_ready, timeout=60, interval=0.3)
        wait_for(lambda: "2 node processes accepting" in node.log(), timeout=60)
        processes = set()
        for _ in range(3):
            pair = [_echo_association("127.0.0.1", port, context, "127.0.0.1") for _ in range(2)]
            assert all(a.is_established for a in pair), node.log()[-3000:]
            processes.update(process_of(node, a) for a in pair)
            for assoc in pair:
                assoc.release()
        assert processes == {0, 1}
        for _ in range(4):
            assert not _echo_association("127.0.0.1", port, None, "127.0.0.1").is_established
    finally:
        node.stop()
    assert node.log().count("TLS handshake failed") >= 4
