"""The house rules of the layout, read from the source with `ast`: no import circle, dependencies
one way (jobs -> pipeline -> model), no Ray in model/, a repo that stands alone."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("model", "pipeline", "jobs")
LAYER = {"model": 0, "pipeline": 1, "jobs": 2}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def _imports(path: Path, name: str, known: set[str]) -> set[str]:
    """Project modules `path` imports anywhere (top level or inside functions)."""
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".") if is_package else name.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            # `from pkg import sub` imports the submodule when there is one.
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base
                       for a in node.names]
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules) | {"model._C"}  # the compiled op: a leaf module, imports nothing back
    return {name: _imports(path, name, known) for name, path in modules.items()}


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_find_cycle_sees_a_circle():
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_import_graph_has_no_circle():
    graph = _graph()
    assert len(graph) > 40  # the walk really found the packages
    cycle = _find_cycle(graph)
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_dependencies_point_one_way():
    wrong = [f"{src} imports {dst}" for src, dsts in _graph().items() for dst in dsts
             if LAYER[dst.split(".")[0]] > LAYER[src.split(".")[0]]]
    assert not wrong, wrong


def test_model_knows_nothing_of_ray_or_torch_distributed():
    offenders = []
    for name, path in _modules().items():
        if not name.startswith("model"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            offenders += [f"{name}: {n}" for n in names
                          if n.split(".")[0] == "ray" or n.startswith("torch.distributed")]
    assert not offenders, offenders


def _reaches_outside(path: Path) -> bool:
    text = path.read_text()
    if re.search(r"\.\./shared|[\"']shared[\"']\s*/", text):
        return True
    # Path(__file__).resolve().parents[N] must name the repo or a folder inside it.
    targets = [path.resolve().parents[int(n)] for n in
               re.findall(r"__file__\)\.resolve\(\)\.parents\[(\d+)\]", text)]
    return any(t != ROOT and ROOT not in t.parents for t in targets)


def test_no_test_or_script_reads_outside_the_repo():
    hits = [str(p.relative_to(ROOT)) for folder in ("tests", "bench", "jobs", "pipeline", "model")
            for p in (ROOT / folder).rglob("*.py")
            if p.name != "test_layout.py" and _reaches_outside(p)]
    beside = "../" + "shared"  # the folder beside a checkout, which a plain clone lacks
    hits += [name for name in ("Makefile", ".ci/run") if beside in (ROOT / name).read_text()]
    assert not hits, hits
