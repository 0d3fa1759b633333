"""What `strata` prints, for people and for scripts: exit codes of `jobs status`, closed pipes,
control characters from corpus text and metadata, `analyze show`'s table, `--help` for every
positional, no credential in any log, and S3 reads without credentials."""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from _cli_store import RESULTS, make_store

from strata import store
from strata.jobs._text import REDACTED, RedactingFilter, safe
from strata.jobs.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[2]
RAW_CONTROL = [chr(c) for c in range(32) if chr(c) not in "\n\t"] + ["\x7f"]  # tabs separate columns


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cli-output") / "acts"
    make_store(root)
    return root


def run(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(list(argv))
    return rc, out.getvalue(), err.getvalue()


def raw_controls(text: str) -> list[str]:
    return sorted({c for c in text if c in RAW_CONTROL})


# -- 16.2: control characters ------------------------------------------------------------------


def test_safe_escapes_every_control_character():
    assert safe("a\x1b[2Jb\x07c\nd\te\x9b") == "a\\x1b[2Jb\\x07c\\nd\\te\\x9b"
    assert safe("plain ünïcode 名前") == "plain ünïcode 名前"


def test_features_top_shows_corpus_control_sequences_escaped(root):
    rc, out, err = run("features", "top", str(root), "ft", "0", "-k", "3")
    assert rc == 0, err
    assert raw_controls(out + err) == []
    assert out.count("\\x1b]0;pwned\\x07\\x1b[2J") >= 3  # each top context holds the crafted token, shown escaped
    rc, out, _ = run("features", "top", str(root), "ft", "0", "-k", "3", "--json")
    assert rc == 0 and raw_controls(out) == [] and "\\u001b]0;pwned\\u0007" in out


def test_listings_show_metadata_control_characters_escaped(root):
    rc, out, _ = run("ls", str(root))
    assert rc == 0 and raw_controls(out) == [] and "synthetic\\x1b[31m" in out
    assert [line.split("\t")[0] for line in out.splitlines() if not line.startswith(" ")] == ["syn", "wide"]
    for argv in (["show", str(root), "syn"], ["sae", "ls", str(root)], ["features", "ls", str(root)], ["analyze", "ls", str(root)],
                 ["analyze", "show", str(root), "cmp"], ["sae", "show", str(root), "sae1"]):
        rc, out, err = run(*argv)
        assert rc == 0 and raw_controls(out + err) == [], (argv, err)


# -- 15.11: analyze show -------------------------------------------------------------------------


def test_analyze_show_prints_the_values_first_and_the_record_behind_json(root):
    rc, out, _ = run("analyze", "show", str(root), "cmp")
    lines = out.splitlines()
    assert rc == 0 and len(lines) == 5, out
    assert lines[1].split() == ["metric", "value", "a", "b"]
    assert lines[2].split()[:2] == ["linear_cka", "0.987654"] and lines[3].split()[:2] == ["procrustes", "0.25"]
    assert "--json" in lines[-1] and "xxxx" not in out  # the long spec stays behind --json
    rc, out, _ = run("analyze", "show", str(root), "cmp", "--json")
    import json

    record = json.loads(out)
    assert rc == 0 and record["results"]["head"] == [dict(zip(RESULTS, row)) for row in zip(*RESULTS.values())]
    assert record["spec"]["note"] == "x" * 4000 and record["provenance"]["method"] == "exact"
    rc, out, _ = run("analyze", "show", str(root), "cmp", "--rows", "1")
    assert rc == 0 and "procrustes" not in out and "1 more rows" in out


# -- 15.12: help for every positional -------------------------------------------------------------


def test_every_positional_of_every_subcommand_has_help():
    def walk(p: argparse.ArgumentParser, path: str):
        for a in p._actions:
            if isinstance(a, argparse._SubParsersAction):
                for name, sp in a.choices.items():
                    yield from walk(sp, f"{path} {name}")
            elif not a.option_strings:
                yield path, a.dest, a.help

    found = list(walk(build_parser(), "strata"))
    assert len(found) > 20
    missing = [f"{path}: {dest}" for path, dest, text in found if not text]
    assert not missing, missing


# -- 15.10: closed pipes -------------------------------------------------------------------------


@pytest.mark.parametrize("argv", [["sae", "show", "{root}", "sae1"], ["analyze", "show", "{root}", "cmp", "--json"], ["ls", "{root}"]])
def test_a_closed_pipe_ends_the_command_quietly(root, argv):
    """The reader has gone before the first write (as `| head` is once it has its lines): every
    write gets EPIPE. Deterministic: no reader holds the pipe's read end at all."""
    r, w = os.pipe()
    os.close(r)
    try:
        p = subprocess.run([sys.executable, "-m", "strata.jobs.cli", *[a.format(root=root) for a in argv]], stdout=w, stderr=subprocess.PIPE,
                           cwd=ROOT, timeout=300)
    finally:
        os.close(w)
    assert p.stderr.decode() == "" and p.returncode == 0


def test_a_reader_that_stops_early(root):
    """`strata analyze show --json | (read one line; exit)`, with a real reader process."""
    cmd = f"{sys.executable} -m strata.jobs.cli analyze show {root} cmp --json | {sys.executable} -c 'import sys; sys.stdin.readline()'"
    p = subprocess.run(["bash", "-c", f"set -o pipefail; {cmd}"], capture_output=True, cwd=ROOT, timeout=300)
    assert p.returncode == 0 and b"Traceback" not in p.stderr and b"BrokenPipe" not in p.stderr, p.stderr


# -- 16.3: credentials in logs, S3 without credentials ---------------------------------------------

KEY_ID = "AKIASTRATATESTKEY123"
SECRET = "strataTestSecret/abc+123456789"


def test_verbose_logs_hold_no_part_of_a_credential(s3_bucket, monkeypatch):
    """`strata -v` in a fresh process (where logging is configured as a user's shell gets it)."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    uri = f"{s3_bucket}/acts"
    from strata.analysis.features.synthetic import synthetic_dataset

    synthetic_dataset(store.open(uri), "s3ds", d=4, units=1, unit_contexts=1, context_size=4)
    for argv in (["-v", "ls", uri], ["-v", "show", uri, "s3ds"]):
        p = subprocess.run([sys.executable, "-m", "strata.jobs.cli", *argv], capture_output=True, text=True, cwd=ROOT, timeout=300)
        assert p.returncode == 0 and "s3ds" in p.stdout, p.stderr[-3000:]
        for part in (KEY_ID, KEY_ID[4:], SECRET, SECRET[:12]):
            assert part not in p.stdout + p.stderr
        assert "DEBUG botocore" not in p.stderr and "DEBUG s3fs" not in p.stderr  # third-party at WARNING
    # -v is Strata's own DEBUG; third-party libraries stay at WARNING
    assert main(["-v", "ls", uri]) == 0
    assert logging.getLogger("strata.store").getEffectiveLevel() == logging.DEBUG
    assert logging.getLogger("botocore").getEffectiveLevel() == logging.WARNING


def test_the_redacting_filter_hides_credentials_in_any_record(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    rec = logging.LogRecord("s3fs", logging.WARNING, __file__, 1, "opts %s header %s", ({"key": "k-123456", "secret": SECRET},
                            f"Authorization: AWS4-HMAC-SHA256 Credential={KEY_ID}/20260101/us-east-1/s3/aws4_request"), None)
    assert RedactingFilter(extra=["k-123456"]).filter(rec)
    text = rec.getMessage()
    assert KEY_ID not in text and SECRET not in text and "k-123456" not in text and REDACTED in text
    other = logging.LogRecord("x", logging.INFO, __file__, 1, "AKIAIOSFODNN7EXAMPLE token=abcd1234", None, None)
    RedactingFilter().filter(other)
    assert "AKIAIOSFODNN7EXAMPLE" not in other.getMessage() and "abcd1234" not in other.getMessage()


def test_an_s3_read_without_credentials_is_one_line_naming_the_url(s3_bucket, monkeypatch, tmp_path):
    uri = f"{s3_bucket}/acts"
    store.open(uri)  # a store, made with the fixture's credentials
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(AWS_ENDPOINT_URL=os.environ["AWS_ENDPOINT_URL"], AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"),
               AWS_CONFIG_FILE=str(tmp_path / "none"), AWS_EC2_METADATA_DISABLED="true", AWS_DEFAULT_REGION="us-east-1")
    # A fresh process: no client or credential cache of this one can answer for it.
    p = subprocess.run([sys.executable, "-m", "strata.jobs.cli", "ls", uri], capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert p.returncode == 2, p.stderr
    assert p.stderr.startswith("strata: error: ") and len(p.stderr.splitlines()) == 1, p.stderr
    assert uri in p.stderr and "no credentials" in p.stderr


# -- 15.9, 15.12, 16.14: jobs status / logs / stop / ls on a real Ray cluster ----------------------


def _wait(c, job_id: str, statuses: tuple[str, ...], timeout: float = 240) -> str:
    deadline = time.monotonic() + timeout
    while True:
        status = str(c.get_job_status(job_id))
        if status in statuses or time.monotonic() > deadline:
            return status
        time.sleep(0.5)


@pytest.mark.slow
def test_jobs_status_exit_codes_times_and_unknown_ids(ray_head, monkeypatch):
    from strata.jobs.submit import client

    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", ray_head["dashboard"])
    c = client(ray_head["dashboard"])  # with the cluster's token, as `strata jobs` sends it
    ok = c.submit_job(entrypoint="python -c \"print('done')\"", submission_id="strata-test-ok")
    bad = c.submit_job(entrypoint="python -c \"import sys; print('\\x1b[2J'); sys.exit(3)\"", submission_id="strata-test-bad")
    slow = c.submit_job(entrypoint="python -c \"import time; time.sleep(600)\"", submission_id="strata-test-slow")
    assert _wait(c, ok, ("SUCCEEDED", "FAILED")) == "SUCCEEDED"
    assert _wait(c, bad, ("SUCCEEDED", "FAILED")) == "FAILED"
    assert _wait(c, slow, ("RUNNING",)) == "RUNNING"

    assert run("jobs", "status", ok)[0] == 0
    rc, out, _ = run("jobs", "status", bad)
    assert rc == 1 and out.startswith(f"{bad}\tFAILED\tstarted 20")
    assert run("jobs", "status", slow)[0] == 3
    rc, out, _ = run("jobs", "logs", bad)
    assert rc == 0 and raw_controls(out) == [] and "\\x1b[2J" in out

    rc, out, _ = run("jobs", "ls")
    lines = out.splitlines()
    assert rc == 0 and lines[0].startswith("submission id\tstatus\tstarted (UTC)\tended (UTC)\ttook")
    rows = {line.split("\t")[0]: line.split("\t") for line in lines[1:]}
    assert rows[ok][1] == "SUCCEEDED" and rows[ok][2].endswith("Z") and rows[ok][3].endswith("Z") and rows[slow][3] == "-"

    rc, out, _ = run("jobs", "stop", slow)
    assert rc == 0 and "stop requested" in out
    assert _wait(c, slow, ("STOPPED",)) == "STOPPED"
    assert run("jobs", "status", slow)[0] == 1

    for action in ("status", "logs", "stop"):
        rc, out, err = run("jobs", action, "nope")
        assert rc == 2 and out == "" and err == "strata: error: no job 'nope' on this cluster (see `strata jobs ls`)\n", err
    rc, _, err = run("jobs", "logs", "nope", "--follow")
    assert rc == 2 and len(err.splitlines()) == 1
