"""The suite's leak check (tests/conftest.py::_no_leaks) fails tests that leave threads or Ray
actors behind, and only those.

Each case runs pytest in a subprocess over a tiny test file next to a copy of the suite's
conftest: the Ray case starts its own Ray there, so it never touches this session's.
"""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

CONFTEST = Path(__file__).with_name("conftest.py")


def _run(tmp_path: Path, body: str, *, grace_s: float | None = None) -> dict[str, str]:
    """Run the tests in ``body`` under the suite's conftest (its grace period set to ``grace_s``
    when given); returns each test's outcome (``passed``, ``failed``, ``error`` at teardown) by
    name, and pytest's output under ``_output``."""
    conftest = CONFTEST.read_text()
    if grace_s is not None:
        assert conftest.count("\nLEAK_GRACE_S = ") == 1
        conftest = re.sub(r"\nLEAK_GRACE_S = .*", f"\nLEAK_GRACE_S = {grace_s}", conftest)
    (tmp_path / "conftest.py").write_text(conftest)
    (tmp_path / "test_case.py").write_text(textwrap.dedent(body))
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-rA", "-q", "test_case.py"],
        cwd=tmp_path, capture_output=True, text=True, timeout=500,
    )
    outcomes: dict[str, str] = {}
    for m in re.finditer(r"^(PASSED|FAILED|ERROR) test_case\.py::(\w+)", proc.stdout, re.M):
        # A teardown error is reported after the PASSED line of the same test: it wins.
        outcomes[m.group(2)] = "error" if m.group(1) == "ERROR" else outcomes.get(m.group(2), m.group(1).lower())
    assert outcomes, f"no outcomes parsed:\n{proc.stdout[-3000:]}\n{proc.stderr[-2000:]}"
    return outcomes | {"_output": proc.stdout}


def test_threads_left_behind_fail_the_test(tmp_path: Path) -> None:
    got = _run(tmp_path, '''
        import threading

        STOP = threading.Event()

        def test_leaks_a_plain_thread():
            threading.Thread(target=STOP.wait, name="worker").start()

        def test_leaks_a_daemon_thread_of_ours():
            threading.Thread(target=STOP.wait, name="strata-lease-x", daemon=True).start()

        def test_third_party_daemon_thread_is_allowed():
            threading.Thread(target=STOP.wait, name="moto-server", daemon=True).start()

        def test_a_thread_that_ends_is_fine():
            t = threading.Thread(target=lambda: None, name="strata-short")
            t.start()

        def test_zz_release():
            STOP.set()
    ''', grace_s=0.5)
    out = got.pop("_output")
    assert got == {
        "test_leaks_a_plain_thread": "error",
        "test_leaks_a_daemon_thread_of_ours": "error",
        "test_third_party_daemon_thread_is_allowed": "passed",
        "test_a_thread_that_ends_is_fine": "passed",
        "test_zz_release": "passed",
    }, out
    assert "test leaked threads: ['worker']" in out and "test leaked threads: ['strata-lease-x']" in out


@pytest.mark.slow
@pytest.mark.ray
def test_ray_actors_left_behind_fail_the_test(tmp_path: Path) -> None:
    got = _run(tmp_path, '''
        import ray

        KEEP = []

        @ray.remote(num_cpus=0)
        class Leaky:
            def ping(self):
                return 1

        def test_killed_actor_is_fine(ray_session):
            a = Leaky.remote()
            assert ray.get(a.ping.remote()) == 1
            ray.kill(a)

        def test_dropped_handle_is_fine(ray_session):
            assert ray.get(Leaky.remote().ping.remote()) == 1

        def test_leaks_an_actor(ray_session):
            KEEP.append(Leaky.remote())
            assert ray.get(KEEP[-1].ping.remote()) == 1

        def test_earlier_actors_are_not_this_tests(ray_session):
            assert len(KEEP) == 1  # still alive, created by the test before
    ''', grace_s=3.0)
    out = got.pop("_output")
    assert got == {
        "test_killed_actor_is_fine": "passed",
        "test_dropped_handle_is_fine": "passed",
        "test_leaks_an_actor": "error",
        "test_earlier_actors_are_not_this_tests": "passed",
    }, out
    assert "test leaked Ray actors (still alive 3 s after it ended): ['Leaky']" in out
