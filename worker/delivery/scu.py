"""C-STORE our outputs to a PACS and classify what happened.

:func:`send_instances` opens one association (pynetdicom as SCU), proposes one
presentation context per SOP class present (Explicit VR Little Endian first, then
Implicit VR Little Endian, plus the instance's own transfer syntax when compressed),
sends every instance with C-STORE and returns a :class:`DeliveryReport`. It never
raises for peer problems; it raises TypeError/ValueError only for bad arguments.

Classification (``delivered`` / ``transient`` / ``permanent``):

======================================================  ==========
What happened                                           Outcome
======================================================  ==========
C-STORE 0x0000; warnings 0x0001, 0xB000, 0xB006,        delivered
0xB007 (and any other 0xBxxx warning)
connection refused / unreachable / connect timeout      transient
no A-ASSOCIATE response (ACSE timeout), A-ABORT,        transient
A-P-ABORT, association dropped mid-transfer, no
C-STORE response (DIMSE timeout)
A-ASSOCIATE-RJ rejected-transient                       transient
A-ASSOCIATE-RJ with source "service-provider            transient
(presentation)": temporary congestion / local limit
A-ASSOCIATE-RJ rejected-permanent (other reasons)       permanent
A-ASSOCIATE-RJ calling/called AE title not recognized   permanent
(even if flagged transient: retrying cannot fix it)
association accepted but no presentation context        permanent
accepted, or none for an instance's SOP class
TLS certificate verification failure                    permanent
C-STORE 0xA7xx (out of resources), 0x0213 (resource     transient
limitation), 0x0210 (duplicate invocation), 0xFE00
(cancel)
C-STORE 0xA9xx, 0xCxxx, 0x0117, 0x0122, 0x0124,         permanent
0x0211, 0x0212 and any other failure status
======================================================  ==========

Files are sent as stored (pynetdicom's chunked send: only the file meta is read, the
data set goes from disk to the socket undecoded), so the objects built once per result
version reach every destination byte for byte. Each encoded transfer syntax (JPEG,
RLE, deflate) gets a presentation context of its own next to the uncompressed one;
when the peer accepts only the uncompressed one, the file is decoded and sent as
Explicit VR Little Endian (deflate; pynetdicom cannot convert pixel encodings, so a
compressed image then fails as a permanent "no presentation context").

Overall outcome: ``permanent`` if any instance is permanent, else ``transient`` if any
is transient, else ``delivered``. Nothing is ``delivered`` without a success (or
warning) status from the peer.
"""

from __future__ import annotations

import os
import ssl
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_file_meta_info
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, _config, evt
from pynetdicom.association import Association

from ct_triage.association import Outcome, check_ae_title, classify_rejection, connect_failure, reactor_paused
from ct_triage.settings import Destination

WARNING_STATUSES = {0x0001, 0xB000, 0xB006, 0xB007}
TRANSIENT_FAILURES = {0x0210, 0x0213, 0xFE00}
_STATUS_NAMES = {
    0x0000: "Success",
    0x0001: "Warning",
    0x0117: "Invalid SOP instance",
    0x0122: "SOP class not supported",
    0x0124: "Not authorised",
    0x0210: "Duplicate invocation",
    0x0211: "Unrecognised operation",
    0x0212: "Mistyped argument",
    0x0213: "Resource limitation",
    0xB000: "Coercion of data elements",
    0xB006: "Elements discarded",
    0xB007: "Data set does not match SOP class",
    0xFE00: "Cancel",
}
_MAX_CONTEXTS = 128
# Send files as stored: pynetdicom streams the data set from disk without decoding it.
_config.STORE_SEND_CHUNKED_DATASET = True


@dataclass(frozen=True)
class _StoredFile:
    """A DICOM file to send as it is; what the sender needs from its file meta."""

    path: Path
    SOPClassUID: str
    SOPInstanceUID: str
    transfer_syntax: UID


@dataclass(frozen=True)
class InstanceStatus:
    """What happened to one instance."""

    sop_class_uid: str
    sop_instance_uid: str
    outcome: Outcome
    status: int | None  # DIMSE status; None when not sent or no response
    reason: str

    @property
    def delivered(self) -> bool:
        return self.outcome == "delivered"


@dataclass
class DeliveryReport:
    """The result of one :func:`send_instances` call."""

    destination: str
    calling_ae_title: str
    outcome: Outcome
    reason: str
    association: str  # established | rejected | aborted | refused | not-attempted
    instances: list[InstanceStatus] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def delivered(self) -> bool:
        return self.outcome == "delivered"

    @property
    def delivered_sop_instance_uids(self) -> list[str]:
        return [i.sop_instance_uid for i in self.instances if i.delivered]

    def to_json(self) -> dict:
        data = asdict(self)
        data["delivered_count"] = len(self.delivered_sop_instance_uids)
        return data


def classify_status(status: int) -> tuple[Outcome, str]:
    """Outcome and a readable text for a C-STORE response status."""
    if not isinstance(status, int) or isinstance(status, bool):
        raise TypeError(f"argument 'status' must be an int, got {type(status).__name__}")
    name = _STATUS_NAMES.get(status)
    label = f"0x{status:04X}" + (f" ({name})" if name else "")
    if status == 0x0000:
        return "delivered", label
    if status in WARNING_STATUSES or 0xB000 <= status <= 0xBFFF:
        return "delivered", f"warning {label}"
    if 0xA700 <= status <= 0xA7FF:
        return "transient", f"failure {label if name else f'0x{status:04X} (Out of resources)'}"
    if status in TRANSIENT_FAILURES:
        return "transient", f"failure {label}"
    if 0xA900 <= status <= 0xA9FF:
        return "permanent", f"failure 0x{status:04X} (Data set does not match SOP class)"
    if 0xC000 <= status <= 0xCFFF:
        return "permanent", f"failure 0x{status:04X} (Cannot understand)"
    return "permanent", f"failure {label}"




# -- argument checks --------------------------------------------------------------------
def _check_optional_timeout(value, name: str) -> float | None:
    return None if value is None else _check_timeout(value, name)


def _check_timeout(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"argument '{name}' must be a number of seconds, got {type(value).__name__}")
    if not value > 0:
        raise ValueError(f"argument '{name}' must be > 0, got {value!r}")
    return float(value)


def _load(items) -> list:
    if isinstance(items, (str, bytes, os.PathLike, Dataset)) or not isinstance(items, Sequence):
        raise TypeError("argument 'datasets_or_paths' must be a sequence of pydicom Datasets or file paths")
    if not items:
        raise ValueError("argument 'datasets_or_paths' must not be empty")
    loaded: list = []
    for i, item in enumerate(items):
        if isinstance(item, Dataset):
            for keyword in ("SOPClassUID", "SOPInstanceUID"):
                if not item.get(keyword):
                    raise ValueError(f"argument 'datasets_or_paths'[{i}] lacks {keyword}")
            meta = getattr(item, "file_meta", None)
            if meta is None or not meta.get("TransferSyntaxUID"):
                raise ValueError(f"argument 'datasets_or_paths'[{i}] has no file meta Transfer Syntax UID")
            loaded.append(item)
        elif isinstance(item, (str, os.PathLike)):
            path = Path(item)
            try:
                meta = read_file_meta_info(path)
            except (OSError, InvalidDicomError) as exc:
                raise ValueError(f"argument 'datasets_or_paths'[{i}]: cannot read {path}: {exc}") from exc
            values = {k: str(meta.get(k, "") or "") for k in
                      ("MediaStorageSOPClassUID", "MediaStorageSOPInstanceUID", "TransferSyntaxUID")}
            missing = [k for k, v in values.items() if not v]
            if missing:
                raise ValueError(
                    f"argument 'datasets_or_paths'[{i}]: {path} has no {', '.join(missing)} in its file meta")
            loaded.append(_StoredFile(path, values["MediaStorageSOPClassUID"], values["MediaStorageSOPInstanceUID"],
                                      UID(values["TransferSyntaxUID"])))
        else:
            raise TypeError(
                f"argument 'datasets_or_paths'[{i}] must be a Dataset or a path, got {type(item).__name__}"
            )
    uids = [str(ds.SOPInstanceUID) for ds in loaded]
    if len(set(uids)) != len(uids):
        raise ValueError("argument 'datasets_or_paths' contains the same SOP Instance UID twice")
    return loaded


def _syntax(item) -> UID:
    return item.transfer_syntax if isinstance(item, _StoredFile) else UID(str(item.file_meta.TransferSyntaxUID))


def _contexts(items: Sequence) -> list[tuple[str, list[str]]]:
    """Per SOP class: one context per transfer syntax its files are stored in (so each file
    can go as stored), then one uncompressed context (Explicit, Implicit VR) to convert into."""
    own: dict[str, list[str]] = {}
    for item in items:
        ts = _syntax(item)
        syntaxes = own.setdefault(str(item.SOPClassUID), [])
        stored = isinstance(item, _StoredFile) or ts.is_compressed or ts.is_deflated
        if stored and ts not in syntaxes:
            syntaxes.append(ts)
    contexts = [(sop, [ts]) for sop, syntaxes in own.items() for ts in syntaxes]
    contexts += [(sop, [ExplicitVRLittleEndian, ImplicitVRLittleEndian]) for sop in own]
    if len(contexts) > _MAX_CONTEXTS:
        raise ValueError(f"argument 'datasets_or_paths' needs {len(contexts)} presentation contexts; "
                         f"at most {_MAX_CONTEXTS}")
    return contexts


def _send(assoc, item):
    """C-STORE one item with the reactor held (ct_triage.association). A stored file goes as
    stored (chunked, undecoded) when the peer accepted its transfer syntax exactly;
    otherwise it is decoded and pynetdicom converts it (uncompressed and deflated files; a
    compressed one then has no context)."""
    with reactor_paused(assoc):
        return _send_item(assoc, item)


def _send_item(assoc, item):
    if not isinstance(item, _StoredFile):
        return assoc.send_c_store(item)
    exact = any(cx.abstract_syntax == item.SOPClassUID and cx.transfer_syntax[0] == item.transfer_syntax
                and cx.as_scu for cx in assoc.accepted_contexts)
    if exact:
        return assoc.send_c_store(item.path)
    ds = dcmread(item.path)
    if item.transfer_syntax.is_deflated:
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian  # deflate is only the file's encoding
    return assoc.send_c_store(ds)


def _sop_name(uid: str) -> str:
    name = UID(uid).name
    return name if name and name != uid else uid


# -- connection diagnostics ------------------------------------------------------------
def send_instances(
    destination: Destination,
    datasets_or_paths: Sequence[Dataset | str | os.PathLike],
    *,
    calling_ae_title: str,
    acse_timeout: float = 30,
    dimse_timeout: float = 60,
    network_timeout: float = 60,
    connection_timeout: float | None = None,
    tls_context: ssl.SSLContext | None = None,
) -> DeliveryReport:
    """C-STORE every instance to ``destination`` over one association.

    Args:
        destination: the PACS (``AET@host:port[+tls]``, see ``parse_destination``).
        datasets_or_paths: Datasets (with ``file_meta``) or DICOM file paths.
        calling_ae_title: our AE title.
        acse_timeout / dimse_timeout / network_timeout: pynetdicom timeouts, seconds.
        connection_timeout: TCP connect timeout (default: ``acse_timeout``).
        tls_context: client SSLContext; when None and ``destination.tls``, a default
            context verifying the peer against the system CAs is used.

    Returns:
        A :class:`DeliveryReport`; peer problems never raise.

    Raises:
        TypeError/ValueError naming a bad argument.
    """
    _check_destination(destination)
    calling = check_ae_title(calling_ae_title, "calling_ae_title")
    timeouts = _Timeouts(
        acse=_check_timeout(acse_timeout, "acse_timeout"),
        dimse=_check_timeout(dimse_timeout, "dimse_timeout"),
        network=_check_timeout(network_timeout, "network_timeout"),
        connect=_check_optional_timeout(connection_timeout, "connection_timeout"),
    )
    if tls_context is not None and not isinstance(tls_context, ssl.SSLContext):
        raise TypeError(f"argument 'tls_context' must be an ssl.SSLContext, got {type(tls_context).__name__}")
    datasets = _load(datasets_or_paths)
    contexts = _contexts(datasets)
    if tls_context is None and destination.tls:
        tls_context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)

    started = time.monotonic()
    where = str(destination)

    def report(outcome: Outcome, reason: str, association: str, statuses: list[InstanceStatus]) -> DeliveryReport:
        seconds = round(time.monotonic() - started, 3)
        return DeliveryReport(where, calling, outcome, reason, association, statuses, seconds)

    def all_unsent(outcome: Outcome, reason: str) -> list[InstanceStatus]:
        return [InstanceStatus(str(ds.SOPClassUID), str(ds.SOPInstanceUID), outcome, None, reason) for ds in datasets]

    ae = _application_entity(calling, timeouts, contexts)
    opened = threading.Event()
    tls_args = (tls_context, destination.host) if tls_context is not None else None
    try:
        assoc = ae.associate(
            destination.host, destination.port, ae_title=destination.ae_title, tls_args=tls_args,
            evt_handlers=[(evt.EVT_CONN_OPEN, lambda event: opened.set())],
        )
    except (OSError, ValueError) as exc:  # e.g. unresolvable host name
        reason = f"cannot open an association to {where}: {exc}"
        return report("transient", reason, "refused", all_unsent("transient", reason))

    if not assoc.is_established:
        outcome, reason, state = _not_established(assoc, destination, where, opened.is_set(), tls_context, timeouts,
                                                  contexts, started)
        return report(outcome, reason, state, all_unsent(outcome, reason))

    statuses, association_state = _store_all(assoc, datasets, where, timeouts.dimse)
    outcome, summary = _summary(statuses, where)
    return report(outcome, summary, association_state, statuses)


def _check_destination(destination: Destination) -> None:
    if not isinstance(destination, Destination):
        raise TypeError(f"argument 'destination' must be a Destination, got {type(destination).__name__}")
    check_ae_title(destination.ae_title, "destination")
    if not destination.host or not isinstance(destination.port, int) or not 0 < destination.port < 65536:
        raise ValueError(f"argument 'destination' has an invalid host/port: {destination}")


@dataclass(frozen=True)
class _Timeouts:
    """The checked timeouts of one send, seconds; ``connect`` None: the ACSE timeout."""

    acse: float
    dimse: float
    network: float
    connect: float | None

    @property
    def tcp_connect(self) -> float:
        return self.connect or self.acse


def _application_entity(calling: str, timeouts: _Timeouts, contexts: list[tuple[str, list[str]]]) -> AE:
    ae = AE(ae_title=calling)
    ae.acse_timeout = timeouts.acse
    ae.dimse_timeout = timeouts.dimse
    ae.network_timeout = timeouts.network
    ae.connection_timeout = timeouts.tcp_connect
    for sop_class, syntaxes in contexts:
        ae.add_requested_context(sop_class, syntaxes)
    return ae


def _not_established(assoc: Association, destination: Destination, where: str, opened: bool,
                     tls_context: ssl.SSLContext | None, timeouts: _Timeouts,
                     contexts: list[tuple[str, list[str]]], started: float) -> tuple[Outcome, str, str]:
    """Why an association was not established: outcome, reason, association state."""
    primitive = getattr(assoc.acceptor, "primitive", None)
    if assoc.is_rejected and primitive is not None:
        outcome = classify_rejection(int(primitive.result), int(primitive.result_source), int(primitive.diagnostic))
        reason = (
            f"association rejected by {where}: {primitive.result_str}, source {primitive.source_str}, "
            f"reason {primitive.reason_str}"
        )
        return outcome, reason, "rejected"
    if not opened:
        outcome, reason = connect_failure(destination.host, destination.port, tls_context,
                                          min(timeouts.tcp_connect, 5.0))
        return outcome, reason, "refused"
    if primitive is not None and getattr(primitive, "result", None) == 0x00:
        offered = ", ".join(dict.fromkeys(_sop_name(uid) for uid, _ in contexts))
        reason = f"{where} accepted the association but none of the presentation contexts ({offered})"
        return "permanent", reason, "aborted"
    if time.monotonic() - started >= timeouts.acse * 0.95:
        reason = f"no association response from {where} within {timeouts.acse:g} s (ACSE timeout)"
    else:
        reason = f"association with {where} aborted during negotiation"
    return "transient", reason, "aborted"


def _store_all(assoc: Association, datasets: list, where: str, dimse: float) -> tuple[list[InstanceStatus], str]:
    """C-STORE each instance in turn, then release; the statuses and the association's state."""
    statuses: list[InstanceStatus] = []
    association_state = "established"
    try:
        for ds in datasets:
            sop_class, sop_instance = str(ds.SOPClassUID), str(ds.SOPInstanceUID)
            if not assoc.is_established:
                association_state = "aborted"
                statuses.append(
                    InstanceStatus(sop_class, sop_instance, "transient", None,
                                   f"not sent: association with {where} lost")
                )
                continue
            statuses.append(_store_one(assoc, ds, sop_class, sop_instance, where, dimse))
    finally:
        if assoc.is_established:
            assoc.release()
        elif not assoc.is_released:
            association_state = "aborted"
        if assoc.is_aborted:
            association_state = "aborted"
    return statuses, association_state


def _store_one(assoc: Association, ds, sop_class: str, sop_instance: str, where: str,
               dimse: float) -> InstanceStatus:
    try:
        rsp = _send(assoc, ds)
    except ValueError as exc:  # no accepted presentation context for this SOP class/syntax
        return InstanceStatus(
            sop_class, sop_instance, "permanent", None,
            f"{where} accepted no presentation context for {_sop_name(sop_class)}: {exc}",
        )
    except RuntimeError as exc:  # association gone between the check and the send
        return InstanceStatus(sop_class, sop_instance, "transient", None, f"not sent: {exc}")
    status = rsp.get("Status") if rsp is not None else None
    if status is None:
        return InstanceStatus(
            sop_class, sop_instance, "transient", None,
            f"no C-STORE response from {where} (DIMSE timeout {dimse:g} s or association aborted)",
        )
    outcome, text = classify_status(int(status))
    comment = rsp.get("ErrorComment")
    if comment:
        text += f": {comment}"
    return InstanceStatus(sop_class, sop_instance, outcome, int(status), text)


def _summary(statuses: list[InstanceStatus], where: str) -> tuple[Outcome, str]:
    """The outcome of the whole send and its one-line reason."""
    outcomes = {s.outcome for s in statuses}
    counts = {o: sum(1 for s in statuses if s.outcome == o) for o in ("delivered", "transient", "permanent")}
    summary = f"{counts['delivered']}/{len(statuses)} delivered to {where}"
    if "permanent" in outcomes:
        first = next(s for s in statuses if s.outcome == "permanent")
        return "permanent", f"{summary}; {counts['permanent']} permanent failure(s), e.g. {first.reason}"
    if "transient" in outcomes:
        first = next(s for s in statuses if s.outcome == "transient")
        return "transient", f"{summary}; {counts['transient']} transient failure(s), e.g. {first.reason}"
    warnings = [s for s in statuses if s.status not in (0x0000, None)]
    if warnings:
        summary += f" ({len(warnings)} with warnings, e.g. {warnings[0].reason})"
    return "delivered", summary
