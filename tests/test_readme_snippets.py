"""The README's snippets of the notebook, SAE and feature-table sections run as written on the
quickstart's store: built once here as `bash examples/quickstart.sh`, `strata sae train
examples/sae.yaml` and `strata features encode examples/features.yaml` would, in a folder that
holds it as ./acts, from which each snippet runs unchanged. A line `EXPR  # LITERAL` (a Python
literal) is checked: EXPR must equal it."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pytest

from strata.jobs.cli import main
from strata.pipeline.tiny import build_tiny

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ("## Reading the store from a notebook", "## SAEs: ", "## Feature tables: ")


def readme_blocks(text: str, *, sections: tuple[str, ...] = SECTIONS) -> list[tuple[str, str, str]]:
    """``(section, language, code)`` of every fenced python or sql block of the named sections, in
    README order."""
    blocks, section = [], None
    for part in re.split(r"(?m)^(?=## )", text):
        section = next((s for s in sections if part.startswith(s)), None)
        if section is None:
            continue
        for lang, code in re.findall(r"(?ms)^```(python|sql)\n(.*?)^```", part):
            blocks.append((section, lang, code))
    return blocks


def _comment_literal(line: str):
    """The Python literal a line's trailing comment states, or None."""
    if "#" not in line:
        return None
    comment = line.split("#", 1)[1].strip()
    try:
        return ("literal", ast.literal_eval(comment))
    except (ValueError, SyntaxError):
        return None


def run_python(code: str, ns: dict) -> int:
    """Run a snippet statement by statement in ``ns``; check ``EXPR  # LITERAL`` lines. The
    number of lines checked."""
    lines = code.splitlines()
    checked = 0
    for stmt in ast.parse(code).body:
        where = f"README line: {lines[stmt.lineno - 1].strip()!r}"
        if isinstance(stmt, ast.Expr):
            try:
                value = eval(compile(ast.Expression(stmt.value), "<README>", "eval"), ns)
            except Exception as e:
                raise AssertionError(f"{where}: {type(e).__name__}: {e}") from e
            stated = _comment_literal(lines[stmt.end_lineno - 1])
            if stated is not None:
                assert value == stated[1], where
                checked += 1
        else:
            try:
                exec(compile(ast.Module([stmt], type_ignores=[]), "<README>", "exec"), ns)
            except Exception as e:
                raise AssertionError(f"{where}: {type(e).__name__}: {e}") from e
    return checked


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory) -> Path:
    """A folder holding the quickstart's store as ./acts: its dataset (examples/quickstart.yaml on
    the model examples/quickstart.sh builds), the SAE of examples/sae.yaml (fewer samples: what is
    tested is the snippets, not the SAE) and its feature table (examples/features.yaml). Extraction
    and encoding run in this process (`compute.executor=local`: the same bytes as on Ray)."""
    work = tmp_path_factory.mktemp("readme")
    corpus = ROOT / "examples" / "corpus.jsonl"
    texts = [json.loads(ln)["text"] for ln in corpus.read_text(encoding="utf-8").splitlines() if ln.strip()]
    model = build_tiny(work / "models" / "tiny-gpt2", family="gpt2", layers=4, d_model=128, heads=4, max_positions=512,
                       vocab_size=1024, seed=0, texts=texts)
    acts = work / "acts"
    ex = ROOT / "examples"
    assert main(["extract", str(ex / "quickstart.yaml"), "--set", f"store={acts}", "--set", f"model.id={model}",
                 "--set", f"corpus.path={corpus}", "--set", "compute.executor=local", "--no-progress"]) == 0
    assert main(["sae", "train", str(ex / "sae.yaml"), "--set", f"store={acts}", "--set", "train.total_training_samples=100000",
                 "--set", "eval.ce=false", "--no-progress"]) == 0
    assert main(["features", "encode", str(ex / "features.yaml"), "--set", f"store={acts}", "--set", "compute.executor=local",
                 "--no-progress"]) == 0
    return work


def test_the_snippet_parser_finds_every_block_of_the_sections():
    blocks = readme_blocks((ROOT / "README.md").read_text())
    langs = [(s.split(":")[0], lang) for s, lang, _ in blocks]
    assert langs == [("## Reading the store from a notebook", "python"), ("## Reading the store from a notebook", "python"),
                     ("## SAEs", "python"), ("## Feature tables", "sql"), ("## Feature tables", "python")]
    assert _comment_literal("s.datasets()   # ['a']") == ("literal", ["a"]) and _comment_literal("x  # numpy [4096, d]") is None


def test_readme_snippets_run_as_written_on_the_quickstart(quickstart, monkeypatch):
    import duckdb

    readme = (ROOT / "README.md").read_text()
    # The README tells the reader what the snippets assume.
    assert "snippets below assume the quickstart's store at `./acts`" in readme
    monkeypatch.chdir(quickstart)
    ns: dict = {"__name__": "__readme__"}
    checked = 0
    sql_rows = None
    for _section, lang, code in readme_blocks(readme):
        if lang == "python":
            checked += run_python(code, ns)
        else:
            sql_rows = duckdb.sql(code).fetchall()
    assert checked >= 1  # s.datasets()  # ['tiny-gpt2-quickstart']

    ds, fs, h = ns["ds"], ns["fs"], ns["h"]
    hook = "blocks.3.hook_resid_post"
    n = ds.num_rows(hook)
    # Values the snippets produced, against the store read another way.
    assert ns["x"].shape == (4096, 128) and ns["docs"].shape[1] == 128
    assert ns["toks"].num_rows == n
    d_sae = h.cfg["d_sae"]
    assert d_sae == 1024  # the quickstart's SAE: 8 x 128
    assert 0 <= ns["f"] < d_sae
    top = fs.top(ns["f"], k=20).to_pylist()
    assert 0 < len(top) <= 20 and [t["activation"] for t in top] == sorted((t["activation"] for t in top), reverse=True)
    # The unit files the commit records name hold exactly the table's non-zero latents.
    assert len(sql_rows) == sum(fs.stats().column("count").to_pylist())
    # The sae-lens snippet trains a sensible number of epochs of the quickstart (not thousands).
    epochs = ns["cfg"].total_training_samples / n
    assert 1 <= epochs <= 20, epochs
    assert ns["state"] is not None
