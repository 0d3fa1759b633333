"""Where everything lives under a store root, and the names users may give."""

from __future__ import annotations

import re

from store.errors import InvalidNameError

DATASETS = "datasets"
CATALOG = "catalog"

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@+=-]{0,199}$")
_HOOK = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]{0,199}$")


def check_name(name: object) -> str:
    """A dataset name is one path component: letters, digits and ``_ . @ + = -``, not starting with a dot."""
    if not isinstance(name, str) or not name:
        raise InvalidNameError(f"dataset name must be a non-empty string, got {name!r}")
    if not _NAME.match(name) or ".." in name:
        raise InvalidNameError(
            f"invalid dataset name {name!r}: use 1-200 letters, digits or '_.@+=-', starting with a letter "
            "or digit, no '..' and no '/' (names never become paths outside the store root)"
        )
    return name


def check_hook(hook: object) -> str:
    if not isinstance(hook, str) or not _HOOK.match(hook) or ".." in hook:
        raise InvalidNameError(
            f"invalid hook name {hook!r}: expected a TransformerLens-style name such as 'blocks.0.hook_resid_post'"
        )
    return hook


def dataset_dir(name: str) -> str:
    return f"{DATASETS}/{check_name(name)}"


def manifest_key(name: str) -> str:
    return f"{dataset_dir(name)}/manifest.json"


def lease_key(name: str) -> str:
    return f"{dataset_dir(name)}/lease.json"


def array_path(name: str, hook: str) -> str:
    return f"{dataset_dir(name)}/acts/{hook}"


def shard_key(name: str, hook: str, unit: int) -> str:
    # Zarr v3 default chunk key encoding: c/<shard row>/<shard col>.
    return f"{array_path(name, hook)}/c/{unit}/0"


def tokens_key(name: str, unit: int, attempt: str) -> str:
    # One file per write attempt: racing writers never overwrite each other's table; the
    # commit record names the file that won.
    return f"{dataset_dir(name)}/tokens/unit-{unit:08d}.{attempt}.parquet"


def commits_dir(name: str, hook: str | None) -> str:
    sub = "tokens" if hook is None else f"acts/{hook}"
    return f"{dataset_dir(name)}/commits/{sub}"


def commit_key(name: str, hook: str | None, unit: int) -> str:
    return f"{commits_dir(name, hook)}/{unit:08d}.json"


def unit_of_commit_key(key: str) -> int:
    return int(key.rsplit("/", 1)[-1].split(".", 1)[0])


def catalog_key(name: str) -> str:
    return f"{CATALOG}/{check_name(name)}.parquet"
