"""Operational faults for tests/pipeline/test_faults_ops.py: a flaky HTTP proxy in front of the
S3 server, a worker whose disk fills up, and the driver of a multi-node cluster that loses a
node (run in a subprocess: a second Ray cannot start in the test session's process).

Pickled by value like ``_faults``: Ray's workers need not import the test folder."""

from __future__ import annotations

import json
import os
import resource
import socket
import sys
import threading
import time
from typing import Any

import ray.cloudpickle

from strata.pipeline.worker import UnitWorker

# -- a flaky HTTP proxy ---------------------------------------------------------------------------

_ERROR_BODY = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>InternalError</Code>'
               b"<Message>We encountered an internal error. Please try again.</Message></Error>")


def _read_head(sock: socket.socket, buf: bytes = b"") -> tuple[bytes, bytes]:
    """Bytes up to and including the blank line ending an HTTP head (``buf``: bytes already
    read), and what came after."""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            return buf, b""
        buf += chunk
    head, _, rest = buf.partition(b"\r\n\r\n")
    return head + b"\r\n\r\n", rest


def _with_close(head: bytes) -> bytes:
    """The head with ``Connection: close`` (one request per connection: the proxy counts requests)."""
    lines = [ln for ln in head.split(b"\r\n")[:-2] if not ln.lower().startswith(b"connection:")]
    return b"\r\n".join([*lines, b"Connection: close", b"", b""])


def _header(head: bytes, name: bytes) -> bytes | None:
    for ln in head.split(b"\r\n")[1:]:
        k, _, v = ln.partition(b":")
        if k.strip().lower() == name:
            return v.strip()
    return None


class FlakyProxy:
    """A TCP proxy for HTTP/1.1 that answers every ``every``-th request itself with a 500
    ``InternalError`` (never forwarding it: the server does not see a failed request) and
    forwards the rest, one request per connection. ``with FlakyProxy(upstream, every=7) as p:``;
    ``p.url`` is its address, ``p.requests`` and ``p.failed`` count what it saw."""

    def __init__(self, upstream: str, *, every: int) -> None:
        host, _, port = upstream.split("://", 1)[-1].rstrip("/").rpartition(":")
        self.upstream = (host, int(port))
        self.every = every
        self.requests = 0
        self.failed = 0
        self.failed_methods: dict[str, int] = {}
        self._lock = threading.Lock()
        self._server = socket.create_server(("127.0.0.1", 0))
        self._server.settimeout(0.2)
        self.url = f"http://127.0.0.1:{self._server.getsockname()[1]}"
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def __enter__(self) -> FlakyProxy:
        t = threading.Thread(target=self._accept, name="flaky-proxy", daemon=True)
        t.start()
        self._threads.append(t)
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        for t in list(self._threads):
            t.join(10)
        self._server.close()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._server.accept()
            except (TimeoutError, OSError):
                continue
            t = threading.Thread(target=self._serve, args=(client,), name="flaky-proxy-conn", daemon=True)
            t.start()

    def _serve(self, client: socket.socket) -> None:
        client.settimeout(60)
        try:
            head, rest = _read_head(client)
            if not head.endswith(b"\r\n\r\n"):
                return
            with self._lock:
                self.requests += 1
                fail = self.requests % self.every == 0
                if fail:
                    self.failed += 1
                    method = head.split(b" ", 1)[0].decode()
                    self.failed_methods[method] = self.failed_methods.get(method, 0) + 1
            if fail:
                self._fail(client, head, rest)
            else:
                self._forward(client, head, rest)
        except OSError:
            pass
        finally:
            client.close()

    def _fail(self, client: socket.socket, head: bytes, rest: bytes) -> None:
        # Read the body first (unless the client waits for `100 Continue`), so the client
        # reads our answer rather than a reset.
        if (_header(head, b"expect") or b"").lower() != b"100-continue":
            left = int(_header(head, b"content-length") or 0) - len(rest)
            while left > 0:
                chunk = client.recv(min(left, 65536))
                if not chunk:
                    break
                left -= len(chunk)
        client.sendall(b"HTTP/1.1 500 Internal Server Error\r\nContent-Type: application/xml\r\n"
                       + f"Content-Length: {len(_ERROR_BODY)}\r\n".encode() + b"Connection: close\r\n\r\n" + _ERROR_BODY)

    def _forward(self, client: socket.socket, head: bytes, rest: bytes) -> None:
        up = socket.create_connection(self.upstream, timeout=60)
        try:
            up.sendall(_with_close(head) + rest)

            def pump() -> None:  # the request body (after a `100 Continue`, too)
                try:
                    while chunk := client.recv(65536):
                        up.sendall(chunk)
                except OSError:
                    pass

            t = threading.Thread(target=pump, daemon=True)
            t.start()
            pending = b""
            while True:  # interim 1xx answers as they are, then the final one with `Connection: close`
                rhead, pending = _read_head(up, pending)
                if not rhead.endswith(b"\r\n\r\n"):
                    client.sendall(rhead)
                    return
                if rhead.split(b" ", 2)[1].startswith(b"1"):
                    client.sendall(rhead)
                    continue
                client.sendall(_with_close(rhead) + pending)
                break
            while chunk := up.recv(65536):  # the server closes after its answer
                client.sendall(chunk)
        finally:
            up.close()


# -- a worker whose disk fills up ----------------------------------------------------------------


def disk_full_after(units: int, limit_bytes: int) -> type[UnitWorker]:
    """A worker whose process may write no file past ``limit_bytes`` once it finished
    ``units`` units (RLIMIT_FSIZE: the kernel refuses the write, EFBIG, as a full disk
    refuses it with ENOSPC; Python ignores the SIGXFSZ that comes with it)."""

    class DiskFullWorker(UnitWorker):
        def process(self, unit: int, contexts: Any, hooks: list[str]) -> dict[str, Any]:
            if self.units_done >= units:
                _, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
                resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, hard))
            return super().process(unit, contexts, hooks)

    return DiskFullWorker


# -- a multi-node cluster that loses a node (run as a script) ------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _raylet_pid(node: Any) -> int:
    from ray._private import ray_constants

    return node.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid


def _node_of(pid: int, nodes: list[Any]) -> Any:
    """The cluster node whose raylet started process ``pid`` (a worker's parent is its raylet)."""
    import psutil

    ancestors = {p.pid for p in psutil.Process(pid).parents()}
    found = [n for n in nodes if _raylet_pid(n) in ancestors]
    assert len(found) == 1, (pid, ancestors)
    return found[0]


def multinode_main(spec_json: str, report: str, seconds_per_unit: float) -> None:
    """Head (no CPUs: it runs no work) and two worker nodes of 2 CPUs; an extraction with two
    workers of one CPU joins it by address; once a unit is committed, the node that ran the
    worker which committed it is removed (its processes killed). Writes a JSON report."""
    import _faults
    import psutil  # noqa: F401 - fail early when missing
    from ray.cluster_utils import Cluster

    from strata import store
    from strata.pipeline.config import ExtractSpec
    from strata.pipeline.extract import run_extract

    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "include_dashboard": False, "dashboard_agent_listen_port": _free_port(),
        "metrics_agent_port": _free_port(), "runtime_env_agent_port": _free_port(), "metrics_export_port": _free_port(),
    })
    out: dict[str, Any] = {}
    try:
        workers = [cluster.add_node(num_cpus=2, dashboard_agent_listen_port=_free_port(), runtime_env_agent_port=_free_port(),
                                    metrics_agent_port=_free_port(), metrics_export_port=_free_port()) for _ in range(2)]
        spec = ExtractSpec.model_validate(json.loads(spec_json))
        spec = spec.updated(compute=spec.compute.updated(address=cluster.address))

        def killer() -> None:
            try:
                deadline = time.time() + 240
                while time.time() < deadline:
                    if spec.name in store.open(spec.store).datasets():
                        recs = store.open(spec.store).dataset(spec.name).committed_units(None)
                        if recs:
                            break
                    time.sleep(0.1)
                else:
                    out["killer"] = "no unit was committed in time"
                    return
                from strata.store import layout
                from strata.store.commit import protocol

                pid = protocol.read_record(store.open(spec.store).storage, layout.commit_key(spec.name, None, recs[0])).writer["pid"]
                node = _node_of(pid, workers)
                out["killed_node_of_pid"] = pid
                out["committed_before_kill"] = len(store.open(spec.store).dataset(spec.name).committed_units(None))
                cluster.remove_node(node, allow_graceful=False)
                out["committed_at_kill"] = len(store.open(spec.store).dataset(spec.name).committed_units(None))
                out["killed"] = True
            except BaseException as e:  # reported, not raised: the main thread writes the report
                out["killer"] = f"{type(e).__name__}: {e}"

        t = threading.Thread(target=killer, name="node-killer", daemon=True)
        t.start()
        try:
            r = run_extract(spec, progress=False, worker_cls=_faults.slow(seconds_per_unit))
            out.update(ok=True, units_run=r.units_run, num_units=r.num_units, private=r.private_cluster)
        except BaseException as e:
            out.update(ok=False, error=f"{type(e).__name__}: {e}")
        t.join(60)
    finally:
        with open(report, "w") as f:
            json.dump(out, f)
        cluster.shutdown()


ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

if __name__ == "__main__":  # pragma: no cover - the test runs it as a script
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    multinode_main(sys.argv[1], sys.argv[2], float(sys.argv[3]))
