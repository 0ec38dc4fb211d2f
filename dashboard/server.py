"""Serve the dashboard (page, API, /metrics) from a thread of ``ct-triage serve`` / ``ct-triage node``.

uvicorn runs the Starlette app in its own thread and event loop, on a socket bound
here first, so a port already in use is reported at once with a clear message.
A page that cannot start never stops the DICOM node: the error is logged and the
node keeps receiving (images matter more than the page).

Binding: ``HTTP_HOST`` (default 127.0.0.1). Settings validation refuses a
non-loopback host without ``HTTP_TOKEN``, and :class:`DashboardServer` checks again,
so the page is never reachable from the network without the token.
Slow and idle clients cannot starve the page (:mod:`dashboard.connections`): a request
must arrive within ``HEAD_TIMEOUT_S`` of connecting, idle keep-alive connections close
after ``IDLE_TIMEOUT_S``, and connections are capped per peer address
(``HTTP_CONNECTIONS_PER_ADDRESS``) and in all (``MAX_CONNECTIONS``), never per request.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from typing import Any

from ct_triage.errors import ConfigError
from ct_triage.settings import Settings, is_loopback
from dashboard.connections import ConnectionTable, HttpLimits, protocol_class

log = logging.getLogger("ct_triage.dashboard")

START_TIMEOUT_S = 10.0
BACKLOG = 1024  # connections the kernel queues before the server accepts them (capped by somaxconn)


class DashboardServer:
    """The page's uvicorn server in a thread; ``limits`` (tests) replaces the defaults and the setting."""

    def __init__(self, settings: Settings, session_factory, limits: HttpLimits | None = None):
        if settings.http_port and not is_loopback(settings.http_host) and not settings.http_token:
            raise ConfigError("the worklist page is bound off localhost without CT_TRIAGE_HTTP_TOKEN: refusing")
        self.settings = settings
        self.session_factory = session_factory
        self._server: Any = None  # uvicorn.Server, imported when started
        self._thread: threading.Thread | None = None
        self.port: int | None = None
        self.connections = ConnectionTable(limits or HttpLimits(per_address=settings.http_connections_per_address))

    def start(self) -> bool:
        """Start serving; False (logged) when the port cannot be bound or the server does not come up."""
        import uvicorn

        from dashboard.app import create_app

        s = self.settings
        family = socket.AF_INET6 if ":" in s.http_host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((s.http_host, s.http_port))
            sock.listen(BACKLOG)
        except OSError as exc:
            sock.close()
            log.error("worklist page not started: cannot listen on %s:%d: %s (set CT_TRIAGE_HTTP_PORT; 0 turns "
                      "the page off)", s.http_host, s.http_port, exc.strerror or exc)
            return False
        self.port = sock.getsockname()[1]
        # No limit_concurrency: uvicorn counts open connections toward it, so idle sockets made it answer 503.
        config = uvicorn.Config(create_app(s, self.session_factory), log_level="warning", access_log=False,
                                lifespan="off", server_header=False, http=protocol_class(self.connections),
                                ws="none", timeout_keep_alive=self.connections.limits.idle_timeout_s,
                                proxy_headers=False)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._run, args=(sock,), name="dashboard-http", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                log.error("worklist page did not start on %s:%d", s.http_host, self.port)
                return False
            time.sleep(0.02)
        log.info("worklist page on http://%s:%d/ (/metrics, /api/worklist)%s", s.http_host, self.port,
                 "" if s.http_token else ", localhost only, no token")
        return True

    def _run(self, sock: socket.socket) -> None:
        try:
            self._server.run(sockets=[sock])
        except Exception:  # the node keeps running without its page
            log.exception("worklist page stopped unexpectedly")
        finally:
            sock.close()

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)


def start_dashboard(settings: Settings, session_factory) -> DashboardServer | None:
    """The page for ``serve`` and ``node``; None when HTTP_PORT is 0 or it could not start."""
    if not settings.http_port:
        log.info("worklist page off (CT_TRIAGE_HTTP_PORT=0)")
        return None
    server = DashboardServer(settings, session_factory)
    return server if server.start() else None
