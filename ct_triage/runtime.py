"""Process start-up shared by every command: logging, settings, database."""

from __future__ import annotations

import logging
import sys

from ct_triage.settings import Settings
from ct_triage.text import OneLineLogFilter

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
    items = " ".join(f"{key}={value!r}" for key, value in settings.effective().items())
    log.info("ct-triage %s starting with %s", role, items)


def open_database(settings: Settings, *, upgrade: bool = True):
    """(engine, session_factory); applies migrations first when ``upgrade``."""
    from db.migrate import upgrade as upgrade_schema
    from db.session import make_engine, make_session_factory

    settings.var_dir.mkdir(parents=True, exist_ok=True)
    engine = make_engine(settings.effective_database_url)
    if upgrade:
        upgrade_schema(engine)
    return engine, make_session_factory(engine)
