"""Which Ray cluster a job runs on, and its shape as a plain value.

* ``address: null`` starts a **private** Ray: a head of its own (``ray start --head --block``,
  a child of this process) that this process joins and stops at the end, never a cluster
  someone else started on this machine. Every port it listens on is free when it starts,
  none is Ray's fixed default (``ray.init`` would take the dashboard agent's 52365, and a
  second Ray on the machine could not start its agent), and its discovery file and logs go
  to a temporary folder of its own, so ``address: auto`` elsewhere never finds it. It is
  started with this process's environment, so its workers see it, and the job may hand them
  its storage credentials.
* The entrypoint of a Ray job (``ray job submit ... -- python -m jobs.extract SPEC``) joins the
  job's own cluster: that is where Ray runs it.
* An explicit address joins that cluster, after checking it answers. Such a cluster is not
  this job's: it gets no credentials, its workers use their own.

A Ray runtime already started in this process (a notebook, the test session) is used as it
is, and is private when this process started it (or the private head it joined).
"""

from __future__ import annotations

import ctypes
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from strata.pipeline.errors import ClusterError

log = logging.getLogger(__name__)

RAY_JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"  # set by Ray for a job's entrypoint process
PRIVATE_START_TIMEOUT_S = 180.0  # a cold head on a busy machine takes 5-20 s
# The bootstrap address of the private head this process started and joined, while it runs:
# a nested connect() (reprocess shares one Ray among its jobs) then knows the cluster is private.
_private_address: str | None = None


def in_ray_job() -> bool:
    """Whether this process is the entrypoint of a Ray job (its working directory may be a
    temporary copy that Ray deletes when the job ends)."""
    return RAY_JOB_ENV in os.environ


@dataclass(frozen=True)
class ClusterShape:
    """What an actor pool needs to know of a cluster: CPUs and GPUs in all, and the CPUs of
    its largest node (an actor must fit on one node)."""

    cpus: int
    gpus: int
    max_node_cpus: int

    @classmethod
    def of_ray(cls) -> ClusterShape:
        import ray  # lazy: ray starts slowly and drags in its own dependencies; in-process runs never import it

        res = ray.cluster_resources()
        nodes = [int(n["Resources"].get("CPU", 0)) for n in ray.nodes() if n.get("Alive")]
        return cls(cpus=max(1, int(res.get("CPU", 1))), gpus=int(res.get("GPU", 0)), max_node_cpus=max(nodes or [1]))

    @classmethod
    def of_machine(cls) -> ClusterShape:
        """This machine, for work run in this process: the CPUs it may use, and its GPUs."""
        import torch  # lazy: only an in-process run sized from this machine needs it

        try:
            cpus = len(os.sched_getaffinity(0))
        except AttributeError:  # pragma: no cover - not Linux
            cpus = os.cpu_count() or 1
        return cls(cpus=cpus, gpus=torch.cuda.device_count(), max_node_cpus=cpus)


def ray_is_private() -> bool:
    """Whether the Ray runtime this process is connected to is its own: it started it in this
    process (a notebook's ``ray.init()``, the test session), or it is the private head
    :func:`connect` started. Only then may its workers be handed this job's credentials."""
    import ray  # lazy: ray starts slowly; only a process already on Ray asks

    if not ray.is_initialized():
        return False
    node = ray._private.worker.global_worker.node
    return bool(getattr(node, "head", False)) or (_private_address is not None and node.gcs_address == _private_address)


@dataclass(frozen=True)
class Cluster:
    shape: ClusterShape
    private: bool  # started by this process: its workers may receive this job's credentials
    address: str


def check_reachable(url: str, *, timeout_s: float = 10.0, what: str = "the Ray cluster") -> None:
    """Fail fast (one line) when nothing answers at ``url`` (``HOST:PORT`` or ``SCHEME://HOST:PORT``)."""
    hostport = url.split("://", 1)[-1].split("/", 1)[0]
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise ClusterError(f"{what} address {url!r} is not HOST:PORT or SCHEME://HOST:PORT")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            pass
    except OSError as e:
        raise ClusterError(f"cannot reach {what} at {url!r} ({e.strerror or type(e).__name__}); is it running?") from None


def _probe(address: str, timeout_s: float) -> None:
    """Fail fast (one line) when nothing answers at ``address``, instead of hanging in Ray."""
    import ray  # lazy: ray starts slowly and drags in its own dependencies; in-process runs never import it

    target = address
    if address == "auto":
        try:
            target = ray._private.services.canonicalize_bootstrap_address_or_die("auto")
        except Exception as e:  # ConnectionError, RuntimeError, ValueError: Ray raises several here
            raise ClusterError(f"`compute.address: auto` found no running Ray cluster on this machine ({str(e).splitlines()[0]})") from None
    hostport = target.split("://", 1)[-1].rstrip("/")
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise ClusterError(f"`compute.address` {address!r} is not HOST:PORT, ray://HOST:PORT or auto")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            pass
    except OSError as e:
        raise ClusterError(
            f"cannot reach the Ray cluster at {address!r} ({e.strerror or type(e).__name__}); is it running? "
            "`compute.address: null` starts a private Ray in this process"
        ) from None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _die_with_parent() -> None:
    """In the ``ray start`` child, before exec: SIGTERM when this process dies, even killed
    with SIGKILL, which makes ``ray start --block`` stop its head (no Ray left behind)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM))  # 1: PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _stop_head(proc: subprocess.Popen) -> None:
    """Stop a head started by :func:`_private_head`, and only it: SIGTERM to its
    ``ray start --block`` stops all of its processes; anything of its tree still running after
    that (a worker stuck in native code) is killed."""
    try:
        import psutil  # lazy: optional (ray[default] brings it); stopping a head works without it

        tree = psutil.Process(proc.pid).children(recursive=True)
    except Exception:  # ImportError, or the head already gone: nothing more to find
        tree = []
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # its own session (start_new_session): nobody else's
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()
    if tree:
        import psutil  # lazy: as above

        _, alive = psutil.wait_procs(tree, timeout=15)
        for q in alive:  # Ray's workers run in process groups of their own
            try:
                q.kill()
            except psutil.Error:
                pass


def _start_failure(log_path: Path, why: str) -> ClusterError:
    tail = [ln.strip() for ln in log_path.read_text(errors="replace").splitlines() if ln.strip()] if log_path.exists() else []
    # The exception `ray start` died of, else its last error line, else its last line.
    exc = re.compile(r"^[\w.]*(Error|Exception|Interrupt)\b")
    last = next((ln for ln in reversed(tail) if exc.match(ln)), None) or next(
        (ln for ln in reversed(tail) if "error" in ln.lower()), tail[-1] if tail else "no output")
    return ClusterError(f"could not start a private Ray (`ray start --head` {why}: {last}); its log: {log_path}")


_AUTH_ENV = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")


@contextmanager
def _private_auth() -> Iterator[dict[str, str]]:
    """Token authentication with a fresh token of the private head's own, in this process (to
    join it) and in the head's environment, restored afterwards. Ray's default token file
    (~/.ray/auth_token) is a user's clusters' token: a private head neither reads nor writes it,
    and two private heads never race for it. ``RAY_AUTH_MODE=disabled`` is respected."""
    from ray._raylet import AuthenticationTokenLoader, Config  # lazy: ray, only for a private head

    if os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled":
        yield {}
        return
    saved = {k: os.environ.get(k) for k in _AUTH_ENV}
    env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    os.environ.pop("RAY_AUTH_TOKEN_PATH", None)
    os.environ.update(env)
    # Ray caches the mode (RayConfig) and the token; refresh both, the config first.
    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()
    try:
        yield env
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        Config.initialize("")
        AuthenticationTokenLoader.instance().reset_cache()


# A port picked free can be taken by another process before the head binds it (two jobs
# starting at once): such a start is tried again on other free ports, this many times in all.
PRIVATE_START_ATTEMPTS = 3


def _port_taken(log_path: Path) -> bool:
    try:
        text = log_path.read_text(errors="replace")
    except OSError:
        return False
    return "used by other components" in text or "Address already in use" in text


def _start_head(tmp: Path, log_path: Path, num_cpus: int | None) -> subprocess.Popen:
    ports = {flag: _free_port() for flag in ("--dashboard-port", "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port",
                                             "--runtime-env-agent-port", "--metrics-export-port", "--ray-client-server-port")}
    argv = [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block", "--port", "0",  # 0: Ray picks a free one
            "--include-dashboard", "false", "--disable-usage-stats", "--temp-dir", str(tmp),
            *(str(a) for kv in ports.items() for a in kv), *(["--num-cpus", str(num_cpus)] if num_cpus else [])]
    # Node-manager, object-manager and worker ports are Ray's free picks already when not set.
    # PR_SET_PDEATHSIG fires when the forking *thread* ends, so only from the main thread.
    die_with_parent = sys.platform == "linux" and threading.current_thread() is threading.main_thread()
    with open(log_path, "w") as out:
        return subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, preexec_fn=_die_with_parent if die_with_parent else None)


@contextmanager
def _private_head(*, num_cpus: int | None = None, timeout_s: float | None = None) -> Iterator[str]:
    """Start a private Ray head with no fixed port; yield its bootstrap address; stop it, on
    errors and Ctrl-C too. It inherits this process's environment (the job's credentials)."""
    timeout_s = PRIVATE_START_TIMEOUT_S if timeout_s is None else timeout_s
    root = os.environ.get("RAY_TMPDIR") or ("/tmp" if os.path.isdir("/tmp") else None)  # short: Ray's socket paths
    tmp = Path(tempfile.mkdtemp(prefix="strata-ray-", dir=root))
    log_path = tmp / "ray-start.log"
    t0 = time.monotonic()
    with _private_auth():  # in os.environ, so the head gets it with the rest of this process's environment
        ok = False
        proc = None
        try:
            for attempt in range(1, PRIVATE_START_ATTEMPTS + 1):
                proc = _start_head(tmp, log_path, num_cpus)
                try:
                    address = _await_head(proc, tmp, log_path, t0=t0, timeout_s=timeout_s)
                    break
                except ClusterError:
                    if attempt == PRIVATE_START_ATTEMPTS or proc.poll() is None or not _port_taken(log_path):
                        raise
                    _stop_head(proc)
                    log.info("a port picked for the private Ray was taken before it bound it; starting it on other free ports")
            yield address
            ok = True
        finally:
            if proc is not None:
                _stop_head(proc)  # before the token goes from this process's environment
            if ok:
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                log.warning("the private Ray's logs are kept in %s", tmp)


def _await_head(proc: subprocess.Popen, tmp: Path, log_path: Path, *, t0: float, timeout_s: float) -> str:
    """The head's bootstrap address once it is up: ``ray start`` writes it into the discovery
    file of its --temp-dir when the head's processes are running."""
    current = tmp / "ray_current_cluster"
    while not (current.exists() and current.read_text().strip()):
        if proc.poll() is not None:
            raise _start_failure(log_path, f"exited with {proc.returncode}")
        if time.monotonic() - t0 > timeout_s:
            raise _start_failure(log_path, f"not up after {timeout_s:g} s")
        time.sleep(0.1)
    address = current.read_text().strip()
    log.info("private Ray head at %s up in %.1f s (logs: %s)", address, time.monotonic() - t0, tmp)
    return address


@contextmanager
def connect(address: str | None, *, timeout_s: float = 10.0, num_cpus: int | None = None,
            log_to_driver: bool = True) -> Iterator[Cluster]:
    """Connect to (or start) the job's Ray cluster; disconnect (or stop it) afterwards when this
    call connected. ``num_cpus`` sizes a private Ray (default: this machine's CPUs)."""
    import ray  # lazy: ray starts slowly and drags in its own dependencies; in-process runs never import it

    global _private_address
    if ray.is_initialized():
        node = ray._private.worker.global_worker.node
        yield Cluster(ClusterShape.of_ray(), private=ray_is_private(), address=str(getattr(node, "address", "")))
        return
    kw = {"include_dashboard": False, "configure_logging": False, "logging_level": logging.WARNING, "log_to_driver": log_to_driver}
    if address is None and in_ray_job():
        ray.init(address="auto", **kw)
        private = False
    elif address is None:
        with _private_head(num_cpus=num_cpus) as head:
            try:
                ray.init(address=head, runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}}, **kw)
            except (ConnectionError, RuntimeError) as e:
                ray.shutdown()
                raise ClusterError(f"cannot join the private Ray just started at {head!r}: {str(e).splitlines()[0]}") from None
            _private_address = head
            try:
                node = ray._private.worker.global_worker.node
                yield Cluster(ClusterShape.of_ray(), private=True, address=str(getattr(node, "address", head)))
            finally:
                _private_address = None
                ray.shutdown()
        return
    else:
        _probe(address, timeout_s)
        try:
            ray.init(address=address, **kw)
        except (ConnectionError, RuntimeError) as e:
            hint = ""
            if os.environ.get("RAY_AUTH_MODE") != "token":
                hint = ("; if the cluster uses token authentication (Ray's default since 2.60), set RAY_AUTH_MODE=token "
                        "(the token comes from RAY_AUTH_TOKEN or ~/.ray/auth_token)")
            raise ClusterError(f"cannot join the Ray cluster at {address!r}: {str(e).splitlines()[0]}{hint}") from None
        private = False
    try:
        node = ray._private.worker.global_worker.node
        yield Cluster(ClusterShape.of_ray(), private=private, address=str(getattr(node, "address", address or "local")))
    finally:
        ray.shutdown()
