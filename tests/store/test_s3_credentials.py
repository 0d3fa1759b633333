"""A notebook opening an S3 store without valid credentials gets one line naming the store
(a ``CredentialsError``), not botocore's traceback, and no part of a credential."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from strata import store

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = """
import sys, store
try:
    store.open(sys.argv[1], create=False)
except store.CredentialsError as e:
    print("CredentialsError", str(e), sep="\\t")
except BaseException as e:
    print(type(e).__name__, str(e).splitlines()[0] if str(e) else "", sep="\\t")
else:
    print("opened")
"""


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(AWS_ENDPOINT_URL=os.environ["AWS_ENDPOINT_URL"], AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"),
               AWS_CONFIG_FILE=str(tmp_path / "none"), AWS_EC2_METADATA_DISABLED="true", AWS_DEFAULT_REGION="us-east-1", **extra)
    return env


@pytest.mark.s3
def test_opening_an_s3_store_without_credentials_is_one_line_naming_it(s3_bucket, tmp_path):
    uri = f"{s3_bucket}/acts"
    store.open(uri)  # a store, made with the fixture's credentials
    # A fresh process: no client or credential cache of this one can answer for it.
    p = subprocess.run([sys.executable, "-c", SCRIPT, uri], capture_output=True, text=True, cwd=ROOT, env=_env(tmp_path), timeout=300)
    kind, _, msg = p.stdout.strip().partition("\t")
    assert kind == "CredentialsError", p.stdout + p.stderr
    assert msg == (f"cannot open store {uri}: no credentials were found "
                   "(set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or the spec's storage_options)")


def test_other_failures_are_not_taken_for_credentials(tmp_path):
    with pytest.raises(store.StoreNotFoundError):
        store.open(tmp_path / "nothing-here", create=False)
    from strata.store.storage import auth_failure

    assert auth_failure(PermissionError("local file"), remote=False) is None
    assert auth_failure(ValueError("bad"), remote=True) is None
    err = RuntimeError("wrapped")
    err.__cause__ = PermissionError("403")
    assert auth_failure(err, remote=True) == "access refused: check the credentials and their permissions"
