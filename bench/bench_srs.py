"""SASRec speed on ml-100k: seconds per training epoch and full-ranking evaluation users/s,
printed as ratios against references measured in the same invocation.

References:
- **RecBole 1.2.1's SASRec** (run in a subprocess from ``.venv-recbole``: RecBole needs numpy < 2,
  so it lives in its own environment; ``make bench-env`` creates it) at the same hidden size,
  history length, layers, heads and dropout. RecBole trains on every prefix of every training
  sequence as its own sample (about 100 times the tokens of our one-window-per-user epoch) and
  has no BCE loss: ``BPR`` with one uniform negative is the closest to our BCE with one
  negative (``--recbole-loss CE`` for its full softmax). Its full-ranking evaluation masks
  history items, so ours is timed with ``mask_history=True`` too. RecBole's epoch time is
  extrapolated from its first ``--recbole-batches`` training batches (data loading included).
- **A plain per-user loop** for evaluation: one user at a time, scores ranked in Python.

Targets (README): epoch time <= 0.5x RecBole's; full-ranking evaluation >= 2x RecBole's
users/s; with ``--recbole-epochs N`` both models are also trained to convergence and their
test NDCG@10 (full ranking, history masked) compared (target: within 0.005).

Usage: ``python bench/bench_srs.py [--max-length 50] [--epochs 3] [--recbole-epochs 0]``
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from reaemb.data import DataConfig, prepare  # noqa: E402
from reaemb.evaluation import build_eval_set, compute_ranks, rank_metrics  # noqa: E402
from reaemb.srs import SRSConfig, build_model  # noqa: E402
from reaemb.training import fit  # noqa: E402

RECBOLE_PY = ROOT / ".venv-recbole" / "bin" / "python"


def export_atomic(ds, folder: Path, name: str) -> None:
    """The prepared dataset as a RecBole atomic file; the position in the user's sequence is
    the timestamp, so RecBole's leave-one-out split equals ours."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = ["user_id:token\titem_id:token\ttimestamp:float"]
    for u in range(ds.n_users):
        lines += [f"{u}\t{i}\t{t}" for t, i in enumerate(ds.sequence(u).tolist())]
    (folder / f"{name}.inter").write_text("\n".join(lines) + "\n")


def per_user_loop_ranks(model, eval_set, n_users: int) -> np.ndarray:
    """The naive reference: one history at a time, ranks counted in Python."""
    ranks = []
    model.eval()
    with torch.no_grad():
        for u in range(n_users):
            hist = eval_set.histories[u : u + 1]
            scores = model.score_all(hist)[0].tolist()
            history = set(eval_set.history_items[eval_set.history_ptr[u] : eval_set.history_ptr[u + 1]].tolist())
            target = int(eval_set.targets[u])
            t = scores[target]
            ranks.append(sum(1 for i in range(1, len(scores)) if i != target and i not in history and scores[i] >= t))
    return np.asarray(ranks)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-length", type=int, default=50, help="history length (reference 200)")
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=3, help="our timed epochs (after one warm-up)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--recbole-loss", default="BPR", choices=["BPR", "CE"])
    parser.add_argument("--recbole-batches", type=int, default=5, help="RecBole batches timed for the epoch estimate")
    parser.add_argument("--recbole-epochs", type=int, default=0, help="train both to convergence (slow) and compare NDCG@10")
    parser.add_argument("--loop-users", type=int, default=200, help="users scored by the per-user loop")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    work = Path(tempfile.mkdtemp(prefix="bench-srs-"))
    ds = prepare(DataConfig(dataset="ml-100k"), work / "data")
    config = SRSConfig(max_length=args.max_length, hidden_size=args.hidden, max_epochs=1 + args.epochs,
                       patience=10**6, batch_size=64)
    print(f"ml-100k: {ds.n_users} users, {ds.n_items} items | SASRec hidden {config.hidden_size}, length "
          f"{config.max_length}, {config.num_layers} layers, {config.num_heads} head, dropout {config.dropout} "
          f"| threads {torch.get_num_threads()}")

    # ours: training epochs (the first is a warm-up) and the vectorised full-ranking evaluation
    model = build_model(ds.n_items, config)
    hist = fit(model, ds, progress=False, device="cpu").history
    ours_epoch = float(np.mean([h["train_seconds"] for h in hist[1:]]))
    test = build_eval_set(ds, "test", config.max_length, 0)
    compute_ranks(model, test, protocols=("full",), mask_history=True)  # warm-up
    tick = time.perf_counter()
    ranks = compute_ranks(model, test, protocols=("full",), mask_history=True)["full"]
    ours_eval = test.n_users / (time.perf_counter() - tick)

    tick = time.perf_counter()
    loop = per_user_loop_ranks(model, test, args.loop_users)
    loop_eval = args.loop_users / (time.perf_counter() - tick)
    assert np.array_equal(loop, ranks[: args.loop_users]), "the per-user loop disagrees with compute_ranks"
    print(f"ours: {ours_epoch:.2f} s per training epoch; full-ranking evaluation {ours_eval:,.0f} users/s")
    print(f"per-user loop evaluation: {loop_eval:,.0f} users/s -> ours / loop = {ours_eval / loop_eval:.1f}x")

    if not RECBOLE_PY.exists():
        print(f"RecBole reference skipped: {RECBOLE_PY} not found (run `make bench-env`)")
        return 0
    export_atomic(ds, work / "recbole" / "reaemb_ml100k", "reaemb_ml100k")
    settings = {
        "dataset": "reaemb_ml100k", "data_path": str(work / "recbole"), "checkpoint_dir": str(work / "recbole-ck"),
        "max_length": config.max_length, "hidden_size": config.hidden_size, "num_layers": config.num_layers,
        "num_heads": config.num_heads, "dropout": config.dropout, "loss": args.recbole_loss,
        "learning_rate": config.learning_rate, "train_batch_size": 2048, "eval_batch_size": 4096,
        "epochs": args.recbole_epochs, "patience": 5, "seed": 0, "threads": args.threads,
        "timed_batches": args.recbole_batches,
    }
    (work / "settings.json").write_text(json.dumps(settings))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env["OMP_NUM_THREADS"] = str(args.threads)
    proc = subprocess.run([str(RECBOLE_PY), str(ROOT / "bench" / "recbole_sasrec.py"), str(work / "settings.json"),
                           str(work / "recbole.json")], env=env, capture_output=True, text=True, cwd=work)
    if proc.returncode != 0:
        print("RecBole reference failed:\n" + proc.stderr[-3000:])
        return 1
    rb = json.loads((work / "recbole.json").read_text())
    rb_eval = rb["eval_users"] / rb["eval_seconds"]
    print(f"RecBole 1.2.1 SASRec ({args.recbole_loss}): {rb['epoch_seconds']:.1f} s per training epoch "
          f"(extrapolated from {rb['timed_batches']} of {rb['train_batches_per_epoch']} batches of 2048); "
          f"full-ranking evaluation {rb_eval:,.0f} users/s")
    print(f"RATIO epoch time ours / RecBole = {ours_epoch / rb['epoch_seconds']:.3f} (target <= 0.5)")
    print(f"RATIO evaluation users/s ours / RecBole = {ours_eval / rb_eval:.2f} (target >= 2)")
    if args.recbole_epochs > 0:
        full = SRSConfig(**{**config.to_dict(), "max_epochs": args.recbole_epochs, "patience": 5})
        model = build_model(ds.n_items, full)
        fit(model, ds, progress=False, device="cpu")
        ours_ndcg = float(rank_metrics(compute_ranks(model, test, protocols=("full",), mask_history=True)["full"], 10)[1].mean())
        rb_ndcg = rb["test"]["ndcg@10"]
        print(f"test NDCG@10 (full ranking, history masked): ours {ours_ndcg:.4f}, RecBole {rb_ndcg:.4f}, "
              f"difference {ours_ndcg - rb_ndcg:+.4f} (target within 0.005)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
