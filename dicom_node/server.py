"""The pynetdicom AE: contexts, security, handlers bound through ``evt_handlers``."""

from __future__ import annotations

import logging
import ssl
import tempfile
import threading
import time
from typing import Any

from pydicom import config as pydicom_config
from pynetdicom import AE, AllStoragePresentationContexts, _config, evt
from pynetdicom.transport import AssociationServer
from sqlalchemy.orm import Session, sessionmaker

from ct_triage.contract import Publisher
from ct_triage.settings import Settings, parse_destination
from ct_triage.text import clean
from dicom_node import fast_store, status
from dicom_node.access import (
    UPS_PULL,
    UPS_PUSH,
    UPS_QUERY,
    UPS_SOP_CLASSES,
    UPS_WATCH,
    VERIFICATION,
    AccessPolicy,
    Refusal,
    narrow_contexts,
    peer_certificate,
)
from dicom_node.auditing import AuditSender, NodeAudit
from dicom_node.cluster import Cluster
from dicom_node.commitment import STORAGE_COMMITMENT_PUSH_MODEL, CommitmentService
from dicom_node.completeness import CompletenessTracker
from dicom_node.expiry import WorkitemExpiry
from dicom_node.processes import (
    AdoptingAssociationServer,
    BusyStudies,
    NodeRole,
    bind_error,
    claim_tmp_dir,
    release_tmp_dir,
)
from dicom_node.proxy import TrustedProxies
from dicom_node.retention import RetentionSweeper
from dicom_node.shutdown import InFlight, drain
from dicom_node.spool import Spool
from dicom_node.store import StoreService
from dicom_node.transport import (
    BoundedAssociationServer,
    install_bounded_receive,
    peer_of,
    seconds_without_a_whole_pdu,
    tune_association,
)
from dicom_node.ups import UpsNotifier, UpsService

log = logging.getLogger("ct_triage.node")

# Stored as received: we never transcode what a scanner sends.
TRANSFER_SYNTAXES = [
    "1.2.840.10008.1.2",  # Implicit VR Little Endian
    "1.2.840.10008.1.2.1",  # Explicit VR Little Endian
    "1.2.840.10008.1.2.1.99",  # Deflated Explicit VR Little Endian
    "1.2.840.10008.1.2.2",  # Explicit VR Big Endian (retired, still sent by old scanners)
    "1.2.840.10008.1.2.4.50",  # JPEG Baseline
    "1.2.840.10008.1.2.4.51",  # JPEG Extended
    "1.2.840.10008.1.2.4.57",  # JPEG Lossless
    "1.2.840.10008.1.2.4.70",  # JPEG Lossless SV1
    "1.2.840.10008.1.2.4.80",  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.81",  # JPEG-LS Near-lossless
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 Lossless
    "1.2.840.10008.1.2.4.91",  # JPEG 2000
    "1.2.840.10008.1.2.5",  # RLE Lossless
]

# PS3.8 9.3.4: A-ASSOCIATE-RJ result/source/reason
REJECT_PERMANENT, REJECT_TRANSIENT = 0x01, 0x02
SOURCE_SERVICE_USER, SOURCE_PROVIDER_PRESENTATION = 0x01, 0x03
CALLING_AE_NOT_RECOGNIZED, CALLED_AE_NOT_RECOGNIZED, LOCAL_LIMIT_EXCEEDED = 0x03, 0x07, 0x02


# -- thin handlers: never raise, return named statuses ------------------------------
def handle_echo(event) -> int:
    return status.SUCCESS


def handle_store(event, store: StoreService, in_flight: InFlight) -> int:
    try:
        with in_flight.track(event.assoc):
            return store.on_c_store(event)
    except Exception:
        log.exception("unexpected error in C-STORE")
        return status.PROCESSING_FAILURE


def _guarded(what: str, call, *args):
    """``call(*args)`` of a handler that answers (status, dataset): an exception is logged
    and answered with Processing Failure instead of raised."""
    try:
        return call(*args)
    except Exception:
        log.exception("unexpected error in %s", what)
        return status.PROCESSING_FAILURE, None


def _n_action(event, commitment: CommitmentService, ups: UpsService):
    if str(event.request.RequestedSOPClassUID) in UPS_SOP_CLASSES:
        return ups.on_n_action(event)
    return commitment.on_n_action(event)


def handle_n_action(event, commitment: CommitmentService, ups: UpsService):
    """N-ACTION for Storage Commitment or UPS, told apart by the Requested SOP Class."""
    return _guarded("N-ACTION", _n_action, event, commitment, ups)


def handle_c_find(event, ups: UpsService):
    """C-FIND on the UPS information model (the reading worklist)."""
    try:
        yield from ups.on_c_find(event)
    except Exception:
        log.exception("unexpected error in UPS C-FIND")
        yield status.PROCESSING_FAILURE, None


def handle_n_get(event, ups: UpsService):
    return _guarded("UPS N-GET", ups.on_n_get, event)


def handle_n_set(event, ups: UpsService):
    return _guarded("UPS N-SET", ups.on_n_set, event)


def _reject(event, result: int, source: int, reason_code: int, why: str) -> None:
    assoc = event.assoc
    log.warning("association from %s (calling %s, called %s) rejected: %s", peer_of(assoc),
                clean(assoc.requestor.primitive.calling_ae_title, 16),
                clean(assoc.requestor.primitive.called_ae_title, 16), why)
    assoc.acse.send_reject(result, source, reason_code)
    # As pynetdicom's own rejection path does: wait for the DUL to send the A-ASSOCIATE-RJ
    # before the server closes the socket, or the caller only sees a dropped connection.
    assoc.kill()


def handle_requested(event, policy: AccessPolicy, node_audit: NodeAudit) -> None:
    """Admit or reject at A-ASSOCIATE-RQ: the role of the called AE title and its allowlist
    (dicom_node.access), then the association cap. An admitted association keeps its role
    and only the presentation contexts of that role."""
    assoc = event.assoc
    primitive = assoc.requestor.primitive
    calling = primitive.calling_ae_title.strip()
    called = primitive.called_ae_title.strip()
    decision = policy.decide(called, calling, assoc.requestor.address, peer_certificate(assoc))
    if decision.role is None:
        reason = CALLED_AE_NOT_RECOGNIZED if decision.refusal is Refusal.CALLED_AE_UNKNOWN \
            else CALLING_AE_NOT_RECOGNIZED
        _reject(event, REJECT_PERMANENT, SOURCE_SERVICE_USER, reason, decision.why)
        node_audit.association_refused(calling, called, assoc.requestor.address, decision.why)
        return
    gate = getattr(assoc, "ct_gate", None)
    if gate is not None and not gate.admit(assoc.ct_gate_key):
        _reject(event, REJECT_TRANSIENT, SOURCE_PROVIDER_PRESENTATION, LOCAL_LIMIT_EXCEEDED,
                f"{gate.max_associations} associations already open (CT_TRIAGE_MAX_ASSOCIATIONS)")
        return
    assoc.ct_role = decision.role
    narrow_contexts(assoc, decision.role)


def handle_rejected(event) -> None:
    """Rejections pynetdicom decides itself (e.g. user identity); ours are logged where made."""
    log.warning("association from %s rejected by the DICOM stack", peer_of(event.assoc))


def handle_conn_open(event) -> None:
    tune_association(event.assoc)


def handle_established(event, store: StoreService) -> None:
    store.association_started(event.assoc)
    log.info("association from %s at %s established", clean(event.assoc.requestor.ae_title, 16),
             peer_of(event.assoc))


def handle_released(event, store: StoreService) -> None:
    store.association_ended(event.assoc, "released")


def abort_reason(assoc) -> str:
    """Why an association ended in an abort, for its one log line."""
    reason = getattr(assoc, "ct_abort_reason", None)
    if reason:
        return reason
    # Our transport's clock, not pynetdicom's idle timer: bytes trickled in while an aborted
    # association closes restart that timer, and an expired timer implies this clock passed too.
    dul = getattr(assoc, "dul", None)
    timeout = assoc.network_timeout
    if dul is not None and timeout and seconds_without_a_whole_pdu(dul) >= timeout:
        return f"network timeout: no complete PDU for {timeout:.0f} s"
    return "A-ABORT from the peer or connection lost"


def handle_aborted(event, store: StoreService) -> None:
    store.association_ended(event.assoc, f"aborted ({abort_reason(event.assoc)})")


def build_tls_context(settings: Settings) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(certfile=str(settings.tls_cert), keyfile=str(settings.tls_key))
    if settings.tls_ca:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(cafile=str(settings.tls_ca))
    return context


class DicomNode:
    """The node: AE + servers + completeness tracker. ``start()`` returns at once."""

    def __init__(self, settings: Settings, session_factory: sessionmaker[Session], publisher: Publisher,
                 role: NodeRole | None = None):
        self.settings = settings
        self.role = role or NodeRole()  # one of several node processes of the host (dicom_node.processes)
        self.busy_siblings: BusyStudies | None = None
        self.spool = Spool(settings.effective_storage_dir, settings.min_free_disk_mb * 2**20,
                           quarantine_max_bytes=settings.quarantine_max_mb * 2**20)
        self.store = StoreService(self.spool, session_factory, on_series_stable=self._wake_tracker,
                                  max_instance_bytes=settings.max_instance_mb * 2**20)
        self.commitment = CommitmentService(
            session_factory, ae_title=settings.ae_title,
            peers=[parse_destination(p, setting="COMMITMENT_PEERS") for p in settings.commitment_peers],
            acse_timeout_s=settings.acse_timeout_s, dimse_timeout_s=settings.dimse_timeout_s,
            wait_indexed=self._wait_indexed)
        self.ups = UpsService(session_factory, settings)
        self.ups_notifier = UpsNotifier(session_factory, self.ups, settings.worklist_ae_title,
                                        poll_interval_s=settings.poll_interval_s, timeout_s=settings.acse_timeout_s)
        self.ups.notifier = self.ups_notifier
        self.tracker = CompletenessTracker(session_factory, publisher, stable_age_s=settings.stable_age_s,
                                           max_receive_s=settings.max_receive_s,
                                           poll_interval_s=settings.poll_interval_s,
                                           busy_study_uids=self._busy_study_uids,
                                           republish_after_s=None if settings.embedded_queue
                                           else settings.republish_after_s)
        self.expiry = WorkitemExpiry(session_factory, settings.worklist_expiry_h,
                                     wake_notifier=self.ups.notifier.wake)
        self.retention = RetentionSweeper(session_factory, settings.effective_storage_dir, settings.retention_days,
                                          settings.retention_interval_s)
        self.in_flight = InFlight()
        self.policy = AccessPolicy(settings)
        self.audit = NodeAudit(session_factory, settings)
        self.audit_sender = AuditSender(session_factory, settings)
        self.store.on_association_ended = self.audit.instances_received
        self.ups.audit = self.audit
        self.ups.on_refusal = self.audit.request_refused
        self.expiry.on_expired = self.audit.workitem_expired
        self.gate = self.role.make_gate(settings)
        self.ae = self._build_ae()
        self.servers: list[AssociationServer] = []
        self.cluster = Cluster(self, session_factory)  # several processes and hosts (dicom_node.cluster)

    def _wake_tracker(self) -> None:
        self.tracker.wake()

    def _wait_indexed(self) -> bool:
        """Rows of what was acknowledged so far, by this process and its siblings (at most 60 s)."""
        asked = time.time()
        done = self.store.indexer.flush(60)
        if self.busy_siblings is not None:
            done = self.busy_siblings.wait_siblings_indexed(asked, 60) and done
        return done

    def _busy_study_uids(self) -> frozenset[str]:
        local = self.store.busy_or_pending_study_uids()
        return local | self.busy_siblings.of_siblings() if self.busy_siblings is not None else local

    def _build_ae(self) -> AE:
        s = self.settings
        ae = AE(ae_title=s.ae_title)
        ae.acse_timeout = s.acse_timeout_s
        ae.dimse_timeout = s.dimse_timeout_s
        ae.network_timeout = s.network_timeout_s
        # Our Gate counts accepted associations (pynetdicom would count every open socket,
        # before any A-ASSOCIATE-RQ): its own cap only bounds threads.
        ae.maximum_associations = s.max_associations + s.max_pending_total
        ae.maximum_pdu_size = s.max_pdu_bytes
        ae.add_supported_context(VERIFICATION)
        ae.add_supported_context(STORAGE_COMMITMENT_PUSH_MODEL)
        for ups_class in (UPS_PULL, UPS_WATCH, UPS_QUERY, UPS_PUSH):
            ae.add_supported_context(ups_class)
        for context in AllStoragePresentationContexts:
            assert context.abstract_syntax is not None  # pynetdicom's storage contexts all name one
            ae.add_supported_context(context.abstract_syntax, TRANSFER_SYNTAXES)
        return ae

    def handlers(self) -> list:
        return [
            (evt.EVT_CONN_OPEN, handle_conn_open),
            (evt.EVT_C_ECHO, handle_echo),
            (evt.EVT_C_STORE, handle_store, [self.store, self.in_flight]),
            (evt.EVT_N_ACTION, handle_n_action, [self.commitment, self.ups]),
            (evt.EVT_C_FIND, handle_c_find, [self.ups]),
            (evt.EVT_N_GET, handle_n_get, [self.ups]),
            (evt.EVT_N_SET, handle_n_set, [self.ups]),
            (evt.EVT_REQUESTED, handle_requested, [self.policy, self.audit]),
            (evt.EVT_REJECTED, handle_rejected),
            (evt.EVT_ESTABLISHED, handle_established, [self.store]),
            (evt.EVT_RELEASED, handle_released, [self.store]),
            (evt.EVT_ABORTED, handle_aborted, [self.store]),
        ]

    def start(self) -> None:
        s = self.settings
        # Data sets stream to disk as they arrive, into a temp folder on the storage
        # file system, so the final placement is a link, not a copy.
        _config.STORE_RECV_CHUNKED_DATASET = True
        install_bounded_receive((fast_store.take_p_data, fast_store.discard) if s.fast_store else None)
        # Headers are read to index them, not to judge them: value validation (regexes
        # on every element) costs more than the rest of the indexing; UIDs we rely on
        # are validated explicitly (dicom_node.uids).
        pydicom_config.settings.reading_validation_mode = pydicom_config.IGNORE
        self.cluster.register()  # before anything shared is touched: a refused node changes nothing
        self._clean_tmp()
        tempfile.tempdir = str(self.spool.tmp_dir)
        for warning in self.policy.warnings():
            log.warning("%s", warning)
        # The indexer first, then what the last run left on disk without a row: all of it
        # is indexed before the first association is accepted.
        self.store.indexer.start()
        if self.role.scans_orphans and self.cluster.scan_storage_at_start():
            self.store.index_spooled_orphans()
        self.cluster.start()
        tls = build_tls_context(s) if s.tls_enabled else None
        if s.tls_enabled and s.tls_required:
            self.servers.append(self._serve(s.port, tls))
        else:
            self.servers.append(self._serve(s.port, None))
            if tls is not None:
                self.servers.append(self._serve(s.tls_port, tls))
        if self.role.count > 1:
            self.busy_siblings = BusyStudies(self.spool.tmp_dir, self.store.busy_or_pending_study_uids,
                                             self.store.indexer.flush)
            self.busy_siblings.start()
        # The leased duties start in every process: a round runs only while this process holds
        # the duty's lease (dicom_node.leases), so the duties of a killed process move to a
        # sibling or another host within a second instead of waiting for its restart.
        self.tracker.start()
        self.retention.start()
        self.ups_notifier.start()
        if not self.role.duties:  # the others run once per host, in child 0 (dicom_node.processes)
            return
        self.expiry.start()
        self.audit.application("start")
        self.audit_sender.start()

    def _serve(self, port: int, tls: ssl.SSLContext | None) -> AssociationServer:
        s = self.settings
        inherited = self.role.listen.get(port)
        adopt: dict[str, Any] = {"listen_socket": inherited} if inherited is not None else {}
        try:
            server = self.ae.make_server(
                (s.bind_address, port), evt_handlers=self.handlers(), ssl_context=tls,
                server_class=AdoptingAssociationServer if adopt else BoundedAssociationServer, gate=self.gate,
                handshake_timeout=s.acse_timeout_s, socket_timeout=s.network_timeout_s,
                limits={"max_message_s": s.max_message_s, "max_instance_bytes": s.max_instance_mb * 2**20},
                proxies=TrustedProxies(s.proxy_protocol_from) or None, **adopt)
        except OSError as exc:
            raise bind_error(exc, s.bind_address, port) from None
        thread = threading.Thread(target=server.serve_forever, name=f"AcceptorServer@{port}", daemon=True)
        thread.start()
        self.ae._servers.append(server)
        log.info("DICOM node %s (worklist %s) listening on %s:%d%s", s.ae_title, s.worklist_ae_title, s.bind_address,
                 server.server_address[1], " (TLS)" if tls else "")
        return server

    @property
    def port(self) -> int:
        return self.servers[0].server_address[1]

    def _clean_tmp(self) -> None:
        """This process's own temporary folder; those of dead processes of this host are wiped."""
        self.spool.tmp_dir = claim_tmp_dir(self.spool.root / "tmp")

    def stop(self, grace_s: float | None = None) -> None:
        """Graceful stop (dicom_node.shutdown): no new associations, open ones finish or are
        aborted between C-STOREs after ``grace_s`` (default CT_TRIAGE_SHUTDOWN_GRACE_S)."""
        grace_s = self.settings.shutdown_grace_s if grace_s is None else grace_s
        started = time.monotonic()
        aborted = drain(self.servers, self.in_flight, grace_s)
        self.servers = []
        self.commitment.wait_idle(max(0.5, grace_s - (time.monotonic() - started)))
        self.store.indexer.stop()
        if self.busy_siblings is not None:
            self.busy_siblings.stop()
        if tempfile.tempdir == str(self.spool.tmp_dir):
            # The folder goes; Python's temporary files (pynetdicom's received data sets among
            # them) must not keep pointing at it in a process that lives on (tests, the demo).
            tempfile.tempdir = None
        release_tmp_dir(self.spool.tmp_dir)
        self.retention.stop()
        self.expiry.stop()
        self.tracker.stop()
        self.ups_notifier.stop()
        self.cluster.stop()  # every process: its journal, its nodes row marked stopped, its leases released
        if not self.role.duties:
            log.info("DICOM node process %d stopped in %.1f s%s", self.role.index, time.monotonic() - started,
                     f" ({aborted} association(s) aborted)" if aborted else "")
            return
        self.audit.application("stop")
        self.audit_sender.stop()
        try:  # one last round, so that the stop itself reaches the audit repository
            self.audit_sender.send()
        except Exception as exc:  # the database or the repository is gone: the rows stay for the next start
            log.warning("audit messages not sent at stop: %s", type(exc).__name__)
        log.info("DICOM node stopped in %.1f s%s", time.monotonic() - started,
                 f" ({aborted} association(s) aborted)" if aborted else "")
