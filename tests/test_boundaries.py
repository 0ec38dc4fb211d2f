"""Package boundaries, read from the source with ``ast`` (every import statement,
including those inside functions and under ``TYPE_CHECKING``):

- no import cycle among the project's modules;
- ``db`` imports nothing of ours; ``dicom_node`` imports only ``db`` and the task
  contract, settings and errors of ``ct_triage``;
- the entry point (``ct_triage_app``) sits alone on top: nothing of ours imports it, and
  ``ct_triage`` (what every process shares) imports no node, worker, page, tools or entry
  point;
- the daemon's packages never import the offline tools (``ct_triage_tools``), except the
  command line, which imports them inside a function, only for the offline commands;
- the worker's packages import only downwards, in this order: ``scoring`` <
  ``followup`` < ``outputs`` < ``worklist`` < ``delivery`` < ``tasks`` (the leaves
  ``worker.retry`` and ``worker.durable`` below all);
- torch is imported only by the model code, ``worker.scoring``;
- the interfaces (``worker.scoring.base``, ``worker.outputs.base``) import nothing of
  their implementations; ``bench/`` does not import ``tests``;

and, by running Python, that importing the node, or the CLI for a daemon command,
leaves torch and the tools out.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("ct_triage", "ct_triage_app", "ct_triage_tools", "dashboard", "db", "dicom_node", "worker")
DAEMON = ("ct_triage", "ct_triage_app", "dashboard", "db", "dicom_node", "worker")
# The worker's layers, bottom first: a module may import its own layer and those below.
WORKER_LAYERS = ("worker.retry", "worker.durable", "worker.scoring", "worker.followup", "worker.outputs",
                 "worker.worklist", "worker.delivery", "worker.tasks")


@dataclass(frozen=True)
class Edge:
    source: str  # importing module
    target: str  # imported project module
    line: int
    in_function: bool


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def project_modules(root: Path = ROOT, packages=PACKAGES) -> dict[str, Path]:
    out = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            out[module_name(path, root)] = path
    return out


def _resolve(module: str, is_package: bool, level: int, name: str | None) -> str:
    """Absolute module name of a (possibly relative) ``from`` import."""
    if not level:
        return name or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([name] if name else []))


def _owner(name: str, modules: dict[str, Path]) -> str | None:
    """The project module ``name`` is, or lies in (``a.b.func`` -> ``a.b``)."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def import_edges(modules: dict[str, Path], extra_files: dict[str, Path] | None = None) -> list[Edge]:
    """Every import of a project module by a project module (or by ``extra_files``)."""
    edges = []
    for source, path in {**modules, **(extra_files or {})}.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        is_package = path.name == "__init__.py"
        functions = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
        inside = {id(inner) for f in functions for inner in ast.walk(f) if inner is not f}
        for node in ast.walk(tree):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(source, is_package, node.level, node.module)
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    targets.append(sub if sub in modules else base)  # a submodule, else a name in base
            else:
                continue
            for target in targets:
                owner = _owner(target, modules)
                if owner is not None and owner != source:
                    edges.append(Edge(source, owner, node.lineno, id(node) in inside))
    return edges


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(node: str) -> tuple[str, Iterator[str]]:
        """Number ``node`` in visiting order, push it; the work item for its children."""
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        return node, iter(sorted(graph.get(node, ())))

    for start in sorted(graph):
        if start in index:
            continue
        work = [visit(start)]
        while work:
            node, children = work[-1]
            advanced = False
            for child in children:
                if child not in index:
                    work.append(visit(child))
                    advanced = True
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            if advanced:
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = _pop_component(stack, on_stack, node)
                if len(component) > 1:
                    cycles.append(sorted(component))
    return cycles


def _pop_component(stack: list[str], on_stack: set[str], root: str) -> list[str]:
    """Pop the strongly connected component whose root is ``root`` off Tarjan's stack."""
    component = []
    while True:
        member = stack.pop()
        on_stack.discard(member)
        component.append(member)
        if member == root:
            return component


@pytest.fixture(scope="module")
def modules() -> dict[str, Path]:
    return project_modules()


@pytest.fixture(scope="module")
def edges(modules) -> list[Edge]:
    return import_edges(modules)


def _in(module: str, packages) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)


def _show(edges: list[Edge]) -> str:
    return "\n".join(f"{e.source}:{e.line} imports {e.target}{' (in a function)' if e.in_function else ''}"
                     for e in edges)


# -- the analysis itself can fail ---------------------------------------------------------------


def test_the_cycle_finder_finds_cycles():
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert find_cycles({"a": {"b"}, "b": set(), "c": {"b"}}) == []


def test_the_import_reader_sees_function_level_and_relative_imports(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("from . import a\n")
    (pkg / "a.py").write_text("def f():\n    from pkg.b import g\n    return g\n")
    (pkg / "b.py").write_text("from .a import f\n\ndef g():\n    return f\n")
    modules = project_modules(tmp_path, ("pkg",))
    found = {(e.source, e.target, e.in_function) for e in import_edges(modules)}
    assert found == {("pkg", "pkg.a", False), ("pkg.a", "pkg.b", True), ("pkg.b", "pkg.a", False)}
    graph: dict[str, set[str]] = {}
    for e in import_edges(modules):
        graph.setdefault(e.source, set()).add(e.target)
    assert find_cycles(graph) == [["pkg.a", "pkg.b"]]


def test_the_project_graph_is_read(modules, edges):
    for name in ("dicom_node.server", "worker.scoring.registry", "worker.outputs.base", "ct_triage_tools.demo"):
        assert name in modules
    pairs = {(e.source, e.target) for e in edges}
    assert ("dicom_node.server", "dicom_node.store") in pairs
    assert ("worker.scoring.registry", "worker.scoring.classical") in pairs  # inside get_scorer


# -- the rules -------------------------------------------------------------------------------------


def test_no_import_cycles(edges):
    graph: dict[str, set[str]] = {}
    for e in edges:
        graph.setdefault(e.source, set()).add(e.target)
    cycles = find_cycles(graph)
    detail = [_show([e for e in edges if e.source in c and e.target in c]) for c in cycles]
    assert not cycles, "import cycles:\n" + "\n\n".join(detail)


def test_db_imports_nothing_of_ours(edges):
    bad = [e for e in edges if _in(e.source, ("db",)) and not _in(e.target, ("db",))]
    assert not bad, _show(bad)


def test_dicom_node_imports_only_db_and_the_contract(edges):
    # ct_triage.text: the one sanitiser for peer text in logs; ct_triage.polling: the background
    # loop the node and the worker share; ct_triage.association: the pynetdicom reactor-pause
    # workaround every SCU of ours uses (leaves: they import nothing of ours).
    allowed = ("db", "dicom_node", "ct_triage.contract", "ct_triage.settings", "ct_triage.errors", "ct_triage.text",
               "ct_triage.polling", "ct_triage.association", "ct_triage.audit")
    bad = [e for e in edges if _in(e.source, ("dicom_node",)) and not _in(e.target, allowed)]
    assert not bad, _show(bad)
    leaf = [e for e in edges if e.source in ("ct_triage.text", "ct_triage.polling", "ct_triage.association")]
    assert not leaf, _show(leaf)


def test_the_daemon_never_imports_the_tools(edges):
    bad = [e for e in edges if _in(e.source, DAEMON) and _in(e.target, ("ct_triage_tools",))
           and not (e.source == "ct_triage_app.cli" and e.in_function)]
    assert not bad, _show(bad)


def test_the_entry_point_is_on_top(edges):
    """Nothing of ours imports ``ct_triage_app`` (the command line and process wiring)."""
    bad = [e for e in edges if _in(e.target, ("ct_triage_app",)) and not _in(e.source, ("ct_triage_app",))]
    assert not bad, _show(bad)


def test_ct_triage_core_imports_nothing_above_it(edges):
    """``ct_triage`` (settings, contract, errors, text, runtime) is what every process shares:
    it imports no node, worker, page, tools or entry point, not even inside a function."""
    above = ("dicom_node", "worker", "dashboard", "ct_triage_tools", "ct_triage_app")
    bad = [e for e in edges if _in(e.source, ("ct_triage",)) and _in(e.target, above)]
    assert not bad, _show(bad)


def _worker_layer(module: str) -> int | None:
    for rank, layer in enumerate(WORKER_LAYERS):
        if _in(module, (layer,)):
            return rank
    return None


def test_every_worker_module_has_a_layer(modules):
    loose = [m for m in modules if _in(m, ("worker",)) and m != "worker" and _worker_layer(m) is None]
    assert not loose, f"worker modules outside WORKER_LAYERS: {loose}"


def test_the_worker_imports_only_downwards(edges):
    bad = [e for e in edges if _in(e.source, ("worker",)) and _in(e.target, ("worker",))
           and (_worker_layer(e.target) or 0) > (_worker_layer(e.source) or 0)]
    assert not bad, _show(bad)


def test_the_layer_rule_can_fail():
    assert _worker_layer("worker.tasks.score") > _worker_layer("worker.followup.priors")
    assert _worker_layer("worker.retry") < _worker_layer("worker.scoring.pipeline")


def _imports_torch(path: Path) -> bool:
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import) and any(a.name.split(".")[0] == "torch" for a in node.names):
            return True
        if isinstance(node, ast.ImportFrom) and not node.level and (node.module or "").split(".")[0] == "torch":
            return True
    return False


def test_torch_only_in_the_model_code(modules):
    bad = [m for m, path in modules.items() if _in(m, DAEMON) and not _in(m, ("worker.scoring",))
           and _imports_torch(path)]
    assert not bad, f"torch imported outside worker.scoring: {bad}"
    assert _imports_torch(modules["worker.scoring.lesion_net"])  # the check sees torch where it is


def test_interfaces_import_no_implementation(edges):
    bad = [e for e in edges if e.source == "worker.scoring.base" and _in(e.target, ("worker",))
           and e.target != "worker.scoring.volume"]
    bad += [e for e in edges if e.source == "worker.outputs.base" and _in(e.target, ("worker.outputs",))]
    assert not bad, _show(bad)


def test_bench_does_not_import_tests(modules):
    bench = {f"bench.{p.stem}": p for p in sorted((ROOT / "bench").glob("*.py"))}
    with_tests = {**modules, **{f"tests.{p.stem}": p for p in (ROOT / "tests").glob("*.py")},
                  "tests.support": ROOT / "tests" / "support" / "__init__.py",
                  **{f"tests.support.{p.stem}": p for p in (ROOT / "tests" / "support").glob("*.py")}}
    bad = [e for e in import_edges(with_tests, bench) if e.source.startswith("bench.")
           and _in(e.target, ("tests",))]
    assert not bad, _show(bad)


# -- what actually gets imported -------------------------------------------------------------------


def _loaded(code: str) -> str:
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            cwd=ROOT, timeout=120)
    return result.stdout.strip()


def test_importing_dicom_node_leaves_torch_out():
    code = "import sys, dicom_node, dicom_node.server, db.repository; print('torch' in sys.modules)"
    assert _loaded(code) == "False"


def test_the_cli_loads_the_tools_only_for_their_commands():
    code = ("import sys\nfrom ct_triage_app.cli import build_parser\n"
            "names = lambda p: sorted(p._subparsers._group_actions[0].choices)\n"
            "daemon = names(build_parser(['serve']))\n"
            "print('ct_triage_tools' in sys.modules, 'torch' in sys.modules, 'phantom' in daemon)\n"
            "tools = names(build_parser(['phantom', 'out', '--involvement', '5']))\n"
            "print('ct_triage_tools' in sys.modules, 'phantom' in tools, 'demo' in tools)")
    first, second = _loaded(code).splitlines()
    assert first == "False False False"
    assert second == "True True True"
