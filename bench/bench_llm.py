"""Benchmark of the LLM item-embedding stage (ratios measured in one invocation).

1. Catalogue extraction, items/s, at identical embeddings:
   * ``naive``: what one writes first — batches in catalogue order, right-padded to the
     longest prompt of the batch, the full causal LM forward (LM head and all layers'
     hidden states computed, ``output_hidden_states=True``), mean of the last hidden layer
     over non-padding tokens, under ``torch.no_grad``;
   * ``sorted``: :func:`reaemb.backbone.extract_embeddings` with ``share_prefix=False``
     (length-sorted batches, decoder body only, ``inference_mode``);
   * ``ours``: the default (the same, plus the prompts' common prefix run once per batch).
   Embeddings are checked equal (allclose) before the timed runs. Target: ours / naive >= 1.3.
2. Training step time, LRCL vs SCFT (same batch, both with the library defaults), median of
   the steps after a warm-up step. Target: LRCL / SCFT <= 1.1 (METHOD.md's ideal two-pass
   cost would be ~4/3). ``--compare-share`` also times both with ``share_prefix=False``.
3. Peak memory of each phase: CUDA max allocated on GPU; on CPU the peak resident set size
   above the phase's starting RSS (sampled every 5 ms).

    python bench/bench_llm.py [--items 192] [--train-batch 8] [--steps 4] [--model PATH]
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import numpy as np
import psutil
import torch

from reaemb.backbone import (
    BackboneConfig,
    catalogue_texts,
    collate,
    extract_embeddings,
    load_backbone,
    pool,
)
from reaemb.data import DataConfig, prepare
from reaemb.lrcl import LRCLConfig, build_encoder, build_optimizer, training_step
from reaemb.text import augmented_item_text


def release_memory() -> None:
    """Return freed heap memory to the OS, so that each phase's peak RSS starts clean."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc
        pass


@contextmanager
def peak_memory(device: torch.device, out: dict, key: str):
    """Record the phase's peak memory in MiB into ``out[key]`` (the max over repeats): CUDA
    max allocated, or on CPU the peak RSS above the RSS at the phase's start."""
    release_memory()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        yield
        torch.cuda.synchronize()
        out[key] = max(out.get(key, 0.0), torch.cuda.max_memory_allocated() / 2**20)
        return
    proc = psutil.Process()
    start = proc.memory_info().rss
    peak = [start]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.005)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        value = (max(peak[0], proc.memory_info().rss) - start) / 2**20
        out[key] = max(out.get(key, 0.0), value)


def naive_extract(backbone, texts: list[str], batch_size: int) -> torch.Tensor:
    """The first loop one writes: catalogue order, right padding, full causal LM forward."""
    model, device = backbone.model, backbone.device
    rows = []
    with torch.no_grad():
        for start in range(0, len(texts), batch_size):
            prompts = [backbone.prompt_ids(t) for t in texts[start : start + batch_size]]
            ids, mask = collate(prompts, backbone.pad_id, "right")
            ids, mask = ids.to(device), mask.to(device)
            out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
            rows.append(pool(out.hidden_states[-1], mask, "mean").float().cpu())
    return torch.cat(rows)


def check_same(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype, what: str) -> float:
    """Max absolute difference relative to the largest magnitude; raise if above tolerance."""
    rel = float((a - b).abs().max() / b.abs().max())
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    if not rel <= tol:
        raise AssertionError(f"{what}: embeddings differ (max relative difference {rel:.2e} > {tol:.0e})")
    return rel


def rotated(names: list[str], shift: int) -> list[str]:
    """``names`` started at position ``shift`` (each method goes first in turn)."""
    k = shift % len(names)
    return names[k:] + names[:k]


def step_prompts(backbone, attributes: list[dict], n_items: int, batch: int, step: int) -> list[list[int]]:
    """Two augmented views of ``batch`` random items (the same for every method at a step)."""
    rng = np.random.default_rng([0, step])
    items = (rng.choice(n_items, size=batch, replace=False) + 1).tolist()
    return [backbone.prompt_ids(augmented_item_text(attributes[i], seed=step, item=i, view=v))
            for v in (0, 1) for i in items]


def interleaved_steps(model: str | None, attributes: list[dict], configs: dict[str, LRCLConfig], steps: int,
                      mem: dict) -> dict[str, float]:
    """Median step seconds per method: one encoder per method (each on a fresh backbone), steps
    taken in turn (method order rotating), the first step of each (warm-up, where peak memory
    is measured) not timed."""
    trainers = {}
    for name, config in configs.items():
        backbone = load_backbone(BackboneConfig(model=model))
        encoder = build_encoder(backbone, config).train()
        trainers[name] = (backbone, encoder, build_optimizer(encoder, config), config)
    n_items = len(attributes) - 1
    times: dict[str, list[float]] = {name: [] for name in configs}
    for step in range(steps):
        for name in rotated(list(configs), step):
            backbone, encoder, optimizer, config = trainers[name]
            prompts = step_prompts(backbone, attributes, n_items, config.batch_size, step)
            if step == 0:
                with peak_memory(backbone.device, mem, f"train_{name}"):
                    training_step(encoder, encoder, optimizer, prompts, config)
                continue
            t0 = time.perf_counter()
            training_step(encoder, encoder, optimizer, prompts, config)
            if backbone.device.type == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - t0)
    return {name: float(np.median(t)) for name, t in times.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="ml-100k")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--model", default=None, help="None: the embedded SmolLM2-135M-Instruct")
    parser.add_argument("--items", type=int, default=192, help="catalogue items embedded per method")
    parser.add_argument("--batch-size", type=int, default=32, help="extraction batch size")
    parser.add_argument("--train-batch", type=int, default=8, help="items per training step (x2 views)")
    parser.add_argument("--steps", type=int, default=3, help="timed training steps per method (after a warm-up step)")
    parser.add_argument("--rounds", type=int, default=2, help="extraction repeats per method (best is kept)")
    parser.add_argument("--compare-share", action="store_true", help="also time training without share_prefix")
    parser.add_argument("--json", default=None, help="also write the numbers to this JSON file")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="bench-llm-") as tmp:
        ds = prepare(DataConfig(dataset=args.dataset, data_dir=args.data_dir), data_root=Path(tmp))
        return run(args, ds)


def measure_extraction(args: argparse.Namespace, ds, mem: dict) -> tuple[dict[str, float], int, float]:
    """Best seconds per extraction method, the number of items, the max relative difference."""
    backbone = load_backbone(BackboneConfig(model=args.model))
    device, dtype = backbone.device, next(backbone.model.parameters()).dtype
    texts = catalogue_texts(ds)[: args.items]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {device}, {dtype}; "
          f"{backbone.source}; {ds.name}: {len(texts)} items, extraction batch {args.batch_size}", flush=True)

    # Correctness first, on a small slice: the three methods give the same embeddings.
    probe = texts[: min(48, len(texts))]
    ref = naive_extract(backbone, probe, args.batch_size)
    for share in (False, True):
        got = extract_embeddings(backbone, probe, args.batch_size, progress=False, share_prefix=share)
        check_same(got, ref, dtype, f"share_prefix={share}")
    print(f"embeddings equal on {len(probe)} items (naive vs sorted vs shared prefix)", flush=True)

    runs = {
        "naive": lambda: naive_extract(backbone, texts, args.batch_size),
        "sorted": lambda: extract_embeddings(backbone, texts, args.batch_size, progress=False, share_prefix=False),
        "ours": lambda: extract_embeddings(backbone, texts, args.batch_size, progress=False, share_prefix=True),
    }
    tables: dict[str, torch.Tensor] = {}
    seconds: dict[str, float] = {}
    for round_ in range(args.rounds):
        for name in rotated(list(runs), round_):
            with peak_memory(device, mem, f"extract_{name}"):
                t0 = time.perf_counter()
                tables[name] = runs[name]()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                took = time.perf_counter() - t0
            seconds[name] = min(seconds.get(name, float("inf")), took)
            print(f"  round {round_ + 1} extraction {name:6s}: {len(texts) / took:7.2f} items/s", flush=True)
    rel = max(check_same(tables[n], tables["naive"], dtype, n) for n in ("sorted", "ours"))
    for name in runs:
        print(f"extraction {name:6s}: {len(texts) / seconds[name]:7.2f} items/s (best of {args.rounds}), "
              f"peak +{mem[f'extract_{name}']:.0f} MiB")
    return seconds, len(texts), rel


def run(args: argparse.Namespace, ds) -> int:
    """The measurements (see the module docstring)."""
    mem: dict[str, float] = {}
    seconds, n_texts, rel = measure_extraction(args, ds, mem)
    release_memory()

    base = LRCLConfig(batch_size=args.train_batch, checkpoint_every=0)
    configs = {"scft": replace(base, method="scft"), "lrcl": replace(base, method="lrcl")}
    if args.compare_share:
        configs.update({"scft_noshare": replace(base, method="scft", share_prefix=False),
                        "lrcl_noshare": replace(base, method="lrcl", share_prefix=False)})
    steps = interleaved_steps(args.model, ds.item_attributes, configs, args.steps + 1, mem)
    for key, value in steps.items():
        print(f"training step {key:12s}: {value:6.2f} s (median of {args.steps}; {args.train_batch} items x 2 views), "
              f"peak +{mem[f'train_{key}']:.0f} MiB")

    ratios = {
        "extraction_ours_over_naive": seconds["naive"] / seconds["ours"],
        "extraction_sorted_over_naive": seconds["naive"] / seconds["sorted"],
        "step_lrcl_over_scft": steps["lrcl"] / steps["scft"],
    }
    if args.compare_share:
        ratios["step_scft_noshare_over_share"] = steps["scft_noshare"] / steps["scft"]
        ratios["step_lrcl_noshare_over_share"] = steps["lrcl_noshare"] / steps["lrcl"]
        ratios["step_lrcl_over_scft_noshare"] = steps["lrcl_noshare"] / steps["scft_noshare"]
    print(f"max relative embedding difference vs naive: {rel:.1e}")
    print(f"extraction speed-up ours / naive  : {ratios['extraction_ours_over_naive']:.2f}x (target >= 1.3)")
    print(f"extraction speed-up sorted / naive: {ratios['extraction_sorted_over_naive']:.2f}x")
    print(f"step time LRCL / SCFT             : {ratios['step_lrcl_over_scft']:.2f}x (target <= 1.1)")
    for key in ("step_scft_noshare_over_share", "step_lrcl_noshare_over_share", "step_lrcl_over_scft_noshare"):
        if key in ratios:
            print(f"{key:34s}: {ratios[key]:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps({"items_per_second": {k: n_texts / v for k, v in seconds.items()},
                                               "step_seconds": steps, "peak_mib": mem, "ratios": ratios}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
