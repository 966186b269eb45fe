"""An ablation over the embedded benchmark's reward fine-tuning: distance kind x objective x learning rate.

    python -m experiments.main --config=configs/ablation.py --workdir=W/ablation \\
        --config.ablation.base.data.cache_dir=W/latents/train \\
        --config.ablation.base.model.init_from=W/base --config.ablation.base.reward.manifold=W/manifold

Each variant runs in ``W/ablation/<name>`` one after another; finished ones (``DONE``) are skipped when
the command is run again. ``ARG`` picks the axes: ``full`` (default: 4 kinds x 2 objectives x 2 rates,
plus the no-reward control at each rate), ``kinds`` (the 4 kinds, one-step objective, base rate).
"""

import itertools

import ml_collections

from configs import embedded
from shelllcc.rewards.manifold_distance import KINDS

OBJECTIVES = ("one_step", "noised_data")
RATES = (1e-5, 3e-5)


def variants(arg: str) -> tuple:
    if arg == "kinds":
        return tuple((kind, {"reward.kind": kind}) for kind in KINDS)
    out = []
    for lr in RATES:
        out.append((f"control-lr{lr:g}", {"objective.name": "sft", "optim.learning_rate": lr}))
        for kind, obj in itertools.product(KINDS, OBJECTIVES):
            out.append((f"{kind}-{obj}-lr{lr:g}", {"reward.kind": kind, "objective.name": obj,
                                                    "optim.learning_rate": lr}))
    return tuple(out)


def get_config(arg: str | None = None):
    arg = arg or "full"
    if arg not in ("full", "kinds"):
        raise ValueError(f"unknown ablation arg {arg!r}; expected 'full' or 'kinds'")
    c = ml_collections.ConfigDict()
    c.ablation = ml_collections.ConfigDict()
    c.ablation.base = embedded.get_config("reward")
    c.ablation.variants = variants(arg)
    return c
