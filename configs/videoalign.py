"""VideoAlign's alignment methods on the embedded benchmark's DiT: ``videoalign.py:ARG``.

ARG:

* ``score``: ``score_samples``: K = 4 clips per training prompt from the base model, scored by the latent
  reward model (``score.reward_model``; ``--config.score.reward=shell_lcc --config.score.manifold=W/manifold``
  for the Shell-LCC distance), written as a Flow-DPO pair cache and a Flow-RWR cache;
* ``flow_dpo``: Flow-DPO with constant beta (the paper's recommendation), LoRA, reference = the starting model;
* ``flow_dpo_t``: the same with the time-dependent beta (1 - t)^2 (the literal derivation; reward-hacks in the
  paper's Table 4);
* ``flow_rwr``: Flow-RWR on every scored clip, softmax(r / T) weights over the batch;
* ``guided``: ``sample`` with Flow-NRG reward guidance (``sampler.guidance``) from the reward model.

    python -m experiments.main --config=configs/videoalign.py:score --workdir=W/score \\
        --config.model.init_from=W/base --config.prompts.cache_dir=W/latents/train \\
        --config.latents.latent_mean=... --config.latents.latent_std=... --config.score.reward_model=W/reward_model
    python -m experiments.main --config=configs/videoalign.py:flow_dpo --workdir=W/flow_dpo \\
        --config.model.init_from=W/base --config.data.cache_dir=W/score/dpo_cache

The DiT is the embedded benchmark's (``experiments.embedded_pipeline.dit_stage_config``: 4 blocks of width
128, text 128). The caches hold latents in the model's normalised space (the sampler's output), so the
training configs leave ``data.latent_mean/std`` empty. LoRA rank 16, alpha 32 keeps the paper's alpha = 2 r
(r 64, alpha 128 on Wan's width 1536) at the small model's width; the learning rate is raised from the
paper's 5e-6 (a 1.3B+ model, batch 64) to what moves the small one in a few hundred steps.
"""

from experiments import embedded_pipeline, flow_dpo, flow_rwr, sample, score_samples

ARGS = ("score", "flow_dpo", "flow_dpo_t", "flow_rwr", "guided")


def _embedded_model(c) -> None:
    """The embedded benchmark's DiT architecture (the settings dit_stage_config gives every DiT stage)."""
    m = embedded_pipeline.dit_stage_config("sft").model
    for k in ("preset", "dim", "num_layers", "num_heads", "ffn_dim", "text_dim", "freq_dim"):
        c.model[k] = m[k]


def _sampler(c) -> None:
    # the embedded benchmark's sampling settings (embedded_pipeline's sample stage)
    c.sampler.steps, c.sampler.guidance_scale, c.sampler.batch_size = 10, 3.0, 32


def get_config(arg: str | None = None):
    arg = arg or "flow_dpo"
    if arg not in ARGS:
        raise ValueError(f"unknown videoalign config arg {arg!r}; expected one of {ARGS}")
    if arg == "score":
        c = score_samples.default_config()
        _sampler(c)
        c.prompts.count = 0                       # every prompt of the cache
        c.score.clips_per_prompt = 4
    elif arg == "guided":
        c = sample.default_config()
        _sampler(c)
        g = c.sampler.guidance
        g.kind, g.weight = "reward_model", 1.0
    elif arg in ("flow_dpo", "flow_dpo_t"):
        c = flow_dpo.default_config()
        c.lora.rank, c.lora.alpha = 16, 32.0
        c.optim.learning_rate = 1e-4
        c.dpo.beta, c.dpo.time_dependent = 500.0, arg == "flow_dpo_t"
    else:
        c = flow_rwr.default_config()
        c.optim.learning_rate = 3e-5
        c.rwr.temperature = 0.1
    _embedded_model(c)
    if arg in ("flow_dpo", "flow_dpo_t", "flow_rwr"):
        c.data.source, c.data.batch_size = "cache", 32
        c.train.steps, c.train.log_every, c.train.checkpoint_every = 300, 25, 100
    return c
