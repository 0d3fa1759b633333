"""Session fixtures shared by the whole suite: one Ray instance, one S3 server on loopback."""

from __future__ import annotations

import os
import threading
import uuid

import pytest

# Tests never reach a hub: everything they load is built locally.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
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
            ray.init(num_cpus=2, include_dashboard=False, log_to_driver=True, configure_logging=False)
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


@pytest.fixture(autouse=True)
def _no_leaked_threads():
    """Fail a test that leaves non-daemon threads behind."""
    before = {t.ident for t in threading.enumerate()}
    yield
    leaked = [t for t in threading.enumerate() if t.ident not in before and t.is_alive() and not t.daemon]
    assert not leaked, f"test leaked threads: {[t.name for t in leaked]}"
