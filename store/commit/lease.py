"""Write leases with fencing: one job at a time changes a dataset (or any artifact folder).

A lease is a sequence of *generations*, ``PREFIX/lease/000000000007.json``, each created
put-if-absent. The highest generation is the lease; its number is the holder's fencing token.

* **Acquire**: read the highest generation ``g``. If its holder is live, refuse
  (:class:`LeaseHeldError`). If it is free (released, its heartbeat older than
  ``stale_after_s``, or its process gone on this very machine), create ``g + 1``
  put-if-absent. Of several processes taking over at once, exactly one creates ``g + 1``;
  the others then find it live and are refused.
* **Heartbeat**: only the holder of ``g`` ever writes ``g``'s file, so refreshing it needs no
  read-modify-write race. Each beat first lists the generations: a higher one means the lease
  was taken over, and the holder has lost it for good (it never writes again).
* **Fencing**: writers record the generation in their commit records and refuse to commit
  when the current generation is no longer theirs (:func:`current_generation`), so a paused
  job that wakes up after a takeover cannot publish anything.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from strata.store.errors import LeaseHeldError, LeaseLostError
from strata.store.layout import lease_dir
from strata.store.storage import Storage

log = logging.getLogger(__name__)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return pid > 0
    return True


def _boot_id() -> str:
    # Host names repeat across machines (containers, VMs called "vm"); the kernel's boot id
    # tells whether a lease was taken on this very machine, where a dead pid means a dead job.
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _gen_key(prefix: str, gen: int) -> str:
    return f"{lease_dir(prefix)}/{gen:012d}.json"


def generations(storage: Storage, prefix: str) -> list[int]:
    out = []
    for key in storage.list(lease_dir(prefix)):
        stem = key.rsplit("/", 1)[-1].removesuffix(".json")
        if stem.isdigit():
            out.append(int(stem))
    return sorted(out)


def current_generation(storage: Storage, prefix: str) -> int:
    """The fencing token of the current lease holder (0 when nobody ever held it)."""
    gens = generations(storage, prefix)
    return gens[-1] if gens else 0


@dataclass(frozen=True)
class Fence:
    """A lease holder's fencing token, for work done in other processes (Ray tasks) on its
    behalf: ``check()`` raises :class:`LeaseLostError` once the lease is at a newer
    generation. Picklable: pass it to the task."""

    storage: Storage
    prefix: str
    token: int
    what: str

    def check(self) -> None:
        cur = current_generation(self.storage, self.prefix)
        if cur != self.token:
            raise LeaseLostError(
                f"{self.what}: this work is fenced with lease generation {self.token}, but the lease is now at "
                f"generation {cur}: another job took it over, so nothing more is committed"
            )


class Lease:
    """A write lease on the artifact folder ``prefix`` (a dataset: ``datasets/NAME``).

    ``with store.lease(name) as lease: ...``; ``lease.token`` is the fencing token,
    ``lease.check()`` raises :class:`LeaseLostError` once another job took the lease over.
    """

    def __init__(
        self,
        storage: Storage,
        prefix: str,
        *,
        what: str,
        owner: str = "",
        heartbeat_s: float = 10.0,
        stale_after_s: float = 60.0,
    ) -> None:
        self.storage = storage
        self.prefix = prefix
        self.what = what
        self.owner = owner or "a Strata job"
        self.heartbeat_s = heartbeat_s
        self.stale_after_s = stale_after_s
        self.token = 0
        self._lost = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_beat = 0.0
        self._last_check = 0.0
        self._on_lost: list[Callable[[], None]] = []

    # -- records ------------------------------------------------------------------------------

    def _record(self, *, released: bool = False) -> bytes:
        return json.dumps(
            {
                "generation": self.token, "owner": self.owner, "host": socket.gethostname(), "boot_id": _boot_id(),
                "pid": os.getpid(), "heartbeat": time.time(), "stale_after_s": self.stale_after_s, "released": released,
            }
        ).encode()

    def _read(self, gen: int) -> dict[str, Any] | None:
        try:
            rec = json.loads(self.storage.read(_gen_key(self.prefix, gen)))
            return rec if isinstance(rec, dict) else {}
        except FileNotFoundError:
            return None
        except ValueError:
            return {}  # a damaged record (a writer died mid-write on a store without atomic writes)

    def _why_free(self, cur: dict[str, Any]) -> str | None:
        """Why the lease described by ``cur`` may be taken, or None while its holder is live."""
        if not cur:
            return "its record is damaged"
        if cur.get("released"):
            return "released"
        age = time.time() - float(cur.get("heartbeat", 0))
        # The holder says how long it may go without a heartbeat (it knows its own cadence).
        if age > float(cur.get("stale_after_s", self.stale_after_s)):
            return f"no heartbeat for {age:.0f}s"
        same_machine = cur.get("host") == socket.gethostname() and cur.get("boot_id", "") == _boot_id()
        if same_machine and not _pid_alive(int(cur.get("pid", -1))):
            return f"its process {cur.get('pid')} on this machine is gone"
        return None

    def holder(self) -> dict[str, Any] | None:
        """The live holder's record, or None when the lease is free (reads only)."""
        gens = generations(self.storage, self.prefix)
        if not gens:
            return None
        cur = self._read(gens[-1])
        return None if cur is None or self._why_free(cur) is not None else cur

    def held_message(self, cur: dict[str, Any]) -> str:
        age = time.time() - float(cur.get("heartbeat", 0))
        return (
            f"{self.what} is being written by another job ({cur.get('owner') or 'unnamed'}, pid {cur.get('pid')} on "
            f"host {cur.get('host')}, heartbeat {age:.0f}s ago); wait for it to finish, or for its lease to go stale "
            f"{float(cur.get('stale_after_s', self.stale_after_s)):.0f}s after its last heartbeat"
        )

    # -- acquire / release -----------------------------------------------------------------------

    def acquire(self) -> Lease:
        for _ in range(5):
            gens = generations(self.storage, self.prefix)
            top = gens[-1] if gens else 0
            if top:
                cur = self._read(top)
                if cur is not None:
                    why = self._why_free(cur)
                    if why is None:
                        raise LeaseHeldError(self.held_message(cur))
                    if why != "released":
                        log.warning("taking over the write lease of %s (generation %d: %s)", self.what, top, why)
            self.token = top + 1
            if self.storage.put_if_absent(_gen_key(self.prefix, self.token), self._record()):
                break
            # Another process created that generation first: the next pass finds it live.
        else:
            raise LeaseHeldError(f"could not take the write lease of {self.what}: other jobs keep taking it")
        for g in gens:  # older generations only tell history; a paused holder sees ours regardless
            if g < self.token:
                self.storage.delete(_gen_key(self.prefix, g))
        self._lost.clear()
        self._stop.clear()
        self._last_beat = self._last_check = time.monotonic()
        self._thread = threading.Thread(target=self._beat, name=f"strata-lease-{self.prefix}", daemon=True)
        self._thread.start()
        return self

    def fence(self) -> Fence:
        """The picklable fencing token of this (acquired) lease."""
        if not self.token:
            raise RuntimeError("fence() of a lease that was never acquired")
        return Fence(self.storage, self.prefix, self.token, self.what)

    def on_lost(self, fn: Callable[[], None]) -> None:
        """Call ``fn`` (from the heartbeat thread) when the lease is found lost."""
        self._on_lost.append(fn)

    def _mark_lost(self, why: str) -> None:
        if not self._lost.is_set():
            log.error("lost the write lease of %s: %s", self.what, why)
            self._lost.set()
            for fn in self._on_lost:
                try:
                    fn()
                except Exception:  # pragma: no cover - a callback must not kill the heartbeat
                    log.exception("lease-lost callback failed")

    def _newer(self) -> int | None:
        gens = generations(self.storage, self.prefix)
        newer = [g for g in gens if g > self.token]
        if newer:
            return newer[-1]
        if self.token not in gens:
            return -1  # our generation was deleted: someone took over and cleaned up
        return None

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s) and not self._lost.is_set():
            try:
                newer = self._newer()
                self._last_check = time.monotonic()
                if newer is not None:
                    self._mark_lost(f"generation {newer} replaced ours ({self.token})" if newer > 0 else "our generation is gone")
                    return
                self.storage.write(_gen_key(self.prefix, self.token), self._record())
                self._last_beat = time.monotonic()
            except OSError as e:
                silent = time.monotonic() - self._last_beat
                log.warning("write lease of %s: heartbeat failed (%s); %.0fs since the last one", self.what, e, silent)
                if silent > self.stale_after_s:
                    self._mark_lost(f"no heartbeat could be written for {silent:.0f}s, so another job may have taken over")
                    return

    @property
    def lost(self) -> bool:
        return self._lost.is_set()

    def check(self) -> None:
        """Raise :class:`LeaseLostError` when the lease is no longer ours (checks the store when
        the last check is more than a second old)."""
        if not self._lost.is_set() and time.monotonic() - self._last_check > 1.0:
            newer = self._newer()
            self._last_check = time.monotonic()
            if newer is not None:
                self._mark_lost(f"generation {newer} replaced ours ({self.token})" if newer > 0 else "our generation is gone")
        if self._lost.is_set():
            raise LeaseLostError(
                f"{self.what}: another job took over this job's write lease (fencing token {self.token}); "
                "this job stopped writing. Was it paused for longer than the lease's stale time?"
            )

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self.token and not self._lost.is_set() and self._newer() is None:
            self.storage.write(_gen_key(self.prefix, self.token), self._record(released=True))

    def __enter__(self) -> Lease:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
