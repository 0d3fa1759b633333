"""`strata submit SPEC.yaml` runs any job kind as a Ray Job; `strata jobs ls|status|logs|stop`.

A submission ships the ``strata`` package (``py_modules``, staged as one folder) and the resolved spec (relative
local paths made absolute, secret storage options removed: the cluster's workers use their own
credentials) in a temporary working directory; nothing else of the submitter's environment.
The submission id is derived from the spec's content (``strata-KIND-NAME-DIGEST``): submitting a
spec whose job is still running reports that job instead of starting a second one, and a later
resubmission of a finished one gets the next free suffix.

Ray 2.60+ clusters use token authentication: ``strata`` sends the token from
``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token`` (which ``ray start``
writes); nothing to set on a machine where ``ray start`` ran.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import re
import shutil
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

import strata
from strata import analysis, jobs, pipeline, store
from strata.jobs._text import safe, safe_lines
from strata.jobs.checks import presubmit
from strata.jobs.kinds import detect, localize
from strata.pipeline.cluster import check_reachable
from strata.pipeline.errors import ClusterError, SpecError
from strata.pipeline.executor import storage_options_for

ACTIVE = ("PENDING", "RUNNING")


def _auth_headers() -> dict[str, str]:
    """The cluster's token as an HTTP header, from where Ray keeps it (``RAY_AUTH_TOKEN``,
    ``RAY_AUTH_TOKEN_PATH``, ``~/.ray/auth_token``); passed explicitly because Ray reads its
    own auth mode once per process. Never printed or logged."""
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled":
        return {}
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if not token:
        path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
        try:
            token = path.read_text().strip()
        except OSError:
            return {}
    return {"Authorization": f"Bearer {token}"} if token else {}


def client(address: str | None) -> Any:
    """A Ray Jobs client for ``address`` (or ``RAY_API_SERVER_ADDRESS``), checked to answer."""
    from ray.job_submission import JobSubmissionClient  # lazy: ray starts slowly; `strata submit`'s bad-input paths must not pay for it


    addr = address or os.environ.get("RAY_API_SERVER_ADDRESS") or ""
    if not addr and os.environ.get("RAY_ADDRESS", "").startswith("http"):
        addr = os.environ["RAY_ADDRESS"]
    if not addr:
        raise SpecError("no cluster to talk to: pass --address http://HEAD:8265 (the Ray dashboard) or set RAY_API_SERVER_ADDRESS")
    if "://" not in addr:
        addr = f"http://{addr}"
    check_reachable(addr, what="the Ray job server")
    try:
        return JobSubmissionClient(addr, headers=_auth_headers())
    except Exception as e:  # ConnectionError, RuntimeError, AuthenticationError, ...
        raise ClusterError(f"cannot use the Ray job server at {addr!r}: {str(e).splitlines()[0]}") from None


def _package(into: str) -> str:
    """The ``strata`` package as installed here, staged as one folder under ``into`` for
    ``py_modules``: the cluster imports ``strata.jobs...`` exactly as this machine does, and
    nothing named bare ``store`` or ``jobs`` lands on its path."""


    dest = Path(into, "strata")
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    dest.mkdir(parents=True)
    shutil.copy2(Path(strata.__file__), dest / "__init__.py")
    for name, mod in (("store", store), ("pipeline", pipeline), ("analysis", analysis), ("jobs", jobs)):
        shutil.copytree(Path(mod.__file__).parent, dest / name, ignore=ignore)
    return str(dest)


def prepare(spec_path: str, overrides: list[str]) -> tuple[Any, dict[str, Any], str, str]:
    """(kind, resolved spec mapping, submission id base, spec YAML), validated, with no secret."""

    kind, _, raw = detect(spec_path, overrides)
    raw = localize(kind, raw)
    if raw.get("storage_options"):
        # A submitted job runs on a cluster this process did not start: it uses its own credentials.
        raw["storage_options"] = storage_options_for(raw["storage_options"], private=False)
    kind.spec_type().model_validate(raw)  # still valid after resolving
    text = yaml.safe_dump(raw, sort_keys=True)
    digest = hashlib.sha256(text.encode()).hexdigest()[:12]
    name = re.sub(r"[^A-Za-z0-9_-]", "-", str(raw.get("name") or raw.get("dataset") or kind.name))
    return kind, raw, f"strata-{kind.name}-{name}-{digest}", text


def check_store(spec_path: str, overrides: list[str]) -> None:
    """Before anything is shipped: the job's own checks against the store as seen from here,
    so a conflict with what it holds (an SAE name with another config, a feature table, dataset
    or analysis with another identity) is one line here, not a failure on the cluster."""

    kind, spec, _ = detect(spec_path, overrides)  # with its storage options: the store is read from here
    presubmit(kind.name, spec)


def submit(spec_path: str, overrides: list[str], *, address: str | None, wait: bool) -> int:
    kind, _raw, base, text = prepare(spec_path, overrides)
    check_store(spec_path, overrides)
    c = client(address)
    mine = [j for j in c.list_jobs() if (j.submission_id or "").startswith(base)]
    running = [j for j in mine if str(j.status) in ACTIVE or getattr(j.status, "value", "") in ACTIVE]
    if running:
        job_id = running[0].submission_id
        print(f"already running: {job_id} (the same spec, submitted before); not starting a second one")
    else:
        taken = {j.submission_id for j in mine}
        job_id = base if base not in taken else next(f"{base}-{n}" for n in range(2, 10_000) if f"{base}-{n}" not in taken)
        with tempfile.TemporaryDirectory(prefix="strata-submit-") as work, tempfile.TemporaryDirectory(prefix="strata-pkg-") as pkg:
            Path(work, "spec.yaml").write_text(text)
            _submit_when_ready(
                c,
                entrypoint=f"python -m {kind.entry} spec.yaml --no-progress",
                submission_id=job_id,
                runtime_env={"working_dir": work, "py_modules": [_package(pkg)], "env_vars": {"TOKENIZERS_PARALLELISM": "false"}},
                metadata={"strata_kind": kind.name, "strata_spec": base},
            )
        print(f"submitted {job_id} ({kind.name} job)")
    if not wait:
        return 0
    return follow(c, job_id)


AGENT_WAIT_S = 120.0


def _submit_when_ready(c: Any, **job: Any) -> None:
    """Submit, waiting while the head's job agent comes up: a cluster started moments ago (a
    KubeRay RayJob, a scheduled run) answers "No available agent" for a while."""
    deadline = time.monotonic() + AGENT_WAIT_S
    while True:
        try:
            c.submit_job(**job)
            return
        except RuntimeError as e:
            if "No available agent" not in str(e):
                raise
            if time.monotonic() > deadline:
                raise SystemExit(
                    f"error: the cluster's job agent did not answer within {AGENT_WAIT_S:.0f} s; "
                    "check the head node's dashboard agent (its log: /tmp/ray/session_latest/logs/dashboard_agent.log)"
                ) from None
            time.sleep(2)


def follow(c: Any, job_id: str) -> int:
    """Stream a job's logs until it ends; 0 when it succeeded."""

    async def tail() -> None:
        async for lines in c.tail_job_logs(job_id):
            print(safe_lines(lines), end="", flush=True)

    asyncio.run(tail())
    status = str(getattr(c.get_job_status(job_id), "value", c.get_job_status(job_id)))
    print(f"job {job_id}: {status}")
    return 0 if status == "SUCCEEDED" else 1


def _cmd_submit(args: argparse.Namespace) -> int:
    return submit(args.spec, args.set or [], address=args.address, wait=args.wait)


# `strata jobs status` exit codes: a script can wait on a job with `until ...; [ $? -ne 3 ]`.
STATUS_EXIT = {"SUCCEEDED": 0, "FAILED": 1, "STOPPED": 1, "PENDING": 3, "RUNNING": 3}


def _when(ms: int | None) -> str:
    """A Ray job time (milliseconds since the epoch) as UTC, or ``-``."""
    if not ms:
        return "-"
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ")


def _took(start_ms: int | None, end_ms: int | None) -> str:
    if not start_ms:
        return "-"
    s = int(((end_ms or time.time() * 1000) - start_ms) / 1000)
    return f"{s // 3600}h{s % 3600 // 60:02d}m{s % 60:02d}s" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def _job_info(c: Any, job_id: str) -> Any:
    """The job's details; an id the cluster does not know is bad input (exit 2), not a traceback."""

    try:
        return c.get_job_info(job_id)
    except RuntimeError as e:
        if "404" in str(e) or "does not exist" in str(e):
            raise SpecError(f"no job {safe(job_id)!r} on this cluster (see `strata jobs ls`)") from None
        raise


def _cmd_jobs(args: argparse.Namespace) -> int:
    if args.action != "ls" and not args.job:

        raise SpecError(f"`strata jobs {args.action}` needs a job id (see `strata jobs ls`)")
    c = client(args.address)
    if args.action == "ls":
        rows = [j for j in c.list_jobs() if args.all or (j.submission_id or "").startswith("strata-")]
        if rows:
            print("submission id\tstatus\tstarted (UTC)\tended (UTC)\ttook\tentrypoint")
        for j in sorted(rows, key=lambda j: j.start_time or 0):
            status = getattr(j.status, "value", j.status)
            print(f"{safe(j.submission_id)}\t{status}\t{_when(j.start_time)}\t{_when(j.end_time)}\t"
                  f"{_took(j.start_time, j.end_time)}\t{safe(j.entrypoint)}")
        if not rows:
            print("no Strata jobs on this cluster" + ("" if args.all else " (--all lists every job)"))
        return 0
    info = _job_info(c, args.job)  # an unknown id fails here, before anything else is asked
    if args.action == "status":
        status = str(getattr(info.status, "value", info.status))
        print(f"{safe(args.job)}\t{status}\tstarted {_when(info.start_time)}\tended {_when(info.end_time)}\t{safe(info.message or '')}")
        return STATUS_EXIT.get(status, 1)
    if args.action == "logs":
        if args.follow:
            return follow(c, args.job)
        print(safe_lines(c.get_job_logs(args.job)), end="")
        return 0
    stopped = c.stop_job(args.job)
    print(f"{safe(args.job)}: {'stop requested' if stopped else 'not running'}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:  # noqa: SLF001 - argparse's own type
    q = sub.add_parser("submit", help="run a job spec (any kind) as a Ray Job on a cluster")
    q.add_argument("spec", help="a job spec (YAML) of any kind: extract, sae, features or analysis")
    q.add_argument("--address", help="the cluster's job server, http://HEAD:8265 (default: RAY_API_SERVER_ADDRESS)")
    q.add_argument("--wait", action="store_true", help="stream the job's logs and exit with its status")
    q.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a spec key")
    q.set_defaults(func=_cmd_submit)

    q = sub.add_parser("jobs", help="Strata's Ray Jobs on a cluster: ls, status, logs, stop")
    q.add_argument("action", choices=("ls", "status", "logs", "stop"),
                   help="ls: Strata's jobs with their times; status: one job's state (exit 0 succeeded, 1 failed or stopped, "
                        "3 still running); logs: its output; stop: ask it to stop")
    q.add_argument("job", nargs="?", help="a submission id (status, logs, stop)")
    q.add_argument("--address", help="the cluster's job server, http://HEAD:8265 (default: RAY_API_SERVER_ADDRESS)")
    q.add_argument("--follow", action="store_true", help="logs: stream until the job ends")
    q.add_argument("--all", action="store_true", help="ls: every job, not only Strata's")
    q.set_defaults(func=_cmd_jobs)
