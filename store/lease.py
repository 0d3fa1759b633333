"""A write lease on a dataset, so two jobs never compute the same unit at once.

Within one job the driver hands each unit to one worker at a time and retries it only after
that worker died, so a unit has one writer. Two *jobs* on one dataset would race on the same
shards; the lease makes the second job refuse to start while the first is alive. The holder
refreshes a heartbeat; a lease whose heartbeat is older than ``stale_after`` seconds, or whose
holder process on this host is gone, is taken over (a killed driver's rerun starts at once).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from typing import Any

from store.errors import LeaseHeldError
from store.layout import lease_key
from store.storage import Storage

log = logging.getLogger(__name__)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class DatasetLease:
    def __init__(
        self, storage: Storage, name: str, *, owner: str = "", heartbeat_s: float = 10.0, stale_after_s: float = 60.0
    ) -> None:
        self.storage = storage
        self.key = lease_key(name)
        self.name = name
        self.owner = owner
        self.heartbeat_s = heartbeat_s
        self.stale_after_s = stale_after_s
        self.token = uuid.uuid4().hex
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _record(self) -> bytes:
        return json.dumps(
            {"token": self.token, "owner": self.owner, "host": socket.gethostname(), "pid": os.getpid(), "heartbeat": time.time()}
        ).encode()

    def _current(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.storage.read(self.key))
        except FileNotFoundError:
            return None

    def _is_stale(self, cur: dict[str, Any]) -> bool:
        if time.time() - float(cur.get("heartbeat", 0)) > self.stale_after_s:
            return True
        return cur.get("host") == socket.gethostname() and not _pid_alive(int(cur.get("pid", -1)))

    def acquire(self) -> DatasetLease:
        for _ in range(3):
            if self.storage.put_if_absent(self.key, self._record()):
                break
            cur = self._current()
            if cur is None:
                continue
            if not self._is_stale(cur):
                age = time.time() - float(cur.get("heartbeat", 0))
                raise LeaseHeldError(
                    f"dataset {self.name!r} is being written by another job ({cur.get('owner') or 'unnamed'} on "
                    f"{cur.get('host')}, pid {cur.get('pid')}, heartbeat {age:.0f}s ago); wait for it to finish, "
                    f"or for its lease to go stale after {self.stale_after_s:.0f}s"
                )
            log.warning("taking over the stale write lease of %r from %s pid %s", self.name, cur.get("host"), cur.get("pid"))
            self.storage.delete(self.key)
        else:
            raise LeaseHeldError(f"could not take the write lease of dataset {self.name!r}: another job keeps taking it")
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name=f"strata-lease-{self.name}", daemon=True)
        self._thread.start()
        return self

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            cur = self._current()
            if cur is None or cur.get("token") != self.token:
                log.error("lost the write lease of dataset %r", self.name)
                return
            self.storage.write(self.key, self._record())

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        cur = self._current()
        if cur is not None and cur.get("token") == self.token:
            self.storage.delete(self.key)

    def __enter__(self) -> DatasetLease:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
