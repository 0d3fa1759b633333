"""A private Ray (`compute.address: null`) holds no fixed port: two of them start side by side
on one machine while a third process holds the dashboard agent's default port 52365, each runs
its tasks with its own environment, and none of their processes is left when they end, on a
normal exit, on Ctrl-C, on the driver's death and on a failed start."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

psutil = pytest.importorskip("psutil")

ROOT = Path(__file__).resolve().parents[2]
AGENT_DEFAULT_PORT = 52365  # Ray's dashboard agent's default
# Ray's fixed defaults: GCS, client server, dashboard, dashboard agent (http).
RAY_DEFAULT_PORTS = {6379, 10001, 8265, AGENT_DEFAULT_PORT}

# A driver: start the private Ray, report its tree's pid and what its workers saw, then wait
# for a line on stdin (or a signal) before leaving the cluster.
DRIVER = textwrap.dedent("""
    import json, os, signal, sys
    # As a terminal's foreground process: Ctrl-C raises KeyboardInterrupt even when the test
    # session was started in the background (whose children inherit SIGINT ignored).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    import ray
    import strata.pipeline.cluster as cluster
    from strata.pipeline.errors import ClusterError
    if len(sys.argv) > 2:
        cluster.PRIVATE_START_TIMEOUT_S = float(sys.argv[2])
    try:
        with cluster.connect(None) as c:
            @ray.remote
            def seen():
                return os.environ.get("AWS_SECRET_ACCESS_KEY"), os.getpid()
            got = ray.get([seen.remote() for _ in range(4)])
            with open(sys.argv[1], "w") as f:
                json.dump({"private": c.private, "address": c.address, "secrets": sorted({s for s, _ in got}),
                           "driver": os.getpid()}, f)
            sys.stdin.readline()
    except ClusterError as e:
        print("ERR", e)
        sys.exit(2)
    # The head's own auth token was this process's only while it ran.
    print("DONE", all(k not in os.environ for k in ("RAY_AUTH_TOKEN", "RAY_AUTH_MODE")))
""")


def _tree(pid: int) -> list:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _listening(procs: list) -> set[int]:
    ports: set[int] = set()
    for q in procs:
        try:
            ports |= {c.laddr.port for c in q.net_connections("inet") if c.status == psutil.CONN_LISTEN}
        except psutil.Error:
            pass
    return ports


def _agent_ports(procs: list) -> list[int]:
    """The ports the raylets of ``procs`` tell their dashboard agents to listen on (whether or not
    the agent could bind it): read from the raylet's command line."""
    ports = []
    for q in procs:
        cmd = _cmdline(q)
        if "raylet/raylet" in cmd:
            ports += [int(p) for p in re.findall(r"--listen-port=(\d+)", cmd)]
    return ports


def _cmdline(q) -> str:
    try:
        return " ".join(q.cmdline())
    except psutil.Error:  # gone meanwhile: Ray starts and ends short-lived processes
        return ""


def _temp_dir(procs: list) -> Path:
    """The --temp-dir of the private head's ``ray start`` in ``procs``."""
    cmd = next(c for c in map(_cmdline, procs) if "ray.scripts.scripts" in c)
    return Path(re.search(r"--temp-dir (\S+)", cmd).group(1))


def _alive(procs: list) -> list:
    alive = []
    for q in procs:
        try:
            if q.is_running() and q.status() != psutil.STATUS_ZOMBIE:
                alive.append(q)
        except psutil.NoSuchProcess:
            pass
    return alive


def _ray_processes_of(tmp_dir: str) -> list:
    """Processes whose command line names a private Ray's temporary folder."""
    found = []
    for q in psutil.process_iter(["cmdline"]):
        try:
            if any(tmp_dir in a for a in q.info["cmdline"] or []) and q.status() != psutil.STATUS_ZOMBIE:
                found.append(q)
        except psutil.Error:
            pass
    return found


def _start(tmp_path: Path, name: str, secret: str, *args: str) -> tuple[subprocess.Popen, Path]:
    report = tmp_path / f"{name}.json"
    env = {**os.environ, "AWS_SECRET_ACCESS_KEY": secret, "AWS_ACCESS_KEY_ID": "AKIA-test"}
    for k in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH"):
        env.pop(k, None)
    proc = subprocess.Popen([sys.executable, "-c", DRIVER, str(report), *args], cwd=ROOT, env=env, text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    return proc, report


def _wait_report(proc: subprocess.Popen, report: Path, timeout_s: float = 300) -> dict:
    deadline = time.monotonic() + timeout_s
    while not report.exists() or not report.read_text():
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"the driver exited with {proc.returncode}: {out[-2000:]} {err[-3000:]}")
        assert time.monotonic() < deadline, "the private Ray did not come up"
        time.sleep(0.2)
    time.sleep(0.2)  # the report is written in one call; let it land
    return json.loads(report.read_text())


@pytest.fixture
def agent_port_held():
    """Hold 127.0.0.1:52365 as another program (or another Ray's agent) would, when it is free."""
    sock = socket.socket()
    try:
        sock.bind(("127.0.0.1", AGENT_DEFAULT_PORT))
        sock.listen()
    except OSError as e:
        if e.errno != errno.EADDRINUSE:
            raise
        # Someone on this machine holds it already: the situation the test is about.
    yield
    sock.close()


@pytest.mark.slow
def test_two_private_rays_side_by_side_hold_no_fixed_port(tmp_path, agent_port_held):
    drivers = {name: _start(tmp_path, name, f"secret-{name}") for name in ("a", "b")}
    try:
        reports = {name: _wait_report(*d) for name, d in drivers.items()}
        trees = {name: _tree(proc.pid) for name, (proc, _) in drivers.items()}
        temp_dirs = {name: _temp_dir(tree) for name, tree in trees.items()}
        assert all(d.is_dir() for d in temp_dirs.values())
        ports = {name: _listening(tree) for name, tree in trees.items()}
        for name, got in reports.items():
            # Each is private, and its workers saw its own driver's environment (credentials).
            assert got["private"] is True and got["secrets"] == [f"secret-{name}"], got
            assert ports[name], f"no listening port found in {name}'s Ray"
            # Told to use another port, not merely failing to get 52365 while the test holds it.
            agent = _agent_ports(trees[name])
            assert agent and AGENT_DEFAULT_PORT not in agent, (name, agent)
            assert not ports[name] & RAY_DEFAULT_PORTS, (name, sorted(ports[name] & RAY_DEFAULT_PORTS))
        assert reports["a"]["address"] != reports["b"]["address"]
        assert not ports["a"] & ports["b"]
        for proc, _ in drivers.values():
            proc.stdin.write("\n")
            proc.stdin.flush()
        for proc, _ in drivers.values():
            out, err = proc.communicate(timeout=180)
            assert proc.returncode == 0 and "DONE True" in out, (out[-1000:], err[-3000:])
        for name, tree in trees.items():
            _, alive = psutil.wait_procs(tree, timeout=30)
            assert not _alive(alive), f"{name}'s Ray left {[_cmdline(q)[:200] for q in _alive(alive)]}"
            assert not temp_dirs[name].exists()  # logs and sockets of a clean run go with it
    finally:
        for proc, _ in drivers.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()


@pytest.mark.slow
@pytest.mark.parametrize("how", ["ctrl-c", "killed"])
def test_a_private_ray_stops_when_its_driver_is_interrupted_or_killed(tmp_path, how):
    proc, report = _start(tmp_path, "c", "secret-c")
    try:
        got = _wait_report(proc, report)
        assert got["secrets"] == ["secret-c"]
        tree = _tree(proc.pid)
        kept = _temp_dir(tree)  # its logs stay after an interrupted run; removed here
        if how == "ctrl-c":
            proc.send_signal(signal.SIGINT)  # what a terminal's Ctrl-C sends the foreground process
        else:
            proc.kill()  # no finally runs: the head must go with its parent all the same
        # Wait with stdin still open: closing it first (communicate) races the signal, and a
        # readline that sees EOF first ends the driver normally, the interrupt landing later.
        proc.wait(timeout=180)
        proc.communicate(timeout=60)
        assert proc.returncode != 0
        _, alive = psutil.wait_procs(tree, timeout=60)
        assert not _alive(alive), [_cmdline(q)[:200] for q in _alive(alive)]
        shutil.rmtree(kept, ignore_errors=True)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.slow
def test_a_private_ray_that_does_not_come_up_is_one_clear_error_and_leaves_nothing(tmp_path):
    # A start-up limit no head can meet: the start is abandoned half-way.
    proc, _ = _start(tmp_path, "d", "secret-d", "0.5")
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 2, err[-3000:]
    errs = [ln for ln in out.splitlines() if ln.startswith("ERR ")]
    assert len(errs) == 1 and "could not start a private Ray (`ray start --head` not up after 0.5 s" in errs[0], out
    tmp_dir = re.search(r"its log: (/\S+)/ray-start\.log", errs[0]).group(1)
    deadline = time.monotonic() + 60
    while _ray_processes_of(tmp_dir) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not _ray_processes_of(tmp_dir)
    shutil.rmtree(tmp_dir)  # kept for the error's log
