"""Session fixtures shared by the whole suite (one Ray instance, one S3 server on loopback) and the
leak check every test passes: no threads or Ray actors left behind."""

from __future__ import annotations

import contextlib
import gc
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

# Tests never reach a hub: everything they load is built locally.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# transformers 5 loads weights on a thread pool it shuts down without waiting; the leaked-thread
# check below would catch its thread now and then in tests that load a model in this process.
os.environ.setdefault("HF_DEACTIVATE_ASYNC_LOAD", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")


def _aws_env(endpoint: str) -> dict[str, str]:
    return {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint}


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 endpoint: moto's server on 127.0.0.1, port chosen by the OS (port 0, so
    parallel sessions never collide)."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture(scope="session")
def ray_session(s3_server):
    """One local Ray instance for the whole session (a cold start costs 5-15 s and ~1 GB),
    started in this process, so it is private to the session. Its workers inherit this
    process's environment when Ray starts, as a user's private Ray does: the AWS settings of
    the S3 server are set first, since jobs hand no environment to workers."""
    import ray

    with pytest.MonkeyPatch.context() as mp:
        for k, v in _aws_env(s3_server).items():
            mp.setenv(k, v)
        mp.delenv("AWS_PROFILE", raising=False)
        if not ray.is_initialized():
            # "local": our own instance, never the `ray start` head of another test (Ray's
            # discovery file may point at one).
            ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=True, configure_logging=False)
        yield ray
        ray.shutdown()


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    """AWS environment pointing at the moto server, as a user's would point at S3."""
    for k, v in _aws_env(s3_server).items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    return s3_server


@pytest.fixture
def s3_bucket(s3_env):
    """A fresh bucket on the moto server; yields its s3:// URI."""
    import boto3

    name = f"strata-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_env).create_bucket(Bucket=name)
    return f"s3://{name}"


# How long a test's threads and actors get to wind down after it returns before they count as
# leaked: a closed iterator's threads and a dropped actor handle's actor end asynchronously.
LEAK_GRACE_S = 10.0


def _ours(t: threading.Thread) -> bool:
    """A thread Strata started: named `strata-...` by our code, or running a function of ours.
    Other daemon threads (moto's server, Ray's and urllib3's helpers) are the libraries' own."""
    target = getattr(t, "_target", None)  # private in CPython, but the only record of what a thread runs
    module = getattr(target, "__module__", None) or type(t).__module__
    return t.name.startswith("strata-") or module.startswith("strata.")


def _leaked_threads(before: set[int | None]) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.ident not in before and t.is_alive() and (not t.daemon or _ours(t))]


def _live_actors() -> dict[str, str]:
    """Actors of the Ray this process is connected to that are not dead, by id (class names as
    values); empty when Ray is not initialized. Only looks when the test session imported Ray."""
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return {}
    # ray.util.state.list_actors needs the dashboard, which the session Ray runs without; the
    # GCS table behind ray._private.state answers in ~1 ms.
    from ray._private import state

    return {a: info["ActorClassName"] for a, info in state.actors().items() if info["State"] != "DEAD"}


@pytest.fixture(autouse=True)
def _no_leaks():
    """Fail a test that leaves threads behind (non-daemon threads, and daemon threads of ours:
    lease renewers, batch prefetchers) or live Ray actors it created, after a grace period."""
    threads_before = {t.ident for t in threading.enumerate()}
    actors_before = set(_live_actors())
    yield
    deadline = time.monotonic() + LEAK_GRACE_S
    while True:
        threads = _leaked_threads(threads_before)
        actors = {a: name for a, name in _live_actors().items() if a not in actors_before}
        if not (threads or actors) or time.monotonic() > deadline:
            break
        gc.collect()  # an unreachable iterator or actor handle goes now, not at some later collection
        time.sleep(0.1)
    assert not threads, f"test leaked threads: {[t.name for t in threads]}"
    assert not actors, f"test leaked Ray actors (still alive {LEAK_GRACE_S:.0f} s after it ended): {sorted(actors.values())}"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _stop_head(head: subprocess.Popen) -> None:
    """Stop a `ray start --head --block` process and everything it started. SIGTERM goes to the
    `ray start` process alone: it drains the node and stops its processes in ~2 s. Sent to the
    whole group at once, it killed the GCS before the drain asked it anything, and the drain
    waited out its 30 s timeout."""
    head.send_signal(signal.SIGTERM)
    try:
        head.wait(60)
    except subprocess.TimeoutExpired:
        head.kill()
        head.wait(10)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            os.killpg(head.pid, 0)  # raises once no process of the group is left
        except ProcessLookupError:
            return
        time.sleep(0.2)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(head.pid, signal.SIGKILL)


@pytest.fixture(scope="session")
def ray_head(tmp_path_factory):
    """A real Ray cluster started with `ray start --head --block` (stopped at the end), as a
    colleague's cluster on this machine or a team's head node would be: a custom resource
    `stranger` tells it apart, Ray's discovery file points at it while it runs, its
    environment has no AWS credentials, and its job server answers on `dashboard`."""
    port, dash = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    # As from an activated virtual environment: a Ray job's `python` is this one.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    log = tmp_path_factory.mktemp("head") / "head.log"
    head = subprocess.Popen(
        [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", "--port", str(port), "--num-cpus", "2",
         "--resources", '{"stranger": 1}', "--include-dashboard", "true", "--dashboard-host", "127.0.0.1",
         "--dashboard-port", str(dash), "--disable-usage-stats",
         # Ports of its own: the session's private Ray already holds the agent's default 52365,
         # and a head whose job agent cannot bind answers every submission "No available agent".
         "--dashboard-agent-listen-port", str(free_port()), "--dashboard-agent-grpc-port", str(free_port()),
         "--runtime-env-agent-port", str(free_port()), "--metrics-export-port", str(free_port())],
        stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env, start_new_session=True,
    )
    current = Path("/tmp/ray/ray_current_cluster")
    try:
        deadline = time.time() + 120
        while "This command will now block" not in log.read_text() and time.time() < deadline:
            assert head.poll() is None, log.read_text()[-3000:]
            time.sleep(0.5)
        address = current.read_text().strip()
        assert address.endswith(f":{port}")
        yield {"address": address, "dashboard": f"http://127.0.0.1:{dash}"}
    finally:
        _stop_head(head)
        if current.exists() and current.read_text().strip().endswith(f":{port}"):
            current.unlink()
