"""Several node processes on one host (`ct-triage node --processes N`): real processes,
dcmtk's storescu, PostgreSQL."""

from __future__ import annotations

import logging
import os
import re
import select as io_select
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification
from sqlalchemy import func, select

from db.models import Instance
from db.session import make_engine, make_session_factory
from dicom_node.processes import claim_tmp_dir
from dicom_node.shared_limits import SharedGate, SharedLimits
from tests.support.daemon import Daemon
from tests.support.scanner import free_port, require_dcmtk, storescu, write_ct_series
from tests.test_node import wait_for
from tests.test_node_process import node_env


@pytest.fixture(autouse=True)
def _dcmtk():
    require_dcmtk()


def _children(supervisor_pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(supervisor_pid)], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


def _per_process_taken(log: str) -> dict[str, int]:
    match = re.search(r"associations taken per process: (.*)", log)
    assert match, log[-3000:]
    return {k: int(v) for k, v in (item.split("=") for item in match.group(1).split(", "))}


def test_two_processes_share_the_port_index_every_instance_once_and_stop_cleanly(tmp_path, postgres_url):
    port = free_port()
    env = node_env(tmp_path, postgres_url, port, stable_age_s=3600)
    series = [write_ct_series(tmp_path / f"s{i}", 40, rows=128, columns=128, seed=40 + i, series_number=2 + i)
              for i in range(4)]
    node = Daemon(["node", "--processes", "2"], env, tmp_path / "node.log").start()
    try:
        node.wait_dicom_ready(port)
        wait_for(lambda: "2 node processes accepting" in node.log(), timeout=60)
        children = _children(node.process.pid)
        assert len(children) == 2
        # Several rounds of 4 concurrent senders: both processes take associations.
        for _ in range(3):
            senders = [storescu(port, s.paths, popen=True) for s in series]
            for sender in senders:
                output, _ = sender.communicate(timeout=120)
                assert sender.returncode == 0, output[-2000:]
        factory = make_session_factory(make_engine(postgres_url))

        def indexed():
            with factory() as session:
                return session.scalar(select(func.count(Instance.id)))
        wait_for(lambda: indexed() == 160, timeout=30)
        with factory() as session:
            uids = session.scalars(select(Instance.sop_instance_uid)).all()
        assert sorted(uids) == sorted(u for s in series for u in s.sop_instance_uids)  # once each
        # SIGTERM to the supervisor alone: it forwards it, each child drains and exits.
        os.kill(node.process.pid, signal.SIGTERM)
        assert node.process.wait(timeout=40) == 0, node.log()[-3000:]
        assert not [pid for pid in children if os.path.exists(f"/proc/{pid}")]
    finally:
        node.stop()
    log = node.log()
    taken = _per_process_taken(log)
    assert taken["p0"] > 0 and taken["p1"] > 0, taken
    assert taken["p0"] + taken["p1"] >= 12
    assert "[p0]" in log and "[p1]" in log
    assert not list((tmp_path / "storage" / "tmp").iterdir())  # each removed its own temp folder


def _associate(port: int, calling: str = "SCANNER"):
    ae = AE(ae_title=calling)
    ae.add_requested_context(Verification)
    return ae.associate("127.0.0.1", port, ae_title="CTTRIAGE")


def _established_per_process(log: str, calling: str) -> list[int]:
    found = re.findall(rf"\[p(\d)\]: association from {calling} at ", log)
    return [found.count("0"), found.count("1")]


def test_simultaneous_connections_split_evenly_and_follow_the_load(tmp_path, postgres_url):
    """The kernel's SO_REUSEPORT hashing, and a shared accept queue, split 4 senders 3-1 as
    often as not: the supervisor hands each connection to the least busy process."""
    port = free_port()
    env = node_env(tmp_path, postgres_url, port)
    node = Daemon(["node", "--processes", "2"], env, tmp_path / "node.log").start()
    held = []
    try:
        node.wait_dicom_ready(port)
        wait_for(lambda: "2 node processes accepting" in node.log(), timeout=60)
        for round_ in range(3):
            with ThreadPoolExecutor(4) as pool:  # four scanners connecting at once
                batch = list(pool.map(lambda _: _associate(port, "BURST"), range(4)))
            held += batch
            assert all(a.is_established for a in batch)
            wait_for(lambda r=round_: sum(_established_per_process(node.log(), "BURST")) == 4 * (r + 1))
            assert _established_per_process(node.log(), "BURST") == [2 * (round_ + 1)] * 2, node.log()[-3000:]
        # Load, not turns: with p0's associations gone, the next two go to p0.
        for assoc in held:
            if "[p0]" in _owner(node.log(), assoc):
                assoc.release()
        time.sleep(1.0)  # the node frees the slots as its association threads end (nothing logs it)
        for _ in range(2):
            held.append(_associate(port, "AFTER"))
        wait_for(lambda: sum(_established_per_process(node.log(), "AFTER")) == 2)
        assert _established_per_process(node.log(), "AFTER") == [2, 0], node.log()[-3000:]
    finally:
        for assoc in held:
            if assoc.is_established:
                assoc.release()
        node.stop()


def _owner(log: str, assoc) -> str:
    """The ``[pN]`` of the log line that established ``assoc`` (by its local port)."""
    local_port = assoc.dul.socket.socket.getsockname()[1] if assoc.is_established else None
    for line in log.splitlines():
        if f"127.0.0.1:{local_port} established" in line:
            return line
    return ""


def test_association_cap_holds_across_processes(tmp_path, postgres_url):
    port = free_port()
    env = node_env(tmp_path, postgres_url, port, max_associations=2)
    node = Daemon(["node", "--processes", "2"], env, tmp_path / "node.log").start()
    held = []
    try:
        node.wait_dicom_ready(port)
        wait_for(lambda: "2 node processes accepting" in node.log(), timeout=60)
        held = [_associate(port) for _ in range(2)]
        assert all(a.is_established for a in held)
        # Whichever process takes the third, it is refused: transient, local limit exceeded.
        for _ in range(6):
            third = _associate(port)
            assert third.is_rejected, "a third association was accepted"
            assert (third.acceptor.primitive.result, third.acceptor.primitive.diagnostic) == (0x02, 0x02)
        held[0].release()
        wait_for(lambda: _associate_and_release(port), timeout=10)
    finally:
        for assoc in held:
            if assoc.is_established:
                assoc.release()
        node.stop()
    log = node.log()
    assert "2 associations already open (CT_TRIAGE_MAX_ASSOCIATIONS)" in log


def _associate_and_release(port: int) -> bool:
    assoc = _associate(port)
    if assoc.is_established:
        assoc.release()
        return True
    return False


def test_sqlite_is_refused_with_several_processes(tmp_path, sqlite_url):
    port = free_port()
    result = subprocess.run([sys.executable, "-m", "ct_triage_app.cli", "node", "--processes", "2"],
                            env={**os.environ, **node_env(tmp_path, sqlite_url, port)}, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 2
    assert "need PostgreSQL" in result.stderr and "CT_TRIAGE_DATABASE_URL" in result.stderr


@pytest.mark.parametrize("processes", ["1", "2"])
def test_a_second_node_on_the_same_port_fails_to_start(tmp_path, postgres_url, processes):
    port = free_port()
    first = Daemon(["node", "--processes", "2"], node_env(tmp_path / "a", postgres_url, port),
                   tmp_path / "a.log").start()
    try:
        first.wait_dicom_ready(port)
        result = subprocess.run([sys.executable, "-m", "ct_triage_app.cli", "node", "--processes", processes],
                                env={**os.environ, **node_env(tmp_path / "b", postgres_url, port)},
                                capture_output=True, text=True, timeout=60)
        assert result.returncode != 0
        assert f"cannot listen on 127.0.0.1:{port}: the port is in use" in result.stderr, result.stderr[-2000:]
        assert "Traceback" not in result.stderr
    finally:
        first.stop()


def test_a_killed_child_is_restarted_and_the_node_keeps_accepting(tmp_path, postgres_url):
    port = free_port()
    env = node_env(tmp_path, postgres_url, port)
    series = write_ct_series(tmp_path / "s", 20, rows=64, columns=64, seed=5)
    node = Daemon(["node", "--processes", "2"], env, tmp_path / "node.log").start()
    try:
        node.wait_dicom_ready(port)
        wait_for(lambda: "2 node processes accepting" in node.log(), timeout=60)
        victim = _children(node.process.pid)[1]
        os.kill(victim, signal.SIGKILL)
        # The other process keeps accepting meanwhile.
        result = storescu(port, series.paths[:10])
        assert result.returncode == 0, result.stdout[-2000:]
        wait_for(lambda: "node process 1 started" in node.log().split(f"(pid {victim}) exited")[-1], timeout=30)
        wait_for(lambda: len(_children(node.process.pid)) == 2 and victim not in _children(node.process.pid),
                 timeout=30)
        result = storescu(port, series.paths[10:])
        assert result.returncode == 0, result.stdout[-2000:]
        factory = make_session_factory(make_engine(postgres_url))

        def indexed():
            with factory() as session:
                return session.scalar(select(func.count(Instance.id)))
        wait_for(lambda: indexed() == 20, timeout=30)
    finally:
        assert node.stop() == 0 or True
    assert f"node process 1 (pid {victim}) exited with code -9: restarting it in 1 s" in node.log()


# -- the parts, in one process --------------------------------------------------------------
def test_shared_gate_counts_for_the_host_and_a_cleared_row_frees_its_slots():
    limits = SharedLimits.create(2)
    a = SharedGate(limits, 0, max_associations=2, max_pending_per_address=2, max_pending_total=3)
    b = SharedGate(SharedLimits(limits.fd, 2), 1, max_associations=2, max_pending_per_address=2,
                   max_pending_total=3)
    assert a.open(("10.0.0.1", 1)) is None and b.open(("10.0.0.1", 2)) is None
    assert "MAX_PENDING_PER_ADDRESS" in (b.open(("10.0.0.1", 3)) or "")
    assert b.open(("10.0.0.2", 4)) is None
    assert "MAX_PENDING_TOTAL" in (a.open(("10.0.0.3", 5)) or "")
    assert a.admit(("10.0.0.1", 1)) and b.admit(("10.0.0.1", 2))
    assert b.counts() == (1, 2)
    b.note_handed_in()
    assert limits.loads() == [(1, 0), (2, 1)]  # b also holds the pending one
    assert not b.admit(("10.0.0.2", 4))  # two accepted on the host
    limits.clear_row(0)  # process 0 died: its slots are free again
    assert b.admit(("10.0.0.2", 4))
    b.release(("10.0.0.2", 4))
    b.release(("10.0.0.1", 2))
    assert a.counts() == (0, 0)
    assert limits.taken() == [0, 2]


def test_tmp_folders_of_running_processes_are_kept(tmp_path):
    root = tmp_path / "tmp"
    root.mkdir()
    (root / "loose.dcm").write_bytes(b"x")  # the old single-folder layout
    host = claim_tmp_dir(root).name.rsplit("-", 1)[0]
    alive = subprocess.Popen(["sleep", "30"])
    try:
        dead = subprocess.Popen(["true"])
        dead.wait()
        for pid in (alive.pid, dead.pid):
            (root / f"{host}-{pid}").mkdir()
            (root / f"{host}-{pid}" / "receiving.dcm").write_bytes(b"x")
        (root / "otherhost-1").mkdir()
        mine = claim_tmp_dir(root)
        assert sorted(p.name for p in root.iterdir()) == sorted([mine.name, f"{host}-{alive.pid}", "otherhost-1"])
        assert (root / f"{host}-{alive.pid}" / "receiving.dcm").exists()
    finally:
        alive.kill()
        alive.wait()


def test_listener_refuses_a_second_bind():
    from dicom_node.processes import bind_listener

    first = bind_listener("127.0.0.1", 0)
    try:
        with pytest.raises(Exception, match="the port is in use"):
            bind_listener("127.0.0.1", first.getsockname()[1])
        probe = socket.socket()
        assert probe.connect_ex(first.getsockname()) == 0
        probe.close()
    finally:
        first.close()
    time.sleep(0)


def test_serve_with_two_processes_runs_the_embedded_worker_once(tmp_path, postgres_url):
    port = free_port()
    node = Daemon(["serve", "--processes", "2"], node_env(tmp_path, postgres_url, port, http_port=0),
                  tmp_path / "serve.log").start()
    try:
        wait_for(lambda: "ct-triage serve ready: 2 node processes accepting" in node.log(), timeout=120)
        node.wait_dicom_ready(port)
        os.kill(node.process.pid, signal.SIGTERM)
        assert node.process.wait(timeout=40) == 0
    finally:
        node.stop()
    log = node.log()
    assert log.count("embedded worker consuming jobs") == 1 and "[p0]: embedded worker" in log
    assert "[p1]: ct-triage node ready" in log


def test_a_process_sees_what_its_siblings_still_receive_and_waits_for_their_rows(tmp_path):
    from dicom_node.processes import BusyStudies

    root = tmp_path / "tmp"
    root.mkdir()
    mine = claim_tmp_dir(root)
    host = mine.name.rsplit("-", 1)[0]
    sibling_process = subprocess.Popen(["sleep", "30"])
    try:
        folder = root / f"{host}-{sibling_process.pid}"
        folder.mkdir()
        indexed = {"flushed": False}
        sibling = BusyStudies(folder, lambda: {"1.2.3"}, lambda timeout: indexed["flushed"])
        me = BusyStudies(mine, lambda: set(), lambda timeout: True)
        asked = time.time()
        sibling.publish()
        assert me.of_siblings() == {"1.2.3"}
        assert not me.wait_siblings_indexed(asked, 0.2)  # its indexer has not caught up
        indexed["flushed"] = True
        sibling.publish()
        assert me.wait_siblings_indexed(asked, 0.2)
        assert not me.wait_siblings_indexed(time.time() + 5, 0.1)  # nothing published after that time yet
    finally:
        sibling_process.kill()
        sibling_process.wait()
    assert me.of_siblings() == frozenset() and me.wait_siblings_indexed(time.time() + 5, 0.1)  # it is gone


def test_dispatcher_deals_by_load_skips_a_stalled_child_and_survives_a_dead_one(caplog):
    from dicom_node.processes import STALLED_AFTER_S, Dispatcher, bind_listener

    listener = bind_listener("127.0.0.1", 0)
    port = listener.getsockname()[1]
    limits = SharedLimits.create(2)
    gates = [SharedGate(SharedLimits(limits.fd, 2), row, 8, 8, 8) for row in range(2)]
    dispatcher = Dispatcher({port: listener}, limits, 2)
    ends = [dispatcher.open_channels(row)[port] for row in range(2)]
    clients: list[socket.socket] = []

    def connect_and_deal() -> int:
        clients.append(socket.create_connection(("127.0.0.1", port)))
        before = list(dispatcher.handed)
        wait_for(lambda: io_select.select([listener], [], [], 0.05)[0])
        dispatcher._take(port)
        return [a - b for a, b in zip(dispatcher.handed, before)].index(1)

    def receive(row: int) -> socket.socket:
        _msg, fds, _flags, _addr = socket.recv_fds(ends[row], 1, 1)
        gates[row].note_handed_in()
        return socket.socket(fileno=fds[0])

    try:
        assert dispatcher.choose(port) is None  # nobody ready yet: connections wait in the backlog
        for row in range(2):
            dispatcher.set_ready(row, True)
        # A burst before anyone received: dealt in turn (in flight counts as load).
        assert [connect_and_deal() for _ in range(4)] == [0, 1, 0, 1]
        received = [receive(row) for row in (0, 0, 1, 1)]
        assert limits.loads() == [(0, 2), (0, 2)]
        # Load, not turns: p0 now holds two associations, so the next two go to p1.
        for key in (("10.0.0.1", 1), ("10.0.0.1", 2)):
            assert gates[0].open(key) is None and gates[0].admit(key)
        assert [connect_and_deal(), connect_and_deal()] == [1, 1]
        # p1 leaves those two unreceived (stopped, or stuck): after STALLED_AFTER_S it gets none.
        assert dispatcher.choose(port, now=time.monotonic() + STALLED_AFTER_S + 0.5) == 0
        received += [receive(1), receive(1)]
        assert dispatcher.choose(port) == 1  # it took them: back in the deal, the least loaded
        # A dead child: its end is gone, the connection goes to the other one.
        ends[1].close()
        assert connect_and_deal() == 0
        assert not dispatcher.ready[1] and dispatcher.channels[1] == {}
        received.append(receive(0))
        # The connection reached the child whole: the peer's bytes arrive on the handed socket.
        clients[-1].sendall(b"hello")
        assert received[-1].recv(5) == b"hello"
        # Nobody can take connections: each is closed (the scanner sees it at once), and a
        # flood of them logs one line, not one per connection.
        ends[0].close()
        caplog.set_level(logging.WARNING, logger="ct_triage.node.processes")
        for _ in range(3):
            clients.append(socket.create_connection(("127.0.0.1", port)))
            wait_for(lambda: io_select.select([listener], [], [], 0.05)[0])
            dispatcher._take(port)
            clients[-1].settimeout(5)
            assert clients[-1].recv(1) == b""  # closed by the node
        assert caplog.text.count("no node process could take it") == 1, caplog.text
    finally:
        dispatcher.stop()
        for sock in clients + [listener, ends[0]]:
            sock.close()


def test_proxy_header_is_read_by_whichever_process_takes_the_connection(tmp_path, postgres_url):
    """Connections handed from the supervisor keep their PROXY v2 header for the child: the
    allowlist and the log see the scanner behind the balancer (127.0.0.2), in both processes."""
    from dicom_node.proxy import build_header
    from tests.test_proxy import associate_rq, exchange

    port = free_port()
    env = node_env(tmp_path, postgres_url, port, proxy_protocol_from="127.0.0.2",
                   allowed_calling_aes="SCANNER@10.1.2.3", acse_timeout_s=3)
    node = Daemon(["node", "--processes", "2"], env, tmp_path / "node.log").start()
    try:
        wait_for(lambda: "2 node processes accepting" in node.log(), timeout=60)
        for source_port in range(40001, 40005):
            payload = build_header(("10.1.2.3", source_port), ("127.0.0.1", port)) + \
                associate_rq("SCANNER", "CTTRIAGE", port)
            assert exchange("127.0.0.2", port, payload) == b"\x02"  # A-ASSOCIATE-AC
        refused = build_header(("10.1.2.99", 41000), ("127.0.0.1", port)) + associate_rq("SCANNER", "CTTRIAGE", port)
        assert exchange("127.0.0.2", port, refused) == b"\x03"  # A-ASSOCIATE-RJ: not the allowed address
        wait_for(lambda: node.log().count("association from SCANNER at 10.1.2.3:") == 4)
    finally:
        node.stop()
    log = node.log()
    assert {line.split("[p")[1][0] for line in log.splitlines() if "at 10.1.2.3:" in line} == {"0", "1"}
    assert "127.0.0.2" not in "".join(line for line in log.splitlines() if "established" in line)


def test_a_stopped_process_gets_no_new_connections_after_a_second_and_rejoins(tmp_path, postgres_url):
    """SIGSTOP one child (hung): at most the connections handed to it before STALLED_AFTER_S
    wait for it; every later one goes to its sibling. After SIGCONT it takes connections again."""
    port = free_port()
    node = Daemon(["node", "--processes", "2"], node_env(tmp_path, postgres_url, port), tmp_path / "node.log").start()
    stopped = None
    try:
        wait_for(lambda: "2 node processes accepting" in node.log(), timeout=60)
        stopped = _children(node.process.pid)[1]
        os.kill(stopped, signal.SIGSTOP)

        def echo() -> bool:
            ae = AE(ae_title="PROBE")
            ae.acse_timeout = 3
            ae.add_requested_context(Verification)
            assoc = ae.associate("127.0.0.1", port, ae_title="CTTRIAGE")
            ok = assoc.is_established and assoc.send_c_echo().Status == 0
            if assoc.is_established:
                assoc.release()
            return bool(ok)

        started = time.monotonic()
        with ThreadPoolExecutor(8) as pool:
            first = [pool.submit(echo) for _ in range(2)]  # the next turn may be the stopped one's
            time.sleep(1.5)
            later = [pool.submit(echo) for _ in range(6)]
            assert all(f.result(timeout=30) for f in later), node.log()[-3000:]
            assert sum(f.result(timeout=30) for f in first) >= 1
        assert time.monotonic() - started < 12
        os.kill(stopped, signal.SIGCONT)
        stopped = None
        for _ in range(4):
            assert echo()
        wait_for(lambda: _established_per_process(node.log(), "PROBE")[1] >= 1, timeout=10)
    finally:
        if stopped is not None:
            os.kill(stopped, signal.SIGCONT)
        node.stop()
    log = node.log()
    assert _established_per_process(log, "PROBE")[0] >= 7, log[-3000:]
