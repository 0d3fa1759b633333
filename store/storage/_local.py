"""A store on a local (or network-mounted POSIX) file system."""

from __future__ import annotations

import mmap
import os
import threading
import uuid
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from zarr.storage import LocalStore

from strata.store.errors import StorageError, StoreNotFoundError
from strata.store.storage._base import Buffers, Storage, as_parts, resolved


class LocalStorage(Storage):
    def __init__(self, root: str | os.PathLike[str], *, durable: bool = False, create: bool = True) -> None:
        # durable=True fsyncs every file before it becomes visible, so a commit survives a
        # power loss. Off by default: a process crash (the common case: a killed worker) loses
        # nothing either way, the page cache outlives the process, and on ext4 each fsync also
        # flushes the shard written just before, which halves write throughput.
        self.durable = durable
        self.root = Path(root).expanduser().absolute()
        if not create:
            if not self.root.is_dir():
                raise StoreNotFoundError(f"no store at {str(self.root)!r}: the folder does not exist")
            self.uri = str(self.root)
            return
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StorageError(f"cannot create store root {str(self.root)!r}: {e.strerror}") from e
        if not os.access(self.root, os.W_OK):
            raise StorageError(f"store root {str(self.root)!r} is not writable")
        self.uri = str(self.root)

    def _path(self, key: str) -> Path:
        return self.root / key

    def _os_path(self, key: str) -> str:
        return os.path.join(self.uri, key)  # a plain string: no pathlib parsing on hot paths

    def read(self, key: str) -> bytes:
        return self._path(key).read_bytes()

    _MAPS_MAX = 64
    _MAPS_BYTES = 256 << 20

    def map(self, key: str) -> np.ndarray:
        """The file memory-mapped (read-only). Recent maps are kept and reused while the file
        is the same one (inode, size, change time): reads of many rows of one shard then cost
        one map, and a file replaced since (a repair) is mapped afresh.

        At most ``_MAPS_MAX`` maps and ``_MAPS_BYTES`` (256 MiB) of mapped files are kept, the
        least recently used dropped first (the newest is always kept). The pages of a map that
        this process has touched count in its RSS for as long as the map is open, so with a
        bound on the count alone a long read of many shards (a similarity pass over 1M rows)
        grows RSS with the rows read. A dropped map closes, and its pages leave RSS (they stay
        in the OS cache), once no array views it: at once for :meth:`read_range`'s views, which
        callers copy and drop; arrays a caller keeps (a dataset's mapped units) keep theirs."""
        path = self._os_path(key)
        st = os.stat(path)
        ident = (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        maps = self.__dict__.setdefault("_maps", OrderedDict())
        lock = self.__dict__.setdefault("_maps_lock", threading.Lock())
        with lock:
            hit = maps.get(key)
            if hit is not None and hit[0] == ident:
                maps.move_to_end(key)
                return hit[1]
        with open(path, "rb") as f:
            if os.fstat(f.fileno()).st_size == 0:
                return np.empty(0, dtype=np.uint8)
            arr = np.frombuffer(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ), dtype=np.uint8)
        with lock:
            maps.pop(key, None)
            maps[key] = (ident, arr)
            total = sum(m[1].size for m in maps.values())
            while len(maps) > 1 and (len(maps) > self._MAPS_MAX or total > self._MAPS_BYTES):
                total -= maps.popitem(last=False)[1][1].size
        return arr

    def __getstate__(self) -> dict:
        # Maps and their lock belong to this process: a copy (pickled for another one) starts empty.
        return {k: v for k, v in self.__dict__.items() if k not in ("_maps", "_maps_lock")}

    def read_into(self, key: str, out: memoryview) -> int:
        with open(self._path(key), "rb", buffering=0) as f:
            got = 0
            while got < len(out):
                n = f.readinto(out[got:])
                if not n:
                    break
                got += n
            return got

    def read_range(self, key: str, start: int, end: int) -> np.ndarray:
        """A read-only view of bytes ``[start, end)`` of the mapped file (shorter when the
        file is): the pages come straight from the OS cache, with no copy and none of the
        page faults of filling a fresh buffer. Callers copy what they hand on."""
        if end <= start:
            return np.empty(0, dtype=np.uint8)
        return self.map(key)[start:end]

    def read_ranges(self, key: str, ranges: list[tuple[int, int]]) -> list[np.ndarray]:
        m = self.map(key)
        return [m[a:b] for a, b in ranges]

    def _tmp(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        return path.with_name(f".{path.name}.{uuid.uuid4().hex}.partial")

    def write(self, key: str, data: Buffers) -> None:
        path = self._path(key)
        tmp = self._tmp(path)
        try:
            with open(tmp, "wb") as f:
                for part in as_parts(data):
                    f.write(resolved(part))
                if self.durable:
                    f.flush()
                    os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    def put_if_absent(self, key: str, data: Buffers) -> bool:
        # os.link fails if the target exists, atomically, on every POSIX file system;
        # the temporary file means the record is whole before it becomes visible.
        path = self._path(key)
        tmp = self._tmp(path)
        try:
            with open(tmp, "wb") as f:
                for part in as_parts(data):
                    f.write(resolved(part))
                if self.durable:
                    f.flush()
                    os.fsync(f.fileno())
            try:
                os.link(tmp, path)
            except FileExistsError:
                return False
            return True
        finally:
            tmp.unlink(missing_ok=True)

    def exists(self, key: str) -> bool:
        return self._path(key).exists()

    def modified(self, key: str) -> float:
        return self._path(key).stat().st_mtime

    def size(self, key: str) -> int:
        return self._path(key).stat().st_size

    # -- listing and deleting never follow a symbolic link ------------------------------------
    # A link inside the store (``ln -s /elsewhere STORE/saes/x``) would make a listing walk, and
    # a clean-up delete, files outside the store root. Links are not the store's: listings leave
    # them out, :meth:`links` names them (``strata verify`` and ``strata gc`` report them), and a
    # delete through a linked folder is refused.

    def _link_on_path(self, key: str) -> str | None:
        """The first component of ``key`` (from the root down) that is a symbolic link, or None."""
        path, parts = self.uri, [p for p in key.split("/") if p]
        for i, part in enumerate(parts):
            path = os.path.join(path, part)
            if os.path.islink(path):
                return "/".join(parts[: i + 1])
        return None

    def _walk(self, prefix: str) -> Iterator[tuple[str, bool]]:
        """(key, is a symbolic link) of every entry under ``prefix``: files, and links to
        anything; never descends into a link."""
        if self._link_on_path(prefix) is not None:
            return
        rel0 = "/".join(p for p in prefix.split("/") if p)
        stack = [(os.path.join(self.uri, rel0) if rel0 else self.uri, rel0)]
        while stack:
            path, rel = stack.pop()
            try:
                with os.scandir(path) as it:
                    entries = list(it)
            except OSError:  # gone meanwhile (a concurrent delete), or not a folder: as os.walk does
                continue
            for e in entries:
                key = f"{rel}/{e.name}" if rel else e.name
                if e.is_symlink():
                    yield key, True
                elif e.is_dir(follow_symlinks=False):
                    stack.append((e.path, key))
                else:
                    yield key, False

    def list(self, prefix: str) -> list[str]:
        return sorted(k for k, link in self._walk(prefix) if not link and not k.endswith(".partial"))

    def list_temporary(self, prefix: str) -> list[str]:
        return sorted(k for k, link in self._walk(prefix) if not link and k.endswith(".partial"))

    def links(self, prefix: str = "") -> list[str]:
        """Keys under ``prefix`` that are symbolic links (to a folder or a file, inside the store
        or out of it), or the link on the way to ``prefix`` itself."""
        on_path = self._link_on_path(prefix)
        if on_path is not None:
            return [on_path]
        return sorted(k for k, link in self._walk(prefix) if link)

    def list_dirs(self, prefix: str) -> list[str]:
        base = self._path(prefix)
        if self._link_on_path(prefix) is not None or not base.is_dir():
            return []
        return sorted(e.name for e in os.scandir(base) if e.is_dir(follow_symlinks=False))

    def delete(self, key: str) -> None:
        # The key itself may be a link (unlinking removes the link, not its target); a folder on
        # the way to it may not: the file deleted would be outside the store.
        parent = key.rsplit("/", 1)[0] if "/" in key else ""
        link = self._link_on_path(parent)
        if link is not None:
            raise StorageError(f"refusing to delete {key!r}: {link!r} is a symbolic link, and Strata never follows a link out of the store root")
        self._path(key).unlink(missing_ok=True)

    def zarr_store(self) -> LocalStore:
        return LocalStore(self.root)
