"""Loading job specs: YAML files validated into the job's one config type, with errors that
name the bad key. The spec types live with the code that runs them (``pipeline.config``,
``analysis.sae.config``); this module only reads files and ``--set`` overrides."""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from pipeline.config import ExtractSpec
from pipeline.errors import SpecError

S = TypeVar("S", bound=BaseModel)

# Values under these keys are never echoed in an error message: they may be credentials.
_SECRET_SECTIONS = ("storage_options",)


def _section_of(model: type[BaseModel], loc: tuple[Any, ...]) -> type[BaseModel] | None:
    section: Any = model
    for part in loc:
        field = section.model_fields.get(str(part)) if isinstance(section, type) and issubclass(section, BaseModel) else None
        if field is None:
            return None
        section = field.annotation
    return section if isinstance(section, type) and issubclass(section, BaseModel) else None


def format_error(err: dict[str, Any], model: type[BaseModel]) -> str:
    """One pydantic error as ``\\`key\\`: what is wrong``, naming the valid keys of a section."""
    loc = ".".join(str(x) for x in err["loc"])
    if err["type"] == "extra_forbidden":
        section = _section_of(model, err["loc"][:-1])
        valid = ", ".join(section.model_fields) if section is not None else ""
        return f"`{loc}` is not a spec key" + (f" (valid keys here: {valid})" if valid else "")
    if err["type"] == "missing":
        return f"`{loc}` is required"
    msg = err["msg"]
    secret = any(str(x) in _SECRET_SECTIONS for x in err["loc"])
    if err.get("input") is not None and err["type"] != "value_error" and not secret:
        msg += f" (got {err['input']!r})"
    return f"`{loc}`: {msg}"


def _set(d: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    if not all(parts):
        raise SpecError(f"--set {dotted}=...: the key has an empty part; expected e.g. compute.batch_tokens=4096")
    for part in parts[:-1]:
        nxt = d.setdefault(part, {})
        if not isinstance(nxt, dict):
            raise SpecError(f"--set {dotted}: `{part}` is not a section")
        d = nxt
    d[parts[-1]] = value


def read_raw(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    """A spec file's mapping of keys, with ``key.sub=value`` overrides applied (values parsed
    as YAML: numbers, booleans, lists). Every problem with the file is a one-line SpecError."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError(f"spec file {str(path)!r} does not exist") from None
    except IsADirectoryError:
        raise SpecError(f"spec path {str(path)!r} is a folder; give a YAML spec file") from None
    except UnicodeDecodeError as e:
        raise SpecError(f"spec file {str(path)!r} is not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start})") from None
    except OSError as e:
        raise SpecError(f"spec file {str(path)!r} cannot be read: {e.strerror}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise SpecError(f"spec file {str(path)!r} is not valid YAML: {str(e).splitlines()[0]}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise SpecError(f"spec file {str(path)!r} must hold a mapping of keys, not a {type(raw).__name__}")
    for kv in overrides:
        if "=" not in kv:
            raise SpecError(f"--set {kv!r}: expected key=value, e.g. compute.batch_tokens=4096")
        k, v = kv.split("=", 1)
        try:
            value = yaml.safe_load(v)
        except yaml.YAMLError as e:
            shown = "<hidden>" if k.strip().split(".")[0] in _SECRET_SECTIONS else repr(v)
            raise SpecError(f"--set {k.strip()}={shown}: the value is not valid YAML ({str(e).splitlines()[0]}); quote strings, e.g. 'a: b'") from None
        _set(raw, k.strip(), value)
    return raw


def load_spec(spec_type: type[S], path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> S:
    """Load and validate a spec file into ``spec_type``."""
    raw = read_raw(path, overrides)
    try:
        return spec_type.model_validate(raw)
    except ValidationError as e:
        raise SpecError(f"{path}: " + "; ".join(format_error(x, spec_type) for x in e.errors())) from None


def load_extract_spec(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> ExtractSpec:
    return load_spec(ExtractSpec, path, overrides)
