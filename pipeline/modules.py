"""Any module by path: ``module:PATH`` (the module's output) and ``module:PATH:input`` hooks.

``PATH`` is a name from ``model.named_modules()`` of the model Strata loads
(:func:`strata.pipeline.models.load_model`): the *base* model, ``AutoModel``, with no task head;
e.g. ``h.0.mlp.c_fc`` for GPT-2 (``GPT2Model``), ``layers.0.mlp`` for Llama (``LlamaModel``),
``encoder.layer.0.intermediate`` for BERT (``BertModel``). A path copied from the task model
(``transformer.h.0.mlp``, ``model.layers.0.mlp``, ``bert.encoder.layer.0``) is accepted too: the
task head's prefix (the model's ``base_model_prefix``, or ``model.`` / ``transformer.`` as
Hugging Face names them) is dropped when the rest names a module.

A module hook's width is not known from the config: :func:`probe_modules` finds it with one dry
forward, and with it the order in which the hooks fire (so a capture can stop the forward after
the deepest one). What a hook takes from the module:

- ``output``: the module's return value when it is a tensor; when it is a tuple or list, its
  *first* element (as decoder layers and GPT-2's attention return ``(hidden, weights, ...)``);
  when it is a ``ModelOutput``, its ``last_hidden_state``.
- ``input``: the module's first positional argument; when it is called with keywords only, its
  ``hidden_states`` keyword, else its first tensor keyword.

That tensor must be ``[batch, seq, d]`` with the batch and sequence length of the inputs, one
row per token, in floating point; anything else (rotary embeddings' ``(cos, sin)`` of
``[1, seq, d_head]``, position embeddings broadcast over the batch, a pooled ``[batch, d]``) is
refused by name with the shape it saw. The probe runs at least two rows so that an output
broadcast over the batch cannot pass as ``[1, seq, d]``.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, Literal

from strata.pipeline.errors import SpecError, UnknownHookError

if TYPE_CHECKING:
    import torch

MODULE_PREFIX = "module:"
#: What a module hook reads: the module's return value or its (first) argument.
ModuleIO = Literal["output", "input"]
_IOS: tuple[str, ...] = ("output", "input")
#: Prefixes Hugging Face task models put before the base model's paths, besides ``base_model_prefix``.
_TASK_PREFIXES = ("model", "transformer")
_CLOSE = 5


def is_module_hook(name: str) -> bool:
    """Whether ``name`` is a ``module:PATH`` or ``module:PATH:input`` hook."""
    return name.startswith(MODULE_PREFIX)


def parse_module_hook(name: str) -> tuple[str, ModuleIO]:
    """``"module:PATH"`` -> ``(PATH, "output")``; ``"module:PATH:input"`` -> ``(PATH, "input")``
    (``"module:PATH:output"`` is accepted as the first). The path is not checked against a model
    here (see :func:`resolve_module_path`), only its form: dot-separated names, none empty."""
    valid = "valid: module:PATH or module:PATH:input, PATH a named_modules() path such as h.0.mlp"
    if not is_module_hook(name):
        raise UnknownHookError(f"hook {name!r} is not a module hook; {valid}")
    path, _, io = name[len(MODULE_PREFIX):].partition(":")
    io = io or "output"
    if io not in _IOS:
        raise UnknownHookError(f"hook {name!r}: {io!r} after the path must be input or output; {valid}")
    if not path or any(not part or part != part.strip() for part in path.split(".")):
        raise UnknownHookError(f"hook {name!r} names no module path; {valid}")
    return path, io  # type: ignore[return-value]  # io is one of _IOS, checked above


def module_hook_name(path: str, io: str = "output") -> str:
    """The hook name of a resolved path: ``module:PATH`` or ``module:PATH:input`` (so that a path
    written with and without the task head's prefix stores under one name)."""
    if io not in _IOS:
        raise ValueError(f"io {io!r} must be one of {', '.join(_IOS)}")
    return f"{MODULE_PREFIX}{path}" + (":input" if io == "input" else "")


def resolve_module_path(model: torch.nn.Module, path: str) -> str:
    """``path`` as ``model.named_modules()`` names it: as given when it names a module; else with a
    task head's prefix dropped (``transformer.h.0.mlp`` -> ``h.0.mlp``), or added when ``model``
    is itself a task model (``h.0.mlp`` -> ``transformer.h.0.mlp``). A path that names no module
    raises :class:`UnknownHookError` listing up to five close matches."""
    names = [n for n, _ in model.named_modules() if n]
    known = set(names)
    if path in known:
        return path
    base = getattr(model, "base_model_prefix", "") or ""
    prefixes = list(dict.fromkeys(p for p in (base, *_TASK_PREFIXES) if p))
    for prefix in prefixes:
        if path.startswith(prefix + ".") and path[len(prefix) + 1:] in known:
            return path[len(prefix) + 1:]
    for prefix in prefixes:
        if f"{prefix}.{path}" in known:
            return f"{prefix}.{path}"
    close = difflib.get_close_matches(path, names, n=_CLOSE)
    if not close:
        # A path with a prefix the model does not use: match what follows the prefix.
        head, _, rest = path.partition(".")
        close = difflib.get_close_matches(rest, names, n=_CLOSE) if head in prefixes and rest else []
    hint = f"close matches: {', '.join(close)}" if close else f"top-level modules: {', '.join(n for n in names if '.' not in n)}"
    relative = f"the {type(model).__name__} Strata loads (AutoModel: the base model, no task head)"
    also = f"; a {' / '.join(p + '.' for p in prefixes)} prefix is dropped" if prefixes else ""
    raise UnknownHookError(f"no module {path!r} in {relative}: paths are relative to it{also}; {hint}")


def probe_modules(
    model: torch.nn.Module,
    paths_io: Iterable[tuple[str, str, str]],
    inputs: Mapping[str, Any],
    *,
    sink: Callable[[str, torch.Tensor], None] | None = None,
) -> dict[str, tuple[int, int]]:
    """One dry forward (``torch.inference_mode``) with a hook on each ``(hook_name, path, io)``;
    return ``{hook_name: (width, firing index)}``, the index counting from 0 in the order the hooks
    first fire. ``path`` may be written as :func:`resolve_module_path` accepts; ``inputs`` are the
    model's keyword inputs (``input_ids`` or ``inputs_embeds`` ``[batch, seq, ...]`` among them),
    on the model's device. A batch of one is repeated to two rows for the probe (see the module's
    docstring). ``sink(hook_name, tensor)``, when given, receives each captured ``[batch, seq, d]``
    tensor (the model's own: copy it to keep it).

    Raises :class:`UnknownHookError` for a path that names no module, and :class:`SpecError` for a
    hook whose tensor is not ``[batch, seq, d]``, a module the forward never reaches, one it runs
    more than once (a shared module: which call would be stored?), or a hook name given twice.
    """
    import torch  # lazy: torch imports in ~2 s; spec checks import this module and must not pay for it

    requests = list(paths_io)
    seen: set[str] = set()
    resolved: list[tuple[str, str, str]] = []
    for hook, path, io in requests:
        if hook in seen:
            raise SpecError(f"hook {hook!r} is requested twice")
        seen.add(hook)
        if io not in _IOS:
            raise SpecError(f"hook {hook!r}: io {io!r} must be one of {', '.join(_IOS)}")
        resolved.append((hook, resolve_module_path(model, path), io))
    batch, seq, run = _probe_inputs(inputs)

    fired: dict[str, int] = {}
    widths: dict[str, int] = {}
    calls: dict[str, int] = {}
    errors: list[str] = []

    def take(hook: str, value: Any) -> None:
        calls[hook] = calls.get(hook, 0) + 1
        if hook in fired or errors:
            return
        fired[hook] = len(fired)
        tensor = module_tensor(value)
        if tensor is None or tensor.ndim != 3 or tuple(tensor.shape[:2]) != (batch, seq) or not tensor.is_floating_point():
            errors.append(_shape_error(hook, value, tensor, batch, seq))
            return
        widths[hook] = int(tensor.shape[-1])
        if sink is not None:
            sink(hook, tensor)

    def on_input(hook: str) -> Callable[..., None]:
        return lambda module, args, kwargs: take(hook, module_input(args, kwargs))

    def on_output(hook: str) -> Callable[..., None]:
        return lambda module, args, output: take(hook, output)

    handles = []
    try:
        for hook, path, io in resolved:
            module = model.get_submodule(path)
            if io == "input":
                handles.append(module.register_forward_pre_hook(on_input(hook), with_kwargs=True))
            else:
                handles.append(module.register_forward_hook(on_output(hook)))
        with torch.inference_mode():
            model(**run)
    finally:
        for handle in handles:
            handle.remove()
    if errors:
        raise SpecError(errors[0])
    missing = [hook for hook, _, _ in resolved if hook not in fired]
    if missing:
        raise SpecError(f"hook{'s' if len(missing) > 1 else ''} {', '.join(missing)}: the model's forward never runs "
                        f"{'these modules' if len(missing) > 1 else 'this module'}; take a module the forward reaches")
    repeated = [f"{hook} ({calls[hook]} times)" for hook, _, _ in resolved if calls[hook] > 1]
    if repeated:
        raise SpecError(f"hook {', '.join(repeated)}: the module runs more than once in one forward (a shared module); "
                        "take a module that runs once per forward")
    return {hook: (widths[hook], fired[hook]) for hook, _, _ in resolved}


def check_bytes_per_token(widths: Mapping[str, int], itemsize: int, budget: int) -> None:
    """Refuse (:class:`SpecError`) hooks whose stored values would take more than ``budget`` bytes a
    token: ``sum(widths) * itemsize > budget``. The message names the hooks (the largest first, equal ones in the given order),
    their bytes a token, the total and the budget (`max_bytes_per_token`)."""
    if itemsize <= 0:
        raise ValueError(f"itemsize {itemsize} must be positive")
    if budget <= 0:
        raise SpecError(f"`max_bytes_per_token` is {budget}; it must be a positive number of bytes")
    total = sum(widths.values()) * itemsize
    if total <= budget:
        return
    ranked = sorted(widths.items(), key=lambda kv: -kv[1])  # stable: equal widths keep the spec's order
    shown = ", ".join(f"{hook} {w * itemsize:,} B" for hook, w in ranked[:10])
    more = f" and {len(ranked) - 10} more" if len(ranked) > 10 else ""
    raise SpecError(f"hooks {shown}{more} store {total:,} bytes a token ({itemsize} bytes a value), over `max_bytes_per_token` "
                    f"= {budget:,}; take fewer or narrower hooks, or raise `max_bytes_per_token`")


def _probe_inputs(inputs: Mapping[str, Any]) -> tuple[int, int, dict[str, Any]]:
    # The batch and sequence length every hook must have, and the inputs to run (at least 2 rows).
    import torch  # lazy: as in probe_modules

    key = next((k for k in ("input_ids", "inputs_embeds") if isinstance(inputs.get(k), torch.Tensor)), None)
    if key is None or inputs[key].ndim < 2:
        raise ValueError(f"probe inputs need input_ids [batch, seq] or inputs_embeds [batch, seq, d]; got {', '.join(inputs) or 'none'}")
    batch, seq = (int(n) for n in inputs[key].shape[:2])
    if batch >= 2:
        return batch, seq, dict(inputs)
    run = {k: v.repeat(2, *([1] * (v.ndim - 1))) if isinstance(v, torch.Tensor) and v.ndim >= 1 and v.shape[0] == 1 else v
           for k, v in inputs.items()}
    return 2, seq, run


def module_input(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """What an ``input`` hook reads from a forward pre-hook's ``(args, kwargs)``: the first positional
    argument, else the ``hidden_states`` keyword, else the first tensor keyword (``None`` if none).
    A capture of module hooks should read with this and :func:`module_tensor`, as the probe does."""
    import torch  # lazy: as in probe_modules

    if args:
        return args[0]
    if "hidden_states" in kwargs:
        return kwargs["hidden_states"]
    return next((v for v in kwargs.values() if isinstance(v, torch.Tensor)), None)


def module_tensor(value: Any) -> torch.Tensor | None:
    """The tensor a hook stores from a module's output (or input): the value itself, a tuple's or
    list's first element, or a ``ModelOutput``'s ``last_hidden_state``; ``None`` when there is none."""
    import torch  # lazy: as in probe_modules

    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    last = getattr(value, "last_hidden_state", None)
    return last if isinstance(last, torch.Tensor) else None


def _describe(value: Any, *, depth: int = 0) -> str:
    import torch  # lazy: as in probe_modules

    if isinstance(value, torch.Tensor):
        dtype = "" if value.is_floating_point() else f" of {str(value.dtype).removeprefix('torch.')}"
        return f"Tensor[{', '.join(str(n) for n in value.shape)}]{dtype}"
    if isinstance(value, (tuple, list)) and depth < 1:
        items = [_describe(v, depth=depth + 1) for v in value[:4]]
        return f"({', '.join(items)}{', ...' if len(value) > 4 else ''})"
    return "None" if value is None else type(value).__name__


def _shape_error(hook: str, value: Any, tensor: torch.Tensor | None, batch: int, seq: int) -> str:
    want = f"[batch, seq, d] = [{batch}, {seq}, d] for these inputs (one row per token, floating point)"
    if isinstance(value, (tuple, list)):
        seen = f"a {type(value).__name__} {_describe(value)}"
        fix = "take a submodule whose output is one tensor"
        part = "whose first element is not"
    else:
        seen = _describe(value) if value is None or hasattr(value, "shape") else f"a {type(value).__name__}"
        fix = "take a module whose output has one row per token"
        part = "which is not"
    verb = "receives" if hook.endswith(":input") else "returns"
    return f"{hook} {verb} {seen}, {part} {want}; {fix}"
