"""`strata features serve`: a local web app over a feature table, reading the store live.

    GET /                       the viewer (index, and each feature at #f=N): one page, drawn from the JSON below
    GET /api/index              per-feature statistics (column arrays), dead features listed, explanations
    GET /api/feature/{f}        one feature's data (:func:`strata.store.features.view.feature_data`)
    GET /api/search?token=TEXT  features whose stored top rows fire on that token: [[feature, rows], ...]

There are no per-feature files: any feature of any size of SAE is one request. The table is
refreshed (new units and merged generations picked up) at most every ``refresh_s`` seconds; the
token search index is built on first use and rebuilt when the merged generation changes. Built on
starlette (served by uvicorn); bad requests are a JSON ``{"error": ...}`` with status 404 or 400.
"""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING, Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from strata.store.errors import StrataError
from strata.store.features.format import FeatureOutOfRangeError
from strata.store.features.view import app_html, feature_data, index_data, load_explanations, token_index

if TYPE_CHECKING:
    from strata.store.features.table import FeatureTable

__all__ = ["make_app", "serve"]


class _Live:
    """The table, refreshed now and then, and what is derived from its current generation."""

    def __init__(self, fs: FeatureTable, explanations: str | None, refresh_s: float) -> None:
        self.fs, self.path, self.refresh_s = fs, explanations, refresh_s
        self.lock = threading.RLock()  # one request at a time reads the table: FeatureTable's caches are not thread-safe
        self.checked = time.monotonic()
        self.gen: Any = None
        self.ex: dict[int, str] = {}
        self.search: dict[str, list[list[int]]] | None = None
        self.index: dict[str, Any] | None = None
        self._reset()

    def _reset(self) -> None:
        self.gen = self.fs.info.merged
        self.ex = load_explanations(self.fs, self.path)
        self.search = None
        self.index = None

    def get(self) -> FeatureTable:
        with self.lock:
            if time.monotonic() - self.checked > self.refresh_s:
                self.checked = time.monotonic()
                self.fs.refresh()
                if self.fs.info.merged != self.gen:
                    self._reset()
            return self.fs


def _error(msg: str, status: int) -> JSONResponse:
    return JSONResponse({"error": msg}, status_code=status)


def make_app(fs: FeatureTable, *, explanations: str | None = None, refresh_s: float = 5.0) -> Starlette:
    """The ASGI app serving ``fs`` (see the module docstring); ``explanations``: a local explanations.jsonl."""
    live = _Live(fs, explanations, refresh_s)
    page = app_html(f"{fs.name}: features", 'StrataView.served("")')

    async def home(request: Request) -> Response:
        return HTMLResponse(page)

    def api_index(request: Request) -> Response:
        with live.lock:
            return _index(live.get())

    def _index(t: FeatureTable) -> Response:
        if live.index is None:
            live.index = index_data(t, explanations=live.ex)
        return JSONResponse(live.index)

    def api_feature(request: Request) -> Response:
        with live.lock:
            return _feature(live.get(), request)

    def _feature(t: FeatureTable, request: Request) -> Response:
        try:
            f = int(request.path_params["f"])
            return JSONResponse(feature_data(t, f, explanations=live.ex))
        except ValueError:
            return _error(f"a feature is an integer 0..{t.d_sae - 1}, got {request.path_params['f']!r}", 400)
        except FeatureOutOfRangeError as e:
            return _error(str(e), 404)
        except StrataError as e:
            return _error(str(e), 500)

    def api_search(request: Request) -> Response:
        with live.lock:
            return _search(live.get(), request)

    def _search(t: FeatureTable, request: Request) -> Response:
        q = request.query_params.get("token", "").strip().lower()
        if not q:
            return _error("search needs ?token=TEXT (a token's text, e.g. ?token=the)", 400)
        if live.search is None:
            live.search = token_index(t)
        return JSONResponse(live.search.get(q, []))

    routes = [Route("/", home), Route("/api/index", api_index), Route("/api/feature/{f}", api_feature), Route("/api/search", api_search)]
    return Starlette(routes=routes)


def serve(fs: FeatureTable, *, host: str = "127.0.0.1", port: int = 8000, explanations: str | None = None) -> None:
    """Serve ``fs`` until interrupted (uvicorn)."""
    uvicorn.run(make_app(fs, explanations=explanations), host=host, port=port, log_level="warning")
