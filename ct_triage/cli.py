"""The ``ct-triage`` command line: thin composition of node, worker and database."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import subprocess
import threading
import time

from ct_triage import __version__
from ct_triage.errors import CtTriageError
from ct_triage.runtime import log_effective_config, open_database, setup_logging
from ct_triage.settings import Settings

log = logging.getLogger("ct_triage")


def _wait_for_signal() -> None:
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda signum, _frame: (stop.set(), log.info("%s received: stopping gracefully",
                                                                           signal.Signals(signum).name)))
    while not stop.wait(1.0):
        pass


def _start_node(settings: Settings, session_factory):
    from ct_triage.contract import make_publisher
    from dicom_node import DicomNode

    node = DicomNode(settings, session_factory, make_publisher(settings.broker_url))
    node.start()
    return node


def cmd_serve(args, settings: Settings) -> int:
    """Node + embedded worker on one machine, no servers needed."""
    log_effective_config(settings, "serve")
    _, session_factory = open_database(settings)
    node = _start_node(settings, session_factory)
    consumer = None
    worker_process = None
    if settings.embedded_queue:
        from ct_triage.contract import make_publisher
        from worker.embedded import EmbeddedConsumer
        from worker.jobs import WorkerContext

        consumer = EmbeddedConsumer(WorkerContext(settings, session_factory, make_publisher("")),
                                    poll_interval_s=settings.poll_interval_s)
        consumer.start()
        log.info("embedded worker consuming jobs from the database")
    else:
        worker_process = subprocess.Popen([sys.executable, "-m", "ct_triage.cli", "worker"])
        log.info("Celery worker started (pid %d) on %s", worker_process.pid, "gpu,io")
    log.info("ct-triage serve ready: DICOM %s on port %d", settings.ae_title, node.port)
    try:
        _wait_for_signal()
    finally:
        # Graceful (SIGTERM): no new work, in-flight C-STOREs answered, running tasks requeued.
        started = time.monotonic()
        if worker_process:
            worker_process.terminate()  # the Celery worker's own graceful stop (cmd_worker)
        if consumer:
            consumer.request_stop()
        node.stop()
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
    from worker.jobs import _holder_is_dead

    return _holder_is_dead(holder)


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
    log_effective_config(settings, "node")
    if settings.embedded_queue:
        log.warning("CT_TRIAGE_BROKER_URL is empty: jobs wait in the database for a `ct-triage serve`")
    _, session_factory = open_database(settings)
    node = _start_node(settings, session_factory)
    log.info("ct-triage node ready: DICOM %s on port %d", settings.ae_title, node.port)
    try:
        _wait_for_signal()
    finally:
        node.stop()
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

    from worker.celery_app import app

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


def _print_table(headers: list[str], table: list[list[str]], empty: str) -> None:
    widths = [max(len(h), *(len(row[i]) for row in table)) if table else len(h) for i, h in enumerate(headers)]
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip())
    for row in table:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
    if not table:
        print(empty)


def cmd_status(args, settings: Settings) -> int:
    from db import repository
    from db.session import session_scope

    from dicom_node.retention import disk_pressure

    _, session_factory = open_database(settings)
    pressure = disk_pressure(settings.effective_storage_dir, settings.min_free_disk_mb, session_factory)
    with session_scope(session_factory) as session:
        rows = repository.series_status(session, limit=args.limit)
        results = repository.result_status(session, limit=args.limit)
    _print_storage(pressure, settings)
    print("\nSERIES")
    _print_table(
        ["study_instance_uid", "series_instance_uid", "mod", "instances", "dups", "ver", "state",
         "first_received", "last_received", "stable", "queued", "reason/flags"],
        [[r.study_instance_uid, r.series_instance_uid, r.modality or "-", str(r.instance_count),
          str(r.duplicate_count), str(r.version), r.state, _fmt_time(r.first_received_at),
          _fmt_time(r.last_received_at), _fmt_time(r.stable_at), _fmt_time(r.queued_at),
          "; ".join(filter(None, [r.state_reason or "", *r.flags]))] for r in rows],
        "(no series received yet)")
    print("\nRESULTS (worklist order)")
    _print_table(
        ["priority", "study_instance_uid", "ver", "status", "category", "involvement_%", "scored",
         "deliveries", "reason"],
        [[r.priority, r.study_instance_uid, str(r.version), r.status, r.category or "-",
          f"{r.involvement_percent:.1f}" if r.involvement_percent is not None else "-", _fmt_time(r.scored_at),
          ", ".join(f"{d}: {state}" for d, state in r.deliveries) or "-", r.reason or ""] for r in results],
        "(no results yet)")
    return 0


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


def cmd_demo(args, settings: Settings) -> int:
    from pathlib import Path

    from ct_triage.demo import print_rows, run_demo

    rows = run_demo(settings, Path(args.workdir))
    print_rows(rows)
    return 0 if all(r.state == "in PACS" for r in rows) else 1


def cmd_config(args, settings: Settings) -> int:
    if args.markdown:
        print("| variable | default | meaning |\n|---|---|---|")
        for name, default, text in Settings.documentation():
            print(f"| `{name}` | `{default}` | {text} |" if default else f"| `{name}` | | {text} |")
    else:
        for key, value in settings.effective().items():
            print(f"{key}={value}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ct-triage", description="COVID-19 chest CT worklist triage daemon")
    parser.add_argument("--version", action="version", version=f"ct-triage {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("serve", help="DICOM node + worker on one machine (embedded defaults)").set_defaults(
        func=cmd_serve)
    sub.add_parser("node", help="the DICOM node alone (publishes to CT_TRIAGE_BROKER_URL)").set_defaults(
        func=cmd_node)
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
    status.set_defaults(func=cmd_status)
    demo = sub.add_parser("demo", help="embedded daemon + local PACS + three phantom studies, end to end")
    demo.add_argument("--workdir", default="var/demo", help="scratch folder (emptied first)")
    demo.set_defaults(func=cmd_demo)
    config = sub.add_parser("config", help="print the effective settings")
    config.add_argument("--markdown", action="store_true", help="the settings table for the README")
    config.set_defaults(func=cmd_config)
    from worker import commands as worker_commands

    worker_commands.register(sub, Settings.from_env)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        settings = Settings.from_env()
        setup_logging(settings.log_level)
        return int(args.func(args, settings) or 0) if _takes_settings(args.func) else int(args.func(args) or 0)
    except CtTriageError as exc:
        print(f"ct-triage: error: {exc}", file=sys.stderr)
        return 2


def _takes_settings(func) -> bool:
    import inspect

    return len(inspect.signature(func).parameters) >= 2


if __name__ == "__main__":
    sys.exit(main())
