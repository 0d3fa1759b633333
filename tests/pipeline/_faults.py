"""Workers that misbehave on purpose: subclasses of the real worker, the seam the tests own
(no environment variable read by library code). This module is pickled by value, so Ray's
workers need not be able to import the test folder."""

from __future__ import annotations

import os
import sys
import time
from typing import Any

import ray.cloudpickle

from strata.pipeline.worker import UnitWorker


def crashing(after: int, marker: str) -> type[UnitWorker]:
    """A worker whose process dies abruptly in the middle of a unit (after its forward pass,
    before anything of it is written) once it finished ``after`` units; only the first worker
    to get there dies (it creates ``marker``)."""

    class CrashingWorker(UnitWorker):
        def compute(self, contexts: Any, hooks: list[str]) -> Any:
            acts = super().compute(contexts, hooks)
            if self.units_done >= after:
                try:
                    os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
                except FileExistsError:
                    return acts
                os._exit(17)
            return acts

    return CrashingWorker


def slow(seconds: float) -> type[UnitWorker]:
    """A worker that takes ``seconds`` longer per unit (before computing it)."""

    class SlowWorker(UnitWorker):
        def process(self, unit: int, contexts: Any, hooks: list[str]) -> dict[str, Any]:
            time.sleep(seconds)
            return super().process(unit, contexts, hooks)

    return SlowWorker


class EnvReporter(UnitWorker):
    """Reports what credentials its process was given: environment and storage options."""

    def process(self, unit: int, contexts: Any, hooks: list[str]) -> dict[str, Any]:
        st = super().process(unit, contexts, hooks)
        st["env_secret"] = os.environ.get("AWS_SECRET_ACCESS_KEY")
        st["storage_options"] = self.cfg.storage_options
        st["threads"] = self.cfg.threads
        return st


ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
