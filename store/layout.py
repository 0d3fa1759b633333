"""Where everything lives under a store root, and the names users may give.

    strata.json                                  the store's marker and format version
    datasets/NAME/manifest.json                  identity, unit grid, hooks, provenance (driver)
    datasets/NAME/aux/documents-*.parquet        document index: row span of every document (driver)
    datasets/NAME/aux/tokenizer-*.json           the tokenizer, to decode tokens to text (driver)
    datasets/NAME/acts/HOOK/                     a Zarr v3 array [rows, d]: one shard per unit
    datasets/NAME/tokens/unit-K.ATTEMPT.parquet  the unit's token table (one file per attempt)
    datasets/NAME/commits/{tokens,acts/HOOK}/GGGGGG/K.json   commit records, 1000 units a folder
    datasets/NAME/aux/commit_index-*.parquet     every record, compacted by the driver
    datasets/NAME/lease/GEN.json                 write-lease generations (fencing tokens)
    datasets/NAME/verify.json                    the outcome of the last verify
    catalog/NAME.parquet                         one row per dataset
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from strata.store.errors import InvalidNameError

MARKER = "strata.json"
DATASETS = "datasets"
CATALOG = "catalog"

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@+=-]{0,199}$")
_HOOK = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]{0,199}(:[A-Za-z_][A-Za-z0-9_.]{0,199}(:input)?)?$")  # module:PATH[:input] hooks too


def check_name(name: object, *, what: str = "dataset") -> str:
    """A name is one path component: letters, digits and ``_ . @ + = -``, not starting with a dot."""
    if not isinstance(name, str) or not name:
        raise InvalidNameError(f"{what} name must be a non-empty string, got {name!r}")
    if not _NAME.match(name) or ".." in name:
        raise InvalidNameError(
            f"invalid {what} name {name!r}: use 1-200 letters, digits or '_.@+=-', starting with a letter "
            "or digit, no '..' and no '/' (names never become paths outside the store root)"
        )
    return name


def check_hook(hook: object) -> str:
    if not isinstance(hook, str) or not _HOOK.match(hook) or ".." in hook:
        raise InvalidNameError(
            f"invalid hook name {hook!r}: expected a TransformerLens-style name such as 'blocks.0.hook_resid_post'"
        )
    return hook


_BLOCK_HOOK = re.compile(r"^blocks\.(\d+)\.(.+)$")
# Where each kind of block hook fires within a block (TransformerLens order).
_KIND_ORDER = {"hook_resid_pre": 0, "ln1.hook_normalized": 1, "hook_attn_out": 2, "hook_resid_mid": 3,
               "ln2.hook_normalized": 4, "hook_mlp_out": 5, "hook_resid_post": 6}


def hook_order(hook: str) -> tuple:
    """Sort key putting hooks in model order: ``hook_embed`` (and other pre-block hooks), then
    blocks 0..L-1 (each in firing order: resid_pre, attn_out, mlp_out, resid_post), then
    ``ln_final`` hooks; anything unknown after, by name."""
    m = _BLOCK_HOOK.match(hook)
    if m:
        return (1, int(m.group(1)), _KIND_ORDER.get(m.group(2), 50), m.group(2))
    if hook.startswith("hook_"):
        return (0, 0, 0, hook)
    if hook.startswith("ln_final"):
        return (2, 0, 0, hook)
    return (3, 0, 0, hook)


def dataset_dir(name: str) -> str:
    return f"{DATASETS}/{check_name(name)}"


def manifest_key(name: str) -> str:
    return f"{dataset_dir(name)}/manifest.json"


def lease_dir(prefix: str) -> str:
    return f"{prefix}/lease"


def verify_key(name: str) -> str:
    return f"{dataset_dir(name)}/verify.json"


def aux_dir(name: str) -> str:
    return f"{dataset_dir(name)}/aux"


def aux_key(name: str, kind: str, tag: str, suffix: str) -> str:
    # Named by content: a manifest always points at the very file it was written with.
    return f"{aux_dir(name)}/{kind}-{tag}.{suffix}"


def array_path(name: str, hook: str) -> str:
    return f"{dataset_dir(name)}/acts/{hook}"


def shard_key(name: str, hook: str, unit: int) -> str:
    # Zarr v3 default chunk key encoding: c/<shard row>/<shard col>.
    return f"{array_path(name, hook)}/c/{unit}/0"


def tokens_dir(name: str) -> str:
    return f"{dataset_dir(name)}/tokens"


def attempt_key(folder: str, unit: int, attempt: str) -> str:
    """A unit's Parquet file of one write attempt: racing writers never overwrite each other's
    file; the commit record names the file that won."""
    return f"{folder}/unit-{unit:08d}.{attempt}.parquet"


def attempt_key_pattern(folder: str, unit: int) -> re.Pattern[str]:
    """The keys a commit record of ``unit`` may name in ``folder`` (any attempt)."""
    return re.compile(re.escape(f"{folder}/unit-{unit:08d}.") + r"[0-9a-f]{12}\.parquet")


def tokens_key(name: str, unit: int, attempt: str) -> str:
    return attempt_key(tokens_dir(name), unit, attempt)


def tokens_key_pattern(name: str, unit: int) -> re.Pattern[str]:
    """The keys a token-table commit record of ``unit`` may name."""
    return attempt_key_pattern(tokens_dir(name), unit)


#: Commit records are kept in folders of this many units: a reader lists only the folders the
#: dataset's commit index does not cover whole (a finished dataset: none).
COMMIT_GROUP = 1000


def commits_dir(name: str, hook: str | None) -> str:
    sub = "tokens" if hook is None else f"acts/{hook}"
    return f"{dataset_dir(name)}/commits/{sub}"


def commit_group_dir(name: str, hook: str | None, group: int) -> str:
    return f"{commits_dir(name, hook)}/{group:06d}"


def commit_key(name: str, hook: str | None, unit: int) -> str:
    return f"{commit_group_dir(name, hook, unit // COMMIT_GROUP)}/{unit:08d}.json"


_COMMIT_FILE = re.compile(r"^(\d{8})\.json$")


def unit_of_commit_key(key: str) -> int | None:
    """The unit a commit record key is for, or None for a file that is not a record."""
    m = _COMMIT_FILE.match(key.rsplit("/", 1)[-1])
    return int(m.group(1)) if m else None


def catalog_key(name: str) -> str:
    return f"{CATALOG}/{check_name(name)}.parquet"


def unit_ranges(units: Iterable[int]) -> str:
    """Units as short ranges, for messages: ``[0, 1, 2, 5, 7, 8]`` -> ``"0-2, 5, 7-8"``."""
    out: list[list[int]] = []
    for u in sorted(units):
        if out and out[-1][1] == u - 1:
            out[-1][1] = u
        else:
            out.append([u, u])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in out)
