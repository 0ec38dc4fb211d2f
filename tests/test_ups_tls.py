"""UPS event reports to a ``+tls`` subscriber: real pynetdicom peers over DICOM TLS (SQLite).

The watcher is a UPS Event SCP served with a self-signed certificate. The node's own
notifier (built by dicom_node.server with the default client context) cannot verify it:
the report is marked failed at once (an untrusted certificate does not heal by retrying),
its reason naming the certificate. A notifier whose client context trusts the certificate
delivers the report over TLS.
"""

from __future__ import annotations

import ssl
from datetime import UTC, datetime

import pytest
from sqlalchemy import select

from db.models import UpsEvent, UpsWorkitem
from dicom_node.ups import UpsNotifier
from tests.support.scanner import free_port
from tests.support.ups import UpsClient, UpsWatcher
from tests.test_delivery_scu import _self_signed
from tests.test_node import wait_for
from tests.test_ups import NO_EXPIRY_H, seed

T0 = datetime(2026, 11, 30, 8, 0, tzinfo=UTC)


def _events(running, uid: str) -> list[UpsEvent]:
    with running.session() as session:
        return list(session.scalars(select(UpsEvent).join(UpsWorkitem, UpsEvent.workitem_fk == UpsWorkitem.id)
                                    .where(UpsWorkitem.sop_instance_uid == uid)))


def test_ups_events_to_a_tls_subscriber(start_node, sqlite_url, tmp_path):
    pytest.importorskip("cryptography")
    cert, key = _self_signed(tmp_path)
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)
    port = free_port()
    watcher = UpsWatcher(port, ssl_context=server_ctx)
    try:
        running = start_node(sqlite_url, ups_subscribers=[f"WATCHER@127.0.0.1:{port}+tls"],
                             worklist_expiry_h=NO_EXPIRY_H, acse_timeout_s=5.0)
        # 1. The node's notifier, default context: the self-signed certificate is not trusted.
        untrusted = seed(running, "1.2.826.0.1.3680043.8.498.21", category="CT-2", percent=30.0, arrived=T0)
        with UpsClient(running.port, ae_title="WATCHER") as client:
            assert client.subscribe("WATCHER", untrusted) == 0
        failed = wait_for(lambda: [e for e in _events(running, untrusted) if e.state == "failed"],
                          timeout=10, interval=0.1)
        assert failed[0].attempts == 1, "an untrusted certificate is not retried"
        assert "certificate" in failed[0].last_error.lower(), failed[0].last_error
        assert "+tls" in failed[0].last_error
        assert watcher.events == []

        # 2. A notifier trusting the certificate delivers over TLS (the node's own one stopped,
        #    so that it does not take the new report first).
        running.node.ups_notifier.stop()
        trusted = seed(running, "1.2.826.0.1.3680043.8.498.22", category="CT-3", percent=55.0, arrived=T0)
        with UpsClient(running.port, ae_title="WATCHER") as client:
            assert client.subscribe("WATCHER", trusted) == 0
        client_ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(cert))
        notifier = UpsNotifier(running.session_factory, running.node.ups, running.settings.worklist_ae_title,
                               timeout_s=5.0, tls_context=client_ctx)
        assert notifier.send_due() == 1
        assert watcher.wait_for_state(trusted, "SCHEDULED", timeout=5) == ["SCHEDULED"]
        assert watcher.over_tls == [True]
        assert [(e.state, e.last_error) for e in _events(running, trusted)] == [("sent", None)]
    finally:
        watcher.stop()


def test_notifier_tls_context_must_be_an_ssl_context(start_node, sqlite_url):
    running = start_node(sqlite_url, worklist_expiry_h=NO_EXPIRY_H)
    with pytest.raises(TypeError, match="must be an ssl.SSLContext"):
        UpsNotifier(running.session_factory, running.node.ups, "CTTRIAGE_WL", tls_context=object())  # type: ignore[arg-type]
