"""Votes of models in half precision and of models spread over devices.

- bf16/fp16: the tiled path votes in the model's dtype with float32 accumulation; against the
  float32 model its majority signs agree on most coordinates (measured, not equal);
- ``accelerate``'s device hooks (what ``from_pretrained(device_map=...)`` puts on modules) keep a
  module covered by its rule, and the votes equal the loop's; with two CUDA devices, a Llama
  split over both votes as the loop does, each layer's gradients on its own device.
"""

from __future__ import annotations

import pytest
import torch
from test_tiles import TiledSink, lm_loss, tiny_llama
from torch import Tensor, nn

from gradfix import estimate_signs
from gradfix.ops.signs import majority_sign
from gradfix.votes.hooks import hook_gradients, hooked_parameters
from gradfix.votes.layers import covering_rule, moves_devices_only

pytestmark = pytest.mark.usefixtures("one_thread")


def _batch(seed: int = 0, samples: int = 8, tokens: int = 16) -> dict[str, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(0, 61, (samples, tokens), generator=gen)}


def _tiled_votes(model: nn.Module, batch: dict[str, Tensor]) -> dict[str, Tensor]:
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    sink = TiledSink(params, budget=2**22)
    hook_gradients(model, params, batch, lm_loss, sink, hooked_parameters(model, params))
    return {n: sink.counts[n] for n in sink.linear}


@pytest.mark.parametrize(("dtype", "floor"), [(torch.bfloat16, 0.97), (torch.float16, 0.99)])
def test_half_precision_votes_agree_with_float32(dtype: torch.dtype, floor: float) -> None:
    batch = _batch()
    full = _tiled_votes(tiny_llama(0), batch)
    half = _tiled_votes(tiny_llama(0, dtype), batch)
    assert set(half) == set(full)
    same = sum(int(majority_sign(full[n]).eq(majority_sign(half[n])).sum()) for n in full)
    total = sum(t.numel() for t in full.values())
    assert floor <= same / total < 1.0  # close, not equal: the model itself is rounded


def _hooked_copy(seed: int) -> nn.Module:
    """A tiny Llama whose linear layers carry ``accelerate``'s device hook (execution on the CPU)."""
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module

    model = tiny_llama(seed)
    for module in model.modules():
        if isinstance(module, nn.Linear):
            add_hook_to_module(module, AlignDevicesHook(execution_device="cpu", io_same_device=True))
    return model


def test_device_hooks_keep_modules_covered_and_votes_equal_the_loop() -> None:
    model = _hooked_copy(2)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert linears and all("forward" in vars(m) and moves_devices_only(m) for m in linears)
    assert all(covering_rule(m) is not None for m in linears)
    replaced = nn.Linear(3, 3)
    replaced.forward = lambda x: x  # type: ignore[method-assign]
    assert covering_rule(replaced) is None and not moves_devices_only(replaced)
    batch = _batch(1, samples=4, tokens=7)
    hooks = estimate_signs(model, [batch], lm_loss, engine="hooks", progress=False)
    loop = estimate_signs(model, [batch], lm_loss, engine="loop", progress=False)
    for name, counts in loop.counts.items():
        assert torch.equal(hooks.counts[name], counts), name
        assert hooks.counts[name].device.type == "cpu"  # votes are returned on the CPU


two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")


@two_gpus
def test_a_llama_over_two_gpus_votes_as_the_loop(tmp_path) -> None:
    from transformers import LlamaForCausalLM

    tiny_llama(3).save_pretrained(tmp_path / "m")
    device_map = {
        "model.embed_tokens": 0,
        "model.rotary_emb": 0,
        "model.layers.0": 0,
        "model.layers.1": 1,
        "model.norm": 1,
        "lm_head": 1,
    }
    model = LlamaForCausalLM.from_pretrained(tmp_path / "m", device_map=device_map, dtype=torch.float32)
    model.eval()
    devices = {n: p.device for n, p in model.named_parameters()}
    assert {d.index for d in devices.values()} == {0, 1}
    batch = {"input_ids": _batch(2, samples=4, tokens=9)["input_ids"].to("cuda:0")}
    seen: dict[str, torch.device] = {}

    class Recording(TiledSink):
        def add_linear(self, name: str, x: Tensor, grad_out: Tensor) -> bool:
            seen[name] = grad_out.device
            return super().add_linear(name, x.to(grad_out.device), grad_out)

    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    sink = Recording(params, budget=2**20)
    hook_gradients(model, params, batch, lm_loss, sink, hooked_parameters(model, params))
    assert seen and all(seen[n] == devices[n] for n in seen)  # gradients beside their parameters
    assert all(sink.counts[n].device == devices[n] for n in sink.counts)
    loop = estimate_signs(model, [batch], lm_loss, engine="loop", progress=False)
    votes = estimate_signs(model, [batch], lm_loss, engine="auto", progress=False)
    for name in seen:  # float rounding on a GPU may flip a sign that is zero up to rounding
        want = loop.counts[name]
        assert float(want.eq(sink.counts[name].cpu().to(want.dtype)).float().mean()) > 0.999, name
        assert float(want.eq(votes.counts[name]).float().mean()) > 0.999, name
