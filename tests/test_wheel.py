"""The built distribution: one `strata` namespace, every module of the four folders inside it.

A wheel of this checkout is built offline (no build isolation: setuptools comes from the test
environment) from a copy of the files it packages, so the build's `build/` folder never lands in
the working tree other test runs read. Installed into a bare target folder, it must import as
`strata` from anywhere, and the bare names `store`, `pipeline`, `analysis`, `jobs` must not exist.
"""

from __future__ import annotations

import configparser
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("store", "pipeline", "analysis", "jobs")


def _source_copy(dest: Path) -> Path:
    """What the build reads, copied: pyproject.toml, the README it names, the namespace root and
    the four folders (without bytecode caches)."""
    dest.mkdir()
    shutil.copy2(ROOT / "pyproject.toml", dest / "pyproject.toml")
    shutil.copy2(ROOT / "README.md", dest / "README.md")
    for extra in ROOT.glob("LICEN[CS]E*"):
        shutil.copy2(extra, dest / extra.name)
    for folder in ("strata", *FOLDERS):
        shutil.copytree(ROOT / folder, dest / folder, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return dest


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel of this checkout, built once for the module."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = _source_copy(tmp / "src")
    out = tmp / "dist"
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation", "--no-index", "-q", "-w", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, f"pip wheel failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    wheels = list(out.glob("strata-*.whl"))
    assert len(wheels) == 1, f"expected one strata wheel in {out}, found {[w.name for w in out.iterdir()]}"
    return wheels[0]


def _names(wheel: Path) -> list[str]:
    with zipfile.ZipFile(wheel) as zf:
        return zf.namelist()


def test_wheel_has_only_the_strata_namespace_at_the_top(wheel: Path) -> None:
    tops = {name.split("/", 1)[0] for name in _names(wheel)}
    dist_info = {t for t in tops if t.startswith("strata-") and t.endswith(".dist-info")}
    assert len(dist_info) == 1, sorted(tops)
    assert tops == {"strata", *dist_info}, f"unexpected top-level entries: {sorted(tops - {'strata', *dist_info})}"


def test_wheel_holds_every_module_of_the_four_folders(wheel: Path) -> None:
    names = set(_names(wheel))
    want = {
        f"strata/{path.relative_to(ROOT).as_posix()}"
        for folder in FOLDERS
        for path in (ROOT / folder).rglob("*.py")
        if "__pycache__" not in path.parts
    }
    # Sanity: the walk found the tree (a wrong ROOT would make the check vacuous).
    assert "strata/store/__init__.py" in want and "strata/jobs/cli.py" in want and len(want) > 50
    missing = sorted(want - names)
    assert not missing, (
        f"{len(missing)} modules missing from the wheel (is their package in pyproject's `packages` list?): {missing[:10]}"
    )
    assert "strata/__init__.py" in names


def test_console_script_points_at_the_cli(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as zf:
        entry = next(n for n in zf.namelist() if n.endswith(".dist-info/entry_points.txt"))
        text = zf.read(entry).decode()
    parser = configparser.ConfigParser()
    parser.read_string(text)
    assert dict(parser["console_scripts"]) == {"strata": "strata.jobs.cli:main"}


def test_installed_wheel_imports_as_strata_only(wheel: Path, tmp_path: Path) -> None:
    target, store_dir, elsewhere = tmp_path / "site", tmp_path / "acts", tmp_path / "cwd"
    elsewhere.mkdir()
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target", str(target), str(wheel)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, f"pip install --target failed:\n{proc.stderr[-3000:]}"
    # pip puts the console script in bin/; everything importable is under strata/.
    installed = sorted(p.name for p in target.iterdir() if not p.name.endswith(".dist-info") and p.name != "bin")
    assert installed == ["strata"], installed
    # -S: no site processing, so the checkout's editable-install hook (a .pth file in this
    # environment) never runs; the dependencies come from this environment's site-packages,
    # named plainly after the installed target.
    deps = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}
    env["PYTHONPATH"] = os.pathsep.join([str(target), *sorted(deps)])
    script = (
        "import importlib.util, os, sys, strata\n"
        # No folder on the path holds the checkout's packages (this environment may live inside
        # the checkout, so its site-packages does not count as the checkout).
        "on_path = [p for p in sys.path if os.path.isfile(os.path.join(p or os.getcwd(), 'store', '__init__.py'))]\n"
        f"assert {str(ROOT)!r} not in sys.path and not on_path, sys.path\n"
        "s = strata.open(sys.argv[1])\n"
        "print(s.datasets())\n"
        "import strata.store, strata.pipeline, strata.analysis, strata.jobs.cli\n"
        "print(strata.__file__)\n"
        "print(strata.store.__file__)\n"
        f"print([n for n in {list(FOLDERS)!r} if importlib.util.find_spec(n) is not None])\n"
    )
    run = subprocess.run([sys.executable, "-S", "-c", script, str(store_dir)], cwd=elsewhere, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, f"importing the installed wheel failed:\n{run.stderr[-3000:]}"
    datasets, strata_file, store_file, bare = run.stdout.strip().splitlines()[-4:]
    assert datasets == "[]"
    assert (store_dir / "strata.json").is_file(), "strata.open did not create the store"
    assert Path(strata_file).is_relative_to(target) and Path(store_file).is_relative_to(target / "strata" / "store")
    assert bare == "[]", f"bare top-level modules importable from the installed wheel: {bare}"
    # And the bare import itself fails as a user would see it.
    bad = subprocess.run([sys.executable, "-S", "-c", "import store"], cwd=elsewhere, env=env, capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "ModuleNotFoundError: No module named 'store'" in bad.stderr
