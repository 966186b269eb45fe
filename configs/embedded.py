"""The embedded benchmark's DiT stages: ``embedded.py:sft`` (base model), ``embedded.py:reward`` (Shell-LCC
reward fine-tuning of that base) and ``embedded.py:sample``.

Paths come from the run (the demo pipeline fills them in; by hand, pass them as flags)::

    python -m experiments.main --config=configs/embedded.py:sft --workdir=W/base \\
        --config.data.cache_dir=W/latents/train
    python -m experiments.main --config=configs/embedded.py:reward --workdir=W/shell \\
        --config.data.cache_dir=W/latents/train --config.model.init_from=W/base --config.reward.manifold=W/manifold

The DiT is small enough to train on a laptop CPU: 4 blocks of width 128 over latents of 5 x 8 x 8 x 16
(17 frames of 64 x 64 through the benchmark's VAE) with the small text encoder's 128-d context.
"""

from experiments import reward_finetune, sample, sft

ARGS = ("sft", "reward", "sample")


def _model(c):
    c.model.preset = "tiny"
    c.model.dim, c.model.num_layers, c.model.num_heads, c.model.ffn_dim = 128, 4, 4, 256
    c.model.text_dim, c.model.freq_dim = 128, 64


def get_config(arg: str | None = None):
    arg = arg or "sft"
    if arg not in ARGS:
        raise ValueError(f"unknown embedded config arg {arg!r}; expected one of {ARGS}")
    if arg == "sample":
        c = sample.default_config()
        _model(c)
        return c
    if arg == "sft":
        c = sft.default_config()
        c.optim.learning_rate, c.optim.schedule, c.optim.warmup_steps = 3e-4, "cosine", 100
        c.optim.end_lr_fraction = 0.1
        c.train.steps = 3000
    else:
        c = reward_finetune.default_config()
        c.optim.learning_rate = 3e-5
        c.train.steps = 300
        c.objective.name, c.objective.s_lo, c.objective.s_hi = "one_step", 0.7, 1.0
        c.reward.kind = "shell"
    _model(c)
    c.data.source = "cache"
    c.data.batch_size = 32
    c.train.log_every, c.train.checkpoint_every = 50, 500
    return c
