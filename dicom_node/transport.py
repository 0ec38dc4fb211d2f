"""Receive-path tuning for pynetdicom (documented workarounds, applied by the node at start).

pynetdicom reads each PDU with 4 KiB ``recv`` calls into a growing bytearray and
polls its DUL loop with a 1 ms sleep. For a 512 KiB CT slice that is ~130 system
calls and copies, plus a millisecond of idle latency per message. We read a PDU
with ``recv_into`` straight into a buffer of its final size and poll faster while
an association is open. Both are process-wide and only touch the receive path.
"""

from __future__ import annotations

from pynetdicom import transport

# Seconds the DUL loop sleeps when idle (pynetdicom's default is 0.001).
DUL_LOOP_DELAY_S = 0.0002

_installed = False


def _recv_exact(self, nr_bytes: int) -> bytearray:
    buffer = bytearray(nr_bytes)
    view = memoryview(buffer)
    received = 0
    while received < nr_bytes:
        count = self.socket.recv_into(view[received:], nr_bytes - received)
        if count == 0:  # peer closed: return what arrived, as pynetdicom does
            del view
            return buffer[:received]
        received += count
    return buffer


def install_fast_recv() -> None:
    global _installed
    if not _installed:
        transport.AssociationSocket.recv = _recv_exact
        _installed = True


def tune_association(assoc) -> None:
    dul = getattr(assoc, "dul", None)
    if dul is not None and hasattr(dul, "_run_loop_delay"):
        dul._run_loop_delay = DUL_LOOP_DELAY_S
