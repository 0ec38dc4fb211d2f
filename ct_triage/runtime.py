"""Process start-up shared by every command: logging, settings, database."""

from __future__ import annotations

import logging
import sys

from ct_triage.settings import Settings
from ct_triage.text import OneLineLogFilter, clean

log = logging.getLogger("ct_triage")

LIBRARY_LOGGERS = ("pynetdicom", "highdicom", "alembic")


def setup_logging(level: str = "INFO") -> None:
    logging.basicConfig(stream=sys.stderr, level=getattr(logging, level.upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    # Libraries log at WARNING unless ct-triage itself runs at DEBUG: pynetdicom at DEBUG
    # dumps whole data sets (patient name, birth date), highdicom logs ~20 INFO lines per
    # object it builds, alembic a few per command.
    quiet = logging.DEBUG if level.upper() == "DEBUG" else logging.WARNING
    for name in LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(quiet)
    # Every line stays one line (peer text is escaped); pynetdicom's errors lose their
    # tracebacks below DEBUG (see ct_triage.text). Python warnings (pydicom warns about
    # odd values, quoting them) go through logging too.
    logging.captureWarnings(True)
    one_line = OneLineLogFilter(tracebacks=level.upper() == "DEBUG")
    for handler in logging.getLogger().handlers:
        handler.addFilter(one_line)


def log_effective_config(settings: Settings, role: str) -> None:
    """The settings at start as one block, one ``name = value`` per line, secrets masked:
    at INFO those that differ from the defaults (and where the database and the storage
    are), at DEBUG every one."""
    if log.isEnabledFor(logging.DEBUG):
        log.debug("%s", config_block(settings, role, full=True), extra={"multiline": True})
    else:
        log.info("%s", config_block(settings, role, full=False), extra={"multiline": True})


ALWAYS_SHOWN = ("effective_database_url", "effective_storage_dir")


def config_block(settings: Settings, role: str, *, full: bool) -> str:
    """``ct-triage ROLE starting with ...:`` and ``name = value`` lines (see log_effective_config)."""
    values = settings.effective()
    if full:
        shown, title = values, "every setting"
    else:
        defaults = Settings().effective()
        shown = {k: v for k, v in values.items() if k in ALWAYS_SHOWN or v != defaults.get(k)}
        if shown.get("database_url") == shown["effective_database_url"]:
            del shown["effective_database_url"]  # the same line twice
        changed = len([k for k in shown if k not in ALWAYS_SHOWN])
        title = (f"{changed} setting(s) changed from the defaults" if changed else "the default settings")
        title += " (every setting at DEBUG, or `ct-triage config`)"
    width = max((len(k) for k in shown), default=0)
    lines = [f"{key.ljust(width)} = {clean(value, 500)}" for key, value in shown.items()]  # one line each
    return "\n".join([f"ct-triage {role} starting with {title}:", *lines])


def open_database(settings: Settings, *, upgrade: bool = True):
    """(engine, session_factory); applies migrations first when ``upgrade``."""
    from db.migrate import upgrade as upgrade_schema
    from db.session import make_engine, make_session_factory

    settings.var_dir.mkdir(parents=True, exist_ok=True)
    engine = make_engine(settings.effective_database_url)
    if upgrade:
        upgrade_schema(engine)
    return engine, make_session_factory(engine)
