"""The ``nodes`` table: node processes sharing this database (dicom_node.nodes, dicom_node.orphans)."""

from __future__ import annotations

import json
from datetime import datetime, timedelta

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from db.models import Node
from db.types import utcnow


def register(session: Session, node_id: str, host: str, pid: int, now: datetime | None = None) -> int:
    now = now or utcnow()
    row = Node(node_id=node_id, host=host, pid=pid, started_at=now, heartbeat_at=now, busy_json="[]")
    session.add(row)
    session.flush()
    return row.id


def heartbeat(session: Session, row_id: int, busy: frozenset[str] | None = None,
              now: datetime | None = None) -> Node | None:
    """Beat (and publish the busy studies when given); the row, or None when it is gone."""
    values: dict[str, object] = {"heartbeat_at": now or utcnow()}
    if busy is not None:
        values["busy_json"] = json.dumps(sorted(busy))
    session.execute(update(Node).where(Node.id == row_id).values(**values))
    return session.get(Node, row_id)


def stopped(session: Session, row_id: int, now: datetime | None = None) -> None:
    session.execute(update(Node).where(Node.id == row_id).values(stopped_at=now or utcnow(), busy_json="[]"))


def unrecovered(session: Session, exclude: int | None = None) -> list[Node]:
    """Rows whose acknowledged-but-unindexed files nobody has looked at yet (live ones too)."""
    query = select(Node).where(Node.recovered_at.is_(None))
    if exclude is not None:
        query = query.where(Node.id != exclude)
    return list(session.scalars(query.order_by(Node.id)).all())


def mark_recovered(session: Session, row_id: int, now: datetime | None = None) -> None:
    session.execute(update(Node).where(Node.id == row_id).values(recovered_at=now or utcnow(), busy_json="[]"))


def busy_elsewhere(session: Session, row_id: int | None, dead_after_s: float,
                   now: datetime | None = None) -> frozenset[str]:
    """Studies that other live nodes (beat within ``dead_after_s``) are receiving or indexing."""
    fresh = (now or utcnow()) - timedelta(seconds=dead_after_s)
    query = select(Node.busy_json).where(Node.stopped_at.is_(None), Node.recovered_at.is_(None),
                                         Node.heartbeat_at >= fresh, Node.busy_json != "[]")
    if row_id is not None:
        query = query.where(Node.id != row_id)
    out: set[str] = set()
    for text in session.scalars(query):
        out.update(json.loads(text or "[]"))
    return frozenset(out)


def indexed_among(session: Session, paths: list[str]) -> set[str]:
    """Which of ``paths`` (storage-relative) have an instance row."""
    from db.models import Instance

    found: set[str] = set()
    for start in range(0, len(paths), 500):
        found.update(session.scalars(select(Instance.path).where(Instance.path.in_(paths[start:start + 500]))))
    return found
