"""Training and evaluating the sequential recommenders: the fit loop (early stopping on
validation NDCG@10, best state kept, checkpoint every epoch, exact resume) and the experiment
grid of notebook 04 (backbones x embedding variants x seeds -> ``metrics.csv``).

Determinism: every epoch starts by seeding torch from ``(seed, epoch)``; user order,
negatives, masks and dropout all follow from it. A run resumed from the checkpoint of epoch
``e`` therefore continues exactly as the uninterrupted run would (tested).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from .evaluation import (
    PROTOCOLS,
    EvalSet,
    build_eval_set,
    compute_ranks,
    metrics_table,
    rank_metrics,
)
from .srs import SequentialRecommender, SRSConfig, build_model, left_pad

__all__ = [
    "default_device",
    "training_windows",
    "length_buckets",
    "alignment_loss",
    "FitResult",
    "fit",
    "SRSRun",
    "train_and_evaluate",
    "default_workers",
    "run_grid",
]


def default_device() -> torch.device:
    """CUDA when present, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def training_windows(dataset, config: SRSConfig, objective: str) -> torch.Tensor:
    """Left-padded training sequences, one row per user: the last ``max_length + 1`` items of
    the training part for next-item BCE (inputs and shifted targets), the last ``max_length``
    for the masked-item objective."""
    width = config.max_length + (1 if objective == "bce" else 0)
    return left_pad(dataset.train_sequences(), width)


def alignment_loss(adapted: torch.Tensor, target: torch.Tensor, tau: float) -> torch.Tensor:
    """LLMEmb's alignment: InfoNCE between adapter outputs and the ID-SASRec embeddings of
    the same items (cosine similarity / ``tau``, the matching item is the positive)."""
    logits = F.normalize(adapted, dim=-1) @ F.normalize(target, dim=-1).T / tau
    return F.cross_entropy(logits, torch.arange(len(adapted), device=adapted.device))


def _epoch_seed(seed: int, epoch: int) -> int:
    return (seed * 1_000_003 + epoch * 7_919 + 17) % (2**63 - 1)


def length_buckets(lengths: torch.Tensor, batch_size: int, generator: torch.Generator, bucket: int = 8) -> list[torch.Tensor]:
    """Batches of row indices for one epoch: users in random order, cut into groups of
    ``bucket`` batches, each group sorted by length and cut into batches, then the batches
    shuffled. Similar lengths share a batch, so little time goes to padding."""
    order = torch.randperm(len(lengths), generator=generator)
    batches: list[torch.Tensor] = []
    span = batch_size * bucket
    for a in range(0, len(order), span):
        group = order[a : a + span]
        group = group[torch.argsort(lengths[group], descending=True, stable=True)]
        batches.extend(group[i : i + batch_size] for i in range(0, len(group), batch_size))
    return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]


def _trim(batch: torch.Tensor) -> torch.Tensor:
    """Drop the leading columns that are padding in every row (left padding)."""
    nonzero = (batch != 0).any(0)
    first = int(nonzero.float().argmax()) if nonzero.any() else batch.shape[1] - 1
    return batch[:, first:]


@dataclass
class FitResult:
    """What :func:`fit` reports. ``history`` has one dict per epoch: epoch, loss,
    valid (NDCG@10), train_seconds (the training pass), seconds (with validation)."""

    best_epoch: int
    best_valid: float
    epochs_run: int
    stopped_early: bool
    history: list[dict] = field(default_factory=list)

    @property
    def seconds(self) -> float:
        return float(sum(h["seconds"] for h in self.history))


def _valid_ndcg10(model, valid_set: EvalSet, config: SRSConfig, device) -> float:
    ranks = compute_ranks(model, valid_set, protocols=(config.valid_protocol,),
                          batch_size=config.eval_batch_size, device=device)[config.valid_protocol]
    return float(rank_metrics(ranks, 10)[1].mean())


def _state_tensors(model: torch.nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    # the frozen table is rebuilt from the embeddings file, never stored with the weights
    return {f"{prefix}{k}": v.detach().cpu().clone() for k, v in model.state_dict().items() if k != "items.frozen"}


def _load_state(model: torch.nn.Module, tensors: dict[str, torch.Tensor], prefix: str) -> None:
    state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or set(missing) - {"items.frozen"}:
        raise ValueError(f"checkpoint does not fit the model (missing {missing}, unexpected {unexpected})")


def fit(
    model: SequentialRecommender,
    dataset,
    *,
    valid_set: EvalSet | None = None,
    checkpoint_dir: str | Path | None = None,
    device: torch.device | str | None = None,
    align_target: torch.Tensor | None = None,
    progress: bool = True,
    stop_after: int | None = None,
) -> FitResult:
    """Train ``model`` on the training part of ``dataset`` with Adam, validating NDCG@10 after
    every epoch and stopping after ``config.patience`` epochs without improvement; the model
    ends holding its best state.

    Args:
        valid_set: the validation :class:`EvalSet` (built when None).
        checkpoint_dir: the state after every epoch is saved there; a later call resumes from
            it, and a finished run is only reloaded.
        device: default :func:`default_device`.
        align_target: ``(n_items + 1, H)`` ID-SASRec item embeddings for the alignment loss
            (used when ``config.align_alpha > 0`` and the model reads a frozen table).
        stop_after: stop after this many epochs in this call (simulates an interruption).
    """
    from tqdm.auto import tqdm

    from .checkpoint import load_checkpoint, optimizer_from_flat, optimizer_to_flat, save_checkpoint

    config = model.config
    device = torch.device(device) if device is not None else default_device()
    model.to(device)
    use_align = config.align_alpha > 0 and model.items.is_frozen_table
    if use_align:
        if align_target is None:
            raise ValueError("align_alpha > 0 needs align_target (a trained ID-SASRec's item embeddings)")
        align_target = torch.as_tensor(align_target, dtype=torch.float32).to(device)
        if align_target.shape[0] != model.n_items + 1:
            raise ValueError(f"align_target must have {model.n_items + 1} rows, got {align_target.shape[0]}")
    if valid_set is None:
        valid_set = build_eval_set(dataset, "valid", config.max_length, config.seed)
    windows = training_windows(dataset, config, model.objective)
    lengths = (windows != 0).sum(1)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)

    history: list[dict] = []
    start, best_epoch, best_valid, bad, done = 0, -1, float("-inf"), 0, False
    best_state = _state_tensors(model, "")
    fingerprint = {k: v for k, v in config.to_dict().items() if k not in ("max_epochs", "patience", "eval_batch_size")}
    if checkpoint_dir is not None and (ck := load_checkpoint(checkpoint_dir)) is not None:
        tensors, state = ck
        if state["config"] != fingerprint:
            raise ValueError(f"checkpoint {checkpoint_dir} was written with another config: {state['config']}")
        _load_state(model, tensors, "model.")
        optimizer_from_flat(optimizer, tensors, state["optimizer"])
        best_state = {k[len("best."):]: v for k, v in tensors.items() if k.startswith("best.")}
        history, start, best_epoch, best_valid, bad = (state["history"], state["epoch"], state["best_epoch"],
                                                       state["best_valid"], state["bad_epochs"])
        done = bad >= config.patience or start >= config.max_epochs

    def save(epoch: int, finished: bool) -> None:
        if checkpoint_dir is None:
            return
        opt_t, opt_meta = optimizer_to_flat(optimizer)
        tensors = _state_tensors(model, "model.") | {f"best.{k}": v for k, v in best_state.items()} | opt_t
        save_checkpoint(checkpoint_dir, tensors, {
            "epoch": epoch, "history": history, "best_epoch": best_epoch, "best_valid": best_valid,
            "bad_epochs": bad, "done": finished, "optimizer": opt_meta, "config": fingerprint,
        })

    end = config.max_epochs if stop_after is None else min(config.max_epochs, start + stop_after)
    bar = tqdm(range(start, end), desc=f"{config.backbone} seed {config.seed}", disable=not progress or done,
               initial=start, total=config.max_epochs, leave=False)
    for epoch in ([] if done else bar):
        tick = time.perf_counter()
        seed = _epoch_seed(config.seed, epoch)
        torch.manual_seed(seed)  # dropout
        gen = torch.Generator().manual_seed(seed)  # order, negatives, masks
        model.train()
        total, batches = 0.0, 0
        for rows in length_buckets(lengths, config.batch_size, gen):
            batch = _trim(windows[rows]).to(device)
            loss = model.training_loss(batch, gen)
            if use_align:
                items = torch.unique(batch[batch > 0])
                loss = loss + config.align_alpha * alignment_loss(model.items.adapted(items), align_target[items], config.align_tau)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += float(loss.detach())
            batches += 1
        train_seconds = time.perf_counter() - tick
        valid = _valid_ndcg10(model, valid_set, config, device)
        if valid > best_valid:
            best_epoch, best_valid, bad = epoch, valid, 0
            best_state = _state_tensors(model, "")
        else:
            bad += 1
        history.append({"epoch": epoch, "loss": total / max(batches, 1), "valid": valid,
                        "train_seconds": round(train_seconds, 3), "seconds": round(time.perf_counter() - tick, 3)})
        bar.set_postfix(loss=f"{history[-1]['loss']:.4f}", ndcg10=f"{valid:.4f}", best=f"{best_valid:.4f}")
        stop = bad >= config.patience
        save(epoch + 1, finished=stop or epoch + 1 >= config.max_epochs)
        if stop:
            break
    bar.close()
    _load_state(model, best_state, "")
    model.eval()
    epochs_run = history[-1]["epoch"] + 1 if history else 0
    return FitResult(best_epoch=best_epoch, best_valid=best_valid, epochs_run=epochs_run,
                     stopped_early=bad >= config.patience, history=history)


# ---------------------------------------------------------------------------------------
# the experiment grid of notebook 04


@dataclass
class SRSRun:
    """One trained and evaluated model: its config, fit result, test metrics (long rows)."""

    dataset: str
    backbone: str
    variant: str
    seed: int
    config: SRSConfig
    fit: FitResult
    metrics: pd.DataFrame
    seconds: float
    input_fingerprint: str | None = None  # fingerprint of the frozen item table (None: ID model)


def _checkpoint_dir(run, dataset, backbone: str, variant: str, seed: int) -> Path:
    key = dataset.path.name if dataset.path is not None else dataset.name
    return run.checkpoints / "srs" / key / f"{backbone}-{variant}-seed{seed}"


def _inputs_path(run) -> Path:
    return run.results / "srs_inputs.json"


def _recorded_input(run, dataset, label: str) -> str | None:
    """The fingerprint recorded with ``label``'s rows (None: none recorded)."""
    path = _inputs_path(run)
    return (json.loads(path.read_text()) if path.exists() else {}).get(f"{dataset.name}/{label}")


def _record_input(run, dataset, label: str, fingerprint: str | None) -> None:
    from .io import atomic_write_json

    path = _inputs_path(run)
    inputs = json.loads(path.read_text()) if path.exists() else {}
    inputs[f"{dataset.name}/{label}"] = fingerprint
    atomic_write_json(path, dict(sorted(inputs.items())))


def invalidate_stale(run, dataset, label: str, table: torch.Tensor | None) -> bool:
    """Forget the results of ``label`` (``<variant>`` or ``<variant>+align``) when they were
    computed from another embedding table than the current one: its rows leave
    ``metrics.csv`` and its SRS checkpoints (which a new fit would otherwise resume from)
    are deleted. The table's :func:`~reaemb.embeddings.table_fingerprint` is recorded in
    ``results/srs_inputs.json`` when a model's rows are written. Returns True when
    something was invalidated. ID models (no table) are never stale."""
    import shutil

    from .embeddings import table_fingerprint
    from .results import drop_metrics, read_metrics

    if table is None:
        return False
    if _recorded_input(run, dataset, label) == table_fingerprint(table):
        return False
    df = read_metrics(run)
    has_rows = bool(((df["dataset"] == dataset.name) & (df["variant"] == label)).any())
    root = _checkpoint_dir(run, dataset, "x", label, 0).parent
    stale_ckpts = sorted(root.glob(f"*-{label}-seed*")) if root.exists() else []
    stale_ckpts = [p for p in stale_ckpts if p.name.split("-seed")[0].split("-", 1)[1] == label]
    if not has_rows and not stale_ckpts:
        return False
    drop_metrics(run, dataset.name, label)
    for folder in stale_ckpts:
        shutil.rmtree(folder)
    return True


def _load_table(run, dataset, variant: str) -> torch.Tensor | None:
    from .embeddings import load_item_embeddings

    if variant == "id":
        return None
    folder = run.embeddings / variant
    if not (folder / "manifest.json").exists():
        raise FileNotFoundError(f"no embedding table for variant {variant!r} in {run.embeddings}: "
                                "run notebook 02 (inference, scft, lrcl) or 03 (crrl) first")
    table, _ = load_item_embeddings(folder, dataset)
    return table


def train_and_evaluate(
    run,
    dataset,
    backbone: str,
    variant: str,
    seed: int,
    config: SRSConfig | None = None,
    *,
    mask_history: bool = False,
    device: torch.device | str | None = None,
    align_target: torch.Tensor | None = None,
    progress: bool = True,
    eval_sets: dict[str, EvalSet] | None = None,
    record: bool = True,
) -> SRSRun:
    """Train one model (resuming from its checkpoint in ``run``), evaluate its best state on
    the test split under both protocols, save the per-user test ranks to ``results/ranks/``
    (for paired tests between methods) and append the rows to ``run.metrics_csv``.

    The rows are labelled ``variant`` (``<variant>+align`` when the LLMEmb alignment loss is
    on; it is off for ``id``, which has no adapter). ``record=False`` leaves ``metrics.csv``
    and ``srs_inputs.json`` alone (the parallel grid's workers: their parent records)."""
    from .embeddings import table_fingerprint
    from .io import atomic_dir

    tick = time.perf_counter()
    base = asdict(config) if config is not None else {}
    config = SRSConfig(**{**base, "backbone": backbone, "seed": seed})
    if variant == "id":
        config.align_alpha = 0.0
    label = f"{variant}+align" if config.align_alpha > 0 else variant
    device = torch.device(device) if device is not None else default_device()
    eval_sets = eval_sets if eval_sets is not None else {}
    for split in ("valid", "test"):
        if split not in eval_sets:
            eval_sets[split] = build_eval_set(dataset, split, config.max_length, seed)
    model_table = _load_table(run, dataset, variant)
    model = build_model(dataset.n_items, config, model_table)
    result = fit(model, dataset, valid_set=eval_sets["valid"], device=device, align_target=align_target,
                 checkpoint_dir=_checkpoint_dir(run, dataset, backbone, label, seed), progress=progress)
    ranks = compute_ranks(model, eval_sets["test"], protocols=PROTOCOLS, mask_history=mask_history,
                          batch_size=config.eval_batch_size, device=device)
    table = metrics_table(ranks, eval_sets["test"].groups)
    rows = table.assign(dataset=dataset.name, backbone=backbone, variant=label, seed=seed)
    with atomic_dir(run.results / "ranks" / f"{dataset.name}_{backbone}_{label}_seed{seed}") as tmp:
        np.savez_compressed(tmp / "ranks.npz", **ranks)
    out = SRSRun(dataset.name, backbone, label, seed, config, result, rows, time.perf_counter() - tick,
                 table_fingerprint(model_table) if model_table is not None else None)
    if record:
        _record_run(run, dataset, out)
    return out


def _record_run(run, dataset, out: SRSRun) -> None:
    """Append ``out``'s rows to ``metrics.csv`` and record its input table's fingerprint."""
    from .results import append_metrics

    append_metrics(run, out.metrics)
    if out.input_fingerprint is not None:
        _record_input(run, dataset, out.variant, out.input_fingerprint)


def _worker_init(threads: int) -> None:
    torch.set_num_threads(threads)


def _grid_job(run, dataset, backbone, variant, seed, config, mask_history, device) -> SRSRun:
    """One model of the parallel grid, in a worker process (records nothing itself)."""
    return train_and_evaluate(run, dataset, backbone, variant, seed, config, mask_history=mask_history,
                              device=device, progress=False, record=False)


def default_workers(device: torch.device | str | None = None) -> int:
    """CPU cores this process may use (on CPU; 1 on CUDA): the grid's worker count when each
    worker runs on one thread, as the small recommenders run best (notebook 04 divides by its
    thread count)."""
    import os

    device = torch.device(device) if device is not None else default_device()
    if device.type != "cpu":
        return 1
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))


def run_grid(
    run,
    dataset,
    *,
    backbones: list[str],
    variants: list[str],
    seeds: list[int] | dict[str, list[int]],
    config: SRSConfig | None = None,
    mask_history: bool = False,
    device: torch.device | str | None = None,
    progress: bool = True,
    workers: int = 1,
) -> pd.DataFrame:
    """Train and evaluate every backbone x variant x seed not yet in ``metrics.csv``; returns
    one row per model (time, epochs, best epoch, validation and test NDCG@10, ``skipped``).
    ``seeds`` is one list for every variant or a list per variant (e.g. more for ``id``).

    With ``config.align_alpha > 0`` the LLM variants are aligned to the ID-SASRec of the same
    seed (trained first, or reloaded from its checkpoint).

    ``workers > 1`` trains that many models at once in worker processes (each with this
    process's torch thread count), without the alignment loss only. Every model is seeded on
    its own, so the rows equal the sequential grid's (tested); this process writes
    ``metrics.csv`` as each model finishes, and an interrupted grid resumes as the sequential
    one does (finished models skipped, the others from their checkpoints).
    """
    from tqdm.auto import tqdm

    from .results import completed

    config = config or SRSConfig()
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    log = []
    per_variant = seeds if isinstance(seeds, dict) else {v: list(seeds) for v in variants}
    if set(per_variant) != set(variants):
        raise ValueError(f"seeds given for {sorted(per_variant)} but the variants are {sorted(variants)}")
    every_seed = sorted({s for v in variants for s in per_variant[v]})
    jobs = [(b, v, s) for s in every_seed for v in variants if s in per_variant[v] for b in backbones]
    eval_cache: dict[int, dict[str, EvalSet]] = {}
    teachers: dict[int, torch.Tensor] = {}
    for variant in variants:
        label = f"{variant}+align" if config.align_alpha > 0 and variant != "id" else variant
        if invalidate_stale(run, dataset, label, _load_table(run, dataset, variant)):
            print(f"{label}: its embedding table changed since its models were evaluated: retraining them")
    pending = []
    for backbone, variant, seed in jobs:
        label = f"{variant}+align" if config.align_alpha > 0 and variant != "id" else variant
        if completed(run, dataset.name, backbone, label, seed):
            log.append({"backbone": backbone, "variant": label, "seed": seed, "skipped": True})
        else:
            pending.append((backbone, variant, seed))
    if workers > 1 and config.align_alpha == 0 and len(pending) > 1:
        return pd.DataFrame(log + _parallel_grid(run, dataset, pending, config, mask_history, device,
                                                 min(workers, len(pending)), progress))
    for backbone, variant, seed in tqdm(pending, desc="models", disable=not progress):
        label = f"{variant}+align" if config.align_alpha > 0 and variant != "id" else variant
        sets = eval_cache.setdefault(seed, {})
        align = None
        if label != variant:
            if seed not in teachers:
                if not completed(run, dataset.name, "sasrec", "id", seed):
                    train_and_evaluate(run, dataset, "sasrec", "id", seed, config, mask_history=mask_history,
                                       device=device, progress=progress, eval_sets=sets)
                teachers[seed] = teacher_table(run, dataset, seed, config)
            align = teachers[seed]
        out = train_and_evaluate(run, dataset, backbone, variant, seed, config, mask_history=mask_history,
                                 device=device, align_target=align, progress=progress, eval_sets=sets)
        log.append(_log_row(out))
    return pd.DataFrame(log)


def _log_row(out: SRSRun) -> dict:
    m = out.metrics.set_index(["protocol", "group", "metric"])["value"]
    return {"backbone": out.backbone, "variant": out.variant, "seed": out.seed, "skipped": False,
            "seconds": round(out.seconds, 1), "epochs": out.fit.epochs_run, "best_epoch": out.fit.best_epoch,
            "valid_ndcg10": round(out.fit.best_valid, 4),
            "test_ndcg10_sampled": round(m[("sampled100", "all", "NDCG@10")], 4),
            "test_ndcg10_full": round(m[("full", "all", "NDCG@10")], 4)}


def _parallel_grid(run, dataset, pending, config, mask_history, device, workers: int, progress: bool) -> list[dict]:
    """``pending`` models on ``workers`` spawned processes; rows recorded here as they finish."""
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    from tqdm.auto import tqdm

    device = str(device) if device is not None else str(default_device())
    log = []
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_worker_init, initargs=(torch.get_num_threads(),))
    try:
        with tqdm(total=len(pending), desc=f"models ({workers} workers)", disable=not progress) as bar:
            futures = {pool.submit(_grid_job, run, dataset, b, v, s, config, mask_history, device)
                       for b, v, s in pending}
            while futures:
                done, futures = wait(futures, return_when=FIRST_COMPLETED)
                for future in done:
                    out = future.result()
                    _record_run(run, dataset, out)
                    log.append(_log_row(out))
                    bar.update(1)
    except BaseException:
        # interrupted or a model failed: stop the workers now (an unfinished model resumes
        # from its checkpoint next time) instead of waiting for the running models
        processes = list((getattr(pool, "_processes", None) or {}).values())
        pool.shutdown(wait=False, cancel_futures=True)
        for process in processes:
            process.terminate()
        raise
    pool.shutdown()
    order = {(b, v, s): i for i, (b, v, s) in enumerate(pending)}
    return sorted(log, key=lambda r: order[(r["backbone"], r["variant"], r["seed"])])


def teacher_table(run, dataset, seed: int, config: SRSConfig) -> torch.Tensor:
    """Item embeddings ``(n_items + 1, H)`` of the trained ID-SASRec of ``seed`` (its best
    state, read from its checkpoint)."""
    from .checkpoint import load_checkpoint

    ck = load_checkpoint(_checkpoint_dir(run, dataset, "sasrec", "id", seed))
    if ck is None:
        raise FileNotFoundError(f"no trained ID-SASRec for seed {seed}: train variant 'id' first")
    sas = build_model(dataset.n_items, SRSConfig(**{**asdict(config), "backbone": "sasrec", "seed": seed,
                                                    "align_alpha": 0.0}))
    _load_state(sas, ck[0], "best.")
    return sas.item_table().detach().cpu()
