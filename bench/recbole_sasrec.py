"""RecBole's SASRec on a dataset exported by bench_srs.py: time training batches and a
full-ranking evaluation, optionally train to convergence. Runs inside ``.venv-recbole``
(RecBole 1.2.1 needs numpy < 2; see ``make bench-env``), never imported by ``reaemb``.

Usage: python bench/recbole_sasrec.py SETTINGS.json OUT.json
"""

from __future__ import annotations

import functools
import json
import sys
import time

import torch

# RecBole 1.2.1 pickles its config into checkpoints; torch >= 2.6 loads weights only by default.
torch.load = functools.partial(torch.load, weights_only=False)

from recbole.config import Config  # noqa: E402
from recbole.data import create_dataset, data_preparation  # noqa: E402
from recbole.model.sequential_recommender import SASRec  # noqa: E402
from recbole.trainer import Trainer  # noqa: E402
from recbole.utils import init_seed  # noqa: E402


def main() -> None:
    settings = json.loads(open(sys.argv[1]).read())
    torch.set_num_threads(settings["threads"])
    loss = settings["loss"]  # "CE" (full softmax) or "BPR" (one sampled negative)
    config = Config(model="SASRec", dataset=settings["dataset"], config_dict={
        "data_path": settings["data_path"],
        "checkpoint_dir": settings["checkpoint_dir"],
        "USER_ID_FIELD": "user_id", "ITEM_ID_FIELD": "item_id", "TIME_FIELD": "timestamp",
        "load_col": {"inter": ["user_id", "item_id", "timestamp"]},
        "MAX_ITEM_LIST_LENGTH": settings["max_length"],
        "hidden_size": settings["hidden_size"], "inner_size": settings["hidden_size"],
        "n_layers": settings["num_layers"], "n_heads": settings["num_heads"],
        "hidden_dropout_prob": settings["dropout"], "attn_dropout_prob": settings["dropout"],
        "hidden_act": "relu", "layer_norm_eps": 1e-12, "initializer_range": 0.02,
        "loss_type": loss,
        "train_neg_sample_args": None if loss == "CE" else {"distribution": "uniform", "sample_num": 1},
        "eval_args": {"split": {"LS": "valid_and_test"}, "order": "TO", "mode": "full", "group_by": "user"},
        "metrics": ["Hit", "NDCG"], "topk": [10], "valid_metric": "NDCG@10",
        "learning_rate": settings["learning_rate"],
        "train_batch_size": settings["train_batch_size"], "eval_batch_size": settings["eval_batch_size"],
        "epochs": settings["epochs"], "stopping_step": settings["patience"],
        "seed": settings["seed"], "reproducibility": True,
        "device": "cpu", "use_gpu": False, "show_progress": False, "log_wandb": False,
        "state": "WARNING",
    })
    init_seed(config["seed"], config["reproducibility"])
    dataset = create_dataset(config)
    train_data, valid_data, test_data = data_preparation(config, dataset)
    model = SASRec(config, train_data.dataset).to(config["device"])
    trainer = Trainer(config, model)
    out = {"train_batches_per_epoch": len(train_data), "users": int(dataset.user_num - 1),
           "items": int(dataset.item_num - 1), "interactions": int(len(dataset.inter_feat))}

    # seconds per epoch: time the first batches of an epoch (data loading included)
    model.train()
    n = min(settings["timed_batches"], len(train_data))
    tick = time.perf_counter()
    for i, interaction in enumerate(train_data):
        if i == n:
            break
        trainer.optimizer.zero_grad()
        model.calculate_loss(interaction.to(config["device"])).backward()
        trainer.optimizer.step()
    out["timed_batches"] = n
    out["epoch_seconds"] = (time.perf_counter() - tick) / n * len(train_data)

    # full-ranking evaluation throughput on the test split (history masked, as RecBole does)
    tick = time.perf_counter()
    trainer.evaluate(test_data, load_best_model=False, show_progress=False)
    out["eval_seconds"] = time.perf_counter() - tick
    out["eval_users"] = int(len(test_data.uid_list)) if hasattr(test_data, "uid_list") else out["users"]

    if settings["epochs"] > 0:  # train to convergence (fresh model), then test
        init_seed(config["seed"], config["reproducibility"])
        model = SASRec(config, train_data.dataset).to(config["device"])
        trainer = Trainer(config, model)
        tick = time.perf_counter()
        best_valid, _ = trainer.fit(train_data, valid_data, saved=True, show_progress=False)
        out["fit_seconds"] = time.perf_counter() - tick
        out["fit_epochs"] = trainer.cur_epoch if hasattr(trainer, "cur_epoch") else None
        out["best_valid_ndcg10"] = float(best_valid)
        test = trainer.evaluate(test_data, load_best_model=True, show_progress=False)
        out["test"] = {k: float(v) for k, v in test.items()}
    with open(sys.argv[2], "w") as fh:
        json.dump(out, fh, indent=1)


if __name__ == "__main__":
    main()
