"""The ``ct-triage`` command line: thin composition of node, worker and database.

Every handler is ``func(args, settings) -> exit code``. The offline commands (phantom,
score, eval, train, demo) live in :mod:`ct_triage_tools.commands`; that package is
imported only when the command line asks for one of them, for help, or for a command
this module does not know, so ``serve``, ``node``, ``worker``, ``db``, ``status`` and
``config`` never import it.
"""

from __future__ import annotations

import argparse
import logging
import signal
import subprocess
import sys
import threading
import time

from ct_triage import __version__
from ct_triage.errors import CtTriageError
from ct_triage.runtime import log_effective_config, open_database, setup_logging
from ct_triage.settings import Settings
from ct_triage.text import clean

log = logging.getLogger("ct_triage")


def _stop_on_signal() -> threading.Event:
    """SIGINT/SIGTERM set the returned event. Installed first thing, so that a signal during
    start-up (the worker's imports take seconds) still means a graceful stop, not death."""
    stop = threading.Event()

    def on_signal(signum: int, _frame) -> None:
        log.info("%s received: stopping gracefully", signal.Signals(signum).name)
        stop.set()

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, on_signal)
    return stop


def _wait_for(stop: threading.Event) -> None:
    while not stop.wait(1.0):
        pass


def _start_node(settings: Settings, session_factory, role=None):
    from ct_triage.contract import make_publisher
    from dicom_node import DicomNode

    node = DicomNode(settings, session_factory, make_publisher(settings.broker_url), role)
    node.start()
    return node


def _supervised(args, settings: Settings, mode: str) -> int | None:
    """With several node processes (--processes N, CT_TRIAGE_NODE_PROCESSES), this process is
    their supervisor (dicom_node.processes): its exit code; None when it is the node itself."""
    count = args.processes or settings.node_processes
    if args.process_index is not None or count == 1:
        return None
    from dicom_node.processes import supervise

    log_effective_config(settings, mode)
    return supervise(settings, mode, count, lambda: open_database(settings)[0].dispose())


def _process_role(args):
    """The NodeRole of a child started by the supervisor; None for a node on its own."""
    if args.process_index is None:
        return None
    from dicom_node.processes import child_role

    return child_role(args.process_index, args.process_count, args.listen_fds, args.limits_fd, args.ready_fd,
                      args.restarted)


def _start_dashboard(settings: Settings, session_factory):
    from dashboard.server import start_dashboard

    return start_dashboard(settings, session_factory)


def cmd_serve(args, settings: Settings) -> int:
    """Node + embedded worker on one machine, no servers needed."""
    supervised = _supervised(args, settings, "serve")
    if supervised is not None:
        return supervised
    stop = _stop_on_signal()
    role = _process_role(args)  # with --processes N: child 0 (the others run `node`)
    if role is None:
        log_effective_config(settings, "serve")
    _, session_factory = open_database(settings)
    node = _start_node(settings, session_factory, role)
    dashboard = _start_dashboard(settings, session_factory)
    consumer = None
    worker_process = None
    if settings.embedded_queue:
        from ct_triage.contract import make_publisher
        from worker.tasks.context import WorkerContext
        from worker.tasks.embedded import EmbeddedConsumer

        consumer = EmbeddedConsumer(WorkerContext(settings, session_factory, make_publisher("")),
                                    poll_interval_s=settings.poll_interval_s)
        consumer.start()
        log.info("embedded worker consuming jobs from the database")
    else:
        worker_process = subprocess.Popen([sys.executable, "-m", "ct_triage_app.cli", "worker"])
        log.info("Celery worker started (pid %d) on %s", worker_process.pid, "gpu,io")
    log.info("ct-triage serve ready: DICOM %s on port %d", settings.ae_title, node.port)
    if role is not None:
        role.ready()
        role.watch_supervisor(stop)
    try:
        _wait_for(stop)
    finally:
        # Graceful (SIGTERM): no new work, in-flight C-STOREs answered, running tasks requeued.
        started = time.monotonic()
        if worker_process:
            worker_process.terminate()  # the Celery worker's own graceful stop (cmd_worker)
        if consumer:
            consumer.request_stop()
        node.stop()
        if dashboard:
            dashboard.stop()
        if consumer:
            left = max(0.5, settings.shutdown_grace_s - (time.monotonic() - started))
            consumer.stop(timeout=left)
            _requeue_claims(session_factory, lambda holder: holder == consumer.ctx.worker_name)
        if worker_process:
            try:
                worker_process.wait(timeout=max(1.0, settings.shutdown_grace_s + 1.5 - (time.monotonic() - started)))
            except subprocess.TimeoutExpired:
                worker_process.kill()
                worker_process.wait()
                _requeue_claims(session_factory, _dead_holder_of_this_host)
        log.info("ct-triage serve stopped in %.1f s", time.monotonic() - started)
    return 0


def _dead_holder_of_this_host(holder: str | None) -> bool:
    """A claim (``host:pid``) by a process of this host that is no longer running."""
    from worker.tasks.context import holder_is_dead

    return holder_is_dead(holder)


def _requeue_claims(session_factory, is_ours) -> None:
    from sqlalchemy.exc import SQLAlchemyError

    from db import repository
    from db.session import session_scope

    try:
        with session_scope(session_factory) as session:
            jobs, deliveries = repository.release_claims(session, is_ours)
    except SQLAlchemyError as exc:
        log.error("could not requeue running tasks (they are taken over when their lease expires): %s",
                  str(exc).splitlines()[0][:300])
        return
    if jobs or deliveries:
        log.warning("requeued running task(s) of stopped processes: jobs %s, deliveries %s", jobs, deliveries)


def cmd_node(args, settings: Settings) -> int:
    supervised = _supervised(args, settings, "node")
    if supervised is not None:
        return supervised
    stop = _stop_on_signal()
    role = _process_role(args)
    if role is None:
        log_effective_config(settings, "node")
    if settings.embedded_queue and (role is None or role.index == 0):
        log.warning("CT_TRIAGE_BROKER_URL is empty: jobs wait in the database for a `ct-triage serve`")
    _, session_factory = open_database(settings)
    node = _start_node(settings, session_factory, role)
    # The page and /metrics once per host: in child 0 when there are several node processes.
    dashboard = _start_dashboard(settings, session_factory) if role is None or role.duties else None
    log.info("ct-triage node ready: DICOM %s on port %d", settings.ae_title, node.port)
    if role is not None:
        role.ready()
        role.watch_supervisor(stop)
    try:
        _wait_for(stop)
    finally:
        node.stop()
        if dashboard:
            dashboard.stop()
    return 0


def cmd_worker(args, settings: Settings) -> int:
    if settings.embedded_queue:
        raise CtTriageError("ct-triage worker needs CT_TRIAGE_BROKER_URL (e.g. redis://127.0.0.1:6379/0); "
                            "for one machine use `ct-triage serve`")
    log_effective_config(settings, "worker")
    _, session_factory = open_database(settings)  # migrations before the first task
    import os

    # Tasks a SIGKILLed worker of this host held: requeued now (the node publishes them
    # again) rather than after the broker's visibility timeout or the claim lease.
    _requeue_claims(session_factory, _dead_holder_of_this_host)

    from celery.signals import worker_shutting_down

    from worker.tasks.celery_app import app

    def escalate(sig=None, how=None, exitcode=None, **_):
        # SIGTERM is Celery's warm shutdown, which waits for running tasks however long they
        # take. After the grace, a cold shutdown (SIGQUIT) stops them; their messages are not
        # acknowledged (acks_late), and their rows are requeued below.
        if how == "Warm":
            log.info("%s: warm shutdown, running tasks get %.0f s", sig, settings.shutdown_grace_s)
            timer = threading.Timer(settings.shutdown_grace_s, os.kill, (os.getpid(), signal.SIGQUIT))
            timer.daemon = True
            timer.start()

    worker_shutting_down.connect(escalate, weak=False)
    argv = ["worker", "--queues", args.queues, "--concurrency", str(args.concurrency), "--loglevel",
            settings.log_level, "--hostname", args.hostname, "--without-gossip", "--without-mingle"]
    try:
        app.worker_main(argv)
    finally:
        _requeue_claims(session_factory, _dead_holder_of_this_host)
    return 0


def cmd_db_upgrade(args, settings: Settings) -> int:
    from db.migrate import current_revision

    engine, _ = open_database(settings)
    print(f"database at revision {current_revision(engine)}")
    return 0


def _fmt_time(value) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S") if value else "-"


def _short_time(value) -> str:
    return value.strftime("%H:%M:%S") if value else "-"


COMPACT_WIDTH = 120  # the default `status` view fits this many columns; --wide prints everything
_UID_WIDTH = 18


def _short_uid(uid: str) -> str:
    """A UID cut to 18 characters (its root and its distinguishing end); --wide shows it whole."""
    return uid if len(uid) <= _UID_WIDTH else f"{uid[:7]}...{uid[-8:]}"


def _print_table(headers: list[str], table: list[list[str]], empty: str, max_width: int | None = None) -> None:
    """Columns padded to their widest cell; with ``max_width`` the last column is cut to fit."""
    # Cells can hold scanner-sent text (modality, reasons quoting attributes): one line each.
    table = [[clean(cell, 300) for cell in row] for row in table]
    widths = [max(len(h), *(len(row[i]) for row in table)) if table else len(h) for i, h in enumerate(headers)]
    if max_width is not None and table:
        room = max(len(headers[-1]), max_width - sum(w + 2 for w in widths[:-1]))
        table = [[*row[:-1], row[-1] if len(row[-1]) <= room else row[-1][: room - 3] + "..."] for row in table]
        widths[-1] = min(widths[-1], room)
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip())
    for row in table:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
    if not table:
        print(empty)


def _state_text(row, stable_age_s: float, now) -> str:
    """``receiving (quiet for 4 s of 15 s)`` while a series waits out its quiet period."""
    if row.state != "receiving" or row.last_received_at is None:
        return row.state
    quiet = max(0, int((now - row.last_received_at).total_seconds()))
    return f"receiving (quiet for {quiet} s of {stable_age_s:g} s)"


def cmd_status(args, settings: Settings) -> int:
    from ct_triage.series_display import series_by_uid
    from db import repository
    from db.activity import last_write_at
    from db.session import session_scope
    from db.types import utcnow
    from dicom_node.retention import disk_pressure

    _, session_factory = open_database(settings)
    pressure = disk_pressure(settings.effective_storage_dir, settings.min_free_disk_mb, session_factory)
    with session_scope(session_factory) as session:
        rows = repository.series_status(session, limit=args.limit)
        details = series_by_uid(session, [r.series_instance_uid for r in rows])
        last_write = last_write_at(session)
        results = repository.result_status(session, limit=args.limit)
        from worker.followup.priors import change_label, changes_by_study  # issue 12: comparison with priors

        changes = changes_by_study(session, [r.study_instance_uid for r in results])
    now = utcnow()
    _print_database(settings, last_write, now, args.quiet_minutes)
    from dicom_node.access import AccessPolicy

    for warning in AccessPolicy(settings).warnings():
        print(f"SECURITY: {warning}")
    _print_storage(pressure, settings)
    _print_series(rows, details, args, settings, now)
    print("\nRESULTS (worklist order: priority, then arrival)")
    if args.wide:
        _print_table(
            ["priority", "study_instance_uid", "ver", "status", "category", "involvement_%", "change", "scored",
             "ups", "deliveries", "reason"],
            [[r.priority, r.study_instance_uid, str(r.version), r.status, r.category or "-",
              f"{r.involvement_percent:.1f}" if r.involvement_percent is not None else "-",
              change_label(changes.get(r.study_instance_uid)), _fmt_time(r.scored_at), r.workitem_state or "-",
              ", ".join(f"{d}: {state}" for d, state in r.deliveries) or "-", r.reason or ""] for r in results],
            "(no results yet)")
    else:
        _print_table(
            ["priority", "study", "ver", "status", "category", "involv_%", "change", "scored", "ups", "deliveries",
             "reason"],
            [[r.priority, _short_uid(r.study_instance_uid), str(r.version), r.status, r.category or "-",
              f"{r.involvement_percent:.1f}" if r.involvement_percent is not None else "-",
              change_label(changes.get(r.study_instance_uid)), _short_time(r.scored_at), r.workitem_state or "-",
              _delivery_summary(r.deliveries), r.reason or ""] for r in results],
            "(no results yet)", max_width=COMPACT_WIDTH)
    problems = [(r, d) for r in results for d in r.delivery_errors]
    if problems:
        # Why a delivery stopped (an HL7 AE/AR with the RIS's text, a rejected association) or retries.
        print("\nDELIVERY PROBLEMS")
        _print_table(
            ["study", "destination", "state", "reason"],
            [[r.study_instance_uid if args.wide else _short_uid(r.study_instance_uid), dest, state, reason]
             for r, (dest, state, reason) in problems],
            "", max_width=None if args.wide else COMPACT_WIDTH)
    return 0


def _print_database(settings: Settings, last_write, now, quiet_minutes: float) -> None:
    """Which database this reads (password masked) and, after ``quiet_minutes`` without a
    write, that nothing seems to use it (a daemon started with other settings?)."""
    from ct_triage.settings import mask_url

    print("DATABASE")
    print(f"database: {mask_url(settings.effective_database_url)}")
    if last_write is None:
        print("last write: never (empty database) - is the daemon running with this database?")
    else:
        minutes = (now - last_write).total_seconds() / 60
        ago = f"{minutes:.0f} min ago" if minutes >= 1 else "less than a minute ago"
        hint = " - is the daemon running with this database?" if minutes >= quiet_minutes else ""
        print(f"last write: {_fmt_time(last_write)} UTC, {ago}{hint}")
    print()


def _series_cells(r, d, settings: Settings, now) -> list[str]:
    """Number, description, kernel, thickness, shown state and reason of one series row
    (``d``: its :class:`ct_triage.series_display.SeriesDisplay`, None when it went meanwhile)."""
    from ct_triage.series_display import display_reason, display_state

    state = display_state(r.state, r.state_reason)
    shown = _state_text(r, settings.stable_age_s, now) if state == r.state else state
    reason = "; ".join(filter(None, [display_reason(r.state, r.state_reason, 300), *r.flags]))
    if d is None:
        return ["-", "-", "-", "-", shown, reason]
    number = str(d.series_number) if d.series_number is not None else "-"
    return [number, d.description or "-", d.kernel or "-", d.thickness_text, shown, reason]


def _facts(cells: list[str]) -> str:
    """``2 FC51 5``: series number, kernel and slice thickness (mm) of a compact row."""
    thickness = cells[3].removesuffix(" mm")
    return " ".join(c for c in (cells[0], cells[2], thickness) if c != "-") or "-"


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "\u2026"


def _print_series(rows, details, args, settings: Settings, now) -> None:
    """The SERIES table: per series its number, description, kernel, slice thickness and
    state; a series passed over for a scored twin reads ``not selected`` with why. To fit
    120 columns the compact view joins number, kernel and thickness, leaves description,
    modality and version to --wide, and lists the twins left out, with why, below."""
    print("\nSERIES")
    cells = [_series_cells(r, details.get(r.series_instance_uid), settings, now) for r in rows]
    if args.wide:
        _print_table(
            ["study_instance_uid", "series_instance_uid", "no", "description", "kernel", "thick", "mod",
             "instances", "dups", "ver", "state", "first_received", "last_received", "stable", "queued",
             "reason/flags"],
            [[r.study_instance_uid, r.series_instance_uid, *c[:4], r.modality or "-", str(r.instance_count),
              str(r.duplicate_count), str(r.version), c[4], _fmt_time(r.first_received_at),
              _fmt_time(r.last_received_at), _fmt_time(r.stable_at), _fmt_time(r.queued_at), c[5]]
             for r, c in zip(rows, cells)],
            "(no series received yet)")
    else:
        _print_table(
            ["study", "series", "no kernel mm", "inst", "state", "received", "reason/flags"],
            [[_short_uid(r.study_instance_uid), _short_uid(r.series_instance_uid), _cut(_facts(c), 13),
              str(r.instance_count), c[4], _short_time(r.last_received_at), c[5]] for r, c in zip(rows, cells)],
            "(no series received yet)", max_width=COMPACT_WIDTH)
        twins = [(r, c) for r, c in zip(rows, cells) if c[4] == "not selected"]
        if twins:  # the reason column above is cut to fit: why, in full width
            print("\nNOT SELECTED (another series of the study was scored)")
            _print_table(["series", "no", "description", "why"],
                         [[_short_uid(r.series_instance_uid), c[0], _cut(c[1], 24), c[5]] for r, c in twins],
                         "", max_width=COMPACT_WIDTH)


def _print_storage(pressure, settings: Settings) -> None:
    mib = 2**20
    verdict = {"ok": "accepting", "low": "accepting, LOW: free space under twice the floor",
               "refusing": "REFUSING C-STORE with 0xA700: free space under the floor"}[pressure.state]
    print("STORAGE")
    print(f"disk: {pressure.free_bytes // mib} MiB free of {pressure.total_bytes // mib} MiB, floor "
          f"{pressure.floor_bytes // mib} MiB: {verdict}")
    if pressure.instances_on_disk is not None:
        print(f"instances on disk: {pressure.instances_on_disk} ({pressure.bytes_on_disk / 1e6:.1f} MB), "
              f"removed by retention: {pressure.instances_deleted}, quarantined files: "
              f"{pressure.quarantined_on_disk}, refused for disk space in the last hour: "
              f"{pressure.refusals_last_hour}")
    retention = (f"{settings.retention_days:g} day(s) after delivery" if settings.retention_days > 0
                 else "off (kept forever)")
    print(f"retention: {retention}")


def _delivery_summary(deliveries: list[tuple[str, str]]) -> str:
    """``2/2 delivered`` or ``1/2 delivered, 1 retrying``; ``-`` when there are none."""
    if not deliveries:
        return "-"
    states = [state for _, state in deliveries]
    done = states.count("delivered")
    others = sorted({s for s in states if s != "delivered"})
    return ", ".join([f"{done}/{len(states)} delivered", *(f"{states.count(s)} {s}" for s in others)])


def cmd_audit(args, settings: Settings) -> int:
    """The newest audit messages (the ATNA trail), newest first, and how many wait to be sent."""
    from datetime import timedelta

    from ct_triage import audit
    from db.session import session_scope
    from db.types import utcnow

    _, session_factory = open_database(settings)
    since = utcnow() - timedelta(hours=args.hours) if args.hours else None
    with session_scope(session_factory) as session:
        rows = audit.recent_audit_events(session, limit=args.limit, since=since)
        table = audit.format_audit_table(rows)
        unsent, oldest = audit.audit_backlog(session)
    print(table)
    repository = settings.audit_repository or "none (CT_TRIAGE_AUDIT_REPOSITORY): kept in the database only"
    print(f"\naudit repository: {repository}; {unsent} message(s) not sent yet"
          + (f", the oldest from {_fmt_time(oldest)}" if unsent and oldest else ""))
    return 0


def cmd_config(args, settings: Settings) -> int:
    if args.markdown:
        from ct_triage.settings import settings_markdown

        print(settings_markdown(), end="")
    else:
        for key, value in settings.effective().items():
            print(f"{key}={value}")
    return 0


DAEMON_COMMANDS = ("serve", "node", "worker", "db", "status", "config")


def _wants_tools(argv: list[str] | None) -> bool:
    """True unless the first word of ``argv`` that is not an option is a daemon command."""
    words = [a for a in (sys.argv[1:] if argv is None else argv) if not a.startswith("-")]
    return not words or words[0] not in DAEMON_COMMANDS


def _add_process_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--processes", type=int, default=None,
                        help="receiving processes on this host, sharing the port (default CT_TRIAGE_NODE_PROCESSES, "
                             "1); more than 1 needs PostgreSQL")
    # Set by the supervisor for the processes it starts (dicom_node.processes), not by hand.
    for option in ("--process-index", "--process-count", "--limits-fd", "--ready-fd"):
        parser.add_argument(option, type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--listen-fds", default="", help=argparse.SUPPRESS)
    parser.add_argument("--restarted", action="store_true", help=argparse.SUPPRESS)


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser for ``argv`` (default ``sys.argv[1:]``): every command, except that the
    offline commands are left out when ``argv`` names a daemon command."""
    parser = argparse.ArgumentParser(prog="ct-triage", description="COVID-19 chest CT worklist triage daemon")
    parser.add_argument("--version", action="version", version=f"ct-triage {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="DICOM node + worker on one machine (embedded defaults)")
    serve.set_defaults(func=cmd_serve)
    node = sub.add_parser("node", help="the DICOM node alone (publishes to CT_TRIAGE_BROKER_URL)")
    node.set_defaults(func=cmd_node)
    for receiver in (serve, node):
        _add_process_options(receiver)
    worker = sub.add_parser("worker", help="a Celery worker (needs CT_TRIAGE_BROKER_URL)")
    worker.add_argument("--queues", default="gpu,io", help="comma-separated queues (default gpu,io)")
    worker.add_argument("--concurrency", type=int, default=1, help="processes (one per GPU for gpu)")
    worker.add_argument("--hostname", default="ct-triage@%h", help="Celery node name")
    worker.set_defaults(func=cmd_worker)
    db = sub.add_parser("db", help="database maintenance")
    db_sub = db.add_subparsers(dest="db_command", required=True)
    db_sub.add_parser("upgrade", help="apply migrations").set_defaults(func=cmd_db_upgrade)
    status = sub.add_parser("status", help="series and queue state as a table")
    status.add_argument("--limit", type=int, default=200)
    status.add_argument("--wide", action="store_true", help="full UIDs and every time stamp (wider than 120 columns)")
    status.add_argument("--quiet-minutes", type=float, default=10.0,
                        help="say so when nothing wrote to the database for this long (default 10)")
    status.set_defaults(func=cmd_status)
    audit_cmd = sub.add_parser("audit", help="the newest audit trail messages (who read or changed what)")
    audit_cmd.add_argument("--limit", type=int, default=50, help="how many (default 50)")
    audit_cmd.add_argument("--hours", type=float, default=0, help="only the last N hours")
    audit_cmd.set_defaults(func=cmd_audit)
    config = sub.add_parser("config", help="print the effective settings")
    config.add_argument("--markdown", action="store_true", help="the settings table of docs/settings.md")
    config.set_defaults(func=cmd_config)
    if _wants_tools(argv):
        from ct_triage_tools import commands as tool_commands  # the offline tools, only when asked for

        tool_commands.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    try:
        settings = Settings.from_env()
        setup_logging(settings.log_level)
        return int(args.func(args, settings) or 0)
    except CtTriageError as exc:
        print(f"ct-triage: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
