"""Before and after: `benchmarks/extract.py` and `benchmarks/store_io.py` of two revisions, run
side by side on this machine, alternating, and their figures set against each other.

    python benchmarks/compare_revisions.py                        # 5a0abf3 (before the house plan) vs this checkout
    python benchmarks/compare_revisions.py --before 5a0abf3 --after HEAD --alternations 4
    python benchmarks/compare_revisions.py --alternations 1 --benchmarks store_io \\
        --store-io-args "--units 2 --unit-contexts 16 --d 64 --repeats 1"      # a smoke run

Each revision runs its own copy of each benchmark, from a git worktree of that revision
(``git worktree add --detach /tmp/strata-before REV``, made when missing and kept for the next
run) or, for ``.``, from this checkout as it is, uncommitted changes included. Both use the same
Python (this venv's), with ``PYTHONPATH`` set to the revision's folder and the working directory
there: code from before the house plan imports bare ``store``/``pipeline`` and finds them on
``PYTHONPATH``; code after it imports ``strata.*``, which ``PYTHONPATH`` resolves to that folder
ahead of the venv's editable install (and its private Ray's workers inherit the same
environment).

Shared CPUs drift by up to 2x over minutes, so the two revisions alternate: each alternation runs
every benchmark once for each revision, the revision that goes first swapping every time (ABBA),
and the whole output of every run is kept under ``--logs``. Figures compared:

* extract: every ``round N: bare ..., pipeline 1 hook ..., all resid_post ..., sae-lens ...
  tokens/s`` line (a format both revisions print) gives one sample per round of each contender,
  and the ratio of each pipeline figure to that round's bare loop. The absolute pipeline rates
  are the figures to compare across revisions: how the bare loop is run changed with the house
  plan (in the driver before, in a fresh process with the workers' settings after), so the
  ratios say how each revision's benchmark saw it;
* store_io: every ``LABEL: OURS ... ratio R`` line (Strata's own rate and its ratio to the
  baseline) and the bytes per token on disk (which must not change at all).

For each figure the report gives each revision's median and spread (min..max) over all its
samples, after/before of the medians, and whether after's median lies below before's by more
than the run-to-run spread (the wider of the two revisions' max - min); ratios to a bare loop
run differently in the two revisions are marked as not comparable. Check the load average printed beside it: figures
taken while other work runs are noise.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _machine import cpu_model, load_average, memory_gib  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = {"extract": "benchmarks/extract.py", "store_io": "benchmarks/store_io.py"}
_NUM = r"([\d,]+(?:\.\d+)?)"
_ROUND = re.compile(rf"^round \d+: bare {_NUM}, pipeline 1 hook {_NUM}, all resid_post {_NUM}(?:, sae-lens {_NUM})? tokens/s")
_STORE_IO = re.compile(rf"^(?P<label>[^:]+): (?:write_unit |checked )?{_NUM} (?P<unit>GB/s|M rows/s)\b.*\bratio {_NUM}")
_BYTES = re.compile(rf"^bytes/token (\w+): {_NUM}")


@dataclass
class Side:
    """One revision: where its code is, and the samples of every figure its runs printed."""

    label: str  # "before" or "after"
    rev: str  # as given: a git revision, or "." for this checkout as it is
    folder: Path
    samples: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    bare_methods: set[str] = field(default_factory=set)  # how its extract.py ran the bare loop


    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(self.folder), *filter(None, [env.get("PYTHONPATH")])])
        return env


def git(*args: str) -> str:
    return subprocess.run(["git", "-C", str(REPO), *args], check=True, capture_output=True, text=True).stdout.strip()


def checkout(label: str, rev: str, worktrees: Path) -> Side:
    """The folder holding ``rev``'s code: this checkout for ``.``, else a worktree made (or
    reused, when it holds that very commit) at ``worktrees/strata-LABEL``."""
    if rev == ".":
        return Side(label, rev, REPO)
    try:
        commit = git("rev-parse", "--verify", f"{rev}^{{commit}}")
    except subprocess.CalledProcessError:
        raise SystemExit(f"--{label} {rev!r} is not a commit of {REPO}: give a git revision (a hash, a branch, HEAD~3) or '.'") from None
    folder = worktrees / f"strata-{label}"
    if folder.exists():
        held = subprocess.run(["git", "-C", str(folder), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
        if held != commit:
            raise SystemExit(f"{folder} holds {held[:10] or 'no git checkout'}, not {rev} ({commit[:10]}): "
                             f"remove it (git worktree remove {folder}) or pass another --worktrees folder")
    else:
        git("worktree", "add", "--detach", str(folder), commit)
    return Side(label, rev, folder)


def describe(side: Side) -> str:
    if side.rev == ".":
        dirty = git("status", "--porcelain", "--untracked-files=no")
        return f"this checkout {REPO} at {git('rev-parse', '--short', 'HEAD')}" + (" with uncommitted changes" if dirty else "")
    return f"{side.rev} ({git('rev-parse', '--short', side.rev)}) in {side.folder}"


def parse(bench: str, text: str) -> dict[str, list[float]]:
    """The figures one run printed, each as a list of samples (extract: one per round)."""
    out: dict[str, list[float]] = defaultdict(list)
    for line in text.splitlines():
        line = line.strip()
        if bench == "extract" and (m := _ROUND.match(line)):
            bare, one, every, sl = (float(x.replace(",", "")) if x else None for x in m.groups())
            out["extract: bare loop, tokens/s"].append(bare)
            out["extract: pipeline 1 hook, tokens/s"].append(one)
            out["extract: pipeline all resid_post, tokens/s"].append(every)
            out["extract: pipeline 1 hook / bare loop (each revision's method)"].append(one / bare)
            out["extract: pipeline all resid_post / bare loop (each revision's method)"].append(every / bare)
            if sl is not None:
                out["extract: sae-lens CacheActivationsRunner, tokens/s"].append(sl)
                out["extract: pipeline 1 hook / sae-lens"].append(one / sl)
        elif bench == "store_io" and (m := _STORE_IO.match(line)):
            label, ours, unit, ratio = m.group("label"), float(m.group(2)), m.group("unit"), float(m.group(4))
            out[f"store_io: {label}, {unit}"].append(ours)
            out[f"store_io: {label}, ratio"].append(ratio)
        elif bench == "store_io" and (m := _BYTES.match(line)):
            out[f"store_io: bytes/token {m.group(1)} (lower is better; must not change)"].append(float(m.group(2)))
    return out


def absorb(side: Side, bench: str, text: str) -> dict[str, list[float]]:
    """Add the figures of one run's output to ``side``; return them."""
    figures = parse(bench, text)
    if bench == "extract" and figures:
        fresh = "each baseline runs in a fresh process" in text
        side.bare_methods.add("a fresh process with the workers' settings" if fresh else "the driver")
    for k, v in figures.items():
        side.samples[k].extend(v)
    return figures


def run_one(bench: str, side: Side, args: list[str], python: str, log: Path) -> bool:
    """Run one benchmark of one revision; keep its whole output in ``log``; add its figures."""
    script = side.folder / BENCHMARKS[bench]
    if not script.exists():
        log.write_text(f"{script} does not exist at {side.rev}\n")
        print(f"  {bench} {side.label}: missing ({script})", flush=True)
        return False
    t0 = time.perf_counter()
    proc = subprocess.run([python, str(script), *args], cwd=side.folder, env=side.env(), stdin=subprocess.DEVNULL,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log.write_text(proc.stdout)
    figures = absorb(side, bench, proc.stdout)
    ok = proc.returncode == 0 and bool(figures)
    print(f"  {bench} {side.label}: {'ok' if ok else f'FAILED (exit {proc.returncode}, {len(figures)} figures)'} in "
          f"{time.perf_counter() - t0:.0f} s, {sum(len(v) for v in figures.values())} samples; {load_average()}; log {log}", flush=True)
    return ok


def fmt(x: float) -> str:
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.3g}" if abs(x) < 10 else f"{x:.1f}"


def verdict(b: list[float], a: list[float], *, lower_is_better: bool) -> str:
    """Whether after's median fell below before's by more than the run-to-run spread (the wider
    of the two revisions' max - min)."""
    mb, ma = statistics.median(b), statistics.median(a)
    if lower_is_better:
        return "same" if ma == mb else "CHANGED"
    if len(b) < 2 or len(a) < 2:
        return "lower (one sample: no spread to judge by)" if ma < mb else "same or higher (one sample)"
    drop, spread = mb - ma, max(max(b) - min(b), max(a) - min(a))
    if drop > spread:
        return f"DROP beyond the spread ({drop / mb:.0%} > {spread / mb:.0%})"
    return f"lower, within the spread ({drop / mb:.0%} <= {spread / mb:.0%})" if drop > 0 else "same or higher"


def report(before: Side, after: Side) -> list[str]:
    """One markdown table row per figure both revisions printed."""
    lines = ["| figure | before: median (min..max), n | after: median (min..max), n | after/before | verdict |",
             "| --- | --- | --- | --- | --- |"]
    # A bare loop run another way is another baseline: its figures, and ratios to it, do not compare.
    methods_differ = before.bare_methods != after.bare_methods
    for key in sorted(set(before.samples) | set(after.samples)):
        b, a = before.samples.get(key, []), after.samples.get(key, [])
        if not b or not a:
            lines.append(f"| {key} | {len(b)} samples | {len(a)} samples | | printed by one revision only |")
            continue
        mb, ma = statistics.median(b), statistics.median(a)
        if methods_differ and "bare loop" in key:
            verdict_ = (f"not comparable: the bare loop ran in {' / '.join(sorted(before.bare_methods))} before, "
                        f"in {' / '.join(sorted(after.bare_methods))} after")
        else:
            verdict_ = verdict(b, a, lower_is_better="lower is better" in key)
        lines.append(f"| {key} | {fmt(mb)} ({fmt(min(b))}..{fmt(max(b))}), {len(b)} | {fmt(ma)} ({fmt(min(a))}..{fmt(max(a))}), {len(a)} "
                     f"| {ma / mb:.2f} | {verdict_} |")
    return lines


def report_logs(logs: Path) -> int:
    """The report of runs kept in ``logs`` (``BENCH-SIDE-N.txt``), without running anything."""
    sides = {label: Side(label, "?", logs) for label in ("before", "after")}
    found = 0
    for path in sorted(logs.glob("*-*-*.txt")):
        bench, label, _ = path.stem.rsplit("-", 2)
        if bench in BENCHMARKS and label in sides:
            absorb(sides[label], bench, path.read_text())
            found += 1
    if not found:
        raise SystemExit(f"no run logs (extract-before-1.txt, store_io-after-2.txt, ...) in {logs}")
    print(f"{found} runs in {logs}\n")
    print("\n".join(report(sides["before"], sides["after"])))
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before", default="5a0abf3", help="git revision (default: 5a0abf3, the revision before the house plan), or '.'")
    ap.add_argument("--after", default=".", help="git revision, or '.' (default): this checkout as it is")
    ap.add_argument("--alternations", type=int, default=3, help="runs of every benchmark per revision, alternating (ABBA)")
    ap.add_argument("--benchmarks", default="extract,store_io", help="comma-separated subset of " + ",".join(BENCHMARKS))
    ap.add_argument("--extract-args", default="--rounds 3", help="arguments for both revisions' extract.py (flags both know)")
    ap.add_argument("--store-io-args", default="", help="arguments for both revisions' store_io.py")
    ap.add_argument("--worktrees", default="/tmp", help="where the revisions' worktrees go (strata-before, strata-after)")
    ap.add_argument("--logs", default=None, help="folder for every run's full output (default: a new one under /tmp)")
    ap.add_argument("--python", default=sys.executable, help="the Python both revisions run with (default: this one)")
    ap.add_argument("--report-only", action="store_true", help="run nothing: report the runs whose output --logs holds")
    a = ap.parse_args(argv)
    if a.report_only:
        if not a.logs or not Path(a.logs).is_dir():
            ap.error(f"--report-only reads the runs kept in --logs: give an existing folder, got {a.logs!r}")
        return report_logs(Path(a.logs))
    benches = [b.strip() for b in a.benchmarks.split(",") if b.strip()]
    unknown = [b for b in benches if b not in BENCHMARKS]
    if unknown or not benches:
        ap.error(f"--benchmarks {a.benchmarks!r}: valid names are {', '.join(BENCHMARKS)}")
    if a.alternations < 1:
        ap.error(f"--alternations must be at least 1, got {a.alternations}")
    if a.before == a.after:
        ap.error(f"--before and --after are both {a.before!r}: compare two different revisions")
    bench_args = {"extract": shlex.split(a.extract_args), "store_io": shlex.split(a.store_io_args)}
    logs = Path(a.logs or f"/tmp/strata-compare-{time.strftime('%Y%m%d-%H%M%S')}")
    logs.mkdir(parents=True, exist_ok=True)
    worktrees = Path(a.worktrees)
    before, after = checkout("before", a.before, worktrees), checkout("after", a.after, worktrees)

    print(f"machine: {cpu_model()}, {os.cpu_count()} cores, {memory_gib():.0f} GiB; python {a.python}")
    print(f"before: {describe(before)}\nafter:  {describe(after)}")
    print(f"{a.alternations} alternations of {', '.join(benches)}; extract args {a.extract_args!r}, store_io args {a.store_io_args!r}; "
          f"logs in {logs}\n{load_average()} at the start", flush=True)
    failed = 0
    for i in range(a.alternations):
        order = (before, after) if i % 2 == 0 else (after, before)  # ABBA: drift falls on both alike
        print(f"alternation {i + 1} of {a.alternations}: {order[0].label} first", flush=True)
        for bench in benches:
            for side in order:
                failed += not run_one(bench, side, bench_args[bench], a.python, logs / f"{bench}-{side.label}-{i + 1}.txt")
    print(f"{load_average()} at the end\n")
    print("\n".join(report(before, after)))
    if failed:
        print(f"\n{failed} run(s) failed or printed no figures: see their logs in {logs}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
