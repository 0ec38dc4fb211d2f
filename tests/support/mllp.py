"""A real MLLP listener for tests, built on python-hl7's asyncio server (hl7.mllp),
optionally behind TLS (``tls``: a server SSLContext, see :func:`server_tls_context`)."""

from __future__ import annotations

import asyncio
import ssl
import threading
import time
from pathlib import Path

import hl7
from hl7.mllp import start_hl7_server


class MllpListener:
    """Receives HL7 messages on ``port`` and answers each with ``ack_code`` (AA, AE, AR).

    ``messages`` holds every parsed message received, in order.
    """

    def __init__(self, port: int, ack_code: str = "AA", error_text: str = "order not found",
                 tls: ssl.SSLContext | None = None):
        self.port = port
        self.tls = tls
        self.ack_code = ack_code
        self.error_text = error_text
        self.messages: list[hl7.Message] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()

    async def _handle(self, reader, writer):
        try:
            while not writer.is_closing():
                message = await reader.readmessage()
                self.messages.append(message)
                ack = message.create_ack(self.ack_code)
                if self.ack_code != "AA":
                    ack.segment("MSA").assign_field(ack.escape(self.error_text), 3)
                writer.writemessage(ack)
                await writer.drain()
        except asyncio.IncompleteReadError:
            pass
        finally:
            writer.close()

    def start(self) -> MllpListener:
        def run():
            self._loop = asyncio.new_event_loop()
            asyncio.set_event_loop(self._loop)
            self._server = self._loop.run_until_complete(start_hl7_server(
                self._handle, "127.0.0.1", self.port, ssl=self.tls))
            self._ready.set()
            self._loop.run_forever()
            self._server.close()
            self._loop.run_until_complete(self._server.wait_closed())
            self._loop.close()

        self._thread = threading.Thread(target=run, name=f"mllp-{self.port}", daemon=True)
        self._thread.start()
        assert self._ready.wait(10), "MLLP listener did not start"
        return self

    def stop(self) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)
            self._loop = None

    def of_type(self, message_type: str) -> list[hl7.Message]:
        return [m for m in self.messages if str(m.segment("MSH")(9)).startswith(message_type)]

    def wait_for(self, count: int, timeout: float = 60.0) -> list[hl7.Message]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and len(self.messages) < count:
            time.sleep(0.1)
        return list(self.messages)


def server_tls_context(cert: Path, key: Path, client_ca: Path | None = None) -> ssl.SSLContext:
    """A listener's TLS context (TLS 1.2 or later); with ``client_ca`` the client must present a
    certificate that CA signed."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(str(cert), str(key))
    if client_ca is not None:
        context.load_verify_locations(str(client_ca))
        context.verify_mode = ssl.CERT_REQUIRED
    return context
