"""docs/architecture.dot is the package graph the code has today (ct_triage_tools.architecture)."""

from __future__ import annotations

from pathlib import Path

from ct_triage_tools.architecture import edges, node_of, to_dot

ROOT = Path(__file__).resolve().parents[1]


def test_nodes_are_the_longest_prefix():
    assert node_of("worker.tasks.score") == "worker.tasks"
    assert node_of("db.repository.outbox") == "db.repository"
    assert node_of("db.models") == "db"
    assert node_of("numpy") is None


def test_the_committed_picture_matches_the_code():
    drawn = to_dot(edges())
    assert ('"worker.tasks" -> "worker.scoring"' in drawn) and ('"db" ->' not in drawn)
    committed = (ROOT / "docs" / "architecture.dot").read_text()
    assert committed == drawn, ("docs/architecture.dot is stale: run python -m ct_triage_tools.architecture "
                                "docs/architecture.dot and dot -Tpng docs/architecture.dot -o docs/architecture.png")
