"""Who may do what on the node: roles by called AE title, allowlists bound to addresses, TLS subjects.

One port, two AE titles, each a role with its own allowlist (dcm4chee-arc serves its
worklist on an AE title of its own for the same reason):

========================  ==============================================  =============================
called AE title           presentation contexts offered                   who is admitted
========================  ==============================================  =============================
``AE_TITLE`` (CTTRIAGE)   every storage SOP class, Storage Commitment      ``ALLOWED_CALLING_AES``;
                          Push, Verification                              empty: any caller (warned)
``WORKLIST_AE_TITLE``     UPS Pull, Watch, Query, Push; Verification       readers ``WORKLIST_AES``
(CTTRIAGE_WL)                                                             (empty: 127.0.0.1 and ::1
                                                                          only) and admins
                                                                          ``WORKLIST_ADMIN_AES``
                                                                          (empty: nobody)
any other title           with ``ACCEPT_ANY_CALLED_AE``: the store role;  as for AE_TITLE
                          else refused (called AE title not recognized)
========================  ==============================================  =============================

An association gets exactly the contexts of its role: they are narrowed in the
A-ASSOCIATE-RQ handler, before pynetdicom negotiates, so a scanner cannot ask for the
worklist and a worklist client cannot store. The operation rules inside the worklist
(PS3.4 Annex CC: who may claim, cancel, update, subscribe) are in :mod:`dicom_node.ups`,
reading the role kept on the association (:func:`role_of`).

Allowlist entries are ``AET`` (any address: any host can present that title, so the node
warns at start), ``AET@address`` or ``AET@network/prefix`` (``RIS@10.1.0.0/16``). With TLS
client certificates (``TLS_CA``) and ``TLS_CERT_AE_TITLE``, the certificate's subject CN
or one of its subject alternative names must equal the calling AE title.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from ipaddress import ip_network

from ct_triage.settings import AllowedCaller, Settings, is_loopback, parse_allowed_caller

log = logging.getLogger("ct_triage.node.access")

UPS_PUSH = "1.2.840.10008.5.1.4.34.6.1"
UPS_WATCH = "1.2.840.10008.5.1.4.34.6.2"
UPS_PULL = "1.2.840.10008.5.1.4.34.6.3"
UPS_EVENT = "1.2.840.10008.5.1.4.34.6.4"
UPS_QUERY = "1.2.840.10008.5.1.4.34.6.5"
UPS_SOP_CLASSES = (UPS_PUSH, UPS_WATCH, UPS_PULL, UPS_EVENT, UPS_QUERY)
VERIFICATION = "1.2.840.10008.1.1"
# With WORKLIST_AES empty, the worklist answers these callers only (not the rest of 127/8:
# another address there is another host as far as the node can tell).
DEFAULT_READER_NETWORKS = (ip_network("127.0.0.1/32"), ip_network("::1/128"))


class Role(str, enum.Enum):
    SENDER = "sender"  # stores, requests storage commitment
    READER = "reader"  # queries, reads, claims; its own subscriptions
    ADMIN = "admin"  # also cancels and updates SCHEDULED items, others' subscriptions


class Refusal(str, enum.Enum):
    CALLED_AE_UNKNOWN = "called"  # A-ASSOCIATE-RJ permanent, reason 7
    CALLING_AE_UNKNOWN = "calling"  # A-ASSOCIATE-RJ permanent, reason 3


@dataclass(frozen=True)
class Decision:
    role: Role | None
    refusal: Refusal | None = None
    why: str = ""


def _matches_any(rules: Iterable[AllowedCaller], calling: str, address: str | None) -> bool:
    return any(rule.matches(calling, address) for rule in rules)


def _default_reader(calling: str, address: str | None) -> bool:
    return any(AllowedCaller(calling, network).matches(calling, address) for network in DEFAULT_READER_NETWORKS)


def certificate_names(cert: dict | None) -> set[str]:
    """Subject CN and subject alternative names (any type) of a peer certificate as
    ``ssl.SSLSocket.getpeercert()`` gives it."""
    if not cert:
        return set()
    names = {value for rdn in cert.get("subject", ()) for key, value in rdn if key == "commonName"}
    names |= {value for _, value in cert.get("subjectAltName", ())}
    return {name.strip() for name in names if isinstance(name, str)}


class AccessPolicy:
    """The roles of callers, from the settings; one per node, shared by its handlers."""

    def __init__(self, settings: Settings):
        self.store_title = settings.ae_title
        self.worklist_title = settings.worklist_ae_title
        self.accept_any_called = settings.accept_any_called_ae
        self.senders = [parse_allowed_caller(e, "ALLOWED_CALLING_AES") for e in settings.allowed_calling_aes]
        self.readers = [parse_allowed_caller(e, "WORKLIST_AES") for e in settings.worklist_aes]
        self.admins = [parse_allowed_caller(e, "WORKLIST_ADMIN_AES") for e in settings.worklist_admin_aes]
        self.cert_must_name_caller = settings.tls_cert_ae_title
        self.bind_address = settings.bind_address

    def warnings(self) -> list[str]:
        """What a reviewer should know at start (logged once; ``ct-triage status`` shows them too)."""
        out = []
        if not self.senders and not is_loopback(self.bind_address):
            out.append(f"CT_TRIAGE_ALLOWED_CALLING_AES is empty and the node listens on {self.bind_address}: "
                       "any host may store to it")
        for setting, rules in (("ALLOWED_CALLING_AES", self.senders), ("WORKLIST_AES", self.readers),
                               ("WORKLIST_ADMIN_AES", self.admins)):
            bare = sorted({rule.ae_title for rule in rules if rule.network is None})
            if bare:
                out.append(f"CT_TRIAGE_{setting} names {', '.join(bare)} without an address: any host "
                           "presenting that AE title is admitted (bind it as AET@address or AET@network/prefix)")
        return out

    def decide(self, called: str, calling: str, address: str | None, peer_cert: dict | None = None) -> Decision:
        """The role of an association request, or why it is refused."""
        if called == self.worklist_title:
            reader = (_matches_any(self.readers, calling, address) if self.readers
                      else _default_reader(calling, address))
            if _matches_any(self.admins, calling, address):
                role = Role.ADMIN
            elif reader:
                role = Role.READER
            else:
                why = ("not in CT_TRIAGE_WORKLIST_AES or WORKLIST_ADMIN_AES" if self.readers
                       else "CT_TRIAGE_WORKLIST_AES is empty: the worklist answers 127.0.0.1 and ::1 only")
                return Decision(None, Refusal.CALLING_AE_UNKNOWN, f"worklist caller {why}")
        elif called == self.store_title or self.accept_any_called:
            if self.senders and not _matches_any(self.senders, calling, address):
                return Decision(None, Refusal.CALLING_AE_UNKNOWN, "calling AE title not allowed to store "
                                "(CT_TRIAGE_ALLOWED_CALLING_AES)")
            role = Role.SENDER
        else:
            return Decision(None, Refusal.CALLED_AE_UNKNOWN,
                            f"called AE title is neither {self.store_title} nor {self.worklist_title} "
                            "(CT_TRIAGE_ACCEPT_ANY_CALLED_AE is off)")
        if self.cert_must_name_caller and peer_cert is not None and calling not in certificate_names(peer_cert):
            return Decision(None, Refusal.CALLING_AE_UNKNOWN,
                            "the client certificate names neither in its CN nor its subject alternative names "
                            "the calling AE title (CT_TRIAGE_TLS_CERT_AE_TITLE)")
        return Decision(role)


def offered_to(role: Role, abstract_syntax: str) -> bool:
    """Whether an association of ``role`` may use ``abstract_syntax``."""
    if abstract_syntax == VERIFICATION:
        return True
    if role is Role.SENDER:
        return abstract_syntax not in UPS_SOP_CLASSES
    return abstract_syntax in UPS_SOP_CLASSES


def narrow_contexts(assoc, role: Role) -> None:
    """Keep only the acceptor's presentation contexts of ``role`` (before negotiation)."""
    assoc.acceptor.supported_contexts = [cx for cx in assoc.acceptor.supported_contexts
                                         if offered_to(role, str(cx.abstract_syntax))]


def peer_certificate(assoc) -> dict | None:
    """The TLS client certificate of an association, or None (no TLS, no certificate)."""
    sock = getattr(getattr(getattr(assoc, "dul", None), "socket", None), "socket", None)
    getpeercert = getattr(sock, "getpeercert", None)
    if getpeercert is None:
        return None
    try:
        return getpeercert() or None
    except (ValueError, OSError):
        return None


def role_of(assoc) -> Role | None:
    """The role given to an association at A-ASSOCIATE-RQ (None: none, e.g. a test double)."""
    return getattr(assoc, "ct_role", None)
