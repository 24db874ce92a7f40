"""The cached two-pass forward equals the full second pass (tiny random Llama, left and
right padding), in outputs and in the gradients of the thought module and the LLM."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from reaemb.thought import ThoughtAttention, ThoughtConfig, thought_forward

T, E = 48, 49  # ids of <|Thought|> and EOS in the toy vocabulary


def _model():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval(), ThoughtAttention(ThoughtConfig(hidden_size=32))


@pytest.mark.parametrize("side", ["left", "right"])
def test_cached_two_pass_equals_full_two_pass(side):
    model, module = _model()
    rows = [[5, 6, 7, T, E], [3, 4, 5, 6, 7, 8, T, E]]
    width = max(map(len, rows))
    pad = [[0] * (width - len(r)) for r in rows]
    ids = torch.tensor([p + r if side == "left" else r + p for p, r in zip(pad, rows, strict=True)])
    mask = torch.tensor([[0] * len(p) + [1] * len(r) if side == "left" else [1] * len(r) + [0] * len(p)
                         for p, r in zip(pad, rows, strict=True)])
    noise = 0.1 * torch.randn(2, 32)
    params = list(module.parameters()) + list(model.parameters())
    outs = []
    for use_cache in (True, False):
        out = thought_forward(model, module, ids, mask, thought_id=T, thought_noise=noise, use_cache=use_cache)
        grads = torch.autograd.grad((out.embedding ** 2).sum(), params, allow_unused=True)
        outs.append((out, grads))
    (a, ga), (b, gb) = outs
    torch.testing.assert_close(a.embedding, b.embedding, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(a.thought, b.thought, atol=1e-6, rtol=1e-5)
    for x, y in zip(ga, gb, strict=True):
        if x is None or y is None:
            assert x is None and y is None
        else:
            torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-4)
    assert any(g is not None and g.abs().sum() > 0 for g in ga[: len(list(module.parameters()))])


def test_every_prompt_must_end_with_thought_then_eos():
    model, module = _model()
    ids = torch.tensor([[5, 6, 7, E, T]])
    with pytest.raises(ValueError):
        thought_forward(model, module, ids, torch.ones_like(ids), thought_id=T)
