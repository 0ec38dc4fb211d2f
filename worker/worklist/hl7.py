"""HL7 v2.5.1 to a RIS over MLLP: the priority as an order update, the result as ORU^R01.

Built and framed with python-hl7 (``hl7``): messages are ``hl7.Message`` trees rendered
by the library; every value goes through :func:`text` (control characters removed,
length capped) and the library's escaping (``|`` -> ``\\F\\``, ``^`` -> ``\\S\\``,
``~`` -> ``\\R\\``, ``\\`` -> ``\\E\\``, ``&`` -> ``\\T\\``), so a delimiter in a patient
name cannot break a segment. Non-ASCII text is kept as UTF-8 (MSH-18 ``UNICODE UTF-8``).

Messages per result (:func:`build_messages`), keyed by Accession Number and Study
Instance UID, control IDs deterministic (``CTT<result id>O`` / ``R``) so a RIS can
drop a retried duplicate:

1. the order update, per ``CT_TRIAGE_HL7_ORDER_MESSAGE``:
   - ``ORM^O01``: PID, ORC (ORC-1 ``XO`` change order, ORC-3 accession, ORC-7 TQ with
     the priority in component 6), OBR (OBR-18 accession, OBR-27 the same TQ), ZDS
     (Study Instance UID, as IHE Scheduled Workflow does);
   - ``OMI^O23``: PID, ORC (``XO``), TQ1 (TQ1-9 priority), OBR, IPC (IPC-1 accession,
     IPC-3 Study Instance UID, IPC-5 modality CT).
   Priority codes: HL7 table 0485 via db.priority (HIGH ``S``, MEDIUM ``A``, LOW ``R``).
2. ``ORU^R01``: PID, ORC (``RE``), OBR (result status ``P``: unverified AI output), OBX:
   Study Instance UID, category (CWE), % involved total / right / left (NM, UCUM ``%``),
   lung and lesion volume (NM, ``mL``), lesion count, routing decision (MosMedData
   Table 2), the change since the patient's prior study when it was compared (CTT015, one
   line from worker.followup.priors), worklist priority (HL70485), algorithm name and version,
   status and reason when not scored, and "NOT FOR DIAGNOSTIC USE". Codes are those of the SR (99CTTRIAGE, SCT).

Sending (:func:`send_messages`): one TCP connection, each message framed by MLLP
(python-hl7's framing bytes), then wait up to ``timeout_s`` for the whole ACK block.
A destination marked ``+tls`` (``host:port+tls``) gets the same MLLP stream inside TLS
(:func:`tls_context`: TLS 1.2 or later, the RIS certificate verified against
``HL7_TLS_CA`` or the system's CAs and its host name checked, our client certificate
``HL7_TLS_CERT`` presented when set); failures are classified as
ct_triage.association.connect_failure classifies a DICOM TLS connect.

================================================  ==========
What happened                                     Outcome
================================================  ==========
ACK MSA-1 AA (or CA)                              accepted: next message
ACK MSA-1 AE / AR (CE / CR)                       permanent, reason = MSA-3 / ERR
TLS certificate of the RIS rejected (untrusted,   permanent ("TLS certificate of
expired, host name mismatch)                      host:port rejected: ...")
connection refused, reset, timeout, no ACK,       transient (retried by the outbox
an unparsable ACK, a failed TLS handshake (also   with the delivery backoff)
our client certificate refused), unreadable
HL7_TLS_* files
================================================  ==========

DICOM text that is multi-valued (``A^B\\C^D``, values separated by ``\\`` as DICOM writes
them, see ct_triage.text.dicom_text) becomes HL7 repetitions (``~``) in PID-3 and PID-5,
each component escaped; a ``\\`` anywhere else is escaped (``\\E\\``), never sent bare.
"""

from __future__ import annotations

import re
import socket
import ssl
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

import hl7
from hl7.client import CR, EB, SB
from sqlalchemy.orm import Session

from ct_triage.settings import Settings, parse_hl7_destination
from db.models import Result
from db.priority import hl7_priority
from worker.followup.priors import comparison_summary
from worker.scoring.result import ROUTING

Outcome = Literal["delivered", "transient", "permanent"]

VERSION = "2.5.1"
SCHEME = "99CTTRIAGE"
SERVICE = ("CTTRIAGE", "COVID-19 CT triage", SCHEME)
NOT_FOR_DIAGNOSTIC_USE = "NOT FOR DIAGNOSTIC USE"
MAX_FIELD = 250  # characters of one sanitised value (ST is 199 in 2.5.1; names, reasons fit)
MAX_ACK_BYTES = 1 << 20  # an ACK larger than this is not an ACK
PRIORITY_NAMES = {"S": "Stat", "A": "ASAP", "R": "Routine"}
CATEGORY_NAMES = {"CT-0": "Not consistent with pneumonia", "CT-1": "Mild", "CT-2": "Moderate",
                  "CT-3": "Severe", "CT-4": "Critical"}
SEX = {"M": "M", "F": "F", "O": "O"}

_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def text(value: object, limit: int = MAX_FIELD) -> str:
    """A value as one line of at most ``limit`` characters: control characters become spaces."""
    if value is None:
        return ""
    return _CONTROL.sub(" ", str(value)).strip()[:limit]


# -- building -------------------------------------------------------------------------------
@dataclass
class Hl7Context:
    """Everything the messages carry, read from the database once."""

    result_id: int
    result_version: int
    status: str
    reason: str | None
    category: str | None
    priority: str
    involvement_percent: float | None
    involvement_percent_left: float | None
    involvement_percent_right: float | None
    lung_volume_ml: float | None
    lesion_volume_ml: float | None
    lesion_count: int | None
    model: str | None
    model_version: str | None
    scored_at: datetime
    study_instance_uid: str
    accession_number: str
    study_date: str | None
    patient_id: str
    issuer_of_patient_id: str
    patient_name: str | None
    patient_birth_date: str | None
    patient_sex: str | None
    order_message: str = "ORM^O01"
    sending_application: str = "CTTRIAGE"
    sending_facility: str = ""
    receiving_application: str = ""
    receiving_facility: str = ""
    change_since_prior: str | None = None  # one line from worker.followup.priors (issue 12), when compared

    @classmethod
    def from_result(cls, session: Session, result: Result, settings: Settings) -> Hl7Context:
        study = result.study
        patient = study.patient
        summary = comparison_summary(session, result.id)
        return cls(
            result_id=result.id, result_version=result.version, status=result.status, reason=result.reason,
            category=result.category, priority=result.priority, involvement_percent=result.involvement_percent,
            involvement_percent_left=result.involvement_percent_left,
            involvement_percent_right=result.involvement_percent_right, lung_volume_ml=result.lung_volume_ml,
            lesion_volume_ml=result.lesion_volume_ml, lesion_count=result.lesion_count, model=result.model,
            model_version=result.model_version, scored_at=result.scored_at or result.created_at,
            study_instance_uid=study.study_instance_uid, accession_number=study.accession_number or "",
            study_date=study.study_date, patient_id=patient.patient_id or "",
            issuer_of_patient_id=patient.issuer_of_patient_id or "", patient_name=patient.patient_name,
            patient_birth_date=patient.patient_birth_date, patient_sex=patient.patient_sex,
            order_message=settings.hl7_order_message, sending_application=settings.hl7_sending_application,
            sending_facility=settings.hl7_sending_facility,
            receiving_application=settings.hl7_receiving_application,
            receiving_facility=settings.hl7_receiving_facility,
            change_since_prior=(summary or {}).get("text"))


class _Builder:
    """Segments as python-hl7 containers; every string value is sanitised and escaped."""

    def __init__(self) -> None:
        self.message = hl7.Message(sequence=[])

    def escape(self, value: object, limit: int = MAX_FIELD) -> str:
        # python-hl7's escape turns non-ASCII into \X..\ codes of the code point; keep UTF-8
        # text as is (MSH-18) and escape the delimiters of the ASCII runs only.
        clean = text(value, limit)
        return "".join(self.message.escape(part) if part.isascii() else part
                       for part in re.split(r"([^\x00-\x7f]+)", clean) if part)

    def field(self, value) -> hl7.Field:
        """``value``: None/str (one value), a tuple of components (each str or None), or a
        list of such tuples (repetitions, ``~``)."""
        if isinstance(value, list):
            return self.message.create_field([self.message.create_repetition(
                [self.escape(c) for c in repetition]) for repetition in value])
        if isinstance(value, tuple):
            return self.message.create_field([self.message.create_repetition(
                [self.escape(c) for c in value])])
        return self.message.create_field([self.escape(value)])

    def segment(self, name: str, *fields) -> None:
        seq = [self.message.create_field([name])] + [self.field(f) for f in fields]
        self.message.append(self.message.create_segment(seq))

    def msh(self, ctx: Hl7Context, message_type: str, control_id: str) -> None:
        code, event = message_type.split("^")
        structure = f"{code}_{event}"
        m = self.message
        fields = [m.create_field(["MSH"]), m.create_field(["|"]), m.create_field(["^~\\&"])]
        fields += [self.field(v) for v in (
            ctx.sending_application, ctx.sending_facility, ctx.receiving_application, ctx.receiving_facility,
            _ts(ctx.scored_at), None, (code, event, structure), control_id, "P", VERSION,
            None, None, None, None, None, "UNICODE UTF-8")]
        m.append(m.create_segment(fields))


def _ts(value: datetime) -> str:
    return value.astimezone(UTC).strftime("%Y%m%d%H%M%S+0000")


def _num(value: float | None) -> str:
    return "" if value is None else f"{value:.1f}"


def dicom_values(value: str | None) -> list[str]:
    """The values of a DICOM string as stored (``\\``-separated, ct_triage.text.dicom_text); [""] when empty."""
    return (value or "").split("\\")


def _xpn(name: str) -> tuple:
    # DICOM PN: family^given^middle^prefix^suffix (alphabetic group); HL7 XPN: family^given^middle^suffix^prefix
    parts = name.split("=")[0].split("^") + [""] * 5
    family, given, middle, prefix, suffix = parts[:5]
    return _trimmed((family, given, middle, suffix, prefix))


def _trimmed(components: tuple) -> tuple:
    """Without trailing empty components (HL7 lets them go): ``A^B``, not ``A^B^^^``."""
    end = len(components)
    while end > 1 and not components[end - 1]:
        end -= 1
    return components[:end]


def _pid(b: _Builder, ctx: Hl7Context) -> None:
    # A multi-valued Patient ID / Patient Name (DICOM's "\\") is sent as HL7 repetitions ("~").
    issuer = ctx.issuer_of_patient_id or None
    b.segment("PID", "1", None, [_trimmed((pid, None, None, issuer)) for pid in dicom_values(ctx.patient_id)], None,
              [_xpn(name) for name in dicom_values(ctx.patient_name)], None, ctx.patient_birth_date,
              SEX.get((ctx.patient_sex or "").strip().upper(), "U"))


def _priority_tq(code: str) -> tuple:
    return (None, None, None, None, None, code)  # TQ component 6: priority


def order_update(ctx: Hl7Context) -> hl7.Message:
    """ORM^O01 (ORC-7) or OMI^O23 (TQ1-9) carrying the study's worklist priority."""
    if not ctx.accession_number:
        raise ValueError("the study has no Accession Number: the RIS cannot match an order update")
    code = hl7_priority(ctx.priority)
    b = _Builder()
    b.msh(ctx, ctx.order_message, f"CTT{ctx.result_id}O")
    _pid(b, ctx)
    acc = ctx.accession_number
    when = _ts(ctx.scored_at)
    if ctx.order_message == "OMI^O23":
        b.segment("ORC", "XO", None, acc, None, "SC", None, None, None, when)
        b.segment("TQ1", "1", None, None, None, None, None, None, None, (code, PRIORITY_NAMES[code], "HL70485"))
        b.segment("OBR", "1", None, acc, SERVICE, *([None] * 13), acc)
        b.segment("IPC", (acc,), (acc,), (ctx.study_instance_uid,), (acc,), "CT")
    else:
        b.segment("ORC", "XO", None, acc, None, "SC", None, _priority_tq(code), None, when)
        b.segment("OBR", "1", None, acc, SERVICE, *([None] * 13), acc, *([None] * 8), _priority_tq(code))
        b.segment("ZDS", (ctx.study_instance_uid, ctx.sending_application, "Application", "DICOM"))
    return b.message


def observation_result(ctx: Hl7Context) -> hl7.Message:
    """ORU^R01 with the result in OBX segments."""
    code = hl7_priority(ctx.priority)
    b = _Builder()
    b.msh(ctx, "ORU^R01", f"CTT{ctx.result_id}R")
    _pid(b, ctx)
    acc = ctx.accession_number
    when = _ts(ctx.scored_at)
    b.segment("ORC", "RE", None, acc)
    b.segment("OBR", "1", None, acc, SERVICE, None, None, when, *([None] * 10), acc,
              None, None, None, when, None, "CT", "P")
    obx: list[tuple] = [("ST", ("110180", "Study Instance UID", "DCM"), ctx.study_instance_uid, None)]
    if ctx.status == "scored":
        obx += [
            ("CWE", ("CTT002", "COVID-19 CT severity category", SCHEME),
             (ctx.category, CATEGORY_NAMES.get(ctx.category or "", ""), SCHEME), None),
            ("NM", ("CTT001", "Lung volume involved, both lungs", SCHEME), _num(ctx.involvement_percent),
             ("%", "percent", "UCUM")),
            ("NM", ("CTT001R", "Lung volume involved, right lung", SCHEME), _num(ctx.involvement_percent_right),
             ("%", "percent", "UCUM")),
            ("NM", ("CTT001L", "Lung volume involved, left lung", SCHEME), _num(ctx.involvement_percent_left),
             ("%", "percent", "UCUM")),
            ("NM", ("39607008", "Lung volume", "SCT"), _num(ctx.lung_volume_ml), ("mL", "milliliter", "UCUM")),
            ("NM", ("52988006", "Lesion volume", "SCT"), _num(ctx.lesion_volume_ml), ("mL", "milliliter", "UCUM")),
            ("NM", ("CTT007", "Lesion count", SCHEME), "" if ctx.lesion_count is None else str(ctx.lesion_count),
             None),
            ("ST", ("CTT005", "Routing decision (MosMedData Table 2)", SCHEME), ROUTING.get(ctx.category or "", ""),
             None),
        ]
        if ctx.change_since_prior:
            obx.append(("ST", ("CTT015", "Change since prior", SCHEME), ctx.change_since_prior, None))
    else:
        obx += [("CWE", ("CTT003", "AI triage status", SCHEME), (ctx.status.upper().replace("_", "-"),
                 ctx.status.replace("_", " "), SCHEME), None),
                ("ST", ("CTT006", "Reason not scored", SCHEME), ctx.reason or "no reason given", None)]
    obx += [
        ("CWE", ("CTT004", "Worklist priority", SCHEME), (code, PRIORITY_NAMES[code], "HL70485"), None),
        ("ST", ("CTT008", "Algorithm", SCHEME), f"{ctx.model or '-'} {ctx.model_version or ''}".strip(), None),
        ("ST", ("CTT009", "Disclaimer", SCHEME), NOT_FOR_DIAGNOSTIC_USE, None),
    ]
    for i, (vtype, ident, value, units) in enumerate(obx, start=1):
        b.segment("OBX", str(i), vtype, ident, None, value, units, None, None, None, None, "P", None, None, when)
    return b.message


def build_messages(ctx: Hl7Context) -> list[hl7.Message]:
    """[order update, ORU^R01]; ValueError (naming what is missing) when the order cannot be keyed."""
    return [order_update(ctx), observation_result(ctx)]


# -- sending --------------------------------------------------------------------------------
@dataclass
class Hl7Report:
    outcome: Outcome
    accepted: int  # messages acknowledged AA before the outcome
    reason: str | None = None


def _read_block(sock: socket.socket) -> bytes:
    data = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("connection closed before the ACK")
        data += chunk
        end = data.find(EB + CR)
        if end >= 0:
            start = data.find(SB)
            return data[start + 1:end] if start >= 0 else data[:end]
        if len(data) > MAX_ACK_BYTES:
            raise ValueError("no ACK within 1 MiB of data")


def _ack_outcome(raw: bytes, control_id: str) -> tuple[Outcome, str | None]:
    try:
        ack = hl7.parse(raw.decode("utf-8", errors="replace"))
        msa = ack.segment("MSA")
    except Exception as exc:  # any unparsable answer is a transient fault
        return "transient", f"unparsable ACK: {text(exc, 120)}"
    code = str(msa(1)).strip().upper()
    if code in ("AA", "CA"):
        return "delivered", None
    detail = text(ack.unescape(str(msa(3))) if len(msa) > 3 else "", 200)
    try:
        err = ack.segment("ERR")
        detail = detail or text(ack.unescape(str(err)), 200)
    except KeyError:
        pass
    return "permanent", f"RIS answered {code or '?'} to {control_id}: {detail or 'no reason given'}"


def tls_context(ca: Path | str | None = None, cert: Path | str | None = None,
                key: Path | str | None = None) -> ssl.SSLContext:
    """Client context for MLLP over TLS: TLS 1.2 or later, the peer's certificate verified
    against ``ca`` (None: the system's CAs) and its host name checked; ``cert``/``key``
    presented when the RIS asks for a client certificate."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca) if ca else None)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if cert:
        context.load_cert_chain(str(cert), str(key) if key else None)
    return context


def settings_tls_context(settings: Settings | None) -> ssl.SSLContext:
    """:func:`tls_context` of ``HL7_TLS_CA``, ``HL7_TLS_CERT`` and ``HL7_TLS_KEY``."""
    if settings is None:
        return tls_context()
    return tls_context(settings.hl7_tls_ca, settings.hl7_tls_cert, settings.hl7_tls_key)


def send_messages(destination: str, messages: list[hl7.Message], timeout_s: float = 30.0, *,
                  settings: Settings | None = None, context: ssl.SSLContext | None = None) -> Hl7Report:
    """Send ``messages`` in order on one MLLP connection; never raises for peer problems.

    A ``+tls`` destination is reached through ``context``, else the one the ``HL7_TLS_*``
    settings make (:func:`settings_tls_context`; no settings: the system's CAs).
    """
    target = parse_hl7_destination(destination)
    where = f"{target.host}:{target.port}"
    accepted = 0
    if not messages:
        return Hl7Report("delivered", 0)
    if target.tls and context is None:
        try:
            context = settings_tls_context(settings)
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError: a bad PEM, a key not matching
            return Hl7Report("transient", 0, f"HL7 TLS settings unusable for {target}: {text(exc, 200)}")
    try:
        with socket.create_connection((target.host, target.port), timeout=timeout_s) as raw:
            raw.settimeout(timeout_s)
            sock: socket.socket = raw
            if target.tls:
                assert context is not None
                wrapped = _tls_handshake(raw, context, target.host, where, timeout_s)
                if isinstance(wrapped, Hl7Report):
                    return wrapped
                sock = wrapped
            with sock:
                for message in messages:
                    control_id = str(message.segment("MSH")(10))
                    sock.sendall(SB + str(message).encode("utf-8") + EB + CR)
                    outcome, reason = _ack_outcome(_read_block(sock), control_id)
                    if outcome != "delivered":
                        return Hl7Report(outcome, accepted, reason)
                    accepted += 1
    except TimeoutError:
        return Hl7Report("transient", accepted, f"no ACK from {target} within {timeout_s:g} s")
    except ssl.SSLError as exc:  # after the handshake: e.g. TLS 1.3 tells a refused client certificate here
        return Hl7Report("transient", accepted, f"{target}: TLS: {text(exc, 200)}")
    except (ConnectionError, OSError, ValueError) as exc:
        return Hl7Report("transient", accepted, f"{target}: {text(exc, 200)}")
    return Hl7Report("delivered", accepted)


def _tls_handshake(raw: socket.socket, context: ssl.SSLContext, host: str, where: str,
                   timeout_s: float) -> ssl.SSLSocket | Hl7Report:
    """The TLS connection over ``raw``, or the report of a failed handshake (nothing accepted).

    A rejected server certificate is permanent (retrying will not change it); the rest is transient.
    """
    try:
        return context.wrap_socket(raw, server_hostname=host)
    except ssl.SSLCertVerificationError as exc:
        return Hl7Report("permanent", 0, f"TLS certificate of {where} rejected: "
                                         f"{text(exc.verify_message or exc, 200)}")
    except TimeoutError:
        return Hl7Report("transient", 0, f"TLS handshake with {where} timed out after {timeout_s:g} s")
    except (ssl.SSLError, OSError) as exc:
        return Hl7Report("transient", 0, f"TLS handshake with {where} failed: {text(exc, 200)}")
