"""Apply Alembic migrations programmatically (``ct-triage db upgrade``)."""

from __future__ import annotations

import logging
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import text
from sqlalchemy.engine import Engine

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"

log = logging.getLogger(__name__)
MIGRATION_LOCK_KEY = 0x6374747269616765  # "cttriage"


def alembic_config(url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def head_revision() -> str:
    head = ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()
    if head is None:  # only with an empty versions folder
        raise RuntimeError("no migrations found")
    return head


def upgrade(engine: Engine) -> str:
    """Bring the schema to head; returns the revision now current."""
    config = alembic_config(engine.url.render_as_string(hide_password=False))
    before = current_revision(engine)
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            # The node and the workers may start together on an empty database: one
            # migrates, the others wait and then find the schema at head.
            conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK_KEY})
        config.attributes["connection"] = conn
        command.upgrade(config, "head")
    revision = current_revision(engine)
    if revision != before:  # said once, when a migration ran; not on every command
        log.info("database schema upgraded from %s to revision %s", before or "empty", revision)
    else:
        log.debug("database schema at revision %s", revision)
    return revision or ""
