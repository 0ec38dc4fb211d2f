"""Only the right peers read and change the worklist (issue 17): roles by called AE title,
allowlists bound to addresses and networks, PS3.4 Annex CC operation rules, the audit trail.

Every peer is a real pynetdicom AE connecting from a non-loopback-default address
(127.0.0.2 and up play other hosts: the worklist's default readers are 127.0.0.1 and ::1
only). Each refusal is checked three ways: the status, the unchanged database row, and the
audit message (in the database, and for one case received by a real syslog receiver).
"""

from __future__ import annotations

import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, Verification
from sqlalchemy import select

from db.models import AuditEvent, UpsSubscription, UpsWorkitem
from dicom_node import ups as ups_scp
from dicom_node.access import UPS_PULL, AccessPolicy, Refusal, Role
from tests.conftest import make_settings
from tests.support.ups import UpsClient
from tests.test_audit import pki, rsyslog, schema  # noqa: F401  (fixtures shared with the audit tests)
from tests.test_node import wait_for
from tests.test_ups import T0, seed

pytestmark = pytest.mark.security


def _state(running, uid: str) -> str:
    with running.session() as session:
        return session.scalar(select(UpsWorkitem.state).where(UpsWorkitem.sop_instance_uid == uid))


def _audit(running, kind: str) -> list[AuditEvent]:
    with running.session() as session:
        return list(session.scalars(select(AuditEvent).where(AuditEvent.kind == kind).order_by(AuditEvent.id)))


def _associate(port: int, calling: str, called: str, source: str, *contexts: str):
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    for context in contexts:
        ae.add_requested_context(context)
    return ae.associate("127.0.0.1", port, ae_title=called, bind_address=(source, 0))


# -- the policy itself ------------------------------------------------------------------------------------
def test_policy_roles_by_called_title_address_and_network(tmp_path, sqlite_url):
    settings = make_settings(tmp_path, sqlite_url, allowed_calling_aes=["CT1@10.0.0.5"],
                             worklist_aes=["RIS@10.1.0.0/16", "VIEWER"], worklist_admin_aes=["ADMIN@10.2.0.9"])
    policy = AccessPolicy(settings)
    assert policy.decide("CTTRIAGE", "CT1", "10.0.0.5").role is Role.SENDER
    assert policy.decide("CTTRIAGE", "CT1", "10.0.0.6").refusal is Refusal.CALLING_AE_UNKNOWN
    assert policy.decide("CTTRIAGE_WL", "CT1", "10.0.0.5").role is None  # a sender is no reader
    assert policy.decide("CTTRIAGE_WL", "RIS", "10.1.200.3").role is Role.READER
    assert policy.decide("CTTRIAGE_WL", "RIS", "10.3.0.1").role is None
    assert policy.decide("CTTRIAGE_WL", "RIS", "::ffff:10.1.0.7").role is Role.READER  # IPv4-mapped
    assert policy.decide("CTTRIAGE_WL", "ADMIN", "10.2.0.9").role is Role.ADMIN
    assert policy.decide("CTTRIAGE_WL", "ADMIN", "10.2.0.8").role is None
    assert policy.decide("OTHER", "CT1", "10.0.0.5").refusal is Refusal.CALLED_AE_UNKNOWN
    assert any("VIEWER without an address" in w for w in policy.warnings())
    defaults = AccessPolicy(make_settings(tmp_path, sqlite_url, bind_address="0.0.0.0"))
    assert defaults.decide("CTTRIAGE_WL", "ANY", "127.0.0.1").role is Role.READER
    assert defaults.decide("CTTRIAGE_WL", "ANY", "::1").role is Role.READER
    assert defaults.decide("CTTRIAGE_WL", "ANY", "127.0.0.2").role is None  # another "host"
    assert defaults.decide("CTTRIAGE_WL", "ANY", "127.0.0.1").role is not Role.ADMIN
    assert any("any host may store" in w for w in defaults.warnings())


def test_certificate_must_name_the_calling_ae(tmp_path, sqlite_url):
    settings = make_settings(tmp_path, sqlite_url, tls_cert_ae_title=True, tls_ca="/dev/null",
                             tls_cert="/dev/null", tls_key="/dev/null")
    policy = AccessPolicy(settings)
    cert = {"subject": ((("commonName", "SCANNER1"),),), "subjectAltName": (("DNS", "ct1.example.org"),)}
    assert policy.decide("CTTRIAGE", "SCANNER1", "10.0.0.1", cert).role is Role.SENDER
    assert policy.decide("CTTRIAGE", "ct1.example.org", "10.0.0.1", cert).role is Role.SENDER
    refused = policy.decide("CTTRIAGE", "SCANNER2", "10.0.0.1", cert)
    assert refused.role is None and "certificate" in refused.why


# -- a running node -------------------------------------------------------------------------------------
@pytest.fixture
def guarded(start_node, database_url):
    running = start_node(database_url, worklist_aes=["READER@127.0.0.2", "READER2@127.0.0.2", "WATCHER@127.0.0.2",
                                                     "VIEWER@127.0.1.0/24"],
                         worklist_admin_aes=["ADMIN@127.0.0.3"], ups_subscribers=["WATCHER@127.0.0.2:1"],
                         worklist_expiry_h=87600.0)  # T0 is days ago: the expiry sweep must leave them
    uids = {"scheduled": seed(running, "1.2.826.0.1.3680043.8.498.101", category="CT-4", percent=80.0, arrived=T0),
            "other": seed(running, "1.2.826.0.1.3680043.8.498.102", category="CT-1", percent=5.0, arrived=T0)}
    return running, uids


def test_worklist_callers_outside_the_lists_are_refused_at_association(guarded):
    running, _ = guarded
    for calling, source in (("READER", "127.0.0.4"),  # right title, wrong host
                            ("STRANGER", "127.0.0.2"),  # right host, unknown title
                            ("VIEWER", "127.0.2.5")):  # outside the network
        assoc = _associate(running.port, calling, "CTTRIAGE_WL", source, UPS_PULL)
        assert assoc.is_rejected, f"{calling}@{source} was admitted"
    ok = _associate(running.port, "VIEWER", "CTTRIAGE_WL", "127.0.1.9", UPS_PULL)
    assert ok.is_established
    ok.release()
    alerts = wait_for(lambda: len(_audit(running, "association_refused")) >= 3 and _audit(running,
                                                                                         "association_refused"))
    assert {a.source_address for a in alerts} >= {"127.0.0.4", "127.0.0.2", "127.0.2.5"}


def test_each_title_offers_only_its_role(guarded):
    running, _ = guarded
    # A scanner calling the store title cannot reach the worklist ...
    store = _associate(running.port, "SCANNER", "CTTRIAGE", "127.0.0.2", UPS_PULL, Verification)
    assert store.is_established
    assert {str(cx.abstract_syntax) for cx in store.accepted_contexts} == {Verification}
    store.release()
    # ... and a worklist reader cannot store.
    reader = _associate(running.port, "READER", "CTTRIAGE_WL", "127.0.0.2", CTImageStorage, UPS_PULL)
    assert reader.is_established
    assert {str(cx.abstract_syntax) for cx in reader.accepted_contexts} == {UPS_PULL}
    reader.release()


def test_reader_rules_and_admin_rights(guarded):
    running, uids = guarded
    uid = uids["scheduled"]
    with UpsClient(running.port, ae_title="READER", source="127.0.0.2") as reader, \
            UpsClient(running.port, ae_title="READER2", source="127.0.0.2") as second, \
            UpsClient(running.port, ae_title="ADMIN", source="127.0.0.3") as admin:
        assert len(reader.find()) == 2
        # A reader may not cancel a SCHEDULED CT-4, nor update it, nor subscribe someone else.
        assert reader.request_cancel(uid) == ups_scp.NOT_AUTHORIZED
        progress = Dataset()
        item = Dataset()
        item.ProcedureStepProgressDescription = "<script>"
        progress.ProcedureStepProgressInformationSequence = [item]
        assert reader.set(uid, progress) == ups_scp.NOT_AUTHORIZED
        assert reader.subscribe("WATCHER") == ups_scp.NOT_AUTHORIZED
        assert _state(running, uid) == "SCHEDULED"
        with running.session() as session:
            assert session.scalar(select(UpsWorkitem.progress_json).where(UpsWorkitem.sop_instance_uid == uid)) \
                in (None, "")
            assert session.scalar(select(UpsSubscription)) is None
        # It may claim; a second reader can then neither complete nor cancel it without the Transaction UID.
        status, transaction = reader.claim(uid)
        assert status == 0
        assert second.complete(uid, "1.2.3.4")[0] == ups_scp.WRONG_TRANSACTION_UID
        assert second.change_state(uid, "CANCELED", "1.2.3.4") == ups_scp.WRONG_TRANSACTION_UID
        assert admin.change_state(uid, "CANCELED", "1.2.3.4") == ups_scp.WRONG_TRANSACTION_UID  # admins too
        assert _state(running, uid) == "IN PROGRESS"
        assert reader.complete(uid, transaction) == (0, 0)
        # An admin cancels a SCHEDULED item and manages another AE's subscription.
        assert admin.request_cancel(uids["other"], "duplicate order") == 0
        assert _state(running, uids["other"]) == "CANCELED"
        assert admin.subscribe("WATCHER") == 0
        assert reader.unsubscribe("WATCHER") == ups_scp.NOT_AUTHORIZED
        assert admin.unsubscribe("WATCHER") == 0
    refused = wait_for(lambda: len(_audit(running, "association_refused")) >= 4 and _audit(running,
                                                                                          "association_refused"))
    assert all(r.source_address == "127.0.0.2" and r.outcome == 4 for r in refused)
    changes = [(e.action, e.user_id) for e in _audit(running, "workitem_changed")]
    assert ("U", "READER") in changes and ("U", "ADMIN") in changes
    assert len(_audit(running, "workitem_changed")) == 3  # claimed, completed, cancelled
    assert _audit(running, "query"), "the C-FIND is in the audit trail"


def test_refusal_reaches_a_real_syslog_receiver(start_node, sqlite_url, rsyslog, schema):  # noqa: F811
    from ct_triage.audit.syslog import send_pending_audit

    rsyslog.start()
    running = start_node(sqlite_url, audit_repository=f"udp://127.0.0.1:{rsyslog.udp_port}")
    assoc = _associate(running.port, "INTRUDER", "CTTRIAGE_WL", "127.0.0.5", UPS_PULL)
    assert assoc.is_rejected
    wait_for(lambda: _audit(running, "association_refused"))
    send_pending_audit(running.session_factory, running.settings)
    received = [m for m in rsyslog.messages(2) if "127.0.0.5" in m[3]]
    assert received, "the Security Alert did not reach the syslog receiver"
    from lxml import etree

    document = etree.fromstring(received[0][3].encode())
    assert schema.validate(document), schema.error_log
    assert "INTRUDER" in received[0][3] and "110113" in received[0][3]

