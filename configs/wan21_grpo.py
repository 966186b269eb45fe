"""GRPO on Wan2.1-T2V-1.3B: ``wan21_grpo.py:ARG``.

ARG (paths left empty; ``--config.*`` flags give them):

* ``shell``: Flow-GRPO, the Shell-LCC distance (shell_norm) of the final latent as the reward (no decode),
  81 x 480 x 832 clips (latents 21 x 60 x 104 x 16), umT5 text (512 x 4096);
* ``reward_model``: the same with the latent BTT reward model (VQ + MQ + TA at t = 0);
* ``dance_shell``: DanceGRPO with the Shell-LCC distance (no KL, best 4 of 8, 60% of the steps);
* ``smoke``: ``shell`` at reduced clip size (17 x 240 x 416: latents 5 x 30 x 52 x 16, text 64 x 4096) with
  random weights, random prompts and a random manifold: ``benchmarks/grpo_smoke.py``'s run.

The model runtime is ``wan21_reward.py:1.3b-lora``'s (bf16 base, flash attention, attention outputs kept for
the backward pass) with LoRA rank 32 / alpha 64 (ours); 10 SDE steps with shift 3 (Wan's 480p shift), Flow-GRPO's
a = 0.7, clip 1e-4, KL 0.04 without dt, advantages clipped to 5. Group size 8 and 2 prompts per step per
device group are ours (upstream: 24 per group): the rollout is the expensive part (``G P x 10`` forward
passes, then ``G P x K`` forward + backward), sharded over the mesh's data axis.

    python -m experiments.main --config=configs/wan21_grpo.py:shell --workdir=runs/wan13b-grpo \\
        --config.model.pretrained=$WAN/transformer --config.data.cache_dir=runs/wan-latents \\
        --config.data.latent_mean=... --config.data.latent_std=... --config.reward.manifold=runs/wan-manifold
"""

from configs import wan21_pipeline
from experiments import grpo

ARGS = ("shell", "reward_model", "dance_shell", "smoke")
SMOKE_LATENTS = (5, 30, 52, 16)       # 17 frames at 240 x 416 through Wan's VAE (4x time, 8x space)
SMOKE_TEXT = (64, 4096)


def get_config(arg: str | None = None):
    arg = arg or "shell"
    if arg not in ARGS:
        raise ValueError(f"unknown wan21_grpo config arg {arg!r}; expected one of {ARGS}")
    r = wan21_pipeline.reward_config()
    c = grpo.default_config()
    for k in ("preset", "dtype", "param_dtype", "attention_impl", "remat_policy"):
        c.model[k] = r.model[k]
    c.lora.rank, c.lora.alpha = 32, 64.0
    c.optim.learning_rate = 1e-4
    c.data.latent_dtype = "bfloat16"
    c.data.random_latent_shape, c.data.random_text_shape = wan21_pipeline.LATENT_SHAPE, wan21_pipeline.TEXT_SHAPE
    g = c.grpo
    g.group_size, g.prompts_per_step, g.sampling_steps, g.shift = 8, 2, 10, 3.0
    c.train.steps, c.train.log_every, c.train.checkpoint_every = 500, 1, 50
    c.reward.source, c.reward.kind = ("reward_model", "shell_norm") if arg == "reward_model" else ("shell_lcc",
                                                                                                   "shell_norm")
    if arg == "dance_shell":
        g.mode, g.kl_weight, g.best_of_n, g.timestep_fraction = "dance_grpo", 0.0, 4, 0.6
    if arg == "smoke":
        c.data.source = "random"
        c.data.random_latent_shape, c.data.random_text_shape = SMOKE_LATENTS, SMOKE_TEXT
        c.reward.manifold = "random"
        c.train.steps, c.train.checkpoint_every = 4, 1000
    return c
