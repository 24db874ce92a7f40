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


def test_shared_prefix_lrcl_encoder_equals_full_two_pass():
    """The LRCL encoder's shared-prefix path (common prompt prefix run once per batch) gives
    the outputs and gradients of the method's full two-pass forward."""
    from reaemb.lrcl import ItemEncoder

    model, module = _model()
    prompts = [[1, 2, 3, 4, 5, 6, 7, T, E], [1, 2, 3, 4, 9, T, E], [1, 2, 3, 4, 8, 8, 8, 10, 11, T, E]]
    width = max(map(len, prompts))
    ids = torch.tensor([p + [0] * (width - len(p)) for p in prompts])
    mask = torch.tensor([[1] * len(p) + [0] * (width - len(p)) for p in prompts])
    encoder = ItemEncoder(model, module, T, pad_id=0, share_prefix=True).eval()
    params = list(module.parameters()) + list(model.parameters())
    a = encoder(prompts=prompts)
    ga = torch.autograd.grad((a ** 2).sum(), params, allow_unused=True)
    b = thought_forward(model, module, ids, mask, thought_id=T, use_cache=False).embedding
    gb = torch.autograd.grad((b ** 2).sum(), params, allow_unused=True)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    for x, y in zip(ga, gb, strict=True):
        if x is None or y is None:
            assert x is None and y is None
        else:
            torch.testing.assert_close(x, y, atol=1e-4, rtol=1e-3)
    with pytest.raises(ValueError):
        encoder(prompts=[[1, 2, 3, E, T], [1, 2, 4, T, E]])


def test_thought_module_takes_bf16_states():
    model, module = _model()
    model = model.to(torch.bfloat16)
    ids = torch.tensor([[5, 6, 7, T, E], [3, 4, 5, T, E]])
    out = thought_forward(model, module, ids, torch.ones_like(ids), thought_id=T)
    assert out.embedding.dtype == torch.bfloat16 and torch.isfinite(out.embedding.float()).all()


def test_real_smollm2_cached_two_pass_equals_full(smollm2):
    """On the embedded SmolLM2 (outputs only, two short prompts): the cached two-pass, the
    shared-prefix encoder and the full two-pass agree."""
    from reaemb.backbone import collate, last_hidden_state
    from reaemb.lrcl import ItemEncoder

    torch.manual_seed(0)
    module = ThoughtAttention(ThoughtConfig(smollm2.hidden_size))
    prompts = [smollm2.prompt_ids("title is Toy Story; year is 1995"), smollm2.prompt_ids("title is Heat")]
    ids, mask = collate(prompts, smollm2.pad_id, "left")
    with torch.no_grad():
        plain = last_hidden_state(smollm2.model, ids, mask)  # causal: its prefix part is pass 1's
        module.calibrate(smollm2.model.get_input_embeddings().weight[: smollm2.thought_id], plain[:, :-2], mask[:, :-2])
        full = thought_forward(smollm2.model, module, ids, mask, thought_id=smollm2.thought_id, use_cache=False)
        cached = thought_forward(smollm2.model, module, ids, mask, thought_id=smollm2.thought_id)
        shared = ItemEncoder(smollm2.model, module, smollm2.thought_id, pad_id=smollm2.pad_id).eval()(prompts=prompts)
    scale = float(full.embedding.abs().max())
    torch.testing.assert_close(cached.embedding, full.embedding, atol=1e-4 * scale, rtol=1e-4)
    torch.testing.assert_close(shared, full.embedding, atol=1e-4 * scale, rtol=1e-4)
    torch.testing.assert_close(cached.thought, full.thought, atol=1e-4, rtol=1e-4)
    # the injected thought really changes the embedding (it is not the plain forward)
    plain_mean = (plain * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True)
    assert float((plain_mean - full.embedding).abs().max()) > 1e-2 * scale
