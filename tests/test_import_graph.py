"""The package's import graph: no cycles, and the layers import only downwards.

Every ``import`` / ``from ... import`` of a pellucid module counts, at module level and inside
functions alike (a function-level import hides a cycle, it does not remove it); only imports under
``if TYPE_CHECKING:`` are left out, since they never run. ``from pkg import name`` counts as
importing ``pkg`` (its ``__init__``, re-exports included) and, when ``pkg.name`` is a module, that
module too. The check reads the sources with :mod:`ast`, so it needs nothing but the standard library.

Layers, bottom to top: ``pellucid.registry`` (imports no pellucid module) → ``datasets`` → ``core``
→ ``explain`` → ``apps`` / ``ui`` / ``cli``.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "pellucid"

# (importer, imported) pairs that break the layer rules today, each owned by a file outside this
# check's reach. Remove an entry when its edge is gone (test_known_violations_still_exist says so).
KNOWN_LAYER_VIOLATIONS: set[tuple[str, str]] = set()

# prefix of the importer → prefixes it must never import
FORBIDDEN = {
    "pellucid.registry": ("pellucid",),
    "pellucid.datasets": ("pellucid.core", "pellucid.explain", "pellucid.apps", "pellucid.ui", "pellucid.cli"),
    "pellucid.core": ("pellucid.explain", "pellucid.apps", "pellucid.ui", "pellucid.cli"),
    "pellucid.explain": ("pellucid.apps", "pellucid.ui", "pellucid.cli"),
}


def module_files(root: Path) -> dict[str, list[Path]]:
    """Dotted module name → its source file(s) for every ``.py`` under the package ``root``."""
    mods: dict[str, list[Path]] = {}
    for f in sorted(root.rglob("*.py")):
        parts = f.relative_to(root.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        mods.setdefault(name, []).append(f)
    return mods


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(x) for stmt in node.body for x in ast.walk(stmt))
    return skip


def _imported_names(f: Path, name: str):
    """Yield ``(line, dotted name)`` for every import in ``f`` (module ``name``) that runs."""
    tree = ast.parse(f.read_text(encoding="utf-8"), filename=str(f))
    skip = _type_checking_nodes(tree)
    base = name.split(".") if f.name == "__init__.py" else name.split(".")[:-1]
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level:
                anchor = base[: len(base) - (node.level - 1)]
                mod = ".".join(anchor + ([mod] if mod else []))
            yield node.lineno, mod
            for alias in node.names:
                yield node.lineno, f"{mod}.{alias.name}"


def import_graph(root: Path) -> dict[str, dict[str, list[str]]]:
    """``{importer: {imported: ["file:line", ...]}}`` over the package's own modules."""
    mods = module_files(root)
    pkg = root.name
    graph: dict[str, dict[str, list[str]]] = {m: {} for m in mods}
    for name, files in mods.items():
        for f in files:
            for line, target in _imported_names(f, name):
                while target and target not in mods:
                    target = target.rpartition(".")[0]
                if target and target != name and (target == pkg or target.startswith(pkg + ".")):
                    where = f"{f.relative_to(root.parent)}:{line}"
                    seen = graph[name].setdefault(target, [])
                    if where not in seen:
                        seen.append(where)
    return graph


def cycles(graph: dict[str, dict[str, list[str]]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            v, children = work[-1]
            for w in children:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph.get(w, {})))))
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        comp.append(w)
                        if w == v:
                            break
                    if len(comp) > 1:
                        found.append(sorted(comp))
    return found


def describe_cycle(graph: dict[str, dict[str, list[str]]], members: list[str]) -> str:
    """The members of one cycle and every edge between them, with where each import is."""
    inside = set(members)
    lines = [f"cycle of {len(members)} modules: {', '.join(members)}"]
    for a in members:
        for b, where in sorted(graph[a].items()):
            if b in inside:
                lines.append(f"    {a} -> {b}  ({', '.join(where)})")
    return "\n".join(lines)


def layer_violations(graph: dict[str, dict[str, list[str]]]) -> dict[tuple[str, str], list[str]]:
    """``{(importer, imported): [file:line, ...]}`` for every import that goes up a layer."""
    def within(mod: str, prefix: str) -> bool:
        return mod == prefix or mod.startswith(prefix + ".")

    bad = {}
    for importer, targets in graph.items():
        for low_layer, banned in FORBIDDEN.items():
            if not within(importer, low_layer):
                continue
            for target, where in targets.items():
                if any(within(target, b) for b in banned):
                    bad[(importer, target)] = where
    return bad


@pytest.fixture(scope="module")
def graph():
    assert PACKAGE.is_dir(), f"package sources not found at {PACKAGE}"
    return import_graph(PACKAGE)


def test_no_import_cycles(graph):
    found = cycles(graph)
    assert not found, "import cycles in pellucid:\n" + "\n".join(describe_cycle(graph, c) for c in found)


def test_layers_import_only_downwards(graph):
    bad = {edge: where for edge, where in layer_violations(graph).items() if edge not in KNOWN_LAYER_VIOLATIONS}
    assert not bad, "imports that go up a layer (registry < datasets < core < explain < apps/ui/cli):\n" + "\n".join(
        f"    {a} -> {b}  ({', '.join(where)})" for (a, b), where in sorted(bad.items()))


def test_known_violations_still_exist(graph):
    gone = sorted(KNOWN_LAYER_VIOLATIONS - set(layer_violations(graph)))
    assert not gone, f"fixed, remove from KNOWN_LAYER_VIOLATIONS: {gone}"


def test_registry_imports_no_pellucid_module(graph):
    assert not graph["pellucid.registry"], graph["pellucid.registry"]


# --------------------------------------------------------------------------- the checker itself
def _write(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root / "pkg"


def test_checker_finds_function_level_and_reexport_cycles(tmp_path):
    pkg = _write(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/a.py": "def f():\n    from pkg.sub import helper\n",          # function-level, via __init__
        "pkg/sub/__init__.py": "from pkg.sub.b import helper\n",            # re-export
        "pkg/sub/b.py": "import pkg.a\nhelper = 1\n",
        "pkg/c.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import pkg.d\n",
        "pkg/d.py": "from . import c\n",                                     # relative; c -> d is typing-only
    })
    g = import_graph(pkg)
    assert cycles(g) == [["pkg.a", "pkg.sub", "pkg.sub.b"]]
    text = describe_cycle(g, cycles(g)[0])
    assert "pkg.a -> pkg.sub  (pkg/a.py:2)" in text and "pkg.sub.b -> pkg.a  (pkg/sub/b.py:1)" in text
    assert g["pkg.d"] == {"pkg": ["pkg/d.py:1"], "pkg.c": ["pkg/d.py:1"]} and g["pkg.c"] == {}


# --------------------------------------------------------------------------- what the graph cannot see
def test_every_built_in_folder_kind_has_a_loader():
    # modelfolder names the loaders of the other kinds as "module:function" strings (imported on
    # demand, so it imports none of them); the AST graph cannot check those strings, this does.
    from pellucid.core import modelfolder

    assert set(modelfolder.card_kinds()) == set(modelfolder.CARD_KINDS)
    for kind in modelfolder.CARD_KINDS:
        if kind != "classifier":
            assert callable(modelfolder._kind_loader(kind)), kind


def test_registered_folder_kind_is_loaded(tmp_path):
    import json

    from pellucid.core import modelfolder

    (tmp_path / "card.json").write_text(json.dumps({"kind": "test-echo", "task": "no-such-app", "classes": ["a"]}))
    modelfolder.register_kind("test-echo", lambda folder, card: ("model", folder, card["kind"]))
    try:
        model, card = modelfolder.load_model(tmp_path)
        assert model == ("model", tmp_path, "test-echo") and card["classes"] == ["a"]
        with pytest.raises(ValueError, match="registered twice"):
            modelfolder.register_kind("test-echo", lambda folder, card: None)
    finally:
        modelfolder._KIND_LOADERS._items.pop("test-echo")
    with pytest.raises(modelfolder.ModelFolderError, match="unknown kind 'test-echo'"):
        modelfolder.read_card(tmp_path)


def test_registry_helper():
    from pellucid.core.backbones import unknown_name_error as reexported
    from pellucid.registry import Registry, did_you_mean, unknown_name_error

    assert reexported is unknown_name_error
    reg: Registry = Registry("colour")
    reg.register("red", 1)

    @reg.register("green")
    def green():
        return 2

    class Blue:
        name = "blue"

    reg.register(Blue)
    assert reg.names() == ["blue", "green", "red"] and reg.get("green") is green and "red" in reg
    reg.register("red", 1)  # the same object again is harmless
    with pytest.raises(ValueError, match="colour 'red' is registered twice"):
        reg.register("red", 3)
    with pytest.raises(KeyError, match=r"unknown colour 'gren'\. Did you mean 'green', 'red'\? "
                                       r"Available: blue, green, red"):
        reg.get("gren")
    assert did_you_mean("gren", ["green", "red"]) == " Did you mean 'green'?"
    assert did_you_mean("gren", ["green"], clause=True) == "; did you mean 'green'?"
    assert did_you_mean("zzz", ["green"]) == ""
