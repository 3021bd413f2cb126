"""The package's layers point one way (ARCHITECTURE.md): no module imports a layer above
its own, siblings do not import each other, and the documented import paths work."""
import ast
import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest

import kvcodec

PACKAGE = Path(__file__).resolve().parent.parent / "codec"
# Rank of each top-level part of kvcodec; a module may import only lower ranks (and its
# own sub-package). format and models are siblings: neither may import the other. blend
# (an algorithm over decoded caches) sits below integrations, whose vLLM connector blends.
RANK = {"errors": 0, "_version": 0, "_native": 0, "_cuda": 0, "core": 1, "format": 2,
        "models": 2, "store": 3, "blend": 3.5, "integrations": 4, "quality": 6, "evict": 6,
        "jobs": 7}


def _modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).with_suffix("")
        parts = list(rel.parts)
        if parts == ["__init__"]:
            continue  # the package root re-exports the public API from every layer
        yield path, parts


def _imported_parts(path: Path, parts: list) -> set:
    """Top-level kvcodec parts that a module imports (relative or absolute)."""
    package = parts[:-1] if parts[-1] != "__init__" else parts[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - (node.level - 1)] if node.level > 1 else package
                target = base + (node.module.split(".") if node.module else [])
                if target:
                    found.add(target[0])
                else:  # "from .. import x": x names the part
                    found.update(a.name for a in node.names)
            elif node.module and node.module.split(".")[0] == "kvcodec":
                rest = node.module.split(".")[1:]
                found.update(rest[:1] or [a.name for a in node.names])
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("kvcodec."):
                    found.add(a.name.split(".")[1])
    return found


@pytest.mark.parametrize("path,parts", list(_modules()), ids=lambda p: "/".join(p) if isinstance(p, list) else "")
def test_no_module_imports_a_layer_above_its_own(path, parts):
    own = parts[0]
    assert own in RANK, f"{'/'.join(parts)}: new top-level part; give it a rank in RANK and ARCHITECTURE.md"
    for part in _imported_parts(path, parts) - {own}:
        assert part in RANK, f"{'/'.join(parts)} imports unknown part {part!r}"
        assert RANK[part] < RANK[own], (
            f"{'/'.join(parts)} ({own}, rank {RANK[own]}) imports {part} (rank {RANK[part]})")


@pytest.mark.parametrize("path,parts", list(_modules()), ids=lambda p: "/".join(p) if isinstance(p, list) else "")
def test_relative_imports_resolve(path, parts):
    """Function-level imports run late: a moved module's stale ``from .x`` shows here."""
    package = parts[:-1]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package[:len(package) - (node.level - 1)]
            target = PACKAGE.joinpath(*base, *(node.module.split(".") if node.module else []))
            names = [] if node.module else [a.name for a in node.names]
            candidates = [target] if node.module else [target / n for n in names]
            for c in candidates:
                assert (c.with_suffix(".py").is_file() or (c / "__init__.py").is_file()
                        or list(c.parent.glob(c.name + ".*.so"))), (
                    f"{'/'.join(parts)}: line {node.lineno} imports {c.relative_to(PACKAGE)}, "
                    "which does not exist")


_ALWAYS = {"errors", "_version", "_native", "_cuda"}  # below everything


def _allowed_by_docstring(part: str, doc: str) -> set:
    """The parts a package's docstring says it may import: its "may import" sentence,
    up to a "never" or "but not"; "every"/"everything" means every lower layer."""
    sentences = re.split(r"(?<=\.)\s+", " ".join(doc.split()))
    said = [x for x in sentences if "may import" in x.lower()]
    assert said, f"{part}: the docstring must say what the package may import"
    head = re.split(r"\bnever\b|\bbut not\b", said[0], flags=re.I)[0]
    if re.search(r"\bevery(thing)?\b", head, re.I):
        return {p for p in RANK if RANK[p] < RANK[part]}
    return {p for p in RANK if re.search(rf"\b{p}\b", head)}


def test_every_subpackage_says_truly_what_it_may_import():
    """Each sub-package's docstring says what it owns and what it may import; what it
    names there is below it, and its modules import nothing else."""
    for init in sorted(PACKAGE.glob("*/__init__.py")):
        part = init.parent.name
        doc = ast.get_docstring(ast.parse(init.read_text()))
        assert doc and len(doc.split()) > 20, f"{part}: say what the package owns"
        allowed = _allowed_by_docstring(part, doc)
        assert all(RANK[p] < RANK[part] for p in allowed - {part}), (
            f"{part}: its docstring allows a layer above it: {sorted(allowed)}")
        used = set()
        for path, parts in _modules():
            if parts[0] == part:
                used |= _imported_parts(path, parts)
        extra = used - allowed - {part} - _ALWAYS
        assert not extra, f"{part} imports {sorted(extra)}, which its docstring does not allow"


def _fresh_python(code: str) -> str:
    """Run ``code`` in a new interpreter (imports start from nothing); its stdout."""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_public_and_documented_paths_import():
    """The paths the README documents (there are no aliases for older ones)."""
    _fresh_python(
        "import kvcodec, kvcodec.integrations.hf as h, kvcodec.integrations.adapt as a\n"
        "import kvcodec.integrations.cuda, kvcodec.format.stream\n"
        "from kvcodec.store import ChunkStore\n"
        "from kvcodec.integrations.hf import cache_from_store, prefill_with_store\n"
        "from kvcodec.format.stream import RateLimitedReader\n"
        "print(kvcodec.encode, h.load_cache, a.load_adaptive)")
    for old in ("kvcodec.hf", "kvcodec.cuda", "kvcodec.adapt", "kvcodec.stream",
                "kvcodec.storage"):
        with pytest.raises(ModuleNotFoundError):
            importlib.import_module(old)


def test_import_kvcodec_stays_light():
    """Importing kvcodec loads no integration and no store."""
    loaded = _fresh_python(
        "import sys, kvcodec\n"
        "print(sorted(m for m in sys.modules if m.startswith('kvcodec.integrations')"
        " or m.startswith('kvcodec.store')))")
    assert loaded == "[]"


def test_attribute_access_loads_submodules():
    _fresh_python("import kvcodec\n"
                  "assert kvcodec.integrations and kvcodec.store.ChunkStore and kvcodec.quality")
    with pytest.raises(AttributeError):
        kvcodec.no_such_thing  # noqa: B018


def test_unknown_submodule_still_fails():
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("kvcodec.no_such_module")


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(["kvcodec"] + parts)


def _all_modules() -> dict:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _import_edges(path: Path, modules: dict) -> set:
    """kvcodec modules that ``path`` imports anywhere in it (function-level imports
    too): ``from .x import y`` is an edge to ``x``, and to ``x.y`` where that is a module."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        targets = []
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            targets = [mod] + [f"{mod}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        out.update(t for t in targets if t in modules and t != name)
    return out


def test_no_import_cycles():
    """No module depends on itself through others (package __init__ files excepted as
    the importers they are: an ``__init__`` re-exporting its submodules is no cycle)."""
    modules = _all_modules()
    graph = {m: {t for t in _import_edges(p, modules) if not modules[t].name == "__init__.py"}
             for m, p in modules.items() if p.name != "__init__.py"}
    state, stack, cycles = {}, [], []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for t in sorted(graph.get(m, ())):
            if state.get(t) == 1:
                cycles.append(stack[stack.index(t):] + [t])
            elif t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def _private_definitions(tree) -> set:
    """Private names a module defines: its functions and classes, class attributes and
    methods, and ``self._x`` attributes its methods assign."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            out.add(node.name)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store) \
                and isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"):
            out.add(node.attr)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            for t in (node.targets if isinstance(node, ast.Assign) else [node.target]):
                if isinstance(t, ast.Name):
                    out.add(t.id)
    return {n for n in out if n.startswith("_") and not n.startswith("__")}


def test_no_private_member_is_used_across_modules():
    """``from x import _y`` between kvcodec modules, or ``obj._attr`` where ``_attr`` is
    private to another kvcodec module (and not defined in this one), means a module is
    reaching into another's internals: make it public or move the code."""
    trees = {m: ast.parse(p.read_text()) for m, p in _all_modules().items()}
    defined = {m: _private_definitions(t) for m, t in trees.items()}
    owners = {}
    for m, names in defined.items():
        for n in names:
            owners.setdefault(n, set()).add(m)
    problems = []
    for m, tree in trees.items():
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("kvcodec")):
                problems += [f"{m}: imports {a.name}" for a in node.names
                             if a.name.startswith("_") and not a.name.startswith("__")
                             and a.name not in ("_native", "_cuda", "_version")]
            elif isinstance(node, ast.Attribute) and node.attr.startswith("_") \
                    and not node.attr.startswith("__") and node.attr not in defined[m] \
                    and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")):
                others = owners.get(node.attr, set()) - {m}
                if others:
                    problems.append(f"{m}: uses .{node.attr} (private to {sorted(others)[0]})")
    assert not problems, "\n".join(sorted(set(problems)))


def test_no_module_is_too_long_to_hold_in_one_head():
    """A module is one idea, a few hundred lines (STYLE.md)."""
    long = {m: n for m, p in _all_modules().items()
            if (n := len(p.read_text().splitlines())) > 420}
    assert not long, f"modules over 420 lines: {long}"
