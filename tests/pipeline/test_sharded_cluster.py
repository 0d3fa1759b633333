"""Sharded corpora on a real multi-node Ray cluster: a 3-node `ray.cluster_utils.Cluster` (one CPU
a node) tokenizes the shards on every node, and the dataset it extracts equals the same corpus
extracted in this process (`compute.executor: local`): token tables, activations, document index.

The cluster lives in a fresh driver process: the test session may already be connected to its
own Ray (the `ray_session` fixture), and one process joins one cluster."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from strata import store
from strata.pipeline.config import ExtractSpec
from strata.pipeline.extract import run_extract
from strata.pipeline.tiny import synthetic_docs, write_jsonl

ROOT = Path(__file__).resolve().parents[2]
CTX, UC = 32, 32
HOOK = "blocks.1.hook_resid_post"
# Documents of 24 short ones: each shard's task tokenizes ~200k tokens, a moment on one CPU. Nine
# shards: a node's first task waits for its worker to start, so the head's ready worker must not
# finish them all alone meanwhile.
SHARDS, DOCS, PARTS = 9, 96, 24

# The driver: builds the cluster, joins it, extracts, and prints which node tokenized which shard.
# Ray writes a head's address into /tmp/ray/ray_current_cluster, where any `ray.init()` on this
# machine would then find it; a throwaway cluster must not redirect other sessions' drivers there.
DRIVER = textwrap.dedent("""
    import json, sys
    import ray
    import ray._private.utils
    from ray.cluster_utils import Cluster
    from strata.pipeline.config import ExtractSpec
    from strata.pipeline.extract import run_extract

    spec = ExtractSpec.model_validate(json.loads(sys.argv[1]))
    ports = json.loads(sys.argv[2])
    ray._private.utils.write_ray_address = lambda *a, **k: None
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False, **ports})
    try:
        for _ in range(2):
            cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, configure_logging=False)
        nodes = sorted(n["NodeID"] for n in ray.nodes() if n["Alive"])
        res = run_extract(spec, progress=False)
        print("RESULT " + json.dumps({"nodes": nodes, "shard_nodes": res.shard_nodes, "units": res.num_units,
                                      "shards_tokenized": res.shards_tokenized, "address": res.cluster_address}))
    finally:
        ray.shutdown()
        cluster.shutdown()
""")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _spec(root: Path, model: Path, corpus: Path, executor: str) -> ExtractSpec:
    return ExtractSpec(store=str(root), name="cl", model={"id": str(model)}, corpus={"path": str(corpus)},
                       tokenize={"context_size": CTX, "packing": "truncate", "split_long": False}, hooks=[HOOK], dtype="float32",
                       compute={"executor": executor, "unit_contexts": UC, "batch_tokens": UC * CTX})


def _corpus(folder: Path) -> list[list[str]]:
    """Long documents cut to one context each (`packing: truncate`): much text to tokenize per
    shard, few activations to compute."""
    folder.mkdir(parents=True)
    shards = []
    for i in range(SHARDS):
        docs = [" ".join(synthetic_docs(PARTS, seed=1000 * i + j)) for j in range(DOCS)]
        write_jsonl(folder / f"part-{i:03d}.jsonl", docs)
        shards.append(docs)
    return shards


def _on_cluster(spec: ExtractSpec) -> dict:
    # Ports of its own for the head's agents: the session's Ray (or a colleague's) may hold the defaults.
    ports = {"dashboard_agent_listen_port": free_port(), "metrics_export_port": free_port(), "runtime_env_agent_port": free_port()}
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    r = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(spec.model_dump(mode="json")), json.dumps(ports)],
                       capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-6000:])
    line = next(ln for ln in r.stdout.splitlines() if ln.startswith("RESULT "))
    return json.loads(line.removeprefix("RESULT "))


@pytest.mark.slow
def test_shards_tokenize_on_every_node_and_the_dataset_equals_a_local_run(tmp_path, tiny_gpt2):
    shards = _corpus(tmp_path / "corpus")
    got = _on_cluster(_spec(tmp_path / "cluster", tiny_gpt2, tmp_path / "corpus", "ray"))
    names = [str(tmp_path / "corpus" / f"part-{i:03d}.jsonl") for i in range(SHARDS)]
    assert len(got["nodes"]) == 3 and got["shards_tokenized"] == SHARDS
    assert sorted(got["shard_nodes"]) == names
    # Which node tokenized which shard (printed; `pytest -rP` shows it): every node took at least one.
    print("\n".join(f"{Path(name).name} on node {node[:12]}" for name, node in sorted(got["shard_nodes"].items())))
    assert set(got["shard_nodes"].values()) == set(got["nodes"]), got["shard_nodes"]

    run_extract(_spec(tmp_path / "local", tiny_gpt2, tmp_path / "corpus", "local"), progress=False)
    a = store.open(str(tmp_path / "cluster")).dataset("cl")
    b = store.open(str(tmp_path / "local")).dataset("cl")
    assert a.info.meta["plan_kind"] == b.info.meta["plan_kind"] == "sharded"
    assert a.info.num_units == b.info.num_units == got["units"] == SHARDS * -(-DOCS // UC)
    assert a.shards().equals(b.shards())
    assert a.shards().column("name").to_pylist() == names
    assert a.shards().column("docs").to_pylist() == [len(s) for s in shards]
    assert a.tokens(HOOK).equals(b.tokens(HOOK))
    for u in range(a.info.num_units):
        t = a.unit_tokens(u)
        assert t.equals(b.unit_tokens(u)), u
        rows = t.column("row").to_numpy()
        np.testing.assert_array_equal(a.read(HOOK, rows=slice(int(rows[0]), int(rows[-1]) + 1)),
                                      b.read(HOOK, rows=slice(int(rows[0]), int(rows[-1]) + 1)))
    assert a.docs().equals(b.docs()) and a.docs().num_rows == SHARDS * DOCS
    assert a.verify().ok
