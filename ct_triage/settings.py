"""One typed settings object per process, read from ``CT_TRIAGE_*`` variables.

Precedence: environment variable > TOML file named by ``CT_TRIAGE_CONFIG`` > default.
Defaults need no servers: SQLite under ``./var``, storage under ``./var/storage``,
the embedded queue (the database itself) instead of a broker.

Every field documents itself (``help``); ``ct-triage config`` prints the table that
docs/settings.md carries, and :meth:`Settings.effective` is logged at start with secrets masked.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
import typing
from dataclasses import dataclass, field
from ipaddress import IPv4Network, IPv6Address, IPv6Network, ip_address, ip_network
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from ct_triage.errors import ConfigError
from db.priority import DEFAULT_RULE_TEXT, PriorityRuleError, parse_rule

PREFIX = "CT_TRIAGE_"


def _f(default, help: str, secret: bool = False):
    return field(default=default, metadata={"help": help, "secret": secret})


def _lf(default: list[str], help: str):
    return field(default_factory=lambda: list(default), metadata={"help": help, "secret": False})


DEFAULT_LUNG_KERNELS = [
    "FC50", "FC51", "FC52", "FC53", "FC55", "FC56", "FC86",  # Toshiba/Canon lung
    "B60f", "B70f", "B80f", "Br59", "Br60", "Bl57", "Bl64", "I70f", "Hr60",  # Siemens sharp
    "LUNG", "BONE", "BONEPLUS", "BONE-PLUS", "EDGE",  # GE
    "L", "YA", "YB", "LC",  # Philips lung
]


@dataclass(frozen=True)
class CoreSettings:
    """Where the process keeps its state and how it runs: database, broker, storage, logging."""

    var_dir: Path = _f(Path("var"), "Working folder for the default database, storage and logs.")
    database_url: str = _f(
        "", "SQLAlchemy URL of the database. Empty: SQLite (WAL) at VAR_DIR/ct-triage.sqlite.",
        secret=True,
    )
    broker_url: str = _f(
        "", "Celery broker (e.g. redis://127.0.0.1:6379/0). Empty: embedded queue in the database.",
        secret=True,
    )
    storage_dir: Path | None = _f(None, "Where received instances are kept. Empty: VAR_DIR/storage.")
    republish_after_s: float = _f(
        600.0, "A job, due delivery or prior search handed to the broker this long ago and still not started "
        "is published again (the broker lost it: Redis crashed before its append-only file was synced, or was "
        "restored empty). A duplicate is harmless: each is claimed once.")
    poll_interval_s: float = _f(1.0, "How often the completeness tracker and the embedded queue look for work.")
    log_level: str = _f("INFO", "Logging level.")
    shutdown_grace_s: float = _f(8.0, "On SIGTERM: how long in-flight C-STOREs and tasks may run before exit.")

    @property
    def effective_database_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.var_dir / 'ct-triage.sqlite').as_posix()}"

    @property
    def effective_storage_dir(self) -> Path:
        return self.storage_dir or (self.var_dir / "storage")

    @property
    def embedded_queue(self) -> bool:
        return not self.broker_url

    def check(self) -> None:
        """Validate this section (a ConfigError names the setting)."""
        if self.republish_after_s < 5:
            raise ConfigError(f"{PREFIX}REPUBLISH_AFTER_S must be >= 5 (a busy worker is not a lost message)")
        if not 0 <= self.shutdown_grace_s <= 60:
            raise ConfigError(f"{PREFIX}SHUTDOWN_GRACE_S must be 0..60, got {self.shutdown_grace_s}")


@dataclass(frozen=True)
class NodeSettings:
    """The DICOM node: AE title, port, limits, timeouts, completeness, storage commitment."""

    ae_title: str = _f("CTTRIAGE", "Our AE title.")
    bind_address: str = _f("0.0.0.0", "Address the DICOM node listens on.")
    port: int = _f(11112, "DICOM port (TLS-only when TLS_REQUIRED).")
    max_associations: int = _f(16, "Concurrent associations accepted; more are rejected (transient).")
    max_pending_per_address: int = _f(
        16, "Connections from one address that may wait for their association to be accepted "
        "(TLS handshake, A-ASSOCIATE-RQ); more are closed at once. Accepted associations do not count. "
        "A scanner console, a router or a NAT opens several at once: keep it at least MAX_ASSOCIATIONS "
        "unless every peer has its own address.")
    max_pending_total: int = _f(64, "Connections from all addresses that may wait for their association.")
    node_processes: int = _f(
        1, "Receiving processes on this host (`node`/`serve --processes N` overrides), sharing the port, the "
        "caps above (counted for the host) and the storage; more than 1 needs PostgreSQL (DATABASE_URL). For "
        "several scanners sending at once on a host with spare cores; see docs/production.md.")
    accept_any_called_ae: bool = _f(False, "Accept associations whatever called AE title they name "
                                    "(default: it must be AE_TITLE).")
    max_instance_mb: int = _f(1024, "Largest data set accepted, on the wire and after inflating Deflated "
                              "Explicit VR; larger is aborted (wire) or refused with 0xA703 (inflated).")
    max_message_s: float = _f(600.0, "A DIMSE message (first to last fragment) must arrive within this; "
                              "slower peers are aborted.")
    quarantine_max_mb: int = _f(1024, "Size cap of the quarantine folder (rejected data sets kept for "
                                "inspection); beyond it, rejected data is not kept.")
    acse_timeout_s: float = _f(30.0, "ACSE (association set-up/release) timeout.")
    dimse_timeout_s: float = _f(60.0, "DIMSE message timeout.")
    network_timeout_s: float = _f(60.0, "Idle network timeout of an association.")
    max_pdu_bytes: int = _f(1048576, "Maximum PDU size we receive (0: unlimited).")
    fast_store: bool = _f(
        True, "Receive C-STORE data sets in the connection's own thread, without pynetdicom's per-message "
        "objects (dicom_node.fast_store); about a third less CPU per instance. false: every message goes "
        "through pynetdicom (for comparison, or should a peer ever need it).")
    min_free_disk_mb: int = _f(
        1024, "Refuse C-STORE with 0xA700 when free space under STORAGE_DIR would drop below this.")
    stable_age_s: float = _f(15.0, "Quiet period after the last instance before a series is stable.")
    max_receive_s: float = _f(3600.0, "Force a series complete after receiving this long.")
    node_id: str = _f(
        "", "Name of this node among the nodes sharing one PostgreSQL database and storage folder (several "
        "hosts). Empty: the host name. Two live nodes with one name are refused.")
    commitment_peers: list[str] = _lf(
        [], "Comma-separated AET@host:port[+tls] of scanners that want the Storage Commitment report on a new "
        "association (used when the requesting association is already closed)."
    )

    def check(self) -> None:
        """Validate this section (a ConfigError names the setting)."""
        if not 0 < self.port < 65536:
            raise ConfigError(f"{PREFIX}PORT must be 1..65535, got {self.port}")
        if not 1 <= len(self.ae_title) <= 16:
            raise ConfigError(f"{PREFIX}AE_TITLE must be 1..16 characters, got {self.ae_title!r}")
        if not 1 <= self.node_processes <= 64:
            raise ConfigError(f"{PREFIX}NODE_PROCESSES must be 1..64, got {self.node_processes}")
        if self.max_pending_per_address < 1 or self.max_pending_total < 1 or self.max_associations < 1:
            raise ConfigError(f"{PREFIX}MAX_ASSOCIATIONS, MAX_PENDING_PER_ADDRESS and MAX_PENDING_TOTAL must be >= 1")
        if self.max_instance_mb < 1 or self.max_message_s <= 0 or self.quarantine_max_mb < 0:
            raise ConfigError(f"{PREFIX}MAX_INSTANCE_MB must be >= 1, MAX_MESSAGE_S > 0, QUARANTINE_MAX_MB >= 0")
        if self.stable_age_s < 0 or self.max_receive_s <= 0:
            raise ConfigError(f"{PREFIX}STABLE_AGE_S must be >= 0 and {PREFIX}MAX_RECEIVE_S > 0")
        for entry in self.commitment_peers:
            parse_destination(entry, setting="COMMITMENT_PEERS")


@dataclass(frozen=True)
class SecuritySettings:
    """Who may do what (docs/security.md): allowlists per role, TLS, the audit trail."""

    allowed_calling_aes: list[str] = _lf(
        [], "Senders (scanners, PACS) allowed to store to AE_TITLE: comma-separated AET, AET@address or "
        "AET@network/prefix. Empty: any caller may store (a warning is logged and shown by status).")
    worklist_ae_title: str = _f("CTTRIAGE_WL", "AE title of the reading worklist (UPS Pull, Watch, Query, Push; "
                                "Verification), on the same port; also the calling AE title of our UPS event reports.")
    worklist_aes: list[str] = _lf(
        [], "Readers of the worklist (viewers, RIS, worklist clients): AET, AET@address or AET@network/prefix. "
        "They may query, read and claim workitems and manage their own subscriptions. Empty: only callers "
        "from 127.0.0.1 and ::1.")
    worklist_admin_aes: list[str] = _lf(
        [], "Worklist administrators, same forms: also cancel and update SCHEDULED workitems and manage "
        "other AEs' subscriptions. Empty: nobody.")
    tls_cert: Path | None = _f(None, "PEM certificate for DICOM TLS. Empty: no TLS.")
    tls_key: Path | None = _f(None, "PEM private key for DICOM TLS.", secret=False)
    tls_ca: Path | None = _f(None, "CA bundle; when set, callers must present a certificate it signed.")
    tls_required: bool = _f(False, "When true (and TLS_CERT set) PORT speaks TLS only; plain TCP is refused.")
    tls_port: int = _f(2762, "Extra TLS port when TLS is configured but not required.")
    tls_cert_ae_title: bool = _f(False, "With TLS client certificates (TLS_CA): the certificate's subject CN or a "
                                 "subject alternative name must equal the calling AE title.")
    audit_repository: str = _f(
        "", "Audit repository (IHE ATNA) receiving the DICOM PS3.15 A.5 audit messages as syslog: tls://host:port "
        "(RFC 5425, e.g. port 6514) or udp://host:port (RFC 5426, e.g. 514). Empty: the audit trail is kept "
        "in the database only (ct-triage audit); see docs/audit.md.")
    audit_tls_ca: Path | None = _f(
        None, "CA bundle that signed the audit repository's certificate. Empty: TLS_CA, else the system's CAs.")
    audit_tls_cert: Path | None = _f(
        None, "PEM client certificate presented to the audit repository (ATNA node authentication). Empty: TLS_CERT.")
    audit_tls_key: Path | None = _f(None, "PEM private key of AUDIT_TLS_CERT. Empty: TLS_KEY.")
    audit_query_aggregate_min: float = _f(
        10.0, "Worklist page and API reads: one Query audit message per client (token and address) in this many "
              "minutes (0: one per request). DICOM queries are never aggregated.")
    proxy_protocol_from: list[str] = _lf(
        [], "Load balancers (HAProxy send-proxy-v2) whose connections start with a PROXY v2 header naming the "
        "client: comma-separated addresses or networks. Their connections must carry one (else closed); the "
        "client it names is the peer for allowlists, caps, logs and the audit trail. Anyone else's header is "
        "garbage. Empty: off.")

    @property
    def tls_enabled(self) -> bool:
        return self.tls_cert is not None

    def check(self) -> None:
        """Validate this section (a ConfigError names the setting)."""
        if self.tls_cert and not self.tls_key:
            raise ConfigError(f"{PREFIX}TLS_KEY is required when {PREFIX}TLS_CERT is set")
        if self.tls_required and not self.tls_cert:
            raise ConfigError(f"{PREFIX}TLS_REQUIRED needs {PREFIX}TLS_CERT and {PREFIX}TLS_KEY")
        for setting, entries in (("ALLOWED_CALLING_AES", self.allowed_calling_aes),
                                 ("WORKLIST_AES", self.worklist_aes),
                                 ("WORKLIST_ADMIN_AES", self.worklist_admin_aes)):
            for entry in entries:
                parse_allowed_caller(entry, setting)
        if not 1 <= len(self.worklist_ae_title) <= 16:
            raise ConfigError(f"{PREFIX}WORKLIST_AE_TITLE must be 1..16 characters")
        if self.tls_cert_ae_title and not self.tls_ca:
            raise ConfigError(f"{PREFIX}TLS_CERT_AE_TITLE needs TLS_CA (client certificates)")
        if self.audit_repository:
            parse_audit_repository(self.audit_repository)
        if self.audit_tls_cert and not self.audit_tls_key:
            raise ConfigError(f"{PREFIX}AUDIT_TLS_KEY is required when {PREFIX}AUDIT_TLS_CERT is set")
        for entry in self.proxy_protocol_from:
            try:
                ip_network(entry.strip().replace("[", "").replace("]", ""), strict=False)
            except ValueError:
                raise ConfigError(f"{PREFIX}PROXY_PROTOCOL_FROM entry {entry!r} is not an IP address or network") \
                    from None
        if self.audit_query_aggregate_min < 0:
            raise ConfigError(f"{PREFIX}AUDIT_QUERY_AGGREGATE_MIN must be >= 0, got {self.audit_query_aggregate_min}")


@dataclass(frozen=True)
class ScoringSettings:
    """The scorer: device, model, series selection, noise floor."""

    device: str = _f("auto", "Scoring device: auto, cpu or cuda.")
    scorer: str = _f("hybrid", "Scorer: hybrid (default: classical lungs, lesions the shipped 2D network "
                     "confirms), classical (HU rules only, no weights) or unet.")
    unet_weights: Path | None = _f(None, "Weights file of the 3D U-Net scorer.")
    lesion_weights: Path | None = _f(None, "Weights file of the hybrid scorer's 2D lesion network (default: "
                                     "the one shipped in the package; its .sha256 must sit beside it).")
    lung_kernels: list[str] = _lf(DEFAULT_LUNG_KERNELS, "Convolution kernels preferred for scoring (case-insensitive).")
    min_slices: int = _f(20, "Fewer slices than this: the series is not applicable.")
    noise_floor_percent: float = _f(0.5, "Involvement below this is CT-0 (no signs).")
    mass_exclusion: str = _f(
        "report", "Solid masses (tumours: >= 2 ml, >= 70 % soft tissue, compact, sharp margin without a ground-glass "
        "halo; worker/scoring/masses.py) among the hybrid's lesions: off, report (measured and reported in the "
        "result, still counted) or exclude (reported and left out of the lesion volume and the %).")
    lesion_hu_normalisation: str = _f(
        "off", "Hybrid: test-time HU normalisation of the lesion network's input (worker/scoring/hu_frame.py): off "
               "(the weights' fixed window), air-soft (map the volume's air and soft-tissue HU peaks onto the training "
               "frame's) or air-lung (air and aerated-lung peaks; COVID-19 lungs move their lung peak, see the model "
               "card). Bounded: scale 0.85-1.15, shift +-60 HU; the fixed window when the peaks are not found.")

    def check(self) -> None:
        """Validate this section (a ConfigError names the setting)."""
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"{PREFIX}DEVICE must be auto, cpu or cuda, got {self.device!r}")
        if self.scorer not in ("classical", "hybrid", "unet"):
            raise ConfigError(f"{PREFIX}SCORER must be classical, hybrid or unet, got {self.scorer!r}")
        if self.mass_exclusion not in ("off", "report", "exclude"):
            raise ConfigError(f"{PREFIX}MASS_EXCLUSION must be off, report or exclude, got {self.mass_exclusion!r}")
        if self.lesion_hu_normalisation not in ("off", "air-soft", "air-lung"):
            raise ConfigError(f"{PREFIX}LESION_HU_NORMALISATION must be off, air-soft or air-lung, "
                              f"got {self.lesion_hu_normalisation!r}")


@dataclass(frozen=True)
class FollowupSettings:
    """Follow-up studies: where priors come from and the progression rule."""

    prior_sources: list[str] = _lf(
        [], "Comma-separated PACS AET@host:port asked (C-FIND, Study Root) for the patient's earlier CT "
        "studies, retrieved with C-MOVE to AE_TITLE and scored as priors. Empty: compare only with studies "
        "ct-triage scored itself."
    )
    prior_lookback_days: float = _f(
        30.0, "Earlier studies of the same patient (Patient ID + Issuer) this recent are priors.")
    prior_max_count: int = _f(3, "At most this many priors (the most recent) are compared with a study.")
    progression_relative_percent: float = _f(
        50.0, "Relative increase of total involvement (%) that is 'progression' (MosMedData Table 2: +50 %).")
    progression_min_hours: float = _f(0.0, "Progression rule window, shortest interval between acquisitions (h).")
    progression_max_hours: float = _f(48.0, "Progression rule window, longest interval between acquisitions (h).")
    progression_min_points: float = _f(
        5.0, "Progression also needs at least this many percentage points of increase (guards tiny shares).")
    stable_points: float = _f(5.0, "A change smaller than this (percentage points) is reported as stable.")

    def check(self) -> None:
        """Validate this section (a ConfigError names the setting)."""
        for source in self.prior_sources:
            try:
                parse_destination(source)
            except ConfigError:
                raise ConfigError(f"{PREFIX}PRIOR_SOURCES entry {source!r} is not AET@host:port") from None
        if self.prior_lookback_days <= 0 or self.prior_max_count < 0:
            raise ConfigError(f"{PREFIX}PRIOR_LOOKBACK_DAYS must be > 0 and {PREFIX}PRIOR_MAX_COUNT >= 0")
        if not 0 <= self.progression_min_hours <= self.progression_max_hours:
            raise ConfigError(f"{PREFIX}PROGRESSION_MIN_HOURS must be >= 0 and <= {PREFIX}PROGRESSION_MAX_HOURS")
        if self.progression_relative_percent <= 0 or self.progression_min_points < 0 or self.stable_points < 0:
            raise ConfigError(f"{PREFIX}PROGRESSION_RELATIVE_PERCENT must be > 0; {PREFIX}PROGRESSION_MIN_POINTS "
                              f"and {PREFIX}STABLE_POINTS >= 0")


@dataclass(frozen=True)
class OutputSettings:
    """The objects written back: SC, SEG, SR."""

    sc_compression: str = _f(
        "jpeg-baseline", "Pixel encoding of the Secondary Capture images: none, rle or jpeg-baseline (lossy, "
        "about 90 KB a slice instead of 768 KB; see docs/outputs.md)."
    )
    sc_slices: str = _f(
        "all", "Which slices get a Secondary Capture image: all (every slice with a lesion box) or N "
        "(the N slices with the largest boxed lesion area); the summary image is always sent."
    )
    seg_compression: str = _f(
        "deflate", "Transfer syntax of the DICOM SEG: deflate (Deflated Explicit VR Little Endian, 1-2 MB) or "
        "none (Explicit VR Little Endian, ~32 KB a frame); a PACS refusing deflate gets it uncompressed."
    )
    sr_max_lesions: int = _f(20, "How many 3-D lesions (largest first) get their own measurement group in the SR.")

    @property
    def sc_max_slices(self) -> int | None:
        """``SC_SLICES`` as the SC builder's ``max_slices``: None = all lesion slices."""
        text = str(self.sc_slices).strip().lower()
        if text in ("all", ""):
            return None
        if text.isdigit() and int(text) >= 1:
            return int(text)
        raise ConfigError(f"{PREFIX}SC_SLICES must be 'all' or a number >= 1, got {self.sc_slices!r}")

    def check(self) -> None:
        """Validate this section (a ConfigError names the setting)."""
        if self.sc_compression not in ("none", "rle", "jpeg-baseline"):
            raise ConfigError(f"{PREFIX}SC_COMPRESSION must be none, rle or jpeg-baseline, got {self.sc_compression!r}")
        self.sc_max_slices  # noqa: B018 - validates SC_SLICES
        if self.seg_compression not in ("deflate", "none"):
            raise ConfigError(f"{PREFIX}SEG_COMPRESSION must be deflate or none, got {self.seg_compression!r}")
        if self.sr_max_lesions < 0:
            raise ConfigError(f"{PREFIX}SR_MAX_LESIONS must be >= 0, got {self.sr_max_lesions}")


@dataclass(frozen=True)
class DeliverySettings:
    """Where results go and how failed sends are retried."""

    destinations: list[str] = _lf([], "Comma-separated PACS targets AET@host:port (append '+tls' for TLS).")
    retry_base_s: float = _f(
        5.0, "First retry delay of a transient delivery failure; doubles each attempt, up to RETRY_MAX_S.")
    retry_max_s: float = _f(
        600.0, "Longest delay between two delivery attempts (a PACS back up is found within this).")

    def check(self) -> None:
        """Validate this section (a ConfigError names the setting)."""
        for dest in self.destinations:
            parse_destination(dest)


@dataclass(frozen=True)
class WorklistSettings:
    """The reading worklist: the priority rule, UPS, HL7 to the RIS, the page."""

    priority_rule: str = _f(
        DEFAULT_RULE_TEXT, "Worklist priority per category, and for results not scored ('failed': failed or not "
        "applicable; never below MEDIUM). Ties are broken by arrival time.")
    ups_worklist_label: str = _f("COVID-19 CT triage", "Worklist Label (0074,1202) of the UPS workitems we serve.")
    worklist_expiry_h: float = _f(
        72.0, "A SCHEDULED UPS workitem that no worklist client claimed this many hours after its study arrived "
        "is cancelled by the node (Scheduled Procedure Step Expiration DateTime (0040,4008)); the same horizon "
        "as HTTP_WORKLIST_HOURS by default. IN PROGRESS workitems never expire.")
    ups_subscribers: list[str] = _lf(
        [], "UPS Watch subscribers we may send N-EVENT-REPORTs to, AET@host:port[+tls] each (+tls: DICOM TLS, "
        "the subscriber's certificate verified against the system's CAs); a subscription from any other AE "
        "title is refused (0xC308).")
    hl7_destinations: list[str] = _lf([], "Comma-separated RIS interfaces host:port receiving HL7 v2 over MLLP "
                                          "(order update + ORU^R01 per result); append '+tls' for MLLP over TLS "
                                          "(TLS 1.2 or later, the RIS certificate and host name verified).")
    hl7_order_message: str = _f("ORM^O01", "Order update message: ORM^O01 (priority in ORC-7) or OMI^O23 "
                                           "(priority in TQ1-9).")
    hl7_sending_application: str = _f("CTTRIAGE", "MSH-3 Sending Application.")
    hl7_sending_facility: str = _f("", "MSH-4 Sending Facility.")
    hl7_receiving_application: str = _f("", "MSH-5 Receiving Application.")
    hl7_receiving_facility: str = _f("", "MSH-6 Receiving Facility.")
    hl7_ack_timeout_s: float = _f(30.0, "Seconds to wait for the connection and for each HL7 ACK; a timeout "
                                        "is retried with the delivery backoff.")
    hl7_tls_ca: Path | None = _f(
        None, "CA bundle that signed the certificates of the '+tls' HL7_DESTINATIONS. Empty: the system's CAs.")
    hl7_tls_cert: Path | None = _f(
        None, "PEM client certificate presented to the '+tls' HL7_DESTINATIONS (a RIS that requires one). "
        "Empty: none.")
    hl7_tls_key: Path | None = _f(None, "PEM private key of HL7_TLS_CERT.")
    http_host: str = _f(
        "127.0.0.1", "Address of the worklist page, its JSON API and /metrics. Off-localhost needs HTTP_TOKEN.",
    )
    http_port: int = _f(8080, "Port of the worklist page and /metrics (0: no page).")
    http_token: str = _f(
        "", "Token the page, API and /metrics require (Bearer header, cookie, or ?token= once). "
        "Required when HTTP_HOST is not a loopback address; at least 16 characters.", secret=True,
    )
    http_refresh_s: float = _f(15.0, "How often the worklist page refreshes itself.")
    http_connections_per_address: int = _f(
        16, "Connections one peer address (an IPv6 /64) may hold open to the page at once; more are closed at "
        "once. Behind a reverse proxy every client shares its address.",
    )
    http_worklist_hours: float = _f(
        72.0, "Studies that arrived longer ago than this leave the page and /api/worklist (the SQL view keeps them).",
    )

    @property
    def priorities(self) -> dict[str, str]:
        """The validated priority rule (db.priority)."""
        return parse_rule(self.priority_rule)

    def check(self) -> None:
        """Validate this section (a ConfigError names the setting)."""
        self._check_http_page()
        try:
            parse_rule(self.priority_rule)
        except PriorityRuleError as exc:
            raise ConfigError(f"{PREFIX}PRIORITY_RULE: {exc}") from exc
        for entry in self.ups_subscribers:
            parse_destination(entry, setting="UPS_SUBSCRIBERS")
        for entry in self.hl7_destinations:
            parse_hl7_destination(entry)
        if self.hl7_order_message not in ("ORM^O01", "OMI^O23"):
            raise ConfigError(f"{PREFIX}HL7_ORDER_MESSAGE must be ORM^O01 or OMI^O23, got {self.hl7_order_message!r}")
        if not 0 < self.worklist_expiry_h <= 87600:  # NaN fails too; 10 years keeps datetimes in range
            raise ConfigError(f"{PREFIX}WORKLIST_EXPIRY_H must be > 0 (hours, at most 87600), got "
                              f"{self.worklist_expiry_h}")
        if not 0 < len(self.ups_worklist_label) <= 64:
            raise ConfigError(f"{PREFIX}UPS_WORKLIST_LABEL must be 1..64 characters")
        if self.hl7_ack_timeout_s <= 0:
            raise ConfigError(f"{PREFIX}HL7_ACK_TIMEOUT_S must be > 0")
        if self.hl7_tls_cert and not self.hl7_tls_key:
            raise ConfigError(f"{PREFIX}HL7_TLS_KEY is required when {PREFIX}HL7_TLS_CERT is set")
        if self.hl7_tls_key and not self.hl7_tls_cert:
            raise ConfigError(f"{PREFIX}HL7_TLS_KEY is set without {PREFIX}HL7_TLS_CERT")

    def _check_http_page(self) -> None:
        """The HTTP_* settings of the worklist page, its API and /metrics."""
        if not 0 <= self.http_port < 65536:
            raise ConfigError(f"{PREFIX}HTTP_PORT must be 0..65535, got {self.http_port}")
        if self.http_port and not is_loopback(self.http_host) and not self.http_token:
            raise ConfigError(f"{PREFIX}HTTP_HOST={self.http_host} is not a loopback address: set {PREFIX}HTTP_TOKEN "
                              f"(at least 16 characters) or bind the page to 127.0.0.1")
        if self.http_token and len(self.http_token) < 16:
            raise ConfigError(f"{PREFIX}HTTP_TOKEN must be at least 16 characters")
        if not 1 <= self.http_connections_per_address <= 1024:
            raise ConfigError(f"{PREFIX}HTTP_CONNECTIONS_PER_ADDRESS must be 1..1024, got "
                              f"{self.http_connections_per_address}")
        if self.http_refresh_s < 1 or self.http_worklist_hours <= 0:
            raise ConfigError(f"{PREFIX}HTTP_REFRESH_S must be >= 1 and {PREFIX}HTTP_WORKLIST_HOURS > 0")


@dataclass(frozen=True)
class RetentionSettings:
    """How long received instances, workitems and quarantined files are kept."""

    retention_days: float = _f(
        0.0, "Delete received instances (and quarantined files) this many days after their result was "
        "delivered; rows are kept with a deleted-at mark. UPS workitems COMPLETED or CANCELED this many days "
        "ago are deleted with their event and subscription rows. 0: keep forever."
    )
    retention_interval_s: float = _f(3600.0, "How often the node (or serve) runs the retention sweep.")

    def check(self) -> None:
        """Validate this section (a ConfigError names the setting)."""
        if self.retention_days < 0 or self.retention_interval_s <= 0:
            raise ConfigError(f"{PREFIX}RETENTION_DAYS must be >= 0 and {PREFIX}RETENTION_INTERVAL_S > 0")


# The sections, in the order of the settings table; each validates its own fields (``check``).
SECTIONS: tuple[type, ...] = (CoreSettings, NodeSettings, SecuritySettings, ScoringSettings, FollowupSettings,
                              OutputSettings, DeliverySettings, WorklistSettings, RetentionSettings)


# Bases in reverse: a dataclass lists the fields of its last base first (the table starts with CoreSettings).
@dataclass(frozen=True)
class Settings(RetentionSettings, WorklistSettings, DeliverySettings, OutputSettings, FollowupSettings,
               ScoringSettings, SecuritySettings, NodeSettings, CoreSettings):
    """Every setting of a process, read from one environment; the sections above, flat.

    Access stays flat (``settings.port``), as the ``CT_TRIAGE_*`` names are: a section groups
    and validates its fields, :meth:`validate` runs every section's ``check`` and then the
    checks that span two sections.
    """

    @classmethod
    def from_env(cls, environ: typing.Mapping[str, str] | None = None, **overrides) -> Settings:
        environ = os.environ if environ is None else environ
        raw: dict[str, object] = {}
        config_file = environ.get(PREFIX + "CONFIG")
        if config_file:
            try:
                with open(config_file, "rb") as fh:
                    data = tomllib.load(fh)
            except (OSError, tomllib.TOMLDecodeError) as exc:
                raise ConfigError(f"{PREFIX}CONFIG={config_file}: {exc}") from exc
            for key, value in data.items():
                raw[key.lower()] = value
        hints = typing.get_type_hints(cls)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(raw) - names
        if unknown:
            raise ConfigError(f"unknown setting(s) in {config_file}: {', '.join(sorted(unknown))}")
        for f in dataclasses.fields(cls):
            env_name = PREFIX + f.name.upper()
            if env_name in environ:
                raw[f.name] = environ[env_name]
        raw.update(overrides)
        values = {name: _coerce(name, hints[name], value) for name, value in raw.items()}
        settings = cls(**values)
        settings.validate()
        return settings

    def validate(self) -> None:
        for section in SECTIONS:
            section.check(self)  # type: ignore[attr-defined]  # each section class defines check
        # Spanning two sections:
        if self.worklist_ae_title == self.ae_title:
            raise ConfigError(f"{PREFIX}WORKLIST_AE_TITLE must differ from AE_TITLE: senders and worklist "
                              "readers are told apart by the title they call")

    def effective(self) -> dict[str, str]:
        """The settings as logged at start: every field, secrets masked."""
        out: dict[str, str] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.metadata.get("secret") and value:
                value = mask_url(str(value)) if "://" in str(value) else "***"
            elif isinstance(value, list):
                value = ",".join(value)
            out[f.name] = "" if value is None else str(value)
        out["effective_database_url"] = mask_url(self.effective_database_url)
        out["effective_storage_dir"] = str(self.effective_storage_dir)
        return out

    @classmethod
    def documentation(cls) -> list[tuple[str, str, str]]:
        """(variable, default, help) rows for the settings table of docs/settings.md."""
        rows = []
        for f in dataclasses.fields(cls):
            default = f.default
            if default is dataclasses.MISSING and f.default_factory is not dataclasses.MISSING:
                default = f.default_factory()
            if isinstance(default, list):
                default = ",".join(default)
            elif isinstance(default, bool):
                default = str(default).lower()
            rows.append((PREFIX + f.name.upper(), "" if default is None else str(default), f.metadata["help"]))
        return rows

def settings_markdown() -> str:
    """The settings tables of docs/settings.md: one per section, in table order."""
    out = []
    for section in reversed(Settings.__mro__[1:-1]):  # CoreSettings first, as the table lists them
        names = {f.name for f in dataclasses.fields(section)}
        title = section.__name__.removesuffix("Settings")
        doc = (section.__doc__ or "").strip()
        out.append(f"## {title}\n\n{doc}\n\n| variable | default | meaning |\n|---|---|---|")
        for name, default, text in Settings.documentation():
            if name[len(PREFIX):].lower() in names:
                out.append(f"| `{name}` | `{default}` | {text} |" if default else f"| `{name}` | | {text} |")
        out.append("")
    return "\n".join(out)


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback IP addresses (127.0.0.0/8, ::1)."""
    import ipaddress

    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip().strip("[]")).is_loopback
    except ValueError:
        return False


def mask_url(url: str) -> str:
    """Hide a password in a URL (``redis://:secret@host`` -> ``redis://:***@host``)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "***"
    if parts.password:
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
        return urlunsplit(parts._replace(netloc=netloc))
    return url


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def _coerce(name: str, hint, value):
    env_name = PREFIX + name.upper()
    origin = typing.get_origin(hint)
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if origin in (typing.Union, __import__("types").UnionType) and args:
        if value in ("", None):
            return None
        hint = args[0]
        origin = typing.get_origin(hint)
    try:
        if origin is list:
            if isinstance(value, str):
                return [item.strip() for item in value.split(",") if item.strip()]
            return [str(item) for item in value]
        if hint is bool:
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in _TRUE:
                return True
            if text in _FALSE:
                return False
            raise ValueError("expected true/false")
        if hint is Path:
            return Path(str(value))
        if hint in (int, float, str):
            return hint(value)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{env_name}={value!r}: {exc}") from exc
    return value


@dataclass(frozen=True)
class Destination:
    ae_title: str
    host: str
    port: int
    tls: bool = False

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}" + ("+tls" if self.tls else "")


def parse_destination(text: str, setting: str = "DESTINATIONS") -> Destination:
    """Parse ``AET@host:port[+tls]``; ConfigError naming the entry when malformed."""
    entry = text.strip()
    tls = entry.endswith("+tls")
    if tls:
        entry = entry[: -len("+tls")]
    aet, sep, hostport = entry.partition("@")
    host, sep2, port = hostport.rpartition(":")
    if not sep or not sep2 or not aet or not host or not port.isdigit() or len(aet) > 16:
        raise ConfigError(f"{PREFIX}{setting} entry {text!r} is not AET@host:port[+tls]")
    return Destination(aet, host, int(port), tls)


@dataclass(frozen=True)
class Hl7Destination:
    host: str
    port: int
    tls: bool = False

    def __str__(self) -> str:
        return f"mllp://{self.host}:{self.port}" + ("+tls" if self.tls else "")


def parse_hl7_destination(text: str) -> Hl7Destination:
    """Parse ``host:port[+tls]`` (or ``mllp://host:port[+tls]``); ConfigError naming the entry when malformed."""
    entry = text.strip()
    if entry.startswith("mllp://"):
        entry = entry[len("mllp://"):]
    tls = entry.endswith("+tls")
    if tls:
        entry = entry[: -len("+tls")]
    host, sep, port = entry.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{PREFIX}HL7_DESTINATIONS entry {text!r} is not host:port[+tls]")
    return Hl7Destination(host, int(port), tls)


@dataclass(frozen=True)
class AuditRepository:
    transport: str  # tls | udp
    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.transport}://{host}:{self.port}"


def parse_audit_repository(text: str) -> AuditRepository:
    """Parse ``tls://host:port`` or ``udp://host:port``; ConfigError naming the value when malformed."""
    entry = text.strip()
    transport, sep, hostport = entry.partition("://")
    host, sep2, port = hostport.rpartition(":")
    host = host.strip("[]")
    if (not sep or transport not in ("tls", "udp") or not sep2 or not host or not port.isdigit()
            or not 0 < int(port) < 65536):
        raise ConfigError(f"{PREFIX}AUDIT_REPOSITORY {text!r} is not tls://host:port or udp://host:port")
    return AuditRepository(transport, host, int(port))


@dataclass(frozen=True)
class AllowedCaller:
    """An allowlist entry: an AE title, bound to an address or a network, or to any address
    (``network`` None: a bare title, which any host can present)."""

    ae_title: str
    network: IPv4Network | IPv6Network | None = None

    @property
    def address(self) -> str | None:
        """The single address an entry is bound to (a /32 or /128), else None."""
        if self.network is not None and self.network.num_addresses == 1:
            return str(self.network.network_address)
        return None

    def matches(self, ae_title: str, address: str | None) -> bool:
        if ae_title != self.ae_title:
            return False
        if self.network is None:
            return True
        try:
            ip = ip_address((address or "").split("%")[0])
        except ValueError:
            return False
        if isinstance(ip, IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return ip in self.network


def parse_allowed_caller(text: str, setting: str = "ALLOWED_CALLING_AES") -> AllowedCaller:
    """``AET``, ``AET@address`` or ``AET@network/prefix`` (IPv4 or IPv6); ConfigError naming the entry."""
    aet, _, where = text.strip().partition("@")
    aet = aet.strip()
    if not aet or len(aet) > 16 or "\\" in aet or not all(32 <= ord(c) < 127 for c in aet):
        raise ConfigError(f"{PREFIX}{setting} entry {text!r} is not AET, AET@address or AET@network/prefix")
    if not where.strip():
        return AllowedCaller(aet)
    try:
        network = ip_network(where.strip().strip("[]"), strict=False)
    except ValueError:
        raise ConfigError(f"{PREFIX}{setting} entry {text!r}: {where!r} is not an IP address or network "
                          "(host names are not accepted: a name can be made to point anywhere)") from None
    return AllowedCaller(aet, network)
