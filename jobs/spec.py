"""Loading job specs: YAML files validated into the job's one config type, with errors that
name the bad key. The spec types live with the code that runs them (``pipeline.config``,
``pipeline.encode``, ``analysis.sae.config``, ``analysis.similarity.spec``), all on the base of
``pipeline.spec``; this module only reads files and ``--set`` overrides and words their errors."""

from __future__ import annotations

import reprlib
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from strata.jobs._text import safe
from strata.pipeline.config import ExtractSpec
from strata.pipeline.errors import SpecError
from strata.pipeline.spec import UNUSED_KEY, Section

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


def _keys_of(section: type[BaseModel]) -> tuple[str, ...]:
    return section.spec_keys() if issubclass(section, Section) else tuple(section.model_fields)


def format_error(err: dict[str, Any], model: type[BaseModel]) -> str:
    """One pydantic error as ``\\`key\\`: what is wrong``, naming the valid keys of a section."""
    loc = ".".join(str(x) for x in err["loc"])
    if err["type"] in ("extra_forbidden", UNUSED_KEY):
        # An unused key (a compute key of another kind of job) is an unknown key for this kind.
        path = tuple(err["loc"]) if err["type"] == "extra_forbidden" else (*err["loc"], err["ctx"]["key"])
        section = _section_of(model, path[:-1])
        valid = ", ".join(_keys_of(section)) if section is not None else ""
        return f"`{'.'.join(str(x) for x in path)}` is not a spec key" + (f" (valid keys here: {valid})" if valid else "")
    if err["type"] == "missing":
        return f"`{loc}` is required"
    msg = err["msg"]
    secret = any(str(x) in _SECRET_SECTIONS for x in err["loc"])
    if err.get("input") is not None and err["type"] != "value_error" and not secret:
        msg += f" (got {short_repr(err['input'])})"
    return f"`{loc}`: {msg}"


_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxlist, _REPR.maxdict, _REPR.maxstring, _REPR.maxother = 3, 6, 6, 60, 60


def short_repr(value: Any, limit: int = 80) -> str:
    """A bounded repr of echoed input: reprlib stops at a few items per level and a few levels,
    so a value that shares structure exponentially (a YAML alias bomb) costs nothing to show;
    the result is cut to ``limit`` characters and has no control characters."""
    text = safe(_REPR.repr(value))
    return text if len(text) <= limit else text[: limit - 3] + "..."


# A spec is a few hundred nodes; a YAML alias may reuse a node anywhere, and the loaded value's
# size (what validation and error messages walk) is that of the expanded tree. Refused above these.
MAX_ALIASES = 1000
MAX_EXPANDED_NODES = 100_000


def _expanded_size(node: yaml.Node, path: str) -> int:
    """Nodes of the tree that ``node`` stands for once every alias is expanded; raises a
    SpecError past the limits, or on a recursive alias, without building anything."""
    sizes: dict[int, int] = {}
    open_: set[int] = set()
    aliases = 0

    def size(n: yaml.Node) -> int:
        nonlocal aliases
        key = id(n)
        if key in sizes:
            aliases += 1  # a node seen before is a reuse: an alias
            if aliases > MAX_ALIASES:
                raise SpecError(f"spec file {path!r} uses more than {MAX_ALIASES} YAML aliases; a spec needs few (is it an alias bomb?)")
            return sizes[key]
        if key in open_:
            raise SpecError(f"spec file {path!r} has a recursive YAML alias (line {n.start_mark.line + 1})")
        open_.add(key)
        total = 1
        if isinstance(n, yaml.SequenceNode):
            total += sum(size(c) for c in n.value)
        elif isinstance(n, yaml.MappingNode):
            total += sum(size(k) + size(v) for k, v in n.value)
        open_.discard(key)
        if total > MAX_EXPANDED_NODES:
            raise SpecError(
                f"spec file {path!r} expands to more than {MAX_EXPANDED_NODES:,} YAML nodes through its aliases "
                f"(line {n.start_mark.line + 1}); a spec is far smaller (is it an alias bomb?)"
            )
        sizes[key] = total
        return total

    return size(node)


def _safe_load(text: str, path: str) -> Any:
    """``yaml.safe_load`` with alias expansion bounded before any Python value is built."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _expanded_size(node, path)
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _set(d: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    if not all(parts):
        raise SpecError(f"--set {dotted}=...: the key has an empty part; expected e.g. compute.batch_tokens=4096")
    cur: Any = d
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(cur, list):  # `analyses.0.metrics=...`: an index into a list
            if not (part.isdigit() and int(part) < len(cur)):
                where = ".".join(parts[:i])
                raise SpecError(f"--set {dotted}: `{where}` is a list of {len(cur)}; `{part}` is not an index of it (0-{len(cur) - 1})")
            if last:
                cur[int(part)] = value
            else:
                cur = cur[int(part)]
            continue
        if not isinstance(cur, dict):
            raise SpecError(f"--set {dotted}: `{parts[i - 1]}` is not a section")
        if last:
            cur[part] = value
        else:
            cur = cur.setdefault(part, {})


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
        raw = _safe_load(text, str(path))
    except yaml.YAMLError as e:
        raise SpecError(f"spec file {str(path)!r} is not valid YAML: {safe(str(e).splitlines()[0])}") from None
    except RecursionError:
        raise SpecError(f"spec file {str(path)!r} nests too deeply to be a spec") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise SpecError(f"spec file {str(path)!r} must hold a mapping of keys, not a {type(raw).__name__}")
    for kv in overrides:
        if "=" not in kv:
            raise SpecError(f"--set {short_repr(kv)}: expected key=value, e.g. compute.batch_tokens=4096")
        k, v = kv.split("=", 1)
        try:
            value = _safe_load(v, f"--set {k.strip()}")
        except yaml.YAMLError as e:
            shown = "<hidden>" if k.strip().split(".")[0] in _SECRET_SECTIONS else short_repr(v)
            raise SpecError(f"--set {k.strip()}={shown}: the value is not valid YAML ({str(e).splitlines()[0]}); "
                            "quote strings, e.g. 'a: b'") from None
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
