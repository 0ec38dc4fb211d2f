"""Several receiving processes on one host: ``ct-triage node --processes N`` (and ``serve``).

What
    A supervisor (the process the command started) binds the listening socket(s) once
    (the DICOM port, and the TLS port when it is a second port), creates the shared
    admission table (:mod:`dicom_node.shared_limits`) and starts N fresh child processes
    (``python -m ct_triage_app.cli node|serve --process-index I ...``, never a fork of a
    process that runs threads or a database engine). The supervisor alone accepts: each
    connection goes, as a descriptor over a Unix socket pair (``SCM_RIGHTS``), to the ready
    child holding the fewest sockets (pending + accepted associations, plus those handed
    to it and not yet received), ties to the one chosen longest ago
    (:class:`Dispatcher`). The child reads the PROXY header, applies the caps and runs the
    association as a single node does (:class:`AdoptingAssociationServer`). No
    ``SO_REUSEPORT``: a stray second node on the port still fails to bind, with a clear error.

    The leased duties (the completeness tracker, retention, the UPS notifier, orphan
    recovery: :mod:`dicom_node.leases`) start in every child and run where the lease is
    held: child 0 takes the leases first (it starts alone), and when it dies a sibling (or
    another host) takes them within a second, rather than after its restart. Child 0 runs
    the rest of what must run once per host (:attr:`NodeRole.duties`): the audit sender,
    workitem expiry, the scan for spooled files without a row, the dashboard and, in
    ``serve``, the embedded consumer (or the Celery worker). The supervisor restarts a child that
    dies (backoff 1 s doubling to 30 s), forwards SIGTERM (each child drains as one node
    does: :mod:`dicom_node.shutdown`), and exits non-zero when a child cannot start.

    Each process keeps its temporary files in its own folder ``STORAGE_DIR/tmp/<host>-<pid>``;
    a start wipes only the folders of processes of this host that no longer run
    (:func:`claim_tmp_dir`). Studies an association of one process is still sending are
    published in that folder so that the completeness tracker (in whichever process holds
    its lease) treats them as busy too, and so is how far its indexer got, so that a storage
    commitment answered by one process waits for the rows of instances another acknowledged
    (:class:`BusyStudies`).

Why these choices
    - The supervisor hands out connections rather than the children sharing one socket or
      ``SO_REUSEPORT``: the kernel's port hashing splits four senders 3-1 as often as not,
      and so did a shared accept queue (whoever is scheduled first wins, even with the
      busier process yielding for 10 ms: 3-1 in 3 of 5 benchmark repeats). Counting the
      connections in flight makes four senders arriving within a millisecond split 2-2. A
      connection costs the supervisor an accept and a ``sendmsg``; when no child is ready
      (all restarting), connections wait in the listen backlog, as they would for one node.
    - SQLite is one writer and one process: several processes require PostgreSQL
      (:func:`check_database`).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy.engine import make_url

from ct_triage.audit import PerKeyRate
from ct_triage.errors import ConfigError
from ct_triage.settings import Settings
from dicom_node.nodes import pid_running
from dicom_node.shared_limits import MAX_ROWS, SharedGate, SharedLimits
from dicom_node.transport import BoundedAssociationServer, Gate

log = logging.getLogger("ct_triage.node.processes")

READY_TIMEOUT_S = 600.0  # child 0 indexes what the last run left without a row before it is ready
RESTART_FIRST_S, RESTART_MAX_S = 1.0, 30.0
STABLE_AFTER_S = 60.0  # a child that ran this long restarts after RESTART_FIRST_S again
BUSY_PUBLISH_S = 0.25
BUSY_FILE = "busy-studies"
INDEXED_FILE = "indexed-until"
DISPATCH_POLL_S = 0.2  # the dispatcher's longest wait: how soon it sees a stop or a child ready
STALLED_AFTER_S = 1.0  # a child that left a handed connection unreceived this long gets no more until it does
NO_CHILD_WAIT_S = 0.05  # with no child ready, how long a waiting connection stays in the backlog between looks
WARNINGS_PER_MINUTE = 1  # the dispatcher's same warning at most this often (with a count): a flood logs a line a minute


# -- the role of one process ------------------------------------------------------------
@dataclass
class NodeRole:
    """Which process of the host this is, and what it inherited from the supervisor."""

    index: int = 0
    count: int = 1
    listen: dict[int, socket.socket] = field(default_factory=dict)  # configured port -> listening socket
    limits: SharedLimits | None = None
    restarted: bool = False
    ready_fd: int | None = None

    @property
    def duties(self) -> bool:
        """Runs the once-per-host duties that take no lease (the dashboard, the embedded
        consumer, workitem expiry, the audit sender). The leased ones start in every process
        and run where their lease (a PostgreSQL advisory lock, :mod:`dicom_node.leases`) is held."""
        return self.index == 0

    @property
    def scans_orphans(self) -> bool:
        """Indexes spooled files without a row at start: child 0, and a restarted child
        (what its dead predecessor acknowledged but had not indexed)."""
        return self.duties or self.restarted

    def make_gate(self, settings: Settings) -> Gate | SharedGate:
        if self.limits is None:
            return Gate(settings.max_associations, settings.max_pending_per_address, settings.max_pending_total)
        return SharedGate(self.limits, self.index, settings.max_associations, settings.max_pending_per_address,
                          settings.max_pending_total)

    def ready(self) -> None:
        """Tell the supervisor this child accepts associations."""
        if self.ready_fd is not None:
            try:
                os.write(self.ready_fd, b"1")
                os.close(self.ready_fd)
            except OSError:
                pass
            self.ready_fd = None

    def watch_supervisor(self, stop: threading.Event) -> None:
        """Set ``stop`` if the supervisor disappears (SIGKILLed): no orphan keeps the port."""
        if self.count <= 1:
            return
        parent = os.getppid()

        def watch() -> None:
            while not stop.wait(1.0):
                if os.getppid() != parent:
                    log.warning("the supervisor (pid %d) is gone: stopping", parent)
                    stop.set()
        threading.Thread(target=watch, name="supervisor-watch", daemon=True).start()


def child_role(index: int, count: int, listen_fds: str, limits_fd: int, ready_fd: int,
               restarted: bool) -> NodeRole:
    """The :class:`NodeRole` of a child from its command line (see :meth:`Supervisor.child_args`)."""
    listen = {}
    for item in filter(None, listen_fds.split(",")):
        port, fd = item.split(":")
        listen[int(port)] = socket.socket(fileno=int(fd))
    _log_as_child(index)
    return NodeRole(index=index, count=count, listen=listen, limits=SharedLimits(limits_fd, count),
                    restarted=restarted, ready_fd=ready_fd)


def _log_as_child(index: int) -> None:
    """Every log line of child ``index`` says so (``ct_triage.node[p1]``)."""
    for handler in logging.getLogger().handlers:
        handler.setFormatter(logging.Formatter(f"%(asctime)s %(levelname)s %(name)s[p{index}]: %(message)s"))


class AdoptingAssociationServer(BoundedAssociationServer):
    """:class:`BoundedAssociationServer` fed by the supervisor: its "listening" socket is this
    child's end of a Unix socket pair, and each message carries one accepted connection
    (:class:`Dispatcher`). Everything after the accept (PROXY header, caps, TLS, the
    association) is the single node's."""

    def __init__(self, *args, listen_socket: socket.socket, **kwargs):
        self._adopted = listen_socket
        super().__init__(*args, **kwargs)

    def server_bind(self) -> None:
        if self.socket is not None:
            self.socket.close()  # the one socketserver made for us
        self.socket = self._adopted
        self.socket.setblocking(False)
        # server_address stays the configured (address, port) the supervisor listens on.

    def server_activate(self) -> None:
        pass  # the supervisor listens

    def get_request(self):
        msg, fds, _flags, _addr = socket.recv_fds(self.socket, 1, 4)
        if not fds:
            if not msg:  # the supervisor closed its end: it stops, or it is gone (the watch stops us)
                time.sleep(DISPATCH_POLL_S)
            raise OSError("no connection in the supervisor's message")
        for extra in fds[1:]:
            os.close(extra)
        client_socket = socket.socket(fileno=fds[0])
        if isinstance(self.gate, SharedGate):
            self.gate.note_handed_in()
        try:
            client_socket.setblocking(True)
            address = client_socket.getpeername()
        except OSError:
            client_socket.close()  # the peer already left
            raise
        return client_socket, address


class Dispatcher:
    """The supervisor's accept loop: each connection to the child with the least load.

    Load of a child: sockets it holds (pending + accepted, from the shared table) plus
    connections sent to it that it has not received yet; ties go to the child chosen
    longest ago, so a burst of simultaneous connections is dealt round-robin. A child that
    has left a connection unreceived for ``STALLED_AFTER_S`` (stopped, or stuck) gets no
    more until it takes it; with every child stalled, the least loaded still gets them."""

    def __init__(self, sockets: dict[int, socket.socket], limits: SharedLimits, count: int):
        self.sockets = sockets
        self.limits = limits
        self.lock = threading.Lock()
        self.channels: list[dict[int, socket.socket]] = [{} for _ in range(count)]  # child -> port -> our end
        self.ready = [False] * count
        self.sent = [0] * count
        self.last_chosen = [0.0] * count
        self.received = [0] * count  # as last read from the table
        self.progress_at = [0.0] * count  # when it last had nothing in flight or received one
        self.handed = [0] * count  # connections handed to each child since start, across its restarts
        self.stop_event = threading.Event()
        self.thread: threading.Thread | None = None
        self._warnings = PerKeyRate(WARNINGS_PER_MINUTE, max_keys=64)

    def _warn(self, message: str) -> None:
        if self._warnings.allow(message):
            left_out = self._warnings.suppressed.pop(message, 0)
            log.warning("%s%s", message, f" ({left_out} more time(s) since the last such line)" if left_out else "")

    def open_channels(self, index: int) -> dict[int, socket.socket]:
        """New socket pairs for child ``index`` (about to start): returns the child's ends (to pass)."""
        theirs = {}
        with self.lock:
            self._close(index)
            for port in self.sockets:
                ours, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
                ours.setblocking(False)
                child_end.set_inheritable(True)
                self.channels[index][port] = ours
                theirs[port] = child_end
            self.sent[index] = self.received[index] = 0
        return theirs

    def set_ready(self, index: int, ready: bool) -> None:
        with self.lock:
            self.ready[index] = ready
            if not ready:
                self._close(index)

    def _close(self, index: int) -> None:
        for ours in self.channels[index].values():
            ours.close()  # a connection sent and not received is closed with it
        self.channels[index] = {}
        self.ready[index] = False

    def choose(self, port: int, now: float | None = None) -> int | None:
        """The ready child to take the next connection on ``port``, or None."""
        now = time.monotonic() if now is None else now
        candidates = []
        for index, (held, received) in enumerate(self.limits.loads()[:len(self.ready)]):
            if not self.ready[index] or port not in self.channels[index]:
                continue
            in_flight = max(0, self.sent[index] - received)
            if in_flight == 0 or received != self.received[index]:
                self.received[index], self.progress_at[index] = received, now
            stalled = now - self.progress_at[index] > STALLED_AFTER_S
            candidates.append((stalled, held + in_flight, self.last_chosen[index], index))
        return min(candidates)[3] if candidates else None

    def start(self) -> None:
        self.thread = threading.Thread(target=self._run, name="dispatcher", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.stop_event.set()
        if self.thread is not None:
            self.thread.join(timeout=5)
        with self.lock:
            for index in range(len(self.channels)):
                self._close(index)

    def _run(self) -> None:
        by_fd = {sock.fileno(): port for port, sock in self.sockets.items()}
        while not self.stop_event.is_set():
            with self.lock:
                anyone = any(self.ready)
            if not anyone:  # leave connections in the backlog until a child is ready
                self.stop_event.wait(NO_CHILD_WAIT_S)
                continue
            try:
                readable, _, _ = select.select(list(by_fd), [], [], DISPATCH_POLL_S)
            except (OSError, ValueError):
                return  # the listening sockets were closed: stopping
            for fd in readable:
                self._take(by_fd[fd])

    def _take(self, port: int) -> None:
        try:
            conn, _address = self.sockets[port].accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:  # out of descriptors or buffers: the connection waits in the backlog
            self._warn(f"accept on port {port} failed: {exc.strerror or exc}")
            self.stop_event.wait(NO_CHILD_WAIT_S)
            return
        try:
            with self.lock:
                tried: set[int] = set()
                while True:
                    index = self.choose(port)
                    if index is None or index in tried:
                        self._warn(f"connection on port {port} closed: no node process could take it")
                        return
                    tried.add(index)
                    try:
                        socket.send_fds(self.channels[index][port], [b"c"], [conn.fileno()])
                    except BlockingIOError:  # its queue is full: it hangs; the next one takes it
                        self._warn(f"node process {index} takes no connections (its queue is full): trying another")
                        continue
                    except OSError as exc:  # it died; the supervisor restarts it
                        log.warning("node process %d did not take a connection (%s): trying another", index,
                                    exc.strerror or exc)
                        self._close(index)
                        continue
                    self.sent[index] += 1
                    self.handed[index] += 1
                    self.last_chosen[index] = time.monotonic()
                    return
        finally:
            conn.close()  # the child holds its own copy now


# -- per-process temporary folders ------------------------------------------------------
def _host() -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in socket.gethostname())[:64] or "host"


def _process_folders(tmp_root: Path) -> list[tuple[Path, int]]:
    """(folder, pid) of this host's process folders under ``tmp_root``."""
    prefix = f"{_host()}-"
    found = []
    for entry in tmp_root.iterdir():
        if entry.is_dir() and entry.name.startswith(prefix) and entry.name[len(prefix):].isdigit():
            found.append((entry, int(entry.name[len(prefix):])))
    return found


def claim_tmp_dir(tmp_root: Path) -> Path:
    """This process's temporary folder ``tmp_root/<host>-<pid>``, emptied; the folders of
    this host's processes that no longer run are removed, and loose files of the old
    single-folder layout too. Folders of other hosts (shared storage) are left alone."""
    mine = tmp_root / f"{_host()}-{os.getpid()}"
    for entry in tmp_root.iterdir():
        if entry.is_file() or entry.is_symlink():
            entry.unlink(missing_ok=True)
    for folder, pid in _process_folders(tmp_root):
        if folder == mine or not pid_running(pid):
            shutil.rmtree(folder, ignore_errors=True)
    mine.mkdir(parents=True, exist_ok=True)
    return mine


def release_tmp_dir(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)


class BusyStudies:
    """What the other node processes of this host are still receiving and indexing.

    Each process writes, in its temporary folder, the studies its associations are sending
    (and its indexer still holds) to ``busy-studies`` when they change, and to
    ``indexed-until`` the latest time before which everything it acknowledged is indexed,
    both at most every ``BUSY_PUBLISH_S``. The completeness tracker (where its lease is
    held) counts the siblings' busy studies as busy (:meth:`of_siblings`); a storage
    commitment waits for the siblings' rows too (:meth:`wait_siblings_indexed`), whichever
    process the scanner's N-ACTION reached."""

    def __init__(self, folder: Path, local, flush):
        self.folder = folder
        self.local = local
        self.flush = flush  # the local indexer's flush(timeout) -> bool
        self._last: frozenset[str] | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="busy-studies", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)

    def _run(self) -> None:
        while not self._stop.wait(BUSY_PUBLISH_S):
            try:
                self.publish()
            except Exception as exc:  # never stops the node; the next round retries
                log.warning("busy studies not published: %s", type(exc).__name__)

    def _write(self, name: str, text: str) -> None:
        temp = self.folder / f".{name}"
        temp.write_text(text)
        os.replace(temp, self.folder / name)

    def publish(self) -> None:
        asked = time.time()
        if self.flush(BUSY_PUBLISH_S):  # everything acknowledged before `asked` has its row
            self._write(INDEXED_FILE, repr(asked))
        busy = frozenset(self.local())
        if busy != self._last:
            self._write(BUSY_FILE, "\n".join(sorted(busy)))
            self._last = busy

    def _siblings(self) -> list[Path]:
        return [folder for folder, pid in _process_folders(self.folder.parent)
                if folder != self.folder and pid_running(pid)]

    def of_siblings(self) -> frozenset[str]:
        found: set[str] = set()
        for folder in self._siblings():
            try:
                found.update(filter(None, (folder / BUSY_FILE).read_text().splitlines()))
            except OSError:
                continue
        return frozenset(found)

    def wait_siblings_indexed(self, since: float, timeout: float) -> bool:
        """Until every running sibling has indexed what it acknowledged before ``since``
        (wall clock); False after ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            waiting = []
            for folder in self._siblings():
                try:
                    until = float((folder / INDEXED_FILE).read_text())
                except (OSError, ValueError):
                    until = 0.0
                if until < since:
                    waiting.append(folder)
            if not waiting:
                return True
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)


# -- the supervisor ---------------------------------------------------------------------
def check_database(settings: Settings, processes: int) -> None:
    if processes < 1 or processes > MAX_ROWS:
        raise ConfigError(f"--processes / CT_TRIAGE_NODE_PROCESSES must be 1..{MAX_ROWS}, got {processes}")
    if processes > 1 and make_url(settings.effective_database_url).get_backend_name() != "postgresql":
        raise ConfigError(
            f"{processes} node processes need PostgreSQL: set CT_TRIAGE_DATABASE_URL=postgresql://... "
            "(SQLite, the default, takes one writing process; run --processes 1 with it)")


def bind_error(exc: OSError, address: str, port: int) -> ConfigError:
    if exc.errno == errno.EADDRINUSE:
        return ConfigError(f"cannot listen on {address}:{port}: the port is in use (another ct-triage node or "
                           "DICOM server runs there?); set CT_TRIAGE_PORT / CT_TRIAGE_TLS_PORT or stop it")
    return ConfigError(f"cannot listen on {address}:{port}: {exc.strerror or exc}")


def listening_ports(settings: Settings) -> list[int]:
    """The ports the node listens on (as :meth:`dicom_node.server.DicomNode.start` serves them)."""
    if settings.tls_enabled and not settings.tls_required:
        return [settings.port, settings.tls_port]
    return [settings.port]


def bind_listener(address: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    # As pynetdicom does: a restart is not refused for the last run's TIME_WAIT sockets. On
    # Linux SO_REUSEADDR never lets a second listener share the port (SO_REUSEPORT would).
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((address, port))
        sock.listen(128)
    except OSError as exc:
        sock.close()
        raise bind_error(exc, address, port) from None
    sock.setblocking(False)
    sock.set_inheritable(True)
    return sock


@dataclass
class _Child:
    index: int
    proc: subprocess.Popen | None = None
    started: float = 0.0
    ready_r: int | None = None
    restart_at: float | None = None
    backoff: float = RESTART_FIRST_S
    taken: int = 0  # associations taken by its dead predecessors


class Supervisor:
    def __init__(self, settings: Settings, mode: str, count: int, sockets: dict[int, socket.socket]):
        self.settings = settings
        self.mode = mode
        self.count = count
        self.sockets = sockets
        self.limits = SharedLimits.create(count)
        self.children = [_Child(i) for i in range(count)]
        self.stop_event = threading.Event()
        self.dispatcher = Dispatcher(sockets, self.limits, count)

    def child_args(self, child: _Child, ready_w: int, restarted: bool, channels: dict[int, socket.socket]) -> list[str]:
        fds = ",".join(f"{port}:{sock.fileno()}" for port, sock in channels.items())
        mode = self.mode if child.index == 0 else "node"
        args = [sys.executable, "-m", "ct_triage_app.cli", mode, "--process-index", str(child.index),
                "--process-count", str(self.count), "--listen-fds", fds, "--limits-fd", str(self.limits.fd),
                "--ready-fd", str(ready_w)]
        return args + (["--restarted"] if restarted else [])

    def spawn(self, child: _Child, restarted: bool = False) -> None:
        ready_r, ready_w = os.pipe()
        channels = self.dispatcher.open_channels(child.index)
        fds = [c.fileno() for c in channels.values()] + [self.limits.fd, ready_w]
        try:
            child.proc = subprocess.Popen(self.child_args(child, ready_w, restarted, channels), pass_fds=fds)
        finally:
            os.close(ready_w)
            for end in channels.values():
                end.close()
        child.ready_r = ready_r
        child.started = time.monotonic()
        child.restart_at = None
        log.info("node process %d started (pid %d)%s", child.index, child.proc.pid, " (restart)" if restarted else "")

    def wait_ready(self, children: list[_Child], timeout: float) -> str | None:
        """None when every child said ready; else why not."""
        waiting = {c.ready_r: c for c in children if c.ready_r is not None}
        deadline = time.monotonic() + timeout
        while waiting:
            if self.stop_event.is_set():
                return "stopped while starting"
            ready, _, _ = select.select(list(waiting), [], [], min(1.0, max(0.0, deadline - time.monotonic())))
            for fd in ready:
                child = waiting.pop(fd)
                got = os.read(fd, 1)
                os.close(fd)
                child.ready_r = None
                self.dispatcher.set_ready(child.index, bool(got))
                if not got:
                    assert child.proc is not None
                    code = child.proc.wait()
                    return f"node process {child.index} exited with code {code} before it was ready (its log above)"
            if waiting and time.monotonic() > deadline:
                return f"node process(es) {sorted(c.index for c in waiting.values())} not ready after {timeout:.0f} s"
        return None

    def _poll_ready(self, child: _Child) -> None:
        if child.ready_r is None:
            return
        ready, _, _ = select.select([child.ready_r], [], [], 0)
        if ready:
            got = os.read(child.ready_r, 1)
            os.close(child.ready_r)
            child.ready_r = None
            self.dispatcher.set_ready(child.index, bool(got))

    def run(self) -> int:
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, lambda signum, _frame: self._on_signal(signum))
        ports = ", ".join(str(p) for p in self.sockets)
        log.info("supervisor (pid %d): %d node processes on port(s) %s", os.getpid(), self.count, ports)
        # Child 0 first: it indexes what the last run left without a row before anyone accepts.
        self.spawn(self.children[0])
        why = self.wait_ready(self.children[:1], READY_TIMEOUT_S)
        if why is None:
            self.dispatcher.start()
            for child in self.children[1:]:
                self.spawn(child)
            why = self.wait_ready(self.children[1:], READY_TIMEOUT_S)
        if why is not None:
            if not self.stop_event.is_set():
                log.error("the node cannot start: %s", why)
            self.stop_children()
            return 1 if not self.stop_event.is_set() else 0
        log.info("ct-triage %s ready: %d node processes accepting on port(s) %s", self.mode, self.count, ports)
        while not self.stop_event.wait(0.2):
            self.watch()
        return self.stop_children()

    def _on_signal(self, signum: int) -> None:
        if not self.stop_event.is_set():
            log.info("%s received: stopping the %d node processes gracefully", signal.Signals(signum).name,
                     self.count)
        self.stop_event.set()

    def watch(self) -> None:
        now = time.monotonic()
        for child in self.children:
            if child.proc is None:
                if child.restart_at is not None and now >= child.restart_at:
                    self.spawn(child, restarted=True)
                continue
            self._poll_ready(child)
            code = child.proc.poll()
            if code is None:
                continue
            self.dispatcher.set_ready(child.index, False)
            if child.ready_r is not None:
                os.close(child.ready_r)
                child.ready_r = None
            child.taken += self.limits.clear_row(child.index)
            if now - child.started > STABLE_AFTER_S:
                child.backoff = RESTART_FIRST_S
            log.error("node process %d (pid %d) exited with code %s: restarting it in %.0f s", child.index,
                      child.proc.pid, code, child.backoff)
            child.proc = None
            child.restart_at = now + child.backoff
            child.backoff = min(RESTART_MAX_S, child.backoff * 2)

    def stop_children(self) -> int:
        """SIGTERM to every child; SIGKILL to one still running after the grace."""
        started = time.monotonic()
        self.dispatcher.stop()  # no new connection from here on; the children drain theirs
        for sock in self.sockets.values():
            sock.close()
        running = [c for c in self.children if c.proc is not None and c.proc.poll() is None]
        for child in running:
            assert child.proc is not None
            with contextlib.suppress(ProcessLookupError):
                child.proc.send_signal(signal.SIGTERM)
        deadline = started + self.settings.shutdown_grace_s + 15
        codes = []
        taken = [c.taken + t for c, t in zip(self.children, self.limits.taken())]
        for child in self.children:
            if child.proc is None:
                continue
            try:
                codes.append(child.proc.wait(timeout=max(0.1, deadline - time.monotonic())))
            except subprocess.TimeoutExpired:
                log.error("node process %d did not stop in time: killed", child.index)
                child.proc.kill()
                codes.append(child.proc.wait())
        log.info("node processes stopped in %.1f s; associations taken per process: %s", time.monotonic() - started,
                 ", ".join(f"p{i}={n}" for i, n in enumerate(taken)))
        return 0 if all(code == 0 for code in codes) else 1


def supervise(settings: Settings, mode: str, count: int, prepare_database) -> int:
    """``ct-triage node|serve --processes N`` (N > 1): bind, start the children, watch them.
    ``prepare_database()`` applies the migrations once, before any child opens the database."""
    check_database(settings, count)
    prepare_database()
    sockets: dict[int, socket.socket] = {}
    try:
        for port in listening_ports(settings):
            sockets[port] = bind_listener(settings.bind_address, port)
    except ConfigError:
        for sock in sockets.values():
            sock.close()
        raise
    return Supervisor(settings, mode, count, sockets).run()
