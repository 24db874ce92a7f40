"""CRRL step cost on CPU: KV-shared rollouts vs a naive full two-pass forward per rollout.

Three ways to produce the G rollouts of an anchor, all through the same ``crrl_step``:

* ``cached``: pass 1 of the whole catalogue computed once beforehand (what notebook 03 does);
  a step only decodes the two suffix positions per rollout;
* ``shared``: pass 1 of the step's anchors computed in the step, its KV cache expanded G
  times (the LRCL cached forward, without a catalogue cache);
* ``naive``: the full two-pass forward (pass 1 + pass 2 over the whole prompt) once per
  rollout, G times per anchor.

All three see the same anchors, noise and candidate table; the script checks that they give
the same rewards and prints seconds per step, anchors per second and the speed ratios,
measured in one invocation (timings on a shared machine are noisy; ratios much less so).
Also printed: pass 1 items/s (catalogue cache), candidate-table refresh items/s, cache size.

    python bench/bench_crrl.py [--anchors 8] [--steps 2] [--items 283]
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time

import numpy as np
import torch

from reaemb.backbone import (
    BackboneConfig,
    catalogue_texts,
    collate,
    last_hidden_state,
    load_backbone,
)
from reaemb.crrl import CRRLConfig, build_anchors, crrl_step
from reaemb.crrl_llm import LLMThoughtPolicy, build_prefix_cache
from reaemb.data import prepare
from reaemb.runs import data_config
from reaemb.thought import ThoughtAttention, ThoughtConfig, thought_forward


class NaiveTwoPassPolicy:
    """Every rollout runs the method's full two-pass forward (pass 1 and pass 2 over the
    whole prompt, :func:`thought_forward` with ``use_cache=False``)."""

    def __init__(self, model, module, prompts, pad_id, thought_id):
        self.model, self.module, self.prompts = model, module, prompts
        self.pad_id, self.thought_id = pad_id, thought_id

    def parameters(self):
        return self.module.parameters()

    @torch.no_grad()
    def prefix_states(self, items):
        ids, mask = collate([self.prompts[int(i) - 1] for i in items], self.pad_id, "left")
        return ids, mask, last_hidden_state(self.model, ids, mask)

    def thought(self, states):
        from reaemb.backbone import position_ids_from_mask

        ids, mask, hidden = states
        return self.module(hidden, mask, position_ids_from_mask(mask), query_index=torch.full(
            (ids.shape[0],), ids.shape[1] - 3, dtype=torch.long))

    @torch.no_grad()
    def embed(self, states, actions):
        ids, mask, _ = states
        mu = self.thought(states)
        out = [thought_forward(self.model, self.module, ids, mask, thought_id=self.thought_id,
                               thought_noise=actions[:, g] - mu, use_cache=False).embedding
               for g in range(actions.shape[1])]
        return torch.stack(out, 1)


def _time_steps(policy, module, batches, table, config):
    """Wall and CPU (this process, all threads) seconds per step, and the step records."""
    opt = torch.optim.Adam(module.parameters(), lr=config.learning_rate)
    records, t0, c0 = [], time.perf_counter(), time.process_time()
    for step, batch in enumerate(batches):
        records.append(crrl_step(policy, batch, table, opt, config, step))
    return (time.perf_counter() - t0) / len(batches), (time.process_time() - c0) / len(batches), records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--anchors", type=int, default=8, help="anchors per step")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per path")
    parser.add_argument("--items", type=int, default=283, help="catalogue items cached (ml-100k, quick profile)")
    parser.add_argument("--generations", type=int, default=8)
    args = parser.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        run(args, prepare(data_config("quick", dataset="ml-100k"), tmp))


def run(args, ds) -> None:
    backbone = load_backbone(BackboneConfig())
    model = backbone.model
    prompts = [backbone.prompt_ids(t) for t in catalogue_texts(ds)][: args.items]
    module = ThoughtAttention(ThoughtConfig(backbone.hidden_size))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {len(prompts)} items, "
          f"mean prompt {np.mean([len(p) for p in prompts]):.1f} tokens; G = {args.generations}, "
          f"{args.anchors} anchors/step")

    t0, c0 = time.perf_counter(), time.process_time()
    cache = build_prefix_cache(model, prompts, backbone.thought_id, backbone.eos_id, backbone.pad_id, progress=False)
    t_pass1, c_pass1 = time.perf_counter() - t0, time.process_time() - c0
    with torch.no_grad():
        ids, mask = collate(prompts[:32], backbone.pad_id, "left")
        module.calibrate(model.get_input_embeddings().weight[: backbone.thought_id],
                         last_hidden_state(model, ids, mask)[:, :-2], mask[:, :-2])
    cached = LLMThoughtPolicy(model, module, cache, prompts, backbone.pad_id)
    t0, c0 = time.perf_counter(), time.process_time()
    table = cached.catalogue_table()
    t_table, c_table = time.perf_counter() - t0, time.process_time() - c0
    print(f"pass 1 (catalogue cache): {len(prompts) / t_pass1:.2f} items/s wall, {len(prompts) / c_pass1:.2f} "
          f"items per CPU-second; cache {cache.nbytes / len(prompts) / 2**20:.2f} MiB/item")
    print(f"candidate table refresh (suffix only): {len(prompts) / t_table:.2f} items/s wall, "
          f"{len(prompts) / c_table:.2f} items per CPU-second ({c_pass1 / c_table:.1f}x cheaper than pass 1 in CPU time)")

    c = ds.cooccurrence[: len(prompts) + 1, : len(prompts) + 1]
    anchors = build_anchors(c, seed=0, negative_fallback_share=0.1)
    batches = [anchors.subset(np.arange(s * args.anchors, (s + 1) * args.anchors)) for s in range(args.steps)]
    config = CRRLConfig(num_generations=args.generations, learning_rate=1e-4)
    policies = {
        "cached": lambda m: LLMThoughtPolicy(model, m, cache, prompts, backbone.pad_id),
        "shared": lambda m: LLMThoughtPolicy(model, m, None, prompts, backbone.pad_id),
        "naive": lambda m: NaiveTwoPassPolicy(model, m, prompts, backbone.pad_id, backbone.thought_id),
    }
    seconds, cpu, rewards = {}, {}, {}
    for name, make in policies.items():
        m = copy.deepcopy(module)
        seconds[name], cpu[name], recs = _time_steps(make(m), m, batches, table, config)
        rewards[name] = [r["reward"] for r in recs]
        print(f"{name:>7}: {seconds[name]:.2f} s/step ({cpu[name]:.2f} CPU-s), {args.anchors / seconds[name]:.2f} anchors/s, "
              "mean reward per step " + ", ".join(f"{r:.4f}" for r in rewards[name]))
    same = all(np.allclose(rewards[k], rewards["naive"], rtol=0, atol=1e-9) for k in rewards)
    print(f"identical rewards across paths: {same}")
    for a, b, what in [("naive", "shared", "KV cache shared by the G rollouts"),
                       ("naive", "cached", "catalogue pass 1 cached once"), ("shared", "cached", "")]:
        print(f"ratio {a} / {b} ({what or 'per-step pass 1 vs cached'}): {seconds[a] / seconds[b]:.1f}x wall, "
              f"{cpu[a] / cpu[b]:.1f}x CPU time")


if __name__ == "__main__":
    main()
