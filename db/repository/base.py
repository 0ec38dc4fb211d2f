"""Helpers every repository module shares.
"""

from __future__ import annotations


def rowcount(result) -> int:
    """Rows an UPDATE matched (a CursorResult's rowcount; typed loosely by SQLAlchemy)."""
    return int(result.rowcount)
