"""Typed DICOM audit messages (PS3.15 A.5) and their XML.

What
    :class:`AuditMessage` and its parts (:class:`Code`, :class:`ActiveParticipant`,
    :class:`ParticipantObject`, :class:`SopClassCount`) are frozen dataclasses whose
    constructors check their arguments and raise :class:`AuditEventError` naming the bad
    one; :meth:`AuditMessage.to_xml` renders the message as one line of XML following the
    DICOM Audit Message Schema (``schema/audit-message.rnc``, PS3.15 A.5.1; the tests
    validate every kind against it); :meth:`AuditMessage.to_record` is the row
    ``db.audit.record_audit`` stores.

Why one line, why sanitised
    Syslog receivers escape or split on line ends, so the XML has no newline at all
    (attribute values escape theirs as ``&#10;``). Text that came from a peer (AE titles,
    patient names, accession numbers, error messages) goes through
    :func:`ct_triage.text.clean` (control characters escaped, length capped) and loses the
    few characters XML 1.0 cannot carry (lone surrogates, U+FFFE/U+FFFF) before it
    reaches the XML; binary values (a query's data set) are base64 as the schema wants.

Thresholds
    - text attributes: at most 200 characters (:data:`TEXT_LIMIT`); an outcome
      description 1,000 (:data:`DESCRIPTION_LIMIT`); UIDs 64 (checked, not cut);
    - a message over :data:`MAX_XML_BYTES` (32,768 octets, the size every PS3.15 A.6
      repository must accept) loses its per-instance UID lists (the per-SOP-class counts
      stay); a query data set over :data:`MAX_QUERY_BYTES` (8,192 octets) is cut to it.
"""

from __future__ import annotations

import base64
import ipaddress
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from datetime import UTC, datetime

from ct_triage.text import clean
from db.audit import AuditRecord

TEXT_LIMIT = 200
DESCRIPTION_LIMIT = 1000
MAX_XML_BYTES = 32768
MAX_QUERY_BYTES = 8192

ACTIONS = ("C", "R", "U", "D", "E")
OUTCOMES = (0, 4, 8, 12)  # success, minor, serious, major failure
OBJECT_TYPES = ("1", "2", "3", "4")  # person, system object, organization, other
OBJECT_ROLES = tuple(str(n) for n in range(1, 27))
LIFE_CYCLES = tuple(str(n) for n in range(1, 16))
SOURCE_TYPES = tuple(str(n) for n in range(1, 10))

_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_XML_ILLEGAL = re.compile("[\ud800-\udfff\ufffe\uffff]")


class AuditEventError(ValueError):
    """A bad argument to an audit message: the message names it."""


def text(value: object, limit: int = TEXT_LIMIT) -> str:
    """Peer text made safe for the XML: :func:`clean`, then no character XML 1.0 forbids."""
    return _XML_ILLEGAL.sub("?", clean(value, limit, none=""))


def _need(name: str, value: object) -> None:
    if value is None or (isinstance(value, str) and not value.strip()):
        raise AuditEventError(f"{name} is required, got {value!r}")


def check_uid(name: str, value: object) -> str:
    if not isinstance(value, str) or len(value) > 64 or not _UID.match(value):
        raise AuditEventError(f"{name} is not a DICOM UID: {clean(value, 80)!r}")
    return value


def _one_of(name: str, value: object, allowed: tuple) -> None:
    if value not in allowed:
        raise AuditEventError(f"{name} must be one of {', '.join(map(str, allowed))}; got {clean(value, 40)!r}")


@dataclass(frozen=True)
class Code:
    """A coded value: csd-code, codeSystemName (DCM, RFC-3881 ...), originalText (code meaning)."""

    code: str
    system: str
    meaning: str

    def __post_init__(self) -> None:
        _need("code", self.code)
        _need("system", self.system)
        _need("meaning", self.meaning)

    def attributes(self) -> dict[str, str]:
        return {"csd-code": text(self.code), "codeSystemName": text(self.system), "originalText": text(self.meaning)}


@dataclass(frozen=True)
class ActiveParticipant:
    """An ActiveParticipant: a process or person taking part (UserID is mandatory)."""

    user_id: str
    requestor: bool
    roles: tuple[Code, ...] = ()
    alternative_user_id: str | None = None
    user_name: str | None = None
    address: str | None = None  # NetworkAccessPointID: an IP address or a host name

    def __post_init__(self) -> None:
        _need("user_id", self.user_id)
        if not isinstance(self.requestor, bool):
            raise AuditEventError(f"requestor must be True or False, got {self.requestor!r}")

    @property
    def address_type(self) -> str:
        """NetworkAccessPointTypeCode: 2 for an IP address, 1 for a machine name."""
        try:
            ipaddress.ip_address(str(self.address).strip("[]"))
            return "2"
        except ValueError:
            return "1"


@dataclass(frozen=True)
class SopClassCount:
    """One SOPClass of a study object: how many instances (and optionally which)."""

    uid: str
    count: int
    instances: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        check_uid("sop_class_uid", self.uid)
        if not isinstance(self.count, int) or self.count < 0:
            raise AuditEventError(f"count of {self.uid} must be an integer >= 0, got {self.count!r}")
        for uid in self.instances:
            check_uid("instance UID", uid)


@dataclass(frozen=True)
class ParticipantObject:
    """A ParticipantObjectIdentification: a patient, a study, a query, a workitem ...

    The schema wants either a name or a query (base64), never both and never neither.
    ``details`` are (type, value) pairs; values are base64-encoded when rendered.
    """

    object_id: str
    id_type: Code
    type_code: str | None = None
    role: str | None = None
    name: str | None = None
    query: bytes | None = None
    details: tuple[tuple[str, bytes], ...] = ()
    accession: str | None = None
    sop_classes: tuple[SopClassCount, ...] = ()
    life_cycle: str | None = None

    def __post_init__(self) -> None:
        _need("object_id", self.object_id)
        if not isinstance(self.id_type, Code):
            raise AuditEventError(f"id_type must be a Code, got {self.id_type!r}")
        if self.type_code is not None:
            _one_of("type_code", self.type_code, OBJECT_TYPES)
        if self.role is not None:
            _one_of("role", self.role, OBJECT_ROLES)
        if self.life_cycle is not None:
            _one_of("life_cycle", self.life_cycle, LIFE_CYCLES)
        if (self.name is None) == (self.query is None):
            raise AuditEventError("a participant object needs exactly one of name and query")
        if self.name is not None:
            _need("name", self.name)
        if self.query is not None and not isinstance(self.query, (bytes, bytearray)):
            raise AuditEventError(f"query must be bytes, got {type(self.query).__name__}")
        for key, value in self.details:
            _need("detail type", key)
            if not isinstance(value, (bytes, bytearray)):
                raise AuditEventError(f"detail {key!r} must be bytes, got {type(value).__name__}")

    @property
    def has_description(self) -> bool:
        return bool(self.accession or self.sop_classes)

    def summary(self) -> dict[str, str]:
        """What the row's participants_json keeps of this object."""
        out = {"type": self.id_type.meaning, "id": text(self.object_id)}
        if self.name is not None:
            out["name"] = text(self.name)
        return out


@dataclass(frozen=True)
class AuditMessage:
    """One audit message (PS3.15 A.5.1): the event, its active participants, the audit
    source (us) and the participant objects. ``kind`` names the builder that made it
    (``db.models.AuditEvent.kind``)."""

    kind: str
    event_id: Code
    outcome: int
    event_time: datetime
    participants: tuple[ActiveParticipant, ...]
    source_id: str
    action: str | None = None
    event_types: tuple[Code, ...] = ()
    outcome_description: str | None = None
    objects: tuple[ParticipantObject, ...] = ()
    site_id: str | None = None
    source_types: tuple[str, ...] = ("4",)  # application server process

    def __post_init__(self) -> None:
        _need("kind", self.kind)
        if not isinstance(self.event_id, Code):
            raise AuditEventError(f"event_id must be a Code, got {self.event_id!r}")
        _one_of("outcome", self.outcome, OUTCOMES)
        if self.action is not None:
            _one_of("action", self.action, ACTIONS)
        if not isinstance(self.event_time, datetime) or self.event_time.tzinfo is None:
            raise AuditEventError(f"event_time must be a timezone-aware datetime, got {self.event_time!r}")
        if not self.participants:
            raise AuditEventError("participants: an audit message needs at least one active participant")
        _need("source_id", self.source_id)
        for code in self.source_types:
            _one_of("source_types", code, SOURCE_TYPES)

    # -- rendering -----------------------------------------------------------------
    def element(self, *, instance_lists: bool = True) -> ET.Element:
        root = ET.Element("AuditMessage")
        event_attrs: dict[str, str] = {}
        if self.action:
            event_attrs["EventActionCode"] = self.action
        event_attrs["EventDateTime"] = xml_datetime(self.event_time)
        event_attrs["EventOutcomeIndicator"] = str(self.outcome)
        event = ET.SubElement(root, "EventIdentification", event_attrs)
        ET.SubElement(event, "EventID", self.event_id.attributes())
        for event_type in self.event_types:
            ET.SubElement(event, "EventTypeCode", event_type.attributes())
        if self.outcome_description:
            ET.SubElement(event, "EventOutcomeDescription").text = text(self.outcome_description, DESCRIPTION_LIMIT)
        for participant in self.participants:
            _participant_element(root, participant)
        source_attrs: dict[str, str] = {}
        if self.site_id:
            source_attrs["AuditEnterpriseSiteID"] = text(self.site_id)
        source_attrs["AuditSourceID"] = text(self.source_id)
        source = ET.SubElement(root, "AuditSourceIdentification", source_attrs)
        for source_type in self.source_types:
            ET.SubElement(source, "AuditSourceTypeCode", {"csd-code": source_type})
        for obj in self.objects:
            _object_element(root, obj, instance_lists)
        return root

    def to_xml(self) -> str:
        """The message as one line of XML (no declaration), at most :data:`MAX_XML_BYTES`
        octets when its per-instance lists are what made it larger."""
        rendered = _serialise(self.element())
        if len(rendered.encode()) > MAX_XML_BYTES:
            rendered = _serialise(self.element(instance_lists=False))
        return rendered

    # -- storing -------------------------------------------------------------------
    @property
    def requestor(self) -> ActiveParticipant:
        return next((p for p in self.participants if p.requestor), self.participants[0])

    def to_record(self) -> AuditRecord:
        requestor = self.requestor
        return AuditRecord(
            kind=self.kind, event_id=self.event_id.code, outcome=self.outcome, event_at=self.event_time,
            message_xml=self.to_xml(), event_type=self.event_types[0].code if self.event_types else None,
            action=self.action, user_id=text(requestor.user_id, 128),
            source_address=text(requestor.address, 64) if requestor.address else None,
            participants=[obj.summary() for obj in self.objects])


def _participant_element(root: ET.Element, participant: ActiveParticipant) -> None:
    attrs = {"UserID": text(participant.user_id)}
    if participant.alternative_user_id:
        attrs["AlternativeUserID"] = text(participant.alternative_user_id)
    if participant.user_name:
        attrs["UserName"] = text(participant.user_name)
    attrs["UserIsRequestor"] = "true" if participant.requestor else "false"
    if participant.address:
        attrs["NetworkAccessPointID"] = text(participant.address, 64)
        attrs["NetworkAccessPointTypeCode"] = participant.address_type
    active = ET.SubElement(root, "ActiveParticipant", attrs)
    for role in participant.roles:
        ET.SubElement(active, "RoleIDCode", role.attributes())


def _object_element(root: ET.Element, obj: ParticipantObject, instance_lists: bool) -> None:
    attrs = {"ParticipantObjectID": text(obj.object_id)}
    if obj.type_code:
        attrs["ParticipantObjectTypeCode"] = obj.type_code
    if obj.role:
        attrs["ParticipantObjectTypeCodeRole"] = obj.role
    if obj.life_cycle:
        attrs["ParticipantObjectDataLifeCycle"] = obj.life_cycle
    node = ET.SubElement(root, "ParticipantObjectIdentification", attrs)
    ET.SubElement(node, "ParticipantObjectIDTypeCode", obj.id_type.attributes())
    if obj.name is not None:
        ET.SubElement(node, "ParticipantObjectName").text = text(obj.name)
    else:
        ET.SubElement(node, "ParticipantObjectQuery").text = _b64(bytes(obj.query or b"")[:MAX_QUERY_BYTES])
    for key, value in obj.details:
        ET.SubElement(node, "ParticipantObjectDetail", {"type": text(key), "value": _b64(bytes(value))})
    if obj.has_description:
        _object_description(node, obj, instance_lists)


def _object_description(node: ET.Element, obj: ParticipantObject, instance_lists: bool) -> None:
    description = ET.SubElement(node, "ParticipantObjectDescription")
    if obj.accession:
        ET.SubElement(description, "Accession", {"Number": text(obj.accession, 64)})
    for sop_class in obj.sop_classes:
        sop = ET.SubElement(description, "SOPClass", {"UID": sop_class.uid, "NumberOfInstances": str(sop_class.count)})
        if instance_lists:
            for uid in sop_class.instances:
                ET.SubElement(sop, "Instance", {"UID": uid})


def xml_datetime(when: datetime) -> str:
    """xsd:dateTime in UTC with milliseconds: 2026-12-02T10:00:00.123Z."""
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _b64(value: bytes) -> str:
    return base64.b64encode(value).decode("ascii")


def _serialise(root: ET.Element) -> str:
    # ElementTree escapes \n, \r and \t in attribute values; element text has none (clean() escaped them).
    return ET.tostring(root, encoding="unicode", short_empty_elements=True)
