"""Terminal-safe printing and credential-free logging for the `strata` command line.

Corpus text, dataset and feature names and stored metadata come from other people's files: a
document holding ``ESC ]0;...BEL`` or ``ESC [2J`` would retitle or clear the terminal of whoever
prints it. Every command that prints such text passes it through :func:`safe` first. Logs go
through :class:`RedactingFilter`, so no credential (an S3 key id, a secret, a token) reaches a log
line at any level, whichever library wrote it.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from collections.abc import Iterable, Mapping
from typing import Any

# C0 and C1 control characters and DEL. Newline and tab are escaped too: one printed value stays
# one line, so a name cannot forge a second row of a listing.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_NAMED = {"\n": "\\n", "\t": "\\t", "\r": "\\r"}


def _escape(m: re.Match[str]) -> str:
    c = m.group(0)
    return _NAMED.get(c) or f"\\x{ord(c):02x}"


def safe(value: Any) -> str:
    """``str(value)`` with every control character shown as an escape (``\\x1b``, ``\\n``)."""
    return _CONTROL.sub(_escape, str(value))


def safe_lines(text: str) -> str:
    """Multi-line text (job logs) with control characters escaped but line breaks kept."""
    return "\n".join(safe(line) for line in text.split("\n"))


# -- logging -------------------------------------------------------------------------------------

# Strata's own packages: `-v` turns these to DEBUG; every other library stays at WARNING, since
# botocore's and s3fs's DEBUG logs print request headers and signing material.
OWN_LOGGERS = ("strata",)
# Environment variables and option keys whose values are credentials.
SECRET_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "RAY_AUTH_TOKEN",
              "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "GOOGLE_APPLICATION_CREDENTIALS")
_SECRET_KEY = re.compile(r"(key|secret|token|password|credential|signature)", re.IGNORECASE)
# `name=value` / `name: value` / "name": "value" pairs whose name says they hold a secret.
_PAIR = re.compile(
    r"""(?P<name>["']?[\w-]*(?:key|secret|token|password|credential|signature)[\w-]*["']?\s*[:=]\s*["']?)(?P<value>[^\s"',;&}]+)""",
    re.IGNORECASE,
)
# AWS access key ids (AKIA..., ASIA...) and the Credential= scope of a SigV4 Authorization header.
_AWS_KEY_ID = re.compile(r"\b(?:AKIA|ASIA|AIDA|AROA)[A-Z0-9]{12,}\b")
REDACTED = "<redacted>"


def secret_values(options: Mapping[str, Any] | None = None, *, environ: Mapping[str, str] | None = None) -> set[str]:
    """Credential values to hide: those of the known environment variables, and of the keys of
    ``options`` (storage options) whose names say they are secrets."""
    env = os.environ if environ is None else environ
    out = {env[k] for k in SECRET_ENV if env.get(k)}
    for k, v in _walk(options or {}):
        if _SECRET_KEY.search(k) and isinstance(v, str):
            out.add(v)
    # Very short values ("1", "x") would blank out unrelated text; a real credential is longer.
    return {v for v in out if len(v) >= 4}


def _walk(d: Mapping[str, Any]) -> Iterable[tuple[str, Any]]:
    for k, v in d.items():
        if isinstance(v, Mapping):
            yield from _walk(v)
        else:
            yield str(k), v


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    """``text`` with known secret values, AWS key ids and ``secret=value`` pairs replaced."""
    for s in sorted(secrets, key=len, reverse=True):
        text = text.replace(s, REDACTED)
    text = _AWS_KEY_ID.sub(REDACTED, text)
    return _PAIR.sub(lambda m: m.group("name") + REDACTED, text)


class RedactingFilter(logging.Filter):
    """Rewrites every record's message (arguments merged) with :func:`redact`. Secret values
    are read from the environment at each record, so a key set after logging was configured
    (a test's monkeypatch, a profile loaded later) is hidden too."""

    def __init__(self, extra: Iterable[str] = ()) -> None:
        super().__init__()
        self.extra = set(extra)

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a malformed record: leave it to the handler to report
            return True
        record.msg = redact(message, secret_values() | self.extra)
        record.args = None
        if record.exc_info and not record.exc_text:
            record.exc_text = redact(logging.Formatter().formatException(record.exc_info), secret_values() | self.extra)
        return True


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at each record (not the one at set-up), so a test's
    captured stream that has since closed is never written to."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:  # StreamHandler.__init__ assigns it
        pass


def configure_logging(*, verbose: bool) -> None:
    """Log to stderr: Strata's own loggers at DEBUG with ``-v`` (else INFO), everything else at
    WARNING, every record through :class:`RedactingFilter`. Replaces handlers that an earlier
    call installed, so calling it twice in one process (tests) does not double the output."""
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, "_strata", False):
            root.removeHandler(h)
    handler = _StderrHandler()
    handler._strata = True  # type: ignore[attr-defined]
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    handler.addFilter(RedactingFilter())
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
    for name in OWN_LOGGERS:
        logging.getLogger(name).setLevel(logging.DEBUG if verbose else logging.INFO)
