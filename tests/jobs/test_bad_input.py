"""Bad input to every `strata` command: exit 2, exactly one line on stderr starting
`strata: error:`, no traceback, nothing written to the store, and no expensive work (no model
load, no Ray: every case runs in-process in well under a second of real work).

The table below is the contract; `test_the_table_covers_every_command` checks that it reaches
every subcommand the parser has."""

from __future__ import annotations

import contextlib
import io
import subprocess
import sys
from pathlib import Path

import pytest
from _cli_store import H, make_store

from strata.jobs.cli import main

ROOT = Path(__file__).resolve().parents[2]

SAE_SPEC = """store: {root}
dataset: syn
hooks: ["{hook}"]
name: t-topk
architecture: topk
sae: {{d_sae: 16, k: 4}}
train: {{total_training_samples: 64, batch_size: 16}}
eval: {{ce: false}}
compute: {{device: cpu, threads: 1}}
"""
EXTRACT_SPEC = """store: {root}
name: ex
model: {{id: {tmp}/no-model}}
corpus: {{path: {tmp}/corpus.jsonl}}
tokenize: {{context_size: 16}}
hooks: ["blocks.0.hook_resid_post"]
"""
ENCODE_SPEC = "store: {root}\nsae: sae1\nname: enc\ncompute: {{device: cpu}}\n"
ANALYZE_SPEC = """store: {root}
analyses:
  - kind: compare
    name: cmp
    a: {{dataset: syn, hook: "{hook}"}}
    b: {{dataset: syn, hook: "{hook}"}}
    metrics: [linear_cka]
"""
PIPELINE = "store: {root}\njobs:\n  - {tmp}/sae.yaml\n"

# A billion-laughs document of 1 KB: 9**9 leaves once its aliases are expanded.
BOMB = """\
a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]
b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]
c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]
d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]
e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]
f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]
g: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f]
h: &h [*g,*g,*g,*g,*g,*g,*g,*g,*g]
i: &i [*h,*h,*h,*h,*h,*h,*h,*h,*h]
store: {root}
dataset: *i
"""


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict[str, str]:
    base = tmp_path_factory.mktemp("bad-input")
    root = base / "acts"
    make_store(root)
    fmt = {"root": str(root), "tmp": str(base), "hook": H}
    for name, text in {"sae.yaml": SAE_SPEC, "sae-ef.yaml": SAE_SPEC.replace("d_sae: 16", "expansion_factor: 2"), "extract.yaml": EXTRACT_SPEC,
                       "encode.yaml": ENCODE_SPEC, "analyze.yaml": ANALYZE_SPEC,
                       "pipeline.yaml": PIPELINE, "bomb.yaml": BOMB, "list.yaml": "- 1\n- 2\n", "broken.yaml": "a: [1, 2\n",
                       "recursive.yaml": "store: &a [*a]\n"}.items():
        (base / name).write_text(text.format(**fmt))
    (base / "binary.yaml").write_bytes(b"store: \xff\xfe\n")
    (base / "corpus.jsonl").write_text('{"text": "hello"}\n')
    (base / "a-file").write_text("not a folder")
    return fmt


def run(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main(list(argv))
        except SystemExit as e:  # argparse's exit, as the console script would see it
            rc = e.code if isinstance(e.code, int) else 1
            if not isinstance(e.code, int) and e.code is not None:
                print(e.code, file=sys.stderr)
    return rc, out.getvalue(), err.getvalue()


def listing(root: str) -> list[tuple[str, int]]:
    return sorted((str(p.relative_to(root)), p.stat().st_size) for p in Path(root).rglob("*") if p.is_file())


R, T, S = "{root}", "{tmp}", "{tmp}/sae.yaml"
# (argv, a substring of the one error line). Finding numbers of issues 15/16 in the comments.
BAD: list[tuple[list[str], str]] = [
    # 16.14: a negative k, absurd sizes: refused at load, nothing allocated
    (["sae", "train", S, "--set", "sae.k=-1"], "`sae.k` (latents kept per token) must be at least 1, got -1"),
    (["sae", "train", S, "--set", "sae.d_sae=1e30"], "`sae.d_sae`"),
    (["sae", "train", T + "/sae-ef.yaml", "--set", "sae.expansion_factor=1e12"], "`sae.expansion_factor` must be positive and at most"),
    (["sae", "train", S, "--set", "sae.d_sae=100000000"], "more latents than Strata trains"),
    (["sae", "train", S, "--set", "dataset=wide", "--set", "sae.d_sae=67108864"], "GiB available; lower `sae.d_sae`"),
    (["sae", "train", T + "/sae-ef.yaml", "--set", "sae.expansion_factor=.nan"], "`sae.expansion_factor` must be positive"),
    # 16.15: silent success on nonsense
    (["sae", "train", S, "--set", "sae.k=0"], "`sae.k` (latents kept per token) must be at least 1, got 0"),
    (["features", "html", R, "ft", "--out", T + "/pages", "--features", "5-2"], "a range runs from low to high (write 2-5)"),
    (["features", "html", R, "ft", "--out", T + "/pages", "--features", "3,x"], "--features takes indices and ranges"),
    (["features", "html", R, "ft", "--out", T + "/pages", "--features", "0-99999999999"],
     "feature 99999999999 is out of range; the table has features 0-19"),
    (["features", "html", R, "ft", "--out", T + "/pages", "--features", ","], "--features: no feature given"),
    (["analyze", "show", R, "cmp", "--rows", "-1"], "--rows must be 0 or more"),
    # 16.14: existing file as --out
    (["features", "html", R, "ft", "--out", T + "/a-file"], "is an existing file; give a folder"),
    # 16.13: the anchor bomb, a recursive alias
    (["sae", "train", T + "/bomb.yaml"], "YAML nodes through its aliases"),
    (["extract", T + "/bomb.yaml"], "YAML nodes through its aliases"),
    (["submit", T + "/bomb.yaml", "--address", "http://127.0.0.1:1"], "YAML nodes through its aliases"),
    (["analyze", T + "/recursive.yaml"], "recursive YAML alias"),
    # argument parsing (16.16: argparse's own errors are exit 2 and one line too)
    ([], "the following arguments are required: command"),
    (["nope"], "invalid choice: 'nope'"),
    (["ls"], "the following arguments are required: store"),
    (["show", R], "the following arguments are required: name"),
    (["verify", R, "syn", "--bogus"], "unrecognized arguments: --bogus"),
    (["gc", R, "--grace", "soon"], "'soon' is not a duration"),
    (["gc", R, "--grace=-5m"], "is not a duration"),
    (["rm", R, "syn", "--kind", "model"], "invalid choice: 'model'"),
    (["features", "top", R, "ft", "x"], "invalid int value: 'x'"),
    (["features", "top", R, "ft", "0", "-k", "0"], "must be a positive integer"),
    (["features", "top", R, "ft", "0", "--before", "-1"], "must be >= 0"),
    (["features", "html", R, "ft"], "the following arguments are required: --out"),
    (["features", "html", R, "ft", "--out", T + "/pages", "--max-pages", "0"], "must be a positive integer"),
    (["features", "serve", R, "nope"], "no feature table 'nope' in store"),
    (["features", "serve", R, "ft", "--port", "99999"], "must be a TCP port (0-65535), got 99999"),
    (["features", "serve", R, "ft", "--explanations", T + "/none.jsonl"], "no such file (give a JSON-lines file"),
    (["features", "derive", R, "nope"], "no feature table 'nope' in store"),
    (["features", "derive", R, "ft", "-k", "0"], "must be a positive integer, got 0"),
    (["features", "derive", R, "ft"], "no SAE 'synthetic' in store"),
    (["analyze", "show", R, "cmp", "--rows", "many"], "invalid int value: 'many'"),
    (["jobs", "frobnicate"], "invalid choice: 'frobnicate'"),
    (["sae"], "the following arguments are required: sae_command"),
    (["features"], "the following arguments are required: features_command"),
    # missing things
    (["ls", T + "/no-store"], "no store at"),
    (["show", R, "nope"], "nope"),
    (["show", R, "../escape"], "escape"),
    (["verify", R, "nope"], "nope"),
    (["rm", R, "nope", "--yes"], "nope"),
    (["rm", R, "nope", "--kind", "sae", "--yes"], "nope"),
    (["rm", R, "syn"], "refusing to delete"),
    (["gc", T + "/no-store"], "no store at"),
    (["sae", "ls", T + "/no-store"], "no store at"),
    (["sae", "show", R, "nope"], "nope"),
    (["features", "ls", T + "/no-store"], "no store at"),
    (["features", "show", R, "nope"], "nope"),
    (["features", "top", R, "nope", "0"], "nope"),
    (["features", "top", R, "ft", "20"], "20"),
    (["features", "top", R, "ft", "-1"], "-1"),
    (["features", "html", R, "nope", "--out", T + "/pages"], "nope"),
    (["analyze", "ls", T + "/no-store"], "no store at"),
    (["analyze", "show", R, "nope"], "nope"),
    (["analyze", "show", R], "usage: strata analyze show STORE NAME"),
    (["analyze", "ls"], "usage: strata analyze ls STORE"),
    (["analyze", T + "/analyze.yaml", "extra"], "unexpected arguments after the spec"),
    (["similarity", T + "/missing.yaml"], "does not exist"),
    # spec files: missing, unreadable, not a mapping, not YAML
    (["extract", T + "/missing.yaml"], "does not exist"),
    (["extract", T], "is a folder"),
    (["extract", T + "/binary.yaml"], "is not UTF-8 text"),
    (["extract", T + "/list.yaml"], "must hold a mapping of keys, not a list"),
    (["sae", "train", T + "/broken.yaml"], "is not valid YAML"),
    (["features", "encode", T + "/missing.yaml"], "does not exist"),
    (["reprocess", T + "/missing.yaml"], "missing.yaml"),
    (["submit", T + "/missing.yaml", "--address", "http://127.0.0.1:1"], "does not exist"),
    # unknown keys, bad values, bad --set syntax
    (["extract", T + "/extract.yaml", "--set", "bogus=1"], "`bogus` is not a spec key"),
    (["extract", T + "/extract.yaml", "--set", "tokenize.context_size=-4"], "`tokenize.context_size`"),
    (["extract", T + "/extract.yaml", "--set", "dtype=float8"], "`dtype`"),
    (["extract", T + "/extract.yaml", "--set", "name=../up"], "name"),
    (["extract", T + "/extract.yaml", "--set", "novalue"], "expected key=value"),
    (["extract", T + "/extract.yaml", "--set", "a..b=1"], "the key has an empty part"),
    (["extract", T + "/extract.yaml", "--set", "name.x=1"], "`name` is not a section"),
    (["extract", T + "/extract.yaml", "--set", "hooks=[a"], "the value is not valid YAML"),
    (["extract", T + "/extract.yaml"], "no-model"),
    (["sae", "train", S, "--set", "train.learning_rate=1"], "`train.learning_rate` is not a spec key"),
    (["sae", "train", S, "--set", "architecture=nope"], "is not a sae-lens training architecture"),
    (["sae", "train", S, "--set", "sae.k=100"], "`sae.k` (100) is larger than `sae.d_sae` (16)"),
    (["sae", "train", S, "--set", "sae.bogus=1"], "`sae.bogus` is not an option"),
    (["sae", "train", S, "--set", "train.batch_size=0"], "`train.batch_size`"),
    (["sae", "train", S, "--set", "dataset=nope"], "nope"),
    (["sae", "train", S, "--set", "hooks=[blocks.9.hook_mlp_out]"], "blocks.9.hook_mlp_out"),
    (["sae", "train", S, "--set", f"store={T}/no-store"], "no-store"),
    (["sae", "train", S, "--set", "name=a/b"], "name"),
    (["features", "encode", T + "/encode.yaml", "--set", "top_k=0"], "`top_k`"),
    (["features", "encode", T + "/encode.yaml", "--set", "sae=nope"], "nope"),
    (["features", "encode", T + "/encode.yaml", "--set", "bogus=1"], "`bogus` is not a spec key"),
    (["analyze", T + "/analyze.yaml", "--set", "analyses.0.metrics=[cka]"], "`analyses.0.compare.metrics.0`"),
    (["analyze", T + "/analyze.yaml", "--set", "analyses.0.a.dataset=nope"], "nope"),
    (["analyze", T + "/analyze.yaml", "--set", "bogus=1"], "`bogus` is not a spec key"),
    (["analyze", T + "/analyze.yaml", "--set", "analyses.3.seed=1"], "`analyses` is a list of 1; `3` is not an index of it (0-0)"),
    (["submit", S, "--set", "bogus=1", "--address", "http://127.0.0.1:1"], "`bogus` is not a spec key"),
    (["reprocess", T + "/pipeline.yaml", "--set", "x=1"], "unrecognized arguments: --set"),
    # jobs without an id, or without a cluster
    (["jobs", "status", "--address", "http://127.0.0.1:1"], "needs a job id"),
    (["jobs", "ls", "--address", "http://127.0.0.1:1"], "127.0.0.1:1"),
]


def _ids() -> list[str]:
    return [f"{i}-{'_'.join(a[:2])}" for i, (a, _) in enumerate(BAD)]


@pytest.mark.parametrize(("argv", "message"), BAD, ids=_ids())
def test_bad_input_is_one_line_exit_2_and_writes_nothing(env, argv, message, monkeypatch):
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    argv = [a.format(**env) for a in argv]
    message = message.format(**env)
    before = listing(env["root"])
    rc, out, err = run(*argv)
    lines = err.splitlines()
    assert rc == 2, (rc, out, err)
    assert len(lines) == 1 and lines[0].startswith("strata: error: "), err
    assert message in lines[0], lines[0]
    assert "Traceback" not in err and len(err) < 2000
    assert listing(env["root"]) == before
    assert not Path(env["tmp"], "pages").exists()


def test_the_table_covers_every_command():
    """Every subcommand of the parser appears in the table (a new command needs its bad inputs)."""
    import argparse

    from strata.jobs.cli import build_parser

    def leaves(p: argparse.ArgumentParser, path: tuple[str, ...]):
        subs = [a for a in p._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs:
            yield path
        for a in subs:
            for name, sp in a.choices.items():
                yield from leaves(sp, (*path, name))

    missing = [" ".join(p) for p in leaves(build_parser(), ()) if not any(tuple(argv[: len(p)]) == p for argv, _ in BAD)]
    assert not missing, f"commands without a bad-input case: {missing}"
    print(f"{len(BAD)} bad inputs in the table")


@pytest.mark.slow
def test_an_anchor_bomb_costs_a_few_kilobytes_and_little_memory(env):
    """16.13: before, `format_error` repr()ed the whole expanded input (312 MB of stderr, 1.4 GB
    RSS for this 1 KB file). The child's peak RSS is read by a wrapper whose only child it is."""
    bomb = Path(env["tmp"], "bomb.yaml")
    assert bomb.stat().st_size < 1024
    wrapper = (
        "import resource, subprocess, sys\n"
        "r = subprocess.run([sys.executable, '-m', 'strata.jobs.cli', 'sae', 'train', sys.argv[1]], capture_output=True)\n"
        "sys.stdout.write(f'{r.returncode} {len(r.stderr)} {resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}\\n')\n"
        "sys.stderr.buffer.write(r.stderr[:4000])\n"
    )

    def peak(spec: Path) -> tuple[int, int, int, str]:
        p = subprocess.run([sys.executable, "-c", wrapper, str(spec)], cwd=ROOT, capture_output=True, text=True, timeout=600)
        rc, err_bytes, rss_kb = (int(x) for x in p.stdout.split())
        return rc, err_bytes, rss_kb, p.stderr

    rc, err_bytes, rss_kb, err = peak(bomb)
    assert rc == 2 and err_bytes < 1000, err
    assert err.startswith("strata: error: ") and "aliases" in err
    # Against the same command refusing a 1-line broken YAML file: the imports alone take
    # ~600 MB, which varies by machine; the bomb may add little on top (it added ~800 MB).
    broken = Path(env["tmp"], "broken.yaml")
    broken.write_text("store: [\n")
    base_rc, _, base_kb, base_err = peak(broken)
    assert base_rc == 2 and base_err.startswith("strata: error: "), base_err
    assert rss_kb < base_kb + 64 * 1024, f"peak RSS {rss_kb} KiB against {base_kb} KiB for a broken 1-line file"


def test_echoed_input_is_cut_short(env, tmp_path):
    """An invalid value is echoed as a short prefix, never whole."""
    spec = tmp_path / "long.yaml"
    spec.write_text(Path(env["tmp"], "sae.yaml").read_text() + "data: {shuffle_seed: [" + ", ".join(["123456789"] * 5000) + "]}\n")
    rc, out, err = run("sae", "train", str(spec))
    assert rc == 2 and len(err.splitlines()) == 1 and "`data.shuffle_seed`" in err and len(err) < 600, err
