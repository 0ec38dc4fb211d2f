"""Draw the package graph of ct-triage from its import statements (docs/architecture.md's picture).

One node per package (the worker's layers and ``db.repository`` as nodes of their own), one
edge per "imports" between two of them, read with ``ast`` from every import statement,
those inside functions included; an edge only used inside functions is dashed. Writes
Graphviz DOT, deterministic, so ``tests/test_architecture_doc.py`` can check that the
committed ``docs/architecture.dot`` is what the code draws today. Render with
``dot -Tpng docs/architecture.dot -o docs/architecture.png`` (Debian package graphviz).

    python -m ct_triage_tools.architecture docs/architecture.dot
"""

from __future__ import annotations

import argparse
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("ct_triage_app", "ct_triage_tools", "dashboard", "worker", "dicom_node", "ct_triage", "db")
# Sub-packages drawn as nodes of their own (the worker's layers, top first).
NODES = ("ct_triage_app", "ct_triage_tools", "dashboard", "worker.tasks", "worker.delivery", "worker.worklist",
         "worker.outputs", "worker.followup", "worker.scoring", "worker.retry", "worker.durable", "dicom_node",
         "ct_triage", "db.repository", "db")


def node_of(module: str) -> str | None:
    """The drawn node a module belongs to (the longest matching prefix), or None."""
    best = None
    for node in NODES:
        if (module == node or module.startswith(node + ".")) and (best is None or len(node) > len(best)):
            best = node
    return best


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def edges(root: Path = ROOT) -> dict[tuple[str, str], bool]:
    """{(from node, to node): True when some import of it is at module level}."""
    found: dict[tuple[str, str], bool] = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            source = node_of(_module_name(path))
            tree = ast.parse(path.read_text(), filename=str(path))
            nested = {id(inner) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                      for inner in ast.walk(f) if inner is not f}
            for stmt in ast.walk(tree):
                if isinstance(stmt, ast.Import):
                    names = [alias.name for alias in stmt.names]
                elif isinstance(stmt, ast.ImportFrom) and not stmt.level and stmt.module:
                    names = [stmt.module] + [f"{stmt.module}.{alias.name}" for alias in stmt.names]
                else:
                    continue
                for name in names:
                    target = node_of(name)
                    if source and target and target != source:
                        key = (source, target)
                        found[key] = found.get(key, False) or id(stmt) not in nested
    return found


def to_dot(graph: dict[tuple[str, str], bool]) -> str:
    lines = ["// Drawn by ct_triage_tools.architecture from the import statements; do not edit.",
             "digraph ct_triage {", '  rankdir=TB; node [shape=box, fontname="DejaVu Sans", fontsize=11];']
    lines += [f'  "{node}";' for node in NODES]
    for (source, target), top_level in sorted(graph.items()):
        lines.append(f'  "{source}" -> "{target}"' + ("" if top_level else " [style=dashed]") + ";")
    lines.append("}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="DOT file to write")
    args = parser.parse_args(argv)
    args.out.write_text(to_dot(edges()))


if __name__ == "__main__":
    main()
