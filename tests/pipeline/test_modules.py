"""``module:PATH`` hooks: parsing, path resolution against real tiny models, the dry-forward probe
(widths, firing order, captured values against independent torch hooks) and the byte budget."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModel, AutoModelForCausalLM
from transformers.modeling_outputs import BaseModelOutput

from strata.pipeline.errors import SpecError, UnknownHookError
from strata.pipeline.modules import (
    MODULE_PREFIX,
    check_bytes_per_token,
    is_module_hook,
    module_hook_name,
    module_input,
    module_tensor,
    parse_module_hook,
    probe_modules,
    resolve_module_path,
)

D = 32  # tests/pipeline/conftest.py builds every tiny model with d_model=32, heads=4


@pytest.fixture(scope="module")
def gpt2(tiny_models) -> torch.nn.Module:
    return AutoModel.from_pretrained(tiny_models("gpt2"), dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def llama(tiny_models) -> torch.nn.Module:
    return AutoModel.from_pretrained(tiny_models("llama"), dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def bert(tiny_models) -> torch.nn.Module:
    return AutoModel.from_pretrained(tiny_models("bert"), dtype=torch.float32).eval()


def _ids(batch: int = 2, seq: int = 7) -> dict[str, torch.Tensor]:
    return {"input_ids": torch.randint(5, 300, (batch, seq), generator=torch.Generator().manual_seed(3))}


# -- names ------------------------------------------------------------------------------------------


def test_parse_module_hook():
    assert MODULE_PREFIX == "module:"
    assert is_module_hook("module:h.0.mlp") and not is_module_hook("blocks.0.hook_resid_post")
    assert parse_module_hook("module:h.0.mlp") == ("h.0.mlp", "output")
    assert parse_module_hook("module:h.0.mlp:output") == ("h.0.mlp", "output")
    assert parse_module_hook("module:layers.1.mlp.down_proj:input") == ("layers.1.mlp.down_proj", "input")
    assert module_hook_name("h.0.mlp") == "module:h.0.mlp"
    assert module_hook_name("h.0.mlp", "input") == "module:h.0.mlp:input"
    for name in ("module:", "module::input", "module:h..0", "module:h.0.", "module:h.0:in", "blocks.0.hook_resid_post"):
        with pytest.raises(UnknownHookError) as e:
            parse_module_hook(name)
        assert "\n" not in str(e.value) and repr(name) in str(e.value) and "module:PATH:input" in str(e.value)


# -- paths ------------------------------------------------------------------------------------------


def test_resolve_with_and_without_task_prefix(gpt2, llama, bert):
    assert resolve_module_path(gpt2, "h.0.mlp") == "h.0.mlp"
    assert resolve_module_path(gpt2, "transformer.h.0.mlp") == "h.0.mlp"
    assert resolve_module_path(llama, "model.layers.0.mlp") == "layers.0.mlp"
    assert resolve_module_path(llama, "layers.1.self_attn.o_proj") == "layers.1.self_attn.o_proj"
    assert resolve_module_path(bert, "bert.encoder.layer.0") == "encoder.layer.0"
    for model, path in ((gpt2, "h.0.mlp"), (llama, "layers.0.mlp"), (bert, "encoder.layer.0")):
        assert isinstance(model.get_submodule(resolve_module_path(model, path)), torch.nn.Module)


def test_resolve_on_a_task_model_adds_the_prefix(tiny_models):
    lm = AutoModelForCausalLM.from_pretrained(tiny_models("gpt2"), dtype=torch.float32)
    assert resolve_module_path(lm, "h.0.mlp") == "transformer.h.0.mlp"
    assert resolve_module_path(lm, "transformer.h.0.mlp") == "transformer.h.0.mlp"


def test_unknown_path_lists_close_matches(gpt2, llama):
    with pytest.raises(UnknownHookError) as e:
        resolve_module_path(gpt2, "h.0.mpl")
    msg = str(e.value)
    assert "\n" not in msg and "'h.0.mpl'" in msg and "GPT2Model" in msg and "no task head" in msg
    close = msg.split("close matches: ")[1].split(", ")
    assert close[0] == "h.0.mlp" and len(close) <= 5
    with pytest.raises(UnknownHookError, match=r"close matches: layers\.0\.mlp"):
        resolve_module_path(llama, "model.layers.0.mpl")
    with pytest.raises(UnknownHookError, match=r"top-level modules: wte, wpe, drop, h, ln_f$"):
        resolve_module_path(gpt2, "zzzzzzzzzzzz")


# -- probe: widths, order, values -------------------------------------------------------------------


def test_probe_widths_and_firing_order(gpt2):
    requests = [
        ("module:h.1.mlp", "h.1.mlp", "output"),
        ("module:h.0.mlp.c_fc", "transformer.h.0.mlp.c_fc", "output"),
        ("module:h.0.mlp.c_fc:input", "h.0.mlp.c_fc", "input"),
        ("module:h.0.mlp:input", "h.0.mlp", "input"),
        ("module:h.0.attn", "h.0.attn", "output"),  # returns (hidden, weights): the first element is taken
        ("module:ln_f", "ln_f", "output"),
    ]
    got = probe_modules(gpt2, requests, _ids())
    assert got == {
        "module:h.0.attn": (D, 0),
        "module:h.0.mlp:input": (D, 1),
        "module:h.0.mlp.c_fc:input": (D, 2),
        "module:h.0.mlp.c_fc": (4 * D, 3),
        "module:h.1.mlp": (D, 4),
        "module:ln_f": (D, 5),
    }


def _direct(model: torch.nn.Module, module: torch.nn.Module, inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    # An independent capture: the module's own first argument and return value, from a plain forward.
    seen: dict[str, torch.Tensor] = {}

    def hook(mod, args, out):
        seen["in"], seen["out"] = args[0].detach().clone(), (out[0] if isinstance(out, tuple) else out).detach().clone()

    handle = module.register_forward_hook(hook)
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        handle.remove()
    return seen["in"], seen["out"]


@pytest.mark.parametrize("family, path, width", [
    ("gpt2", "h.0.mlp.c_fc", 4 * D), ("gpt2", "h.1.attn", D), ("llama", "layers.1.mlp.down_proj", D), ("llama", "layers.0.mlp.gate_proj", 3 * D),
    ("bert", "encoder.layer.0.intermediate", 4 * D),
])
def test_probe_captures_the_modules_own_tensors(request, family, path, width):
    model = request.getfixturevalue(family)
    inputs = _ids(batch=3, seq=6)
    captured: dict[str, torch.Tensor] = {}
    hooks = [(module_hook_name(path), path, "output"), (module_hook_name(path, "input"), path, "input")]
    got = probe_modules(model, hooks, inputs, sink=lambda h, t: captured.__setitem__(h, t.clone()))
    want_in, want_out = _direct(model, model.get_submodule(path), inputs)
    assert got[module_hook_name(path)][0] == width == want_out.shape[-1]
    assert got[module_hook_name(path, "input")] == (want_in.shape[-1], 0)
    assert captured[module_hook_name(path)].shape == (3, 6, width)
    torch.testing.assert_close(captured[module_hook_name(path)], want_out, rtol=0, atol=0)
    torch.testing.assert_close(captured[module_hook_name(path, "input")], want_in, rtol=0, atol=0)
    assert not model.get_submodule(path)._forward_hooks and not model.get_submodule(path)._forward_pre_hooks  # hooks removed


def test_probe_repeats_a_single_row(gpt2):
    # [1, seq] inputs are run as two rows, so position embeddings broadcast over the batch are caught.
    assert probe_modules(gpt2, [("module:h.0.mlp", "h.0.mlp", "output")], _ids(batch=1, seq=5)) == {"module:h.0.mlp": (D, 0)}
    with pytest.raises(SpecError, match=r"^module:wpe returns Tensor\[1, 5, 32\], which is not \[batch, seq, d\] = \[2, 5, d\]"):
        probe_modules(gpt2, [("module:wpe", "wpe", "output")], _ids(batch=1, seq=5))


# -- probe: refusals --------------------------------------------------------------------------------


def test_probe_refuses_a_tuple_of_wrong_shapes(llama):
    with pytest.raises(SpecError) as e:
        probe_modules(llama, [("module:layers.0.mlp", "layers.0.mlp", "output"), ("module:rotary_emb", "model.rotary_emb", "output")], _ids(2, 7))
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith("module:rotary_emb returns a tuple (Tensor[1, 7, 8], Tensor[1, 7, 8]), whose first element is not "
                          "[batch, seq, d] = [2, 7, d]")
    assert msg.endswith("take a submodule whose output is one tensor")


def test_probe_refuses_broadcast_position_embeddings(gpt2):
    with pytest.raises(SpecError, match=r"module:wpe returns Tensor\[1, 7, 32\], which is not \[batch, seq, d\] = \[2, 7, d\].*one row per token$"):
        probe_modules(gpt2, [("module:wpe", "wpe", "output")], _ids(2, 7))


def test_probe_refuses_a_pooled_output(bert):
    with pytest.raises(SpecError, match=r"^module:pooler returns Tensor\[2, 32\], which is not"):
        probe_modules(bert, [("module:pooler", "bert.pooler", "output")], _ids(2, 7))


def test_probe_refuses_an_unknown_path_before_running(gpt2):
    with pytest.raises(UnknownHookError, match="close matches: h.0.mlp"):
        probe_modules(gpt2, [("module:h.0.mpl", "h.0.mpl", "output")], _ids())
    assert not any(m._forward_hooks for m in gpt2.modules())


class _Toy(torch.nn.Module):
    """A model with a module its forward never calls, one it calls twice, and one returning ints."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(50, 8)
        self.shared = torch.nn.Linear(8, 8)
        self.unused = torch.nn.Linear(8, 8)
        self.argmax = _Argmax()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(input_ids)
        self.argmax(x)
        return self.shared(self.shared(x))


class _Argmax(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.argmax(-1, keepdim=True)


def test_probe_refuses_unreached_shared_and_integer_modules():
    toy = _Toy().eval()
    ids = {"input_ids": torch.randint(0, 50, (2, 4))}
    assert probe_modules(toy, [("e", "embed", "output")], ids) == {"e": (8, 0)}
    with pytest.raises(SpecError, match=r"^hook u: the model's forward never runs this module"):
        probe_modules(toy, [("e", "embed", "output"), ("u", "unused", "output")], ids)
    with pytest.raises(SpecError, match=r"^hook s \(2 times\): the module runs more than once"):
        probe_modules(toy, [("s", "shared", "output")], ids)
    with pytest.raises(SpecError, match=r"^a returns Tensor\[2, 4, 1\] of int64, which is not"):
        probe_modules(toy, [("a", "argmax", "output")], ids)
    with pytest.raises(SpecError, match="requested twice"):
        probe_modules(toy, [("e", "embed", "output"), ("e", "embed", "input")], ids)
    with pytest.raises(ValueError, match="input_ids"):
        probe_modules(toy, [("e", "embed", "output")], {"x": torch.zeros(2, 4)})


def test_what_a_hook_reads():
    a, b = torch.ones(1, 2, 3), torch.zeros(1, 2, 3)
    assert module_input((a, b), {"hidden_states": b}) is a
    assert module_input((), {"mask": None, "hidden_states": b, "x": a}) is b
    assert module_input((), {"mask": None, "x": a}) is a
    assert module_input((), {"mask": None}) is None
    assert module_tensor(a) is a and module_tensor((b, a)) is b and module_tensor([b]) is b
    assert module_tensor(BaseModelOutput(last_hidden_state=a)) is a
    assert module_tensor((None, a)) is None and module_tensor(()) is None and module_tensor(None) is None


# -- byte budget ------------------------------------------------------------------------------------


def test_check_bytes_per_token():
    widths = {"blocks.0.hook_resid_post": 32, "module:h.0.mlp.c_fc": 128, "blocks.1.mlp.hook_post": 128}
    check_bytes_per_token(widths, 4, 288 * 4)  # exactly the budget passes
    check_bytes_per_token({}, 4, 1)
    with pytest.raises(SpecError) as e:
        check_bytes_per_token(widths, 4, 288 * 4 - 1)
    assert str(e.value) == (
        "hooks module:h.0.mlp.c_fc 512 B, blocks.1.mlp.hook_post 512 B, blocks.0.hook_resid_post 128 B store 1,152 bytes a token "
        "(4 bytes a value), over `max_bytes_per_token` = 1,151; take fewer or narrower hooks, or raise `max_bytes_per_token`"
    )
    many = {f"blocks.{i}.hook_resid_post": 10 for i in range(12)}
    with pytest.raises(SpecError, match=r"blocks\.9\.hook_resid_post 20 B and 2 more store 240 bytes a token \(2 bytes a value\)"):
        check_bytes_per_token(many, 2, 239)
    with pytest.raises(SpecError, match="must be a positive"):
        check_bytes_per_token(widths, 4, 0)
