"""Which Ray cluster a job runs on, and its shape as a plain value.

* ``address: null`` starts a **private** Ray in this process (``ray.init(address="local")``):
  never a cluster someone else started on this machine, even when Ray's discovery file
  points at one. Its workers are children of this process, so they see its environment,
  and the job may hand them its storage credentials.
* The entrypoint of a Ray job (``ray job submit ... -- python -m jobs.extract SPEC``) joins the
  job's own cluster: that is where Ray runs it.
* An explicit address joins that cluster, after checking it answers. Such a cluster is not
  this job's: it gets no credentials, its workers use their own.

A Ray runtime already started in this process (a notebook, the test session) is used as it
is, and is private when this process started it.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from pipeline.errors import ClusterError

log = logging.getLogger(__name__)

RAY_JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"  # set by Ray for a job's entrypoint process


def in_ray_job() -> bool:
    """Whether this process is the entrypoint of a Ray job (its working directory may be a
    temporary copy that Ray deletes when the job ends)."""
    return RAY_JOB_ENV in os.environ


@dataclass(frozen=True)
class ClusterShape:
    """What the unit pool needs to know of a cluster: CPUs and GPUs in all, and the CPUs of
    its largest node (an actor must fit on one node)."""

    cpus: int
    gpus: int
    max_node_cpus: int

    @classmethod
    def of_ray(cls) -> ClusterShape:
        import ray

        res = ray.cluster_resources()
        nodes = [int(n["Resources"].get("CPU", 0)) for n in ray.nodes() if n.get("Alive")]
        return cls(cpus=max(1, int(res.get("CPU", 1))), gpus=int(res.get("GPU", 0)), max_node_cpus=max(nodes or [1]))


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
    import ray

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


@contextmanager
def connect(address: str | None, *, timeout_s: float = 10.0) -> Iterator[Cluster]:
    """Connect to (or start) the job's Ray cluster; disconnect (or stop it) afterwards when this
    call connected."""
    import ray

    if ray.is_initialized():
        node = ray._private.worker.global_worker.node
        yield Cluster(ClusterShape.of_ray(), private=bool(getattr(node, "head", False)), address=str(getattr(node, "address", "")))
        return
    kw = {"include_dashboard": False, "configure_logging": False, "logging_level": logging.WARNING}
    if address is None and in_ray_job():
        ray.init(address="auto", **kw)
        private = False
    elif address is None:
        # "local": a new private instance, even when Ray's discovery file names a running one.
        ray.init(address="local", runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}}, **kw)
        private = True
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
