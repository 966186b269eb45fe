"""VideoAlign's latent reward model on the embedded benchmark (experiment ``train_reward_model``).

    python -m experiments.main --config=configs/reward_model.py --workdir=/tmp/rm
    python -m experiments.main --config=configs/reward_model.py:bt --workdir=/tmp/rm_bt \
        --config.pairs.data_dir=/tmp/rm/preferences --config.data.train=/tmp/rm/pairs/train \
        --config.data.validation=/tmp/rm/pairs/validation --config.data.test=/tmp/rm/pairs/test

Default (no argument): the preference set of ``pairs.num_prompts`` Moving Textures prompts is built and
encoded with the shipped VAE and text encoder (``configs/pretrained/demo``) into pair caches under the
workdir (or read from ``data.*`` where given), the reward model is the shipped base DiT's first blocks
with three query tokens trained with BTT at every noise level, then evaluated on the test pairs
(``eval.json``, ``eval_hist.png``). CPU cost on two cores: see ``benchmarks/RESULTS.md``.

Args: ``bt`` (the BT loss, ties dropped), ``pooled`` (one query token for the three rewards),
``regression`` (the difference regressed on the label), ``frozen`` (the backbone frozen), ``lora`` (LoRA
rank 8 on the blocks), ``tiny`` (a random tiny DiT and a handful of pairs: the smoke test).
"""

from experiments import train_reward_model

ARGS = ("bt", "pooled", "regression", "frozen", "lora")
DEMO = "configs/pretrained/demo"


def get_config(arg: str | None = None):
    c = train_reward_model.default_config()
    c.fast_cpu_compile = True
    c.reward_model.packed_base = DEMO
    c.pairs.build, c.pairs.packed = True, DEMO
    c.train.async_checkpoints = False
    if arg == "bt":
        c.reward_model.loss = "bt"
    elif arg == "pooled":
        c.reward_model.pooled = True
    elif arg == "regression":
        c.reward_model.loss = "regression"
    elif arg == "frozen":
        c.reward_model.backbone = "frozen"
    elif arg == "lora":
        c.reward_model.backbone, c.lora.rank, c.lora.alpha = "lora", 8, 16.0
    elif arg:
        raise ValueError(f"unknown reward_model config arg {arg!r}; expected nothing or one of {ARGS}")
    return c
