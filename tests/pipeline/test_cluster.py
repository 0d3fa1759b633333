"""Which cluster a job runs on: a private Ray by default (never a stranger's, never with
credentials for a cluster this job did not start), an explicit address joined after a check,
and the README's `ray job submit` command working as written. The cluster tests start a real
head with `ray start --head --block` (stopped by the test)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from strata import store
from strata.pipeline.cluster import ClusterShape
from strata.pipeline.executor import pool_shape

ROOT = Path(__file__).resolve().parents[2]
SECRET = "strata-test-SECRET-in-the-driver-env"


# -- sizing, without Ray -----------------------------------------------------------------------------


def test_pool_shape_cpu_and_gpu_clusters():
    cpu = ClusterShape(cpus=16, gpus=0, max_node_cpus=8)
    assert pool_shape(cpu) == pool_shape(cpu, num_workers=1)
    one = pool_shape(cpu)
    assert (one.replicas, one.num_cpus, one.num_gpus, one.threads) == (1, 8, 0, 8)  # fits on one node
    assert "num_gpus" not in one.resources  # never a GPU request a CPU cluster cannot meet
    four = pool_shape(cpu, num_workers=4)
    assert (four.replicas, four.num_cpus, four.threads) == (4, 4, 4)
    assert pool_shape(cpu, num_workers=4, cpus_per_worker=1).threads == 1
    gpu = pool_shape(ClusterShape(cpus=64, gpus=8, max_node_cpus=32))
    assert (gpu.replicas, gpu.num_gpus, gpu.num_cpus, gpu.threads) == (8, 1, 1, None)
    assert pool_shape(ClusterShape(cpus=64, gpus=8, max_node_cpus=32), num_workers=20).replicas == 8


def test_an_unreachable_address_fails_at_once():
    """In a fresh process (a Ray already running in this one would simply be used)."""
    port = free_port()  # nothing listens there
    script = textwrap.dedent(f"""
        from strata.pipeline.cluster import connect
        from strata.pipeline.errors import ClusterError
        for address in ("127.0.0.1:{port}", "nonsense"):
            try:
                with connect(address):
                    print("connected?!")
            except ClusterError as e:
                print("ERR", e)
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=ROOT)
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("ERR ")]
    assert len(lines) == 2, (r.stdout, r.stderr[-2000:])
    assert f"cannot reach the Ray cluster at '127.0.0.1:{port}'" in lines[0] and "is not HOST:PORT" in lines[1]


# -- a stranger's cluster on this machine ----------------------------------------------------------


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def stranger(ray_head):
    """Someone else's cluster on this machine (tests/conftest.py)."""
    return ray_head


def _driver(tmp_path: Path, model: Path, corpus: Path, address: str | None) -> dict:
    """Run an extraction in a fresh driver process whose environment holds an AWS secret, with
    workers that report what credentials they got."""
    import json

    spec = {
        "store": str(tmp_path / "acts"), "name": "c", "model": {"id": str(model)}, "corpus": {"path": str(corpus)},
        "tokenize": {"context_size": 16}, "hooks": ["blocks.0.hook_resid_post"], "dtype": "float32",
        "compute": {"address": address, "unit_contexts": 8, "cpus_per_worker": 1},
        "storage_options": {"key": "AKIA-test", "secret": SECRET, "endpoint_url": "http://127.0.0.1:9"},
    }
    script = textwrap.dedent(f"""
        import json, sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        import _faults
        from strata.pipeline.config import ExtractSpec
        from strata.pipeline.extract import run_extract
        seen = []
        r = run_extract(ExtractSpec.model_validate(json.loads({json.dumps(spec)!r})), progress=False,
                        worker_cls=_faults.EnvReporter, on_unit=seen.append)
        print("RESULT " + json.dumps({{"private": r.private_cluster, "address": r.cluster_address, "units": r.units_run,
              "env": sorted({{str(s["env_secret"]) for s in seen}}), "options": [s["storage_options"] for s in seen]}}))
    """)
    env = {**os.environ, "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_ACCESS_KEY_ID": "AKIA-test"}
    if address is not None:
        env["RAY_AUTH_MODE"] = "token"  # the stranger's cluster uses Ray's token authentication
    env.pop("RAY_ADDRESS", None)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    line = next(ln for ln in r.stdout.splitlines() if ln.startswith("RESULT "))
    return json.loads(line.removeprefix("RESULT "))


@pytest.mark.slow
def test_null_address_starts_a_private_ray_even_with_a_stranger_running(stranger, tmp_path, tiny_gpt2, corpus_file):
    got = _driver(tmp_path, tiny_gpt2, corpus_file, None)
    assert got["private"] is True and got["address"] != stranger["address"] and got["units"] > 0
    # Its own workers are its children: they see its environment and get its storage options.
    assert got["env"] == [SECRET] and all(o["secret"] == SECRET for o in got["options"])


@pytest.mark.slow
def test_an_explicit_address_joins_that_cluster_and_forwards_no_credentials(stranger, tmp_path, tiny_gpt2, corpus_file):
    got = _driver(tmp_path, tiny_gpt2, corpus_file, stranger["address"])
    assert got["private"] is False and got["address"] == stranger["address"] and got["units"] > 0
    assert got["env"] == ["None"]  # the stranger's workers never saw the driver's environment
    assert all(o == {"endpoint_url": "http://127.0.0.1:9"} for o in got["options"])  # nor its secret options
    assert store.open(tmp_path / "acts").dataset("c").verify().ok


@pytest.mark.slow
def test_the_readme_ray_job_command_works_as_written(stranger, tmp_path, tiny_gpt2):
    """The README's command, against a real cluster: an absolute store outlives the job; a
    relative one is refused with a clear message instead of vanishing with Ray's temporary
    working directory."""
    readme = (ROOT / "README.md").read_text()
    cmd = ("ray job submit --working-dir . -- python -m strata.jobs.extract examples/quickstart.yaml "
           "--set store=$PWD/acts --set model.id=$PWD/models/tiny-gpt2")
    assert cmd in readme
    ray_bin = str(Path(sys.executable).parent / "ray")
    env = {**os.environ, "RAY_API_SERVER_ADDRESS": stranger["dashboard"], "RAY_AUTH_MODE": "token", "PWD": str(tmp_path)}
    # The repository as the working directory, the model and store under $PWD (here tmp_path).
    (tmp_path / "models").mkdir()
    os.symlink(tiny_gpt2, tmp_path / "models" / "tiny-gpt2")
    argv = [ray_bin, "job", "submit", "--working-dir", str(ROOT), "--", "python", "-m", "strata.jobs.extract", "examples/quickstart.yaml",
            "--set", f"store={tmp_path}/acts", "--set", f"model.id={tmp_path}/models/tiny-gpt2", "--no-progress"]

    def submit() -> subprocess.CompletedProcess:
        for _ in range(30):  # a fresh head's job agent takes a while to come up
            r = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
            if "No available agent to submit job" not in r.stdout + r.stderr:
                return r
            time.sleep(2)
        return r

    r = submit()
    assert r.returncode == 0 and "succeeded" in r.stdout + r.stderr, (r.stdout[-6000:] + r.stderr[-6000:]).split("Tailing logs")[-1]
    ds = store.open(tmp_path / "acts", create=False).dataset("tiny-gpt2-quickstart")
    assert ds.is_complete and ds.verify().ok
    argv[argv.index(f"store={tmp_path}/acts")] = "store=./acts"
    r = submit()
    assert r.returncode != 0
    assert "relative local path, and this is a Ray job" in r.stdout + r.stderr
