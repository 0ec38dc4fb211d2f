"""C-STORE without pynetdicom's per-message machinery, in the connection's own thread.

Why: with several senders the node is CPU-bound, and a received instance cost about
3.3 ms of CPU, half of it in pynetdicom (issue 18). For each P-DATA-TF PDU pynetdicom
builds PDU and primitive objects, runs the DUL state machine, copies every fragment twice,
and for each C-STORE decodes the command set with pydicom, validates every attribute of a
``C_STORE`` primitive, builds the file meta with pydicom, hands the message to the
association's reactor thread and the response back to the DUL thread (two thread switches
under the GIL, each up to the interpreter's switch interval when the process is busy),
then encodes the response with pydicom.

What: :func:`take_p_data` is offered each whole P-DATA-TF PDU of an established
association (by ``dicom_node.transport``) before pynetdicom sees it. It takes a PDU only
when it starts a C-STORE request it can serve exactly as pynetdicom would, and then the rest
of that message:

- **Taken** on associations we accepted, when pynetdicom holds no message of this
  association (none in assembly, none queued for its reactor), the PDU's first fragment
  is a whole command set (one fragment, as every sender we know sends it), the command
  is a C-STORE-RQ with a data set, its presentation context is accepted with us as SCP
  and names the same SOP class as the command, no SOP Class Common Extended Negotiation
  applies, and a handler is bound to ``EVT_C_STORE``. Anything else (C-ECHO, N-ACTION,
  C-FIND, a command split over fragments, a mismatched class) goes to pynetdicom unchanged.
- **Written** like pynetdicom's ``STORE_RECV_CHUNKED_DATASET``: a file in the process's
  temporary folder (``tempfile.gettempdir()``, the spool's), with the same preamble and
  file meta information (pynetdicom's implementation UID and version name), then each
  data set fragment as it arrives, written from the PDU buffer without a copy.
- **Answered** by calling the handler bound to ``EVT_C_STORE`` (``dicom_node.server.
  handle_store``, the same thin handler) with an event that has what it reads
  (``assoc``, ``request``, ``context``, ``dataset_path``), and sending the C-STORE-RSP
  command set (implicit VR little endian, as pynetdicom encodes it) on the socket from
  this thread, which is the thread pynetdicom sends from. The temporary file is removed
  afterwards, as pynetdicom does. The association's idle timer stands still while the
  handler runs: the time we take is not the peer's silence (with pynetdicom the reactor
  thread that checks the timer was the one serving the store).
- **Broken messages**: a command fragment or another presentation context inside the
  data set aborts the association (A-ABORT, one log line), as would a data set over the
  size limit (``dicom_node.transport``). An association that ends mid-message leaves no
  temporary file (:func:`discard`).
- **A temporary file that cannot be created or written** (disk full, I/O error): the rest of
  the data set is read and dropped, and the request is answered 0xA701 ("could not write to
  storage") with one log line; the association goes on, so the scanner can retry.

``CT_TRIAGE_FAST_STORE=false`` turns it off: every PDU goes to pynetdicom. Measured
(``bench/scale_bench.py``, docs/production.md): one sender 2.28 s off, 1.85 s on; four
senders to two processes 5.04 s off, 3.77 s on (Orthanc 1.89 and 3.13 s in the same run).
"""

from __future__ import annotations

import contextlib
import logging
import os
import struct
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION, evt
from pynetdicom.service_class import StorageServiceClass
from pynetdicom.sop_class import uid_to_service_class

from ct_triage.text import clean, clean_exception
from dicom_node import status as statuses

log = logging.getLogger("ct_triage.node.fast_store")

C_STORE_RQ = 0x0001
C_STORE_RSP = 0x8001
NO_DATA_SET = 0x0101

_US_TAGS = {0x0100: "command_field", 0x0110: "message_id", 0x0700: "priority", 0x0800: "data_set_type",
            0x1031: "move_originator_message_id"}
_UI_TAGS = {0x0002: "sop_class_uid", 0x1000: "sop_instance_uid"}


@dataclass
class StoreCommand:
    """The fields of a C-STORE-RQ command set that the handler and the response need."""

    command_field: int = -1
    message_id: int = 0
    priority: int = 0
    data_set_type: int = NO_DATA_SET
    sop_class_uid: str = ""
    sop_instance_uid: str = ""
    move_originator_message_id: int | None = None
    move_originator_aet: str | None = None


class Request:
    """What ``event.request`` offers the C-STORE handler, named as on pynetdicom's ``C_STORE``."""

    def __init__(self, command: StoreCommand, dataset_path: Path):
        self.MessageID = command.message_id
        self.Priority = command.priority
        self.AffectedSOPClassUID = command.sop_class_uid
        self.AffectedSOPInstanceUID = command.sop_instance_uid
        self.MoveOriginatorApplicationEntityTitle = command.move_originator_aet
        self.MoveOriginatorMessageID = command.move_originator_message_id
        self._dataset_path = dataset_path


class StoreEvent:
    """The ``EVT_C_STORE`` event handed to the bound handler (the attributes it reads)."""

    event = evt.EVT_C_STORE

    def __init__(self, assoc, request: Request, context):
        self.assoc = assoc
        self.request = request
        self.context = context
        self.timestamp = time.time()

    @property
    def dataset_path(self) -> Path:
        return self.request._dataset_path


@dataclass
class _Incoming:
    """A C-STORE being received through this module. ``failed``: why its temporary file
    could not be written; the rest of the data set is then read and dropped, and the
    request answered with 0xA701."""

    command: StoreCommand
    context_id: int
    fd: int = -1
    path: Path | None = None
    failed: str | None = None

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def discard(self) -> None:
        self.close()
        if self.path is not None:
            with contextlib.suppress(OSError):
                self.path.unlink()
            self.path = None

    def write(self, data: memoryview) -> None:
        if self.failed is not None:
            return
        try:
            while data:
                data = data[os.write(self.fd, data):]
        except OSError as exc:
            self.failed = clean_exception(exc)
            self.discard()


def _element(tag: int, value: bytes) -> bytes:
    return struct.pack("<HHL", 0x0000, tag, len(value)) + value


def _ui(uid: str) -> bytes:
    raw = uid.encode("ascii")
    return raw + b"\0" if len(raw) % 2 else raw


def parse_command(data: memoryview) -> StoreCommand | None:
    """The C-STORE fields of an implicit VR little endian command set; None when it is not
    well formed (pynetdicom then decodes it, and says what is wrong)."""
    command = StoreCommand()
    offset, end = 0, len(data)
    try:
        while offset + 8 <= end:
            group, element, length = struct.unpack_from("<HHL", data, offset)
            offset += 8
            if group != 0 or offset + length > end:
                return None
            value = data[offset:offset + length]
            offset += length
            if element in _US_TAGS and length == 2:
                setattr(command, _US_TAGS[element], struct.unpack("<H", value)[0])
            elif element in _UI_TAGS:
                setattr(command, _UI_TAGS[element], bytes(value).rstrip(b"\0 ").decode("ascii"))
            elif element == 0x1030:
                command.move_originator_aet = bytes(value).decode("ascii", "replace").strip(" \0") or None
    except (struct.error, UnicodeDecodeError):
        return None
    return command if offset == end else None


def encode_response(command: StoreCommand, status: int) -> bytes:
    """The C-STORE-RSP command set (implicit VR little endian, with its group length)."""
    body = (_element(0x0002, _ui(command.sop_class_uid))
            + _element(0x0100, struct.pack("<H", C_STORE_RSP))
            + _element(0x0120, struct.pack("<H", command.message_id))
            + _element(0x0800, struct.pack("<H", NO_DATA_SET))
            + _element(0x0900, struct.pack("<H", status))
            + _element(0x1000, _ui(command.sop_instance_uid)))
    return _element(0x0000, struct.pack("<L", len(body))) + body


def p_data_tf(context_id: int, control: int, data: bytes) -> bytes:
    """One P-DATA-TF PDU carrying one fragment."""
    item = struct.pack(">LBB", len(data) + 2, context_id, control) + data
    return struct.pack(">BBL", 0x04, 0, len(item)) + item


def file_meta(command: StoreCommand, transfer_syntax: str) -> bytes:
    """Preamble, ``DICM`` and the file meta group as pynetdicom writes them for a received data set."""

    def element(tag: int, vr: bytes, value: bytes) -> bytes:
        if vr == b"OB":
            return struct.pack("<HH2sHL", 0x0002, tag, vr, 0, len(value)) + value
        return struct.pack("<HH2sH", 0x0002, tag, vr, len(value)) + value

    version_name = PYNETDICOM_IMPLEMENTATION_VERSION.encode("ascii")
    if len(version_name) % 2:
        version_name += b" "
    body = (element(0x0001, b"OB", b"\x00\x01")
            + element(0x0002, b"UI", _ui(command.sop_class_uid))
            + element(0x0003, b"UI", _ui(command.sop_instance_uid))
            + element(0x0010, b"UI", _ui(transfer_syntax))
            + element(0x0012, b"UI", _ui(str(PYNETDICOM_IMPLEMENTATION_UID)))
            + element(0x0013, b"SH", version_name))
    return b"\0" * 128 + b"DICM" + element(0x0000, b"UL", struct.pack("<L", len(body))) + body


def _storage_context(assoc, context_id: int, sop_class_uid: str):
    """The accepted context this C-STORE may be served under here, or None."""
    context = assoc._accepted_cx.get(context_id)
    if context is None or not context.as_scp or str(context.abstract_syntax) != sop_class_uid:
        return None
    if assoc.acceptor.accepted_common_extended:
        return None
    try:
        if uid_to_service_class(sop_class_uid) is not StorageServiceClass:
            return None
    except Exception:
        return None
    return context


def _pynetdicom_idle(dul) -> bool:
    """No DIMSE message of this association is in pynetdicom's hands."""
    dimse = dul.assoc.dimse
    return dimse.message is None and dimse.msg_queue.empty() and dul.event_queue.empty() \
        and dul._recv_pdu.empty()


def take_p_data(dul, items: list[tuple[int, memoryview]], abort) -> bool | None:
    """Serve a whole P-DATA-TF of ``dul``'s association here (``items``: its fragments): True
    when it was handled, False when the association was aborted, None when pynetdicom should
    have it. ``abort(dul, reason)`` aborts with one log line."""
    incoming: _Incoming | None = dul.__dict__.get("_ct_store")
    if incoming is None:
        if not items or not dul.assoc.is_acceptor or dul.state_machine.current_state != "Sta6" \
                or not _pynetdicom_idle(dul):
            return None
        context_id, first = items[0]
        if first[0] & 0x03 != 0x03:  # not a whole command set in one fragment
            return None
        command = parse_command(first[1:])
        if command is None or command.command_field != C_STORE_RQ or command.data_set_type == NO_DATA_SET:
            return None
        assoc = dul.assoc
        context = _storage_context(assoc, context_id, command.sop_class_uid)
        handler = assoc.get_handlers(evt.EVT_C_STORE)
        if context is None or not handler or handler[0] is None:
            return None
        incoming = _Incoming(command, context_id)
        dul.__dict__["_ct_store"] = incoming
        try:
            fd, name = tempfile.mkstemp(suffix=".dcm", dir=tempfile.gettempdir())
            incoming.fd, incoming.path = fd, Path(name)
        except OSError as exc:
            incoming.failed = clean_exception(exc)
        incoming.write(memoryview(file_meta(command, str(context.transfer_syntax[0]))))
        items = items[1:]
    return _data(dul, incoming, items, abort)


def _data(dul, incoming: _Incoming, items, abort) -> bool:
    for context_id, fragment in items:
        control = fragment[0]
        if control & 0x01 or context_id != incoming.context_id:
            return _failed(dul, incoming, abort, "a command fragment or another presentation context "
                                                 "inside a C-STORE data set")
        incoming.write(fragment[1:])
        if control & 0x02:
            if fragment is not items[-1][1]:
                return _failed(dul, incoming, abort, "data after the last fragment of a C-STORE data set")
            _answer(dul, incoming)
            return True
    return True


def _answer(dul, incoming: _Incoming) -> None:
    """The whole data set is on disk: the bound handler decides, the response goes out."""
    dul.__dict__["_ct_store"] = None
    incoming.close()
    assoc = dul.assoc
    command = incoming.command
    if incoming.failed is not None or incoming.path is None:
        log.error("C-STORE of %s refused with 0xA701: cannot write its temporary file: %s",
                  clean(command.sop_instance_uid, 80), incoming.failed)
        status = statuses.OUT_OF_RESOURCES_WRITE_FAILED
    else:
        status = _handle(dul, incoming, incoming.path)
    sock = dul.socket.socket if dul.socket is not None else None
    if sock is None or not assoc.is_established:
        return
    with contextlib.suppress(OSError):  # the peer went away: the DUL notices on its next read
        sock.sendall(p_data_tf(incoming.context_id, 0x03, encode_response(command, status)))


def _handle(dul, incoming: _Incoming, path: Path) -> int:
    """The status the bound ``EVT_C_STORE`` handler answers for the data set at ``path``."""
    assoc = dul.assoc
    context = assoc._accepted_cx[incoming.context_id]
    handler, args = assoc.get_handlers(evt.EVT_C_STORE)
    event = StoreEvent(assoc, Request(incoming.command, path), context.as_tuple)
    # The network timeout is the peer's silence, not our work: the association's reactor
    # checks the idle timer meanwhile (with pynetdicom it served the store and could not).
    idle = dul._idle_timer
    idle.restart()
    idle.stop()
    try:
        answer = handler(event, *args) if args else handler(event)
        return int(answer if isinstance(answer, int) else answer.Status)
    except Exception:  # the bound handler never raises; if it did, the peer still gets an answer
        log.exception("unexpected error in the C-STORE handler")
        return statuses.PROCESSING_FAILURE
    finally:
        idle.restart()
        incoming.discard()


def _failed(dul, incoming: _Incoming, abort, reason: str) -> bool:
    dul.__dict__["_ct_store"] = None
    incoming.discard()
    abort(dul, reason)
    return False


def discard(dul) -> None:
    """The association ended: remove a half-received data set's temporary file."""
    incoming = dul.__dict__.pop("_ct_store", None)
    if incoming is not None:
        incoming.discard()

