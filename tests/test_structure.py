"""The package's shape, checked from its source: the import graph between its modules has no cycle, no private
name crosses from one part of the package into another, and no source file outgrows a few hundred lines."""

import ast
import dataclasses
from pathlib import Path

import pytest

from jaxcnn import train
from jaxcnn.train import run

SOURCE = Path(__file__).resolve().parents[1] / "src" / "jaxcnn"
MAX_LINES = 450  # the bound on the largest file (the aim is about 400)


def module_name(path: Path) -> str:
    parts = path.relative_to(SOURCE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted(SOURCE.rglob("*.py"))}


def imports_of(name: str) -> list[tuple[str, list[str], bool]]:
    """``(module, imported names, at top level)`` for every ``import`` of a jaxcnn module in ``name``'s source;
    a module imported inside a function (a lazy import) is not at top level."""
    tree = ast.parse(MODULES[name].read_text())
    package = name if MODULES[name].name == "__init__.py" else name.rpartition(".")[0]
    top = set(map(id, tree.body))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + [base]).strip(".")
            if base.split(".")[0] == "jaxcnn":
                found.append((base, [alias.name for alias in node.names], id(node) in top))
        elif isinstance(node, ast.Import):
            found += [(a.name, [], id(node) in top) for a in node.names if a.name.split(".")[0] == "jaxcnn"]
    return found


def top_level_graph() -> dict[str, set[str]]:
    """Module -> the jaxcnn modules its top level imports (``from jaxcnn.x import y`` counts ``jaxcnn.x.y``
    when that is a module, else ``jaxcnn.x``). TYPE_CHECKING blocks are not at top level in this sense."""
    graph: dict[str, set[str]] = {}
    for name in MODULES:
        edges = set()
        for base, names, top in imports_of(name):
            if not top:
                continue
            targets = [f"{base}.{n}" for n in names if f"{base}.{n}" in MODULES] or [base]
            edges.update(target for target in targets if target in MODULES and target != name)
        graph[name] = edges
    return graph


def test_the_import_graph_has_no_cycle():
    graph = top_level_graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                cycle = path[path.index(target) :] + [target]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target, [*path, target])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])


def test_the_graph_sees_the_imports_a_cycle_would_need():
    graph = top_level_graph()
    assert "jaxcnn.train.step" in graph["jaxcnn.train.ensemble"]
    assert "jaxcnn.train.state" in graph["jaxcnn.parallel"]
    assert not any(target.startswith("jaxcnn.parallel") for target in graph["jaxcnn.train.loop"])


CLI_PARTS = ("jaxcnn.cli", "jaxcnn._cli_use", "jaxcnn._train_flags")  # the command line, in three files
SHARED = {
    "jaxcnn._validate",
    "jaxcnn._signals",
    "jaxcnn._gloo",
    "jaxcnn._memory",
    "jaxcnn._xla_flags",
    "jaxcnn._step_jit",
}  # private helpers at the top


def part_of(module: str) -> str:
    """The part of the package a module belongs to: ``jaxcnn.train.loop`` -> ``jaxcnn.train``; a module at the
    top (``jaxcnn.models``, ``jaxcnn._signals``) is a part of its own, and the command line's files are one."""
    return "jaxcnn.cli" if module in CLI_PARTS else ".".join(module.split(".")[:2])


def test_no_private_name_is_imported_across_parts():
    crossings = []
    for name in MODULES:
        for base, names, _ in imports_of(name):
            if part_of(base) == part_of(name) or base in SHARED:
                continue
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            private = [n for n in private if f"{base}.{n}" not in SHARED and part_of(f"{base}.{n}") != part_of(name)]
            private += [p for p in base.split(".")[2:] if p.startswith("_")]  # a private module of another part
            if private:
                crossings.append(f"{name} imports {base}: {private}")
    assert crossings == []


def test_no_source_file_is_over_the_bound():
    sizes = {name: len(path.read_text().splitlines()) for name, path in MODULES.items()}
    assert {name: size for name, size in sizes.items() if size > MAX_LINES} == {}


def test_the_compile_key_holds_every_field_but_the_noncompiling_ones():
    fields = {field.name for field in dataclasses.fields(train.Config)}
    assert set(run.NONCOMPILING) <= fields
    config = train.Config(learning_rate=0.05, optimizer="adam", seed=3, epochs=7, dropout=0.25, keep=2)
    key = dict(run.compile_key(config, None, 45)[0])
    assert set(key) == fields  # every field, so a new one is in the key unless listed as noncompiling
    for name in fields:
        expected = getattr(train.Config, name) if name in run.NONCOMPILING else getattr(config, name)
        assert key[name] == expected, name
    other = config.replace(seed=4, epochs=9, keep=5, early_stopping=2, normalize=False)
    assert run.compile_key(other, None, 45) == run.compile_key(config, None, 45)
    assert run.compile_key(config.replace(learning_rate=0.06), None, 45) != run.compile_key(config, None, 45)
    assert run.compile_key(config, None, 46) != run.compile_key(config, None, 45)
    cosine = config.replace(schedule="cosine")
    assert run.compile_key(cosine.replace(epochs=9), None, 45) != run.compile_key(cosine, None, 45)  # its horizon
