"""GRPO (Flow-GRPO, DanceGRPO) on the embedded benchmark's DiT: ``grpo.py:ARG``.

ARG:

* ``shell``: Flow-GRPO with the Shell-LCC distance (``reward.kind`` shell_norm, the authors' reward) of the
  final latent as the reward, KL 0.04 to the starting model (without dt, upstream's form);
* ``reward_model``: Flow-GRPO with the latent BTT reward model (VQ + MQ + TA) at t = 0;
* ``energy_judge``: Flow-GRPO with GT-SVJ's energy judge's ``-E``;
* ``dance_shell``: DanceGRPO with the Shell-LCC distance: no KL, best 4 of each group of 8, 60% of the steps.

    python -m experiments.main --config=configs/grpo.py:shell --workdir=W/grpo_shell \\
        --config.model.init_from=W/base --config.data.cache_dir=W/latents/train \\
        --config.data.latent_mean=... --config.data.latent_std=... --config.reward.manifold=W/manifold

The prompts are the train cache's text embeddings (its latents are not used: the rollouts are the model's
own). Sizes (ours): 4 prompts x 8 samples = 32 rollouts per step (upstream: 24 per group; DanceGRPO's users:
a global batch below 16-32 does not reproduce), 10 SDE steps, LoRA rank 16 / alpha 32 as the embedded
VideoAlign rows (configs/videoalign.py), lr 1e-4 (what moves the small model in ~100 steps).
"""

from experiments import grpo
from experiments.embedded_pipeline import dit_stage_config

ARGS = ("shell", "reward_model", "energy_judge", "dance_shell")


def _embedded_model(c) -> None:
    m = dit_stage_config("sft").model
    for k in ("preset", "dim", "num_layers", "num_heads", "ffn_dim", "text_dim", "freq_dim"):
        c.model[k] = m[k]


def get_config(arg: str | None = None):
    arg = arg or "shell"
    if arg not in ARGS:
        raise ValueError(f"unknown grpo config arg {arg!r}; expected one of {ARGS}")
    c = grpo.default_config()
    _embedded_model(c)
    c.lora.rank, c.lora.alpha = 16, 32.0
    c.optim.learning_rate = 1e-4
    c.data.source = "cache"
    g = c.grpo
    g.group_size, g.prompts_per_step, g.sampling_steps = 8, 4, 10
    c.train.steps, c.train.log_every, c.train.checkpoint_every = 100, 5, 50
    if arg in ("shell", "dance_shell"):
        c.reward.source, c.reward.kind = "shell_lcc", "shell_norm"
    else:
        c.reward.source = arg
    if arg == "dance_shell":
        g.mode, g.kl_weight, g.best_of_n = "dance_grpo", 0.0, 4
        g.timestep_fraction = 0.6
    return c
