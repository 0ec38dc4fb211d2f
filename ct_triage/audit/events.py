"""One builder per audited event: the DICOM PS3.15 A.5.3 message for each thing ct-triage audits.

What (event ID, action, event type: PS3.15 A.5.3 and CID 400-403)
    ==========================  =====================================  ======  ======================
    builder                     EventID                                action  EventTypeCode
    ==========================  =====================================  ======  ======================
    application_activity        110100 Application Activity            E       110120 Start / 110121 Stop
    association_refused         110113 Security Alert                  E       110126 Node Authentication
                                                                               (or 110132 Use of
                                                                               Restricted Function)
    instances_transferred       110104 DICOM Instances Transferred     C recv  -
                                                                       R sent
    query (C-FIND, N-GET)       110112 Query                           E       -
    http_read (page, API)       110112 Query                           E       -
    workitem_changed            110111 Procedure Record                C / U   -
    hl7_sent                    110109 Order Record (ORM, OMI)         U       -
                                110111 Procedure Record (ORU)          C
    authentication_failure      110114 User Authentication             E       110122 Login
    ==========================  =====================================  ======  ======================

    Participants follow A.5.3: the peer that started an exchange is the requestor
    (UserIsRequestor true); in transfers the sender has RoleIDCode 110153 Source and the
    receiver 110152 Destination. ct-triage is UserID = its AE title, AlternativeUserID =
    its process ID, NetworkAccessPointID = its host name. Objects: the patient
    (ParticipantObjectIDTypeCode 2 Patient Number, type 1 person, role 1 patient; ID as
    ``id^^^issuer`` when an issuer is known), the study (110180 Study Instance UID, type 2,
    role 3 report, with Accession and per-SOP-class counts), the query (110181 SOP Class
    UID with the data set as ParticipantObjectQuery; page and API reads: 12 URI), the UPS
    workitem (ct-triage's local code ``UPS`` in code system ``99CTTRIAGE``, role 20 job,
    with its new state in ParticipantObjectDetail ``ProcedureStepState``).

Why these events for UPS
    PS3.15 has no UPS-specific audit event; a workitem is a procedure step record, so a
    claim (SCHEDULED -> IN PROGRESS), completion and cancellation are Procedure Record
    updates (EventActionCode U), as IHE Radiology audits procedure step changes.

Outcome
    0 success, 4 minor failure (refused association, failed login, a send that will be
    retried), 8 serious failure (a send that failed for good); ``outcome_description``
    says why in one line.

Every builder takes the settings (AE title: AuditSourceID and our participant) and the
event's time (default now); every text that came from a peer is sanitised on rendering
(``message.text``). Nothing here touches the database or the network.
"""

from __future__ import annotations

import hashlib
import os
import socket
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from typing import Literal
from urllib.parse import parse_qsl, urlencode, urlsplit

from ct_triage.audit.message import (
    ActiveParticipant,
    AuditEventError,
    AuditMessage,
    Code,
    ParticipantObject,
    SopClassCount,
    check_uid,
    text,
)
from ct_triage.settings import Settings
from db.types import utcnow

DCM = "DCM"
RFC3881 = "RFC-3881"
LOCAL = "99CTTRIAGE"  # HL7 convention for a local code system

APPLICATION_ACTIVITY = Code("110100", DCM, "Application Activity")
INSTANCES_ACCESSED = Code("110103", DCM, "DICOM Instances Accessed")
INSTANCES_TRANSFERRED = Code("110104", DCM, "DICOM Instances Transferred")
ORDER_RECORD = Code("110109", DCM, "Order Record")
PROCEDURE_RECORD = Code("110111", DCM, "Procedure Record")
QUERY = Code("110112", DCM, "Query")
SECURITY_ALERT = Code("110113", DCM, "Security Alert")
USER_AUTHENTICATION = Code("110114", DCM, "User Authentication")

APPLICATION_START = Code("110120", DCM, "Application Start")
APPLICATION_STOP = Code("110121", DCM, "Application Stop")
LOGIN = Code("110122", DCM, "Login")
NODE_AUTHENTICATION = Code("110126", DCM, "Node Authentication")
RESTRICTED_FUNCTION = Code("110132", DCM, "Use of Restricted Function")

ROLE_APPLICATION = Code("110150", DCM, "Application")
ROLE_LAUNCHER = Code("110151", DCM, "Application Launcher")
ROLE_DESTINATION = Code("110152", DCM, "Destination Role ID")
ROLE_SOURCE = Code("110153", DCM, "Source Role ID")

ID_PATIENT = Code("2", RFC3881, "Patient Number")
ID_URI = Code("12", RFC3881, "URI")
ID_STUDY = Code("110180", DCM, "Study Instance UID")
ID_SOP_CLASS = Code("110181", DCM, "SOP Class UID")
ID_NODE = Code("110182", DCM, "Node ID")
ID_WORKITEM = Code("UPS", LOCAL, "UPS Workitem SOP Instance UID")
ID_HL7_MESSAGE = Code("HL7", LOCAL, "HL7 Message Control ID")

UPS_STATES = {"created": ("C", "SCHEDULED"), "claimed": ("U", "IN PROGRESS"),
              "completed": ("U", "COMPLETED"), "cancelled": ("U", "CANCELED")}
ALERTS = {"node-authentication": NODE_AUTHENTICATION, "restricted-function": RESTRICTED_FUNCTION}


@lru_cache(maxsize=1)
def host_name() -> str:
    return socket.getfqdn() or socket.gethostname() or "localhost"


def token_fingerprint(token: str | None) -> str:
    """How an HTTP client is named in the audit trail: ``token:`` and 12 hex digits of the
    token's SHA-256 (never the token), or ``anonymous``."""
    if not token:
        return "anonymous"
    return "token:" + hashlib.sha256(token.encode()).hexdigest()[:12]


def _when(when: datetime | None) -> datetime:
    return when or utcnow()


def _us(settings: Settings, *, requestor: bool, roles: tuple[Code, ...] = (), process: str | None = None
        ) -> ActiveParticipant:
    return ActiveParticipant(user_id=settings.ae_title, requestor=requestor, roles=roles,
                             alternative_user_id=str(os.getpid()), user_name=process, address=host_name())


def _peer(user_id: str | None, address: str | None, *, requestor: bool, roles: tuple[Code, ...] = ()
          ) -> ActiveParticipant:
    return ActiveParticipant(user_id=text(user_id) or "unknown", requestor=requestor, roles=roles,
                             address=text(address, 64) or None)


def _message(settings: Settings, kind: str, event_id: Code, outcome: int, when: datetime | None,
             participants: Sequence[ActiveParticipant], **fields) -> AuditMessage:
    return AuditMessage(kind=kind, event_id=event_id, outcome=outcome, event_time=_when(when),
                        participants=tuple(participants), source_id=settings.ae_title, **fields)


def patient_object(patient_id: str | None, patient_name: str | None = None, issuer: str | None = None
                   ) -> ParticipantObject:
    """The patient (Patient Number; ``id^^^issuer`` when the issuer is known)."""
    pid = text(patient_id, 64)
    if not pid:
        raise AuditEventError(f"patient_id is required, got {patient_id!r}")
    ident = f"{pid}^^^{text(issuer, 64)}" if issuer else pid
    return ParticipantObject(object_id=ident, id_type=ID_PATIENT, type_code="1", role="1",
                             name=text(patient_name, 324) or pid)


def study_object(study_uid: str, *, accession: str | None = None,
                 sop_classes: Mapping[str, int | Sequence[str]] | None = None,
                 life_cycle: str | None = None) -> ParticipantObject:
    """The study (Study Instance UID), with its accession number and per-SOP-class counts;
    a value of ``sop_classes`` is a count or the list of instance UIDs."""
    check_uid("study_uid", study_uid)
    counts = []
    for uid, value in (sop_classes or {}).items():
        if isinstance(value, int):
            counts.append(SopClassCount(uid, value))
        else:
            instances = tuple(value)
            counts.append(SopClassCount(uid, len(instances), instances))
    return ParticipantObject(object_id=study_uid, id_type=ID_STUDY, type_code="2", role="3", name=study_uid,
                             accession=text(accession, 64) or None, sop_classes=tuple(counts),
                             life_cycle=life_cycle)


# -- the events --------------------------------------------------------------------
def application_activity(settings: Settings, action: Literal["start", "stop"], *, process: str = "ct-triage",
                         launcher: str | None = None, outcome: int = 0, description: str | None = None,
                         when: datetime | None = None) -> AuditMessage:
    """ct-triage (``process``: node, worker, dashboard ...) started or stopped; ``launcher``
    is the user or service manager that started it, when known."""
    if action not in ("start", "stop"):
        raise AuditEventError(f"action must be start or stop, got {action!r}")
    participants = [_us(settings, requestor=launcher is None, roles=(ROLE_APPLICATION,), process=process)]
    if launcher:
        participants.append(ActiveParticipant(user_id=text(launcher), requestor=True, roles=(ROLE_LAUNCHER,)))
    return _message(settings, "application_activity", APPLICATION_ACTIVITY, outcome, when, participants,
                    action="E", event_types=(APPLICATION_START if action == "start" else APPLICATION_STOP,),
                    outcome_description=description)


def association_refused(settings: Settings, *, calling_ae: str | None, address: str | None, reason: str,
                        called_ae: str | None = None, alert: str = "node-authentication",
                        when: datetime | None = None) -> AuditMessage:
    """An association (or TLS handshake) we refused: Security Alert, outcome 4, the peer as
    the performing participant and the alert subject (Node ID, with ``reason`` as the
    ``Alert Description`` detail)."""
    if alert not in ALERTS:
        raise AuditEventError(f"alert must be one of {', '.join(ALERTS)}, got {alert!r}")
    _require("reason", reason)
    peer = _peer(calling_ae, address, requestor=True)
    subject = ParticipantObject(
        object_id=text(address, 64) or peer.user_id, id_type=ID_NODE, type_code="2", role="13",
        name=peer.user_id,
        details=(("Alert Description", text(reason, 1000).encode()),
                 *((("CalledAETitle", text(called_ae, 64).encode()),) if called_ae else ())))
    return _message(settings, "association_refused", SECURITY_ALERT, 4, when,
                    [_us(settings, requestor=False), peer], action="E", event_types=(ALERTS[alert],),
                    outcome_description=reason, objects=(subject,))


def instances_transferred(settings: Settings, *, direction: Literal["received", "sent"], peer_ae: str,
                          peer_address: str | None, study_uid: str,
                          sop_classes: Mapping[str, int | Sequence[str]], patient_id: str | None,
                          patient_name: str | None = None, issuer_of_patient_id: str | None = None,
                          accession: str | None = None, outcome: int = 0, description: str | None = None,
                          when: datetime | None = None) -> AuditMessage:
    """Instances of one study received on one association (``received``: the peer sent,
    requestor) or sent by one delivery (``sent``: we sent, requestor). ``sop_classes``:
    {SOP Class UID: count or [instance UIDs]}."""
    if direction not in ("received", "sent"):
        raise AuditEventError(f"direction must be received or sent, got {direction!r}")
    if not sop_classes:
        raise AuditEventError("sop_classes: at least one SOP class is required")
    received = direction == "received"
    peer = _peer(peer_ae, peer_address, requestor=received, roles=(ROLE_SOURCE if received else ROLE_DESTINATION,))
    us = _us(settings, requestor=not received, roles=(ROLE_DESTINATION if received else ROLE_SOURCE,))
    objects = (study_object(study_uid, accession=accession, sop_classes=sop_classes),
               patient_object(patient_id, patient_name, issuer_of_patient_id))
    return _message(settings, "instances_transferred", INSTANCES_TRANSFERRED, outcome, when,
                    [peer, us] if received else [us, peer], action="C" if received else "R",
                    outcome_description=description, objects=objects)


def query(settings: Settings, *, calling_ae: str, address: str | None, sop_class_uid: str, query: bytes,
          transfer_syntax_uid: str | None = None, outcome: int = 0, description: str | None = None,
          when: datetime | None = None) -> AuditMessage:
    """A DICOM query we answered: C-FIND or N-GET (``sop_class_uid`` of the service,
    ``query`` the identifier / attribute list as received, encoded in ``transfer_syntax_uid``)."""
    check_uid("sop_class_uid", sop_class_uid)
    if not isinstance(query, (bytes, bytearray)):
        raise AuditEventError(f"query must be the encoded data set (bytes), got {type(query).__name__}")
    details = ((("TransferSyntax", check_uid("transfer_syntax_uid", transfer_syntax_uid).encode()),)
               if transfer_syntax_uid else ())
    subject = ParticipantObject(object_id=sop_class_uid, id_type=ID_SOP_CLASS, type_code="2", role="24",
                                query=bytes(query), details=details)
    return _message(settings, "query", QUERY, outcome, when,
                    [_peer(calling_ae, address, requestor=True, roles=(ROLE_SOURCE,)),
                     _us(settings, requestor=False, roles=(ROLE_DESTINATION,))],
                    action="E", outcome_description=description, objects=(subject,))


def http_read(settings: Settings, *, client_address: str | None, path: str, token: str | None = None,
              outcome: int = 0, when: datetime | None = None) -> AuditMessage:
    """A read of the worklist page or JSON API (``path`` with its query string). The client
    is named by :func:`token_fingerprint` (never the token), and a ``token=`` parameter is
    taken out of the recorded query. Aggregate with ``ct_triage.audit.record_http_read``."""
    _require("path", path)
    parts = urlsplit(path)
    kept = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k.lower() != "token"]
    recorded = parts.path + (("?" + urlencode(kept)) if kept else "")
    subject = ParticipantObject(object_id=text(parts.path or "/"), id_type=ID_URI, type_code="2", role="24",
                                query=recorded.encode())
    client = ActiveParticipant(user_id=token_fingerprint(token), requestor=True, roles=(ROLE_SOURCE,),
                               address=text(client_address, 64) or None)
    return _message(settings, "http_read", QUERY, outcome, when,
                    [client, _us(settings, requestor=False, roles=(ROLE_DESTINATION,), process="dashboard")],
                    action="E", objects=(subject,))


def workitem_changed(settings: Settings, *, change: Literal["created", "claimed", "completed", "cancelled"],
                     performer_ae: str | None, address: str | None, workitem_uid: str, study_uid: str,
                     patient_id: str | None, patient_name: str | None = None, issuer_of_patient_id: str | None = None,
                     accession: str | None = None, reason: str | None = None, outcome: int = 0,
                     when: datetime | None = None) -> AuditMessage:
    """A UPS workitem created (by us), claimed (N-ACTION to IN PROGRESS), completed or
    cancelled (by ``performer_ae``, or by us when it is None): Procedure Record."""
    if change not in UPS_STATES:
        raise AuditEventError(f"change must be one of {', '.join(UPS_STATES)}, got {change!r}")
    action, state = UPS_STATES[change]
    check_uid("workitem_uid", workitem_uid)
    participants = [_us(settings, requestor=performer_ae is None)]
    if performer_ae is not None:
        participants.insert(0, _peer(performer_ae, address, requestor=True))
    workitem = ParticipantObject(object_id=workitem_uid, id_type=ID_WORKITEM, type_code="2", role="20",
                                 name=workitem_uid, details=(("ProcedureStepState", state.encode()),),
                                 life_cycle="1" if change == "created" else "3")
    objects = (workitem, study_object(study_uid, accession=accession),
               patient_object(patient_id, patient_name, issuer_of_patient_id))
    return _message(settings, "workitem_changed", PROCEDURE_RECORD, outcome, when, participants, action=action,
                    outcome_description=reason, objects=objects)


def hl7_sent(settings: Settings, *, destination: str, message_type: str, control_id: str, patient_id: str | None,
             patient_name: str | None = None, issuer_of_patient_id: str | None = None, study_uid: str | None = None,
             accession: str | None = None, outcome: int = 0, error: str | None = None,
             when: datetime | None = None) -> AuditMessage:
    """An HL7 v2 message sent to a RIS (``destination`` host:port): an order update
    (ORM^O01, OMI^O23) is an Order Record update, a result (ORU^R01) a Procedure Record
    created at the RIS. The message control ID (MSH-10) is kept as an object."""
    _require("message_type", message_type)
    _require("control_id", control_id)
    is_result = message_type.upper().startswith("ORU")
    host, _, _port = destination.rpartition(":")
    peer = _peer(destination, host or destination, requestor=False, roles=(ROLE_DESTINATION,))
    message = ParticipantObject(object_id=text(control_id, 64), id_type=ID_HL7_MESSAGE, type_code="2", role="3",
                                name=text(message_type, 16), details=(("MSH-9", text(message_type, 16).encode()),))
    objects = [message, patient_object(patient_id, patient_name, issuer_of_patient_id)]
    if study_uid:
        objects.insert(1, study_object(study_uid, accession=accession))
    return _message(settings, "hl7_sent", PROCEDURE_RECORD if is_result else ORDER_RECORD, outcome, when,
                    [_us(settings, requestor=True, roles=(ROLE_SOURCE,)), peer],
                    action="C" if is_result else "U", outcome_description=error, objects=tuple(objects))


def authentication_failure(settings: Settings, *, user_id: str | None, address: str | None, mechanism: str,
                           reason: str, when: datetime | None = None) -> AuditMessage:
    """A failed login: a wrong or missing HTTP token (``user_id`` from
    :func:`token_fingerprint`), a client certificate refused (``mechanism`` says which).
    User Authentication, Login, outcome 4."""
    _require("mechanism", mechanism)
    _require("reason", reason)
    user = ActiveParticipant(user_id=text(user_id) or "anonymous", requestor=True,
                             address=text(address, 64) or None, alternative_user_id=text(mechanism, 32))
    return _message(settings, "authentication_failure", USER_AUTHENTICATION, 4, when,
                    [user, _us(settings, requestor=False)], action="E", event_types=(LOGIN,),
                    outcome_description=f"{text(mechanism, 32)}: {text(reason, 500)}")


def _require(name: str, value: object) -> None:
    if value is None or not str(value).strip():
        raise AuditEventError(f"{name} is required, got {value!r}")
