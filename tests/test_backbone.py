"""The LLM backbone: the thought token and the prompt layout, pooling by hand, extraction
(order, padding and prefix sharing change nothing), and clear errors for bad model paths."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from reaemb.backbone import (
    THOUGHT_TOKEN,
    BackboneConfig,
    BackboneError,
    build_prompt_ids,
    collate,
    common_prefix_length,
    encode_prompts,
    extract_embeddings,
    forward_shared_prefix,
    last_hidden_state,
    load_backbone,
    pool,
    position_ids_from_mask,
)

TEXTS = [
    "title is Toy Story; year is 1995; genres is Animation, Children's, Comedy",
    "title is GoldenEye; year is 1995; genres is Action, Adventure, Thriller",
    "title is Four Rooms; year is 1995; genres is Thriller",
    "title is Get Shorty; year is 1995; genres is Action, Comedy, Drama",
    "title is Copycat",
]


# --------------------------------------------------------------------------- prompt


def test_thought_token_is_one_new_special_token(make_tiny_backbone):
    bb = make_tiny_backbone()
    tok = bb.tokenizer
    assert tok.convert_ids_to_tokens(bb.thought_id) == THOUGHT_TOKEN
    assert tok(THOUGHT_TOKEN, add_special_tokens=False)["input_ids"] == [bb.thought_id]
    # The embedding matrix has a row for it, initialised to the mean of the other rows.
    emb = bb.model.get_input_embeddings().weight
    assert emb.shape[0] > bb.thought_id
    torch.testing.assert_close(emb[bb.thought_id], emb[: bb.thought_id].mean(0))


@pytest.mark.parametrize("side", ["left", "right"])
def test_thought_is_second_to_last_real_token_then_eos(make_tiny_backbone, side):
    bb = make_tiny_backbone()
    prompts = [bb.prompt_ids(t) for t in TEXTS]
    assert len({len(p) for p in prompts}) > 1  # the batch really pads
    ids, mask = collate(prompts, bb.pad_id, side)
    for row, prompt in enumerate(prompts):
        real = ids[row][mask[row].bool()].tolist()
        assert real == prompt
        assert real[-2] == bb.thought_id and real[-1] == bb.eos_id
        assert real.count(bb.thought_id) == 1
        pad_cols = (~mask[row].bool()).nonzero().flatten().tolist()
        n_pad = ids.shape[1] - len(prompt)
        expected = list(range(n_pad)) if side == "left" else list(range(len(prompt), ids.shape[1]))
        assert pad_cols == expected
    text = bb.tokenizer.decode(prompts[0])
    assert text.endswith(f"<|im_start|>assistant\n{THOUGHT_TOKEN}<|im_end|>")
    assert "Please provide the item description. The item information is: title is Toy Story" in text


def test_long_attribute_text_is_cut_not_the_template(make_tiny_backbone):
    bb = make_tiny_backbone()
    ids = build_prompt_ids(bb.tokenizer, "title is " + "word " * 500, bb.thought_id, bb.eos_id, max_length=80)
    assert len(ids) <= 80 and ids[-2:] == [bb.thought_id, bb.eos_id]


# --------------------------------------------------------------------------- pooling, positions


def test_pool_by_hand():
    h = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [9.0, 9.0]], [[9.0, 9.0], [5.0, 6.0], [7.0, 10.0]]])
    right = torch.tensor([[1, 1, 0], [0, 1, 1]])  # row 0 right-padded, row 1 left-padded
    torch.testing.assert_close(pool(h, right, "mean"), torch.tensor([[2.0, 3.0], [6.0, 8.0]]))
    torch.testing.assert_close(pool(h, right, "last"), torch.tensor([[3.0, 4.0], [7.0, 10.0]]))
    with pytest.raises(ValueError):
        pool(h, right, "max")


def test_positions_count_real_tokens_only():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 0, 0, 1]])
    assert position_ids_from_mask(mask)[:, :].tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 2, 2], [0, 1, 1, 1, 2]]


def test_common_prefix_length():
    assert common_prefix_length([[1, 2, 3, 4], [1, 2, 3, 5, 6], [1, 2, 7]]) == 2
    assert common_prefix_length([[1, 2, 3], [1, 2, 3, 4]], keep=1) == 2  # each keeps one token
    assert common_prefix_length([[1, 2, 3], [1, 2, 3, 4]], keep=2) == 1
    assert common_prefix_length([[5, 1], [6, 1]]) == 0


# --------------------------------------------------------------------------- extraction


def test_extraction_keeps_order_and_matches_one_by_one(make_tiny_backbone):
    """Length sorting, batching, padding side and the shared prefix change no embedding."""
    bb = make_tiny_backbone()
    with torch.no_grad():
        singles = torch.cat([
            pool(last_hidden_state(bb.model, ids, torch.ones_like(ids)), torch.ones_like(ids))
            for ids in (torch.tensor([bb.prompt_ids(t)]) for t in TEXTS)
        ])
    for share in (True, False):
        for side in ("left", "right"):
            bb_side = type(bb)(bb.model, bb.tokenizer, bb.thought_id, bb.eos_id, bb.pad_id,
                               BackboneConfig(model="tiny", padding_side=side), bb.source)
            got = extract_embeddings(bb_side, TEXTS, batch_size=2, progress=False, share_prefix=share)
            torch.testing.assert_close(got, singles, atol=1e-5, rtol=1e-4)


def test_shared_prefix_forward_equals_plain_forward_in_outputs_and_gradients(make_tiny_backbone):
    bb = make_tiny_backbone()
    prompts = [bb.prompt_ids(t) for t in TEXTS[:3]]
    assert common_prefix_length(prompts) > 10
    params = [p for p in bb.model.parameters()]
    outs = []
    for share in (True, False):
        emb = encode_prompts(bb.model, prompts, bb.pad_id, "mean", "left", share_prefix=share)
        grads = torch.autograd.grad((emb ** 2).sum(), params, allow_unused=True)
        outs.append((emb, grads))
    (a, ga), (b, gb) = outs
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    n_checked = 0
    for x, y in zip(ga, gb, strict=True):
        if x is None or y is None:
            assert x is None and y is None
            continue
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-4)
        n_checked += 1
    assert n_checked > 10


def test_shared_prefix_layout(make_tiny_backbone):
    bb = make_tiny_backbone()
    prompts = [[1, 2, 3, 4, 5], [1, 2, 3, 9], [1, 2, 3, 7, 8, 6]]
    states = forward_shared_prefix(bb.model, prompts, bb.pad_id)
    assert states.shared == 3
    # [shared | left padding | rest]: real tokens of row 1 are columns 0-2 and the last one.
    assert states.attention_mask.tolist() == [[1, 1, 1, 0, 1, 1], [1, 1, 1, 0, 0, 1], [1, 1, 1, 1, 1, 1]]
    assert states.positions[1].tolist()[-1] == 3 and states.positions[2].tolist() == [0, 1, 2, 3, 4, 5]
    assert len(states.kv) == 2 and states.kv[0][0].shape[2] == 6


def test_extraction_rejects_two_hooks(make_tiny_backbone):
    bb = make_tiny_backbone()
    with pytest.raises(ValueError):
        extract_embeddings(bb, TEXTS, encode=lambda i, m: i, encode_batch=lambda p: p, progress=False)
    with pytest.raises(ValueError):
        extract_embeddings(bb, [], progress=False)


# --------------------------------------------------------------------------- loading errors


def _load_error(path) -> str:
    with pytest.raises(BackboneError) as err:
        load_backbone(BackboneConfig(model=str(path), cache_dir=str(path.parent / "cache")))
    return str(err.value)


def test_missing_model_folder(tmp_path):
    path = tmp_path / "no-such-model"
    assert str(path) in _load_error(path)


def test_folder_with_garbage_config(tmp_path):
    path = tmp_path / "garbage"
    path.mkdir()
    (path / "config.json").write_text("{this is not json")
    assert str(path) in _load_error(path)


def test_folder_without_config(tmp_path):
    path = tmp_path / "empty"
    path.mkdir()
    message = _load_error(path)
    assert str(path) in message and "config.json" in message


def test_corrupt_gguf(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    assert str(path) in _load_error(path)
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(b"GGUF\x03\x00\x00\x00garbage")
    assert str(truncated) in _load_error(truncated)


def test_missing_gguf(tmp_path):
    path = tmp_path / "absent.gguf"
    assert str(path) in _load_error(path)


def test_bad_config_values():
    with pytest.raises(ValueError):
        BackboneConfig(pooling="max")
    with pytest.raises(ValueError):
        BackboneConfig(padding_side="middle")
    with pytest.raises(ValueError):
        BackboneConfig(dtype="float16")


# --------------------------------------------------------------------------- the real model


def test_real_smollm2_prompt_layout(smollm2):
    ids = smollm2.prompt_ids(TEXTS[0])
    assert ids[-2:] == [smollm2.thought_id, smollm2.eos_id]
    assert smollm2.tokenizer.convert_ids_to_tokens(smollm2.eos_id) == "<|im_end|>"
    assert smollm2.hidden_size == 576
    assert next(smollm2.model.parameters()).dtype == torch.float32  # CPU: fp32
