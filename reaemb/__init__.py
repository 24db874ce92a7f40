"""reaemb: a reproducible companion to ReaEmb (reasoning-based LLM item embeddings for
sequential recommendation).

One module per paper concept:

- :mod:`reaemb.data`  — loading, k-core, leave-one-out split, co-occurrence, long-tail groups,
  prepared datasets in the run directory.
- :mod:`reaemb.text`  — item attribute text (``key is value; ...``) and the seeded view
  augmentation used by contrastive training.
- :mod:`reaemb.runs`  — run directories, the quick/full profile, papermill runs.
"""

__version__ = "0.1.0"
