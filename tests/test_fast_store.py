"""dicom_node.fast_store: C-STORE served in the connection's thread, byte for byte as pynetdicom
would (command parsing, the response, the file meta), and the paths it leaves to pynetdicom."""

from __future__ import annotations

import os
import socket
import struct
import time
from io import BytesIO

import pytest
from pydicom import dcmread
from pynetdicom import AE
from pynetdicom.dimse_messages import C_STORE_RQ, C_STORE_RSP
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import create_file_meta, encode, write_file_meta_info
from pynetdicom.sop_class import CTImageStorage, Verification

from dicom_node import fast_store
from tests.support.scanner import acknowledged_files, require_dcmtk, storescu, write_ct_series
from tests.test_node import wait_for

CT = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT = "1.2.840.10008.1.2.1"


def _command_set(primitive) -> bytes:
    message = C_STORE_RQ() if primitive.MessageIDBeingRespondedTo is None else C_STORE_RSP()
    message.primitive_to_message(primitive)
    return encode(message.command_set, True, True)


def test_command_response_and_file_meta_are_pynetdicoms():
    request = C_STORE()
    request.MessageID = 7
    request.AffectedSOPClassUID = CT
    request.AffectedSOPInstanceUID = "1.2.3.4.5"  # odd length: padded with a NUL on the wire
    request.Priority = 2
    request.MoveOriginatorApplicationEntityTitle = "MOVER"
    request.MoveOriginatorMessageID = 3
    request.DataSet = BytesIO(b"\0\0")  # a data set follows the command
    parsed = fast_store.parse_command(memoryview(_command_set(request)))
    assert parsed is not None
    assert (parsed.command_field, parsed.message_id, parsed.priority, parsed.sop_class_uid, parsed.sop_instance_uid,
            parsed.move_originator_aet, parsed.move_originator_message_id) == \
        (fast_store.C_STORE_RQ, 7, 2, CT, "1.2.3.4.5", "MOVER", 3)
    assert parsed.data_set_type != fast_store.NO_DATA_SET
    assert fast_store.parse_command(memoryview(_command_set(request)[:-3])) is None  # cut short

    for status in (0x0000, 0xA700, 0xC211):
        response = C_STORE()
        response.MessageIDBeingRespondedTo = 7
        response.AffectedSOPClassUID = CT
        response.AffectedSOPInstanceUID = "1.2.3.4.5"
        response.Status = status
        assert fast_store.encode_response(parsed, status) == _command_set(response)

    buffer = BytesIO()
    buffer.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(buffer, create_file_meta(sop_class_uid=CT, sop_instance_uid="1.2.3.4.5",
                                                  transfer_syntax=EXPLICIT))
    assert fast_store.file_meta(parsed, EXPLICIT) == buffer.getvalue()


def _stored_bytes(running) -> dict[str, bytes]:
    assert running.node.store.indexer.flush()
    storage = running.settings.effective_storage_dir / "instances"
    return {path.name: path.read_bytes() for path in storage.rglob("*.dcm")}


def test_storescu_files_stored_identically_with_and_without_the_fast_path(start_node, sqlite_url, tmp_path,
                                                                          monkeypatch):
    require_dcmtk()
    series = write_ct_series(tmp_path / "s", 6, rows=64, columns=64, seed=3)
    served = []
    answer = fast_store._answer
    monkeypatch.setattr(fast_store, "_answer", lambda dul, incoming: (served.append(1), answer(dul, incoming))[1])
    stored = {}
    for fast in (True, False):
        running = start_node(sqlite_url.replace(".sqlite", f"-{fast}.sqlite"), fast_store=fast,
                             storage_dir=tmp_path / f"storage-{fast}")
        result = storescu(running.port, series.paths)
        assert len(acknowledged_files(result.stdout + result.stderr)) == 6, result.stderr[-2000:]
        stored[fast] = _stored_bytes(running)
        assert len(served) == 6  # the second node (fast_store=False) never takes the fast path
        running.node.stop()
    assert len(stored[True]) == 6 and stored[True] == stored[False]
    assert all(dcmread(BytesIO(raw)).SOPInstanceUID for raw in stored[True].values())


def test_echo_and_stores_mixed_on_one_association(start_node, sqlite_url, tmp_path):
    running = start_node(sqlite_url)
    paths = write_ct_series(tmp_path / "s", 3, rows=32, columns=32, seed=4).paths
    ae = AE(ae_title="SCANNER")
    ae.add_requested_context(Verification)
    ae.add_requested_context(CTImageStorage, EXPLICIT)
    assoc = ae.associate("127.0.0.1", running.port, ae_title="CTTRIAGE")
    assert assoc.is_established
    try:
        statuses = [assoc.send_c_echo().Status]
        for path in paths:
            statuses += [assoc.send_c_store(dcmread(path)).Status, assoc.send_c_echo().Status]
    finally:
        assoc.release()
    assert statuses == [0] * 7
    assert len(_stored_bytes(running)) == 3


def _raw_association(port: int):
    """A pynetdicom association whose socket we then write raw PDUs to."""
    ae = AE(ae_title="SCANNER")
    ae.add_requested_context(CTImageStorage, EXPLICIT)
    assoc = ae.associate("127.0.0.1", port, ae_title="CTTRIAGE")
    assert assoc.is_established
    context_id = assoc.accepted_contexts[0].context_id
    request = C_STORE()
    request.MessageID = 1
    request.AffectedSOPClassUID = CT
    request.AffectedSOPInstanceUID = "1.2.826.0.1.3680043.10.1.5"
    request.Priority = 0
    request.DataSet = BytesIO(b"\0\0")
    return assoc, context_id, _command_set(request)


def _tmp_files(running) -> list:
    return [p for p in running.node.spool.tmp_dir.iterdir() if p.is_file()]


@pytest.mark.parametrize("how", ["command inside the data set", "peer gone mid data set"])
def test_a_broken_data_set_leaves_no_temporary_file(start_node, sqlite_url, tmp_path, caplog, how):
    running = start_node(sqlite_url)
    assoc, context_id, command = _raw_association(running.port)
    sock: socket.socket = assoc.dul.socket.socket
    sock.sendall(fast_store.p_data_tf(context_id, 0x03, command) + fast_store.p_data_tf(context_id, 0x00, b"\0" * 64))
    wait_for(lambda: _tmp_files(running), timeout=10, interval=0.05)  # the data set is being written
    if how == "peer gone mid data set":
        assoc.dul.socket.close()
    else:
        sock.sendall(fast_store.p_data_tf(context_id, 0x01, command))
        wait_for(lambda: assoc.is_aborted, timeout=10, interval=0.05)
        assert "command fragment or another presentation context inside a C-STORE data set" in caplog.text
    wait_for(lambda: not _tmp_files(running), timeout=10, interval=0.05)
    assoc.abort()
    assert not any((running.settings.effective_storage_dir / "instances").rglob("*.dcm"))


def test_a_malformed_p_data_is_aborted(start_node, sqlite_url, caplog):
    running = start_node(sqlite_url)
    assoc, context_id, command = _raw_association(running.port)
    item = struct.pack(">LBB", 200, context_id, 0x03) + command  # declares more than the PDU holds
    assoc.dul.socket.socket.sendall(struct.pack(">BBL", 0x04, 0, len(item)) + item)
    wait_for(lambda: assoc.is_aborted, timeout=10, interval=0.05)
    assert "malformed P-DATA-TF" in caplog.text
    time.sleep(0.2)
    assert not _tmp_files(running)


def test_the_file_meta_is_read_as_pydicom_reads_it(tmp_path):
    """dicom_node.metadata reads the file meta group directly; every file must give pydicom's
    (data set offset, transfer syntax), and what it does not recognise goes to pydicom."""
    from pydicom.filereader import _read_file_meta_info, read_preamble

    from dicom_node import metadata

    def pydicoms(raw: bytes, fallback: str) -> tuple[int, str]:
        fh = BytesIO(raw)
        read_preamble(fh, True)
        meta = _read_file_meta_info(fh)
        return fh.tell(), str(meta.get("TransferSyntaxUID") or fallback)

    written = write_ct_series(tmp_path / "s", 1, rows=8, columns=8).paths[0].read_bytes()
    command = fast_store.StoreCommand(sop_class_uid=CT, sop_instance_uid="1.2.3.4.5")
    ours = fast_store.file_meta(command, "1.2.840.10008.1.2") + b"\x08\x00\x18\x00\x0a\x00\x00\x001.2.3.4.5\x00"
    private = bytearray(ours)  # an OB element (private information) appended to the group
    extra = struct.pack("<HH2sHL", 2, 0x0102, b"OB", 0, 4) + b"\x01\x02\x03\x04"
    group_length = struct.unpack_from("<L", private, 140)[0]
    private[140:144] = struct.pack("<L", group_length + len(extra))
    private[144 + group_length:144 + group_length] = extra
    no_preamble = written[128:]
    for raw in (written, ours, bytes(private), no_preamble, b"\0" * 200):
        assert metadata._read_meta(BytesIO(raw), "9.9") == pydicoms(raw, "9.9")


def test_a_temporary_file_that_cannot_be_written_is_answered_0xa701(start_node, sqlite_url, tmp_path, monkeypatch,
                                                                   caplog):
    require_dcmtk()
    running = start_node(sqlite_url)
    series = write_ct_series(tmp_path / "s", 2, rows=32, columns=32, seed=5)

    def no_room(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(fast_store.tempfile, "mkstemp", no_room)
    result = storescu(running.port, series.paths)
    output = result.stdout + result.stderr
    # answered with the status (storescu then stops and releases), not aborted
    assert "Received Store Response (Refused: OutOfResources)" in output, output[-2000:]
    assert "Releasing Association" in output and "Abort" not in output, output[-2000:]
    assert "refused with 0xA701: cannot write its temporary file: OSError" in caplog.text
    monkeypatch.undo()
    assert not any((running.settings.effective_storage_dir / "instances").rglob("*.dcm"))

    broken = fast_store._Incoming(fast_store.StoreCommand(), 1, fd=os.open(os.devnull, os.O_RDONLY))
    broken.write(memoryview(b"data"))  # a descriptor that cannot be written: the failure is kept, not raised
    assert broken.failed and broken.fd == -1
