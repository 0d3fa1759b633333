"""The house's structure, checked statically with ``ast`` (no project module is imported).

- No import cycles among ``strata.store.*`` modules, nor among ``strata.pipeline.*`` modules:
  every import counts, at module level, inside functions and under ``TYPE_CHECKING`` alike (a
  type-only circle is still a circle). Importing ``a.b.c`` also runs ``a/b/__init__.py``; those
  implicit parent imports are left out (a package's ``__init__`` re-exporting its own modules
  would otherwise close a circle with each of them).
- ``store/`` is layered: storage, errors, layout, dtypes and root at the bottom, then
  ``commit/``, then ``datasets/ features/ saes/ analyses/``, then ``lifecycle/``, then
  ``core.py``, then ``store/__init__.py``; a module imports only from its own layer or below.
- Data flows one way: ``store/`` imports nothing of pipeline/analysis/jobs, and ``pipeline/``
  nothing of analysis/jobs.
- No module uses another module's private names (``from x import _y``, or ``x._y`` on an
  imported module). A private module (``_moments.py``) is imported only from within its own
  package (tests may import it to test it).
- Imports sit at module level in every package, except the slow third-party libraries in
  :data:`LAZY_OK`, each with a ``# lazy: why`` comment on the import's line.
  ``analysis/`` and ``jobs/`` may also import a project module inside a function, with the same
  comment, where that module pulls one of those libraries at import time and the importer does
  not already (the CLI's ``strata --help`` must not wait for torch).
- No import cycles among ``strata.analysis.*`` nor among ``strata.jobs.*`` modules either, and
  nothing outside ``jobs/`` imports ``strata.jobs``.
- No bare ``import store|pipeline|analysis|jobs`` anywhere: the distribution installs them as
  ``strata.store`` and so on only.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: The repository's folders and the package each installs as.
PACKAGES = {"store": "strata.store", "pipeline": "strata.pipeline", "analysis": "strata.analysis", "jobs": "strata.jobs"}
#: Folders whose Python files may not import the packages bare, nor use private names across modules.
OTHER_FOLDERS = ("strata", "tests", "benchmarks", "examples")

#: Third-party libraries that ``store/`` and ``pipeline/`` may import inside a function, and why.
LAZY_OK = {
    "torch": "~2 s to import; `import strata.store` and the CLI's bad-input paths must not pay for it",
    "ray": "starts slowly and drags in its own dependencies; in-process runs never need it",
    "sae_lens": "imports torch and transformers; only loading an SAE needs it",
    "transformers": "seconds to import; only loading a model needs it",
    "datasets": "HF datasets imports in ~1 s (pandas, its own fsspec setup); only hf corpora need it",
    "huggingface_hub": "its error types import its HTTP stack (~130 ms); only a hub download needs it",
    "psutil": "optional (ray[default] brings it): stopping a private Ray head works without it",
    "matplotlib": "~0.5 s to import; only the plots need it, and the analyses' workers never draw",
    "diffusers": "seconds to import; only building or loading a diffusion model needs it",
}

#: Modules exempt from the function-level-import check while a rewrite of them is under way
#: (name each with the reason); empty since the one-executor rewrite (issue 17 item 2) landed.
LAZY_PENDING: set[str] = set()
#: ``(importer, private name)`` uses of another module's private name allowed while a rewrite is
#: under way (say which); empty now: every name another module uses is public.
PRIVATE_PENDING: set[tuple[str, str]] = set()


@dataclass(frozen=True)
class Import:
    """One import statement's target, as the importing module sees it."""

    importer: str  # dotted name of the importing module
    target: str  # the project module imported (longest known prefix), or the third-party name
    name: str  # the one name of a `from` import this entry is for (``""`` for `import x`)
    module: str  # the `from` module as written, resolved (``""`` for `import x`)
    line: int
    in_function: bool
    text: str  # the source line, for messages and the `# lazy:` comment


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    parts[0] = PACKAGES.get(parts[0], parts[0])
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


@cache
def _files() -> dict[str, Path]:
    """Every Python file of the repository's packages and other folders, by module name."""
    out: dict[str, Path] = {}
    for folder in [*PACKAGES, *OTHER_FOLDERS]:
        for path in sorted((ROOT / folder).rglob("*.py")):
            if "__pycache__" not in path.parts:
                out[_module_name(path)] = path
    return out


@cache
def _project_modules() -> frozenset[str]:
    return frozenset(m for m in _files() if m.split(".")[0] == "strata")


def _known(name: str) -> str | None:
    """The longest prefix of ``name`` that is a project module."""
    mods = _project_modules()
    while name:
        if name in mods:
            return name
        name = name.rpartition(".")[0]
    return None


def _is_package(module: str) -> bool:
    return _files()[module].name == "__init__.py"


def _function_lines(tree: ast.AST) -> set[int]:
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            for inner in ast.walk(node):
                if isinstance(inner, (ast.Import, ast.ImportFrom)):
                    lines.add(inner.lineno)
    return lines


@cache
def _parsed(module: str) -> tuple[ast.Module, list[str]]:
    text = _files()[module].read_text()
    return ast.parse(text), text.splitlines()


@cache
def imports_of(module: str) -> tuple[Import, ...]:
    """Every import of ``module``: at module level, in functions, under TYPE_CHECKING."""
    tree, lines = _parsed(module)
    in_function = _function_lines(tree)
    package = module if _is_package(module) else module.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                target = _known(alias.name) or alias.name
                out.append(Import(module, target, "", "", node.lineno, node.lineno in in_function, lines[node.lineno - 1]))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package
                for _ in range(node.level - 1):
                    anchor = anchor.rpartition(".")[0]
                base = f"{anchor}.{base}" if base else anchor
            for alias in node.names:
                target = _known(f"{base}.{alias.name}") or _known(base) or base
                out.append(Import(module, target, alias.name, base, node.lineno, node.lineno in in_function, lines[node.lineno - 1]))
    return tuple(out)


def _modules_under(package: str) -> list[str]:
    return sorted(m for m in _project_modules() if m == package or m.startswith(package + "."))


def _cycles(package: str) -> list[list[str]]:
    """Strongly connected components of more than one module among ``package``'s modules
    (Tarjan), each sorted; a module importing itself counts too."""
    nodes = _modules_under(package)
    edges = {m: sorted({i.target for i in imports_of(m) if i.target in nodes and i.target != m}) for m in nodes}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
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

    for v in nodes:
        if v not in index:
            visit(v)
    return found


def _describe_cycle(comp: list[str]) -> str:
    inside = set(comp)
    lines = [f"  {m} -> {', '.join(i.target for i in imports_of(m) if i.target in inside and i.target != m)}" for m in comp]
    return "\n".join(lines)


@pytest.mark.parametrize("package", ["strata.store", "strata.pipeline", "strata.analysis", "strata.jobs"])
def test_no_import_cycles(package: str) -> None:
    cycles = _cycles(package)
    assert not cycles, f"import cycles in {package} (lazy and TYPE_CHECKING imports count):\n" + "\n\n".join(
        _describe_cycle(c) for c in cycles
    )


@contextmanager
def _fake_modules(tmp_path: Path, fake: dict[str, str]) -> Iterator[None]:
    """The tree as seen by these checks, plus the modules ``fake`` gives (name -> source)."""
    saved = dict(_files())

    def forget() -> None:
        _parsed.cache_clear()
        imports_of.cache_clear()
        _project_modules.cache_clear()

    try:
        for mod, text in fake.items():
            path = tmp_path / (mod.replace(".", "_") + ".py")
            path.write_text(text)
            _files()[mod] = path
        forget()
        yield
    finally:
        _files().clear()
        _files().update(saved)
        forget()


# The checks pass on the tree; these show each could fail.


def test_the_cycle_finder_finds_a_type_only_circle(tmp_path: Path) -> None:
    # A circle closed only by a TYPE_CHECKING import inside a function is found, and named.
    fake = {"strata.store.a": "from strata.store import b\n",
            "strata.store.b": "from typing import TYPE_CHECKING\ndef f():\n    if TYPE_CHECKING:\n        from strata.store.a import x\n"}
    with _fake_modules(tmp_path, fake):
        assert ["strata.store.a", "strata.store.b"] in _cycles("strata.store")


def test_the_checks_find_private_names_lazy_imports_and_bare_imports(tmp_path: Path) -> None:
    fake = {
        "strata.pipeline.fake": ("from strata.pipeline.corpus import _hidden\nfrom strata.pipeline import corpus\n"
                                 "x = corpus._also_hidden\n"
                                 "def f():\n    import yaml\n    import torch\n    import ray  # lazy: a reason\n"),
        "strata.analysis.elsewhere": "from strata.analysis.similarity import _moments\n",
        "tests.fake_test": "import store\nfrom pipeline.plan import pack\n",
    }
    with _fake_modules(tmp_path, fake):
        private = sorted(name for m in fake for _, _, name in _private_uses(m))
        assert private == ["strata.analysis.similarity._moments", "strata.pipeline.corpus._also_hidden", "strata.pipeline.corpus._hidden"]
        lazy = [v.split(": ", 1)[1] for v in _lazy_imports() if "fake" in v]
        assert lazy == ["import yaml (only " + ", ".join(LAZY_OK) + " may be lazy)", "import torch (say why with a `# lazy: ...` comment)"]
        assert [v.split(": ", 1)[1] for v in _bare_imports()] == ["import store", "from pipeline.plan import pack"]


#: The layers of ``store/``, bottom first; a module may import from its own layer or lower ones.
STORE_LAYERS: list[tuple[str, ...]] = [
    ("strata.store.storage", "strata.store.errors", "strata.store.layout", "strata.store.dtypes", "strata.store.root"),
    ("strata.store.commit",),
    ("strata.store.datasets", "strata.store.features", "strata.store.saes", "strata.store.analyses", "strata.store.views"),
    ("strata.store.lifecycle",),
    ("strata.store.core",),
]


def _store_layer(module: str) -> int:
    if module == "strata.store":
        return len(STORE_LAYERS)  # the package's __init__: on top
    for rank, prefixes in enumerate(STORE_LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return rank
    raise AssertionError(f"{module} is in no layer of tests/test_structure.py's STORE_LAYERS; add it to the layer it belongs to")


def test_store_is_layered() -> None:
    bad = []
    for m in _modules_under("strata.store"):
        for i in imports_of(m):
            if i.target.startswith("strata.store") and i.target != "strata.store" and _store_layer(i.target) > _store_layer(m):
                bad.append(f"{_rel(_files()[m])}:{i.line}: {m} (layer {_store_layer(m)}) imports {i.target} "
                           f"(layer {_store_layer(i.target)})")
    assert not bad, "store/ imports upward:\n" + "\n".join(bad)


@pytest.mark.parametrize(("package", "forbidden"), [
    ("strata.store", ("strata.pipeline", "strata.analysis", "strata.jobs")),
    ("strata.pipeline", ("strata.analysis", "strata.jobs")),
    ("strata.analysis", ("strata.jobs",)),
])
def test_data_flows_one_way(package: str, forbidden: tuple[str, ...]) -> None:
    bad = [f"{_rel(_files()[m])}:{i.line}: {i.text.strip()}"
           for m in _modules_under(package) for i in imports_of(m)
           if any(i.target == f or i.target.startswith(f + ".") for f in forbidden)]
    assert not bad, f"{package} must not import {', '.join(forbidden)}:\n" + "\n".join(bad)


def _bare_imports() -> list[str]:
    bad = []
    for m, path in _files().items():
        for i in imports_of(m):
            written = i.module or i.target
            if not i.module:  # `import x`: what was written is the target's own text
                written = i.text.strip().split()[1].split(",")[0]
            if written.split(".")[0] in PACKAGES and not i.text.lstrip().startswith("from ."):
                bad.append(f"{_rel(path)}:{i.line}: {i.text.strip()}")
    return list(dict.fromkeys(bad))


def test_no_bare_package_imports() -> None:
    bad = _bare_imports()
    assert not bad, "bare imports of the packages (the distribution installs them as strata.*):\n" + "\n".join(bad)


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _private_module_owner(module: str) -> str | None:
    """The package a private module belongs to (``strata.analysis.similarity`` for
    ``strata.analysis.similarity._moments``), or None for a public module."""
    parts = module.split(".")
    for k, part in enumerate(parts):
        if _private(part):
            return ".".join(parts[:k])
    return None


def _private_uses(module: str) -> Iterator[tuple[int, str, str]]:
    """``(line, what, dotted private name)`` for each use of another module's private name."""
    tree, _ = _parsed(module)
    bound: dict[str, str] = {}  # local name -> project module it stands for
    is_test = module.startswith("tests.")
    for i in imports_of(module):
        if not i.target.startswith("strata.") and i.target != "strata":
            continue
        if i.module:
            full = f"{i.module}.{i.name}"
            if _known(full) == full:
                bound[i.name] = full
            elif _private(i.name) and _known(i.module) == i.module:
                yield i.line, f"imports private name {i.name} from {i.module}", full
        owner = _private_module_owner(i.target)
        if owner is not None and not is_test and not (module == owner or module.startswith(owner + ".")):
            yield i.line, f"imports private module {i.target} from outside {owner}", i.target
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.asname and _known(alias.name) == alias.name:
                    bound[alias.asname] = alias.name
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in bound
                and _private(node.attr) and bound[node.value.id] != module):
            yield node.lineno, f"uses {node.value.id}.{node.attr} of {bound[node.value.id]}", f"{bound[node.value.id]}.{node.attr}"


def test_no_private_names_across_modules() -> None:
    bad = []
    for m, path in _files().items():
        for line, what, name in _private_uses(m):
            if (m, name) not in PRIVATE_PENDING:
                bad.append(f"{_rel(path)}:{line}: {what}")
    assert not bad, "private names used across modules (give them a public name):\n" + "\n".join(bad)


def _type_checking_lines(tree: ast.Module) -> set[int]:
    """Lines of the imports under a module-level ``if TYPE_CHECKING:`` (never run)."""
    lines: set[int] = set()
    for node in tree.body:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            lines |= {n.lineno for n in ast.walk(node) if isinstance(n, (ast.Import, ast.ImportFrom))}
    return lines


def _parents(module: str) -> list[str]:
    parts = module.split(".")
    return [".".join(parts[:k]) for k in range(1, len(parts))]


@cache
def _pulls(module: str) -> frozenset[str]:
    """The :data:`LAZY_OK` libraries that importing ``module`` imports, through the module-level
    imports of the project modules it runs (its parent packages' ``__init__`` included)."""
    seen: set[str] = set()
    heavy: set[str] = set()
    todo = [module, *_parents(module)]
    while todo:
        m = todo.pop()
        if m in seen or m not in _files():
            continue
        seen.add(m)
        skip = _type_checking_lines(_parsed(m)[0])
        for i in imports_of(m):
            if i.in_function or i.line in skip:
                continue
            if i.target.startswith("strata"):
                todo += [i.target, *_parents(i.target)]
            elif i.target.split(".")[0] in LAZY_OK:
                heavy.add(i.target.split(".")[0])
    return frozenset(heavy)


#: Packages whose modules may import a project module inside a function (see :func:`_lazy_imports`).
LAZY_PROJECT_OK = ("strata.analysis", "strata.jobs")


def _lazy_imports() -> list[str]:
    """Function-level imports that break the rule, one line each.

    A lazy third-party import must be one of :data:`LAZY_OK` and say why; in ``analysis/`` and
    ``jobs/`` also one the module does not import at import time anyway (its own or its
    packages' module-level imports, or those of the project modules they import). There a lazy
    project import is allowed, saying why, only where the module imported pulls
    a :data:`LAZY_OK` library that the importer itself does not (so the laziness buys something)."""
    bad: list[str] = []
    for package in PACKAGES.values():
        for m in _modules_under(package):
            if m in LAZY_PENDING:
                continue
            for i in imports_of(m):
                if not i.in_function:
                    continue
                where = f"{_rel(_files()[m])}:{i.line}: {i.text.strip()}"
                if i.target.startswith("strata") and package in LAZY_PROJECT_OK:
                    gain = _pulls(i.target) - _pulls(m)
                    if not gain:
                        bad.append(f"{where} (pulls no LAZY_OK library that {m} does not already: move it to module level)")
                    elif "# lazy:" not in i.text:
                        bad.append(f"{where} (say why with a `# lazy: ...` comment; it pulls {', '.join(sorted(gain))})")
                    continue
                top = i.target.split(".")[0] if not i.target.startswith("strata") else i.target
                if top not in LAZY_OK:
                    bad.append(f"{where} (only {', '.join(LAZY_OK)} may be lazy)")
                elif package in LAZY_PROJECT_OK and top in _pulls(m):
                    bad.append(f"{where} ({m} imports {top} at import time already: move it to module level)")
                elif "# lazy:" not in i.text:
                    bad.append(f"{where} (say why with a `# lazy: ...` comment)")
    return list(dict.fromkeys(bad))


def test_imports_at_module_level() -> None:
    bad = _lazy_imports()
    assert not bad, "function-level imports:\n" + "\n".join(bad)


def test_lazy_project_imports_must_buy_something(tmp_path: Path) -> None:
    # A lazy import of a module that pulls torch is allowed with its reason; one of a module
    # that pulls nothing heavy, or from a module that already pulls torch, is not.
    fake = {
        "strata.analysis.fake_heavy": "import torch\n",
        "strata.analysis.fake_light": "import json\n",
        "strata.jobs.fake_cmd": ("def f():\n    from strata.analysis.fake_heavy import x  # lazy: torch: CLI start-up\n"
                                 "    from strata.analysis.fake_light import y  # lazy: no reason\n"),
        "strata.jobs.fake_torch": "import torch\ndef f():\n    from strata.analysis.fake_heavy import x  # lazy: torch\n",
    }
    with _fake_modules(tmp_path, fake):
        _pulls.cache_clear()
        try:
            assert _pulls("strata.jobs.fake_cmd") == frozenset() and _pulls("strata.analysis.fake_heavy") == {"torch"}
            flagged = sorted(v.split(": ", 1)[1] for v in _lazy_imports() if "fake" in v)
        finally:
            _pulls.cache_clear()
        assert [v.split(" (")[0] for v in flagged] == ["from strata.analysis.fake_heavy import x  # lazy: torch",
                                                       "from strata.analysis.fake_light import y  # lazy: no reason"]


def test_lazy_pending_modules_exist() -> None:
    # An exemption for a module that was removed or renamed must go too.
    assert LAZY_PENDING <= set(_files()), sorted(LAZY_PENDING - set(_files()))


def test_import_strata_store_stays_light() -> None:
    # What the lazy torch imports buy: a notebook's `strata.open` does not wait for torch.
    code = "import sys, strata.store; print(sorted(m for m in ('torch', 'ray', 'sae_lens', 'transformers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT).stdout
    assert out.strip() == "[]", f"`import strata.store` imported {out.strip()}"
