"""A throw-away local PACS for the demo, the benchmarks and the tests.

:class:`OrthancServer` runs a private Orthanc (``/usr/sbin/Orthanc``, Debian package);
:class:`LocalPacs` is what ``ct-triage demo`` uses: that Orthanc when installed, else a
small pynetdicom storage SCP writing to a folder.

Usage::

    with OrthancServer(tmp_path, aet="ORTHANC", known_aets={"CTTRIAGE": ("127.0.0.1", 104)},
                       accept_unknown=False) as pacs:
        send_instances(pacs.destination, datasets, calling_ae_title="CTTRIAGE")
        pacs.studies()

What the generated configuration does:

- HTTP (REST) and DICOM on free ports picked at start; ``RemoteAccessAllowed`` false and
  no authentication, so only loopback clients may use the REST API. (Orthanc 1.10 has
  no bind-address option: the DICOM port listens on all interfaces; the test machine
  has no inbound access.)
- Storage and SQLite index under ``tmp_path``; no plugins, no WebDAV; Orthanc Explorer
  only with ``explorer=True`` (the demo shows it). ``env``: the process environment (the
  benchmarks pass ``TCP_NODELAY=1``: Orthanc's DICOM server is dcmtk, and Nagle costs it
  ~40 ms per instance).
- ``DicomCheckCalledAet`` true: a wrong called AE title is rejected.
- ``accept_unknown=True`` (default): ``DicomAlwaysAllowStore``/``Echo`` true, any calling
  AE may store. ``accept_unknown=False``: both false, only AE titles in ``known_aets``
  (``DicomModalities``) may associate; Orthanc then answers an unknown calling AE with
  A-ASSOCIATE-RJ (rejected-permanent, service-user, calling-AE-title-not-recognized).
  ``check_host=True`` adds ``DicomCheckModalityHost`` (the caller's IP must match).

:meth:`stop` then :meth:`start` reuses the same ports, for "PACS down, then up again".
Startup takes about 0.05-0.1 s on the 2-core test machine (empty SQLite index); a clean
stop (SIGTERM) takes about 3.3 s because Orthanc's HTTP and DICOM servers poll for the
shutdown flag. Processes still running at interpreter exit are killed (atexit).
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from ct_triage.settings import Destination
from ct_triage_tools.ports import free_port

ORTHANC = os.environ.get("ORTHANC_BINARY", "/usr/sbin/Orthanc")


_LIVE: set[subprocess.Popen] = set()


@atexit.register
def _kill_leftovers() -> None:
    """An interrupted test run must not leave Orthanc processes behind."""
    for proc in list(_LIVE):
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=5)
        _LIVE.discard(proc)


def available() -> bool:
    return Path(ORTHANC).exists() or shutil.which("Orthanc") is not None


class OrthancError(RuntimeError):
    """Orthanc did not start, or a REST call failed."""


class OrthancServer:
    """Start/stop a private Orthanc; REST helpers for the assertions."""

    def __init__(
        self,
        tmp_path: str | os.PathLike,
        *,
        aet: str = "ORTHANC",
        known_aets: Mapping[str, tuple[str, int]] | Iterable[str] | None = None,
        accept_unknown: bool = True,
        check_host: bool = False,
        startup_timeout: float = 30.0,
        verbose: bool = False,
        explorer: bool = False,
        env: Mapping[str, str] | None = None,
    ) -> None:
        if not 1 <= len(aet) <= 16:
            raise ValueError(f"argument 'aet' must be 1..16 characters, got {aet!r}")
        # Absolute: Orthanc runs with this folder as its working directory.
        self.root = Path(tmp_path).resolve() / f"orthanc-{aet.lower()}"
        self.aet = aet
        self.accept_unknown = accept_unknown
        self.check_host = check_host
        self.startup_timeout = startup_timeout
        self.verbose = verbose
        self.explorer = explorer
        self.env = dict(env) if env is not None else None
        if known_aets is None:
            known: dict[str, tuple[str, int]] = {}
        elif isinstance(known_aets, Mapping):
            known = {str(k): (str(v[0]), int(v[1])) for k, v in known_aets.items()}
        else:
            known = {str(k): ("127.0.0.1", 104) for k in known_aets}
        for name in known:
            if not 1 <= len(name) <= 16:
                raise ValueError(f"argument 'known_aets' has an invalid AE title {name!r}")
        self.known_aets = known
        self.http_port = free_port()
        self.dicom_port = free_port()
        while self.dicom_port == self.http_port:
            self.dicom_port = free_port()
        self.process: subprocess.Popen | None = None
        self.startup_seconds: float | None = None
        self.config_path = self.root / "orthanc.json"
        self.log_path = self.root / "orthanc.log"

    # -- configuration / lifecycle --------------------------------------------------------
    def config(self) -> dict:
        modalities = {
            f"m{i}-{name.lower()}": [name, host, port]
            for i, (name, (host, port)) in enumerate(sorted(self.known_aets.items()))
        }
        return {
            "Name": f"ct-triage-test-{self.aet}",
            "StorageDirectory": str(self.root / "storage"),
            "IndexDirectory": str(self.root / "index"),
            "StorageCompression": False,
            "Plugins": [],
            "LuaScripts": [],
            "ConcurrentJobs": 1,
            "SaveJobs": False,
            "HttpServerEnabled": True,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "RegisteredUsers": {},
            "SslEnabled": False,
            "OrthancExplorerEnabled": self.explorer,
            "WebDavEnabled": False,
            "HttpDescribeErrors": True,
            "DicomServerEnabled": True,
            "DicomAet": self.aet,
            "DicomPort": self.dicom_port,
            "DicomCheckCalledAet": True,
            "DicomAlwaysAllowEcho": self.accept_unknown,
            "DicomAlwaysAllowStore": self.accept_unknown,
            "DicomAlwaysAllowFind": False,
            "DicomAlwaysAllowFindWorklist": False,
            "DicomAlwaysAllowGet": False,
            "DicomAlwaysAllowMove": False,
            "DicomCheckModalityHost": self.check_host,
            "DicomModalities": modalities,
            "DicomModalitiesInDatabase": False,
            "DicomScpTimeout": 30,
            "UnknownSopClassAccepted": False,
            "DefaultEncoding": "Latin1",
            "StableAge": 60,
        }

    @property
    def destination(self) -> Destination:
        return Destination(self.aet, "127.0.0.1", self.dicom_port)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self) -> OrthancServer:
        if self.running:
            return self
        if not available():
            raise OrthancError(f"Orthanc is not installed ({ORTHANC})")
        self.root.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(json.dumps(self.config(), indent=2))
        binary = ORTHANC if Path(ORTHANC).exists() else (shutil.which("Orthanc") or ORTHANC)
        args = [binary, str(self.config_path)]
        if self.verbose:
            args.append("--verbose")
        started = time.monotonic()
        with open(self.log_path, "ab") as log:  # the child keeps its own descriptor
            self.process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, cwd=self.root,
                                            start_new_session=True, env=self.env)
        _LIVE.add(self.process)
        deadline = started + self.startup_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise OrthancError(f"Orthanc exited with {self.process.returncode} at start:\n{self.log_tail()}")
            if self._http_ready() and self._dicom_ready():
                self.startup_seconds = time.monotonic() - started
                return self
            time.sleep(0.05)
        self.stop()
        raise OrthancError(f"Orthanc did not come up within {self.startup_timeout:g} s:\n{self.log_tail()}")

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM (Orthanc shuts down cleanly), SIGKILL after ``timeout``; ports are kept."""
        proc, self.process = self.process, None
        if proc is None:
            return
        _LIVE.discard(proc)
        if proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
        # wait until the DICOM port no longer accepts connections
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and self._dicom_ready():
            time.sleep(0.05)

    def restart(self) -> OrthancServer:
        self.stop()
        return self.start()

    def __enter__(self) -> OrthancServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def _http_ready(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/system", timeout=1.0) as rsp:
                return rsp.status == 200
        except (urllib.error.URLError, OSError, ValueError):
            return False

    def _dicom_ready(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.dicom_port), timeout=0.5):
                return True
        except OSError:
            return False

    # -- REST -----------------------------------------------------------------------------
    def request(self, method: str, path: str, body: object | None = None, *, raw: bool = False):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=30) as rsp:
                payload = rsp.read()
        except urllib.error.HTTPError as exc:
            raise OrthancError(f"{method} {path}: HTTP {exc.code}: {exc.read()[:500]!r}") from exc
        except (urllib.error.URLError, OSError) as exc:
            raise OrthancError(f"{method} {path}: {exc}") from exc
        return payload if raw else json.loads(payload or b"null")

    def get(self, path: str):
        return self.request("GET", path)

    def post(self, path: str, body: object):
        return self.request("POST", path, body)

    def system(self) -> dict:
        return self.get("/system")

    def statistics(self) -> dict:
        return self.get("/statistics")

    def studies(self) -> list[dict]:
        """Every study, expanded (MainDicomTags, PatientMainDicomTags, Series ids)."""
        return self.get("/studies?expand")

    def series_of_study(self, study_instance_uid: str) -> list[dict]:
        """Expanded series of a study, found by StudyInstanceUID via /tools/find."""
        return self.post(
            "/tools/find",
            {"Level": "Series", "Query": {"StudyInstanceUID": study_instance_uid}, "Expand": True},
        )

    def instances(self) -> list[str]:
        """Orthanc ids of every stored instance."""
        return self.get("/instances")

    def instance_tags(self, instance_id: str) -> dict:
        """``simplified-tags`` of an instance (keyword -> value; sequences as lists)."""
        return self.get(f"/instances/{urllib.parse.quote(instance_id)}/simplified-tags")

    def instance_id(self, sop_instance_uid: str) -> str | None:
        found = self.post("/tools/find", {"Level": "Instance", "Query": {"SOPInstanceUID": sop_instance_uid}})
        return found[0] if found else None

    def instance_file(self, instance_id: str) -> bytes:
        return self.request("GET", f"/instances/{urllib.parse.quote(instance_id)}/file", raw=True)


class LocalPacs:
    """Orthanc on loopback ports, or a pynetdicom storage SCP when Orthanc is absent
    (``ct-triage demo``). ``destination`` is ``DEMOPACS@127.0.0.1:PORT``."""

    AET = "DEMOPACS"

    def __init__(self, folder: Path):
        self.folder = Path(folder).resolve()
        self.kind = "Orthanc" if available() else "pynetdicom store SCP"
        self.orthanc = OrthancServer(self.folder, aet=self.AET, explorer=True) if self.kind == "Orthanc" else None
        self.port = self.orthanc.dicom_port if self.orthanc else free_port()
        self.server: Any = None  # a pynetdicom ThreadedAssociationServer without Orthanc

    @property
    def destination(self) -> str:
        return f"{self.AET}@127.0.0.1:{self.port}"

    def start(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        if self.orthanc is not None:
            self.orthanc.start()
            return
        from pynetdicom import AE, AllStoragePresentationContexts, evt  # only without Orthanc

        received = self.folder / "received"
        received.mkdir(exist_ok=True)

        def on_store(event):
            ds = event.dataset
            ds.file_meta = event.file_meta
            ds.save_as(received / f"{len(list(received.iterdir())):05d}.dcm", enforce_file_format=True)
            return 0x0000

        ae = AE(ae_title=self.AET)
        ae.supported_contexts = AllStoragePresentationContexts
        self.server = ae.start_server(("127.0.0.1", self.port), block=False,
                                      evt_handlers=[(evt.EVT_C_STORE, on_store)])

    def where(self) -> str:
        if self.orthanc is not None:
            return f"Orthanc explorer/REST at {self.orthanc.url}/ (while the demo runs)"
        return f"files under {self.folder / 'received'}"

    def stop(self) -> None:
        if self.orthanc is not None:
            self.orthanc.stop()
        if self.server:
            self.server.shutdown()
