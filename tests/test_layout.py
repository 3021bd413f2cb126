"""The package's layers point one way (ARCHITECTURE.md): no module imports a layer above
its own, siblings do not import each other, and the documented import paths work."""
import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

import kvcodec

PACKAGE = Path(__file__).resolve().parent.parent / "codec"
# Rank of each top-level part of kvcodec; a module may import only lower ranks (and its
# own sub-package). format and models are siblings: neither may import the other.
RANK = {"errors": 0, "_version": 0, "_native": 0, "_cuda": 0, "core": 1, "format": 2,
        "models": 2, "storage": 3, "integrations": 4, "store": 5, "quality": 6,
        "blend": 6, "evict": 6, "jobs": 7}


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


def test_every_subpackage_says_what_it_owns():
    for init in PACKAGE.glob("*/__init__.py"):
        doc = ast.get_docstring(ast.parse(init.read_text()))
        assert doc and "import" in doc, f"{init}: the docstring must say what it owns and may import"


def _fresh_python(code: str) -> str:
    """Run ``code`` in a new interpreter (imports start from nothing); its stdout."""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_public_and_documented_paths_import():
    _fresh_python(
        "import kvcodec, kvcodec.hf, kvcodec.store, kvcodec.cuda, kvcodec.adapt, kvcodec.stream\n"
        "import kvcodec.integrations.hf as h, kvcodec.store.adapt as a\n"
        "assert kvcodec.hf is h and kvcodec.adapt is a\n"
        "from kvcodec.store import Store, prefill_with_store\n"
        "from kvcodec.stream import RateLimitedReader\n"
        "print(kvcodec.encode, kvcodec.hf.load_cache)")


def test_import_kvcodec_stays_light():
    """The moved-path aliases resolve lazily: importing kvcodec loads no integration."""
    loaded = _fresh_python(
        "import sys, kvcodec\n"
        "print(sorted(m for m in sys.modules if m.startswith('kvcodec.integrations')"
        " or m.startswith('kvcodec.store')))")
    assert loaded == "[]"


def test_attribute_access_loads_submodules():
    _fresh_python("import kvcodec\n"
                  "assert kvcodec.hf.load_cache and kvcodec.store.Store and kvcodec.quality\n"
                  "import kvcodec.integrations.hf as h\nassert kvcodec.hf is h")
    with pytest.raises(AttributeError):
        kvcodec.no_such_thing  # noqa: B018


def test_unknown_submodule_still_fails():
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("kvcodec.no_such_module")
