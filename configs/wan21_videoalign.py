"""VideoAlign's methods on Wan2.1-T2V-1.3B with the paper's settings: ``wan21_videoalign.py:ARG``.

ARG (paths left empty; ``--config.*`` flags give them):

* ``score``: ``score_samples`` of the base: K = 4 clips per prompt with the sampler of
  ``wan21_pipeline.py:sample`` (81 x 480 x 832, UniPC 50 steps, shift 3, CFG 5), scored by the latent reward
  model at t = 0 (r = mean of VQ, MQ, TA, as VideoAlign labels its DPO pairs), written as a Flow-DPO pair
  cache (best against worst per prompt) and a Flow-RWR cache;
* ``flow_dpo``: Flow-DPO with constant beta (the paper's recommendation, Table 10 for video): LoRA r 64,
  alpha 128 on q/k/v/o of both attention layers, Adam lr 5e-6, batch 64, beta 500; reference = the starting
  model (adapters zeroed);
* ``flow_dpo_t``: the same with beta (1 - t)^2 (the literal derivation; reward-hacks in the paper's Table 4);
* ``flow_rwr``: Flow-RWR with the same LoRA, optimizer and batch; the temperature is unspecified upstream
  (``rwr.temperature`` 0.5 is ours, on the reward model's logit scale), weights softmax(r / T) over the
  whole batch of 64 (computed before the microbatch split);
* ``guided``: ``wan21_pipeline.py:sample`` with Flow-NRG reward guidance from the noise-aware reward model
  (``sampler.guidance``; weight 1 per dimension: the paper's Table 6 weights are not available here);
* ``sft``: the control row: plain flow matching on the Flow-RWR cache (every scored clip, unweighted) with the
  same LoRA, optimizer, batch and steps as Flow-DPO and Flow-RWR;
* ``reward_model``: ``train_reward_model`` on pair caches of Wan latents (``shelllcc.data.preference_cache``:
  both clips through the Wan2.1 VAE, normalised with its statistics; umT5 text): the first 8 of the 1.3B
  DiT's 30 blocks (the paper takes "the first blocks" without a number: 8 is ours) with LoRA, three query
  tokens, BTT (theta 5), t ~ U[0, 1); LoRA r 64 / alpha 128, lr 2e-6, batch 32 are the settings VideoAlign
  released for its VLM reward model, taken over here (their latent model's are unpublished).

One epoch of Flow-DPO is ``pairs / 64`` steps: set ``--config.train.steps`` from the pair count that
``score`` prints. Each pass runs one pair (``train.microbatch_size`` 1: the winner and the loser through the
policy, forward and backward, and through the reference, forward only); 64 pairs accumulate per step.

    python -m experiments.main --config=configs/wan21_videoalign.py:score --workdir=runs/va-score \\
        --config.model.pretrained=$WAN/transformer --config.prompts.file=prompts.txt \\
        --config.prompts.text_encoder=prompts.npz --config.score.reward_model=runs/reward-model
    python -m experiments.main --config=configs/wan21_videoalign.py:flow_dpo --workdir=runs/va-dpo \\
        --config.model.pretrained=$WAN/transformer --config.data.cache_dir=runs/va-score/dpo_cache

The caches hold latents in the DiT's normalised space (the sampler's output), so the training configs leave
``data.latent_mean/std`` empty.
"""

from configs import wan21_pipeline
from experiments import flow_dpo, flow_rwr, sample, score_samples, sft, train_reward_model

ARGS = ("score", "flow_dpo", "flow_dpo_t", "flow_rwr", "sft", "guided", "reward_model")


def _model(m) -> None:
    """The 1.3B DiT with its training runtime (``wan21_reward.py:1.3b-lora``: bf16 base, cuDNN/flash attention,
    each block's attention output kept for the backward pass)."""
    r = wan21_pipeline.reward_config().model
    for k in ("preset", "dtype", "param_dtype", "attention_impl", "remat_policy"):
        m[k] = r[k]


def _sampling(c) -> None:
    """The sampler, prompts and latent shape of ``wan21_pipeline.py:sample``."""
    s = wan21_pipeline.sample_config()
    for section in ("model", "prompts", "latents", "sampler"):
        for k, v in s[section].items():
            if k != "guidance":          # the guidance section is this config's own
                c[section][k] = v


def get_config(arg: str | None = None):
    arg = arg or "flow_dpo"
    if arg not in ARGS:
        raise ValueError(f"unknown wan21_videoalign config arg {arg!r}; expected one of {ARGS}")
    if arg == "reward_model":
        c = train_reward_model.default_config()
        _model(c.model)
        c.model.scan_layers = False            # the reward model runs its few blocks one by one
        r = c.reward_model
        r.num_blocks, r.backbone, r.loss, r.theta, r.t_max = 8, "lora", "btt", 5.0, 1.0
        c.lora.rank, c.lora.alpha = 64, 128.0
        c.optim.learning_rate, c.optim.grad_clip = 2e-6, 1.0
        c.data.batch_size = 32
        c.train.microbatch_size, c.train.steps = 1, 1000
        c.train.log_every, c.train.checkpoint_every = 10, 200
        c.eval.batch_size = 4
        return c
    if arg in ("score", "guided"):
        c = score_samples.default_config() if arg == "score" else sample.default_config()
        _sampling(c)
        if arg == "score":
            c.score.reward, c.score.clips_per_prompt, c.score.batch_size = "reward_model", 4, 1
            c.prompts.count = 0
        else:
            g = c.sampler.guidance
            g.kind, g.weight, g.dimension_weights = "reward_model", 1.0, (1.0, 1.0, 1.0)
        return c
    c = {"flow_rwr": flow_rwr.default_config, "sft": sft.default_config}.get(arg, flow_dpo.default_config)()
    _model(c.model)
    c.lora.rank, c.lora.alpha = 64, 128.0
    c.optim.learning_rate, c.optim.schedule, c.optim.grad_clip = 5e-6, "constant", 1.0
    c.data.source, c.data.batch_size, c.data.latent_dtype = "cache", 64, "bfloat16"
    c.data.random_latent_shape, c.data.random_text_shape = wan21_pipeline.LATENT_SHAPE, wan21_pipeline.TEXT_SHAPE
    c.train.microbatch_size, c.train.steps = 1, 200
    c.train.log_every, c.train.checkpoint_every, c.train.keep_checkpoints = 5, 50, 3
    if arg == "flow_rwr":
        c.rwr.temperature = 0.5
    elif arg != "sft":
        c.dpo.beta, c.dpo.time_dependent = 500.0, arg == "flow_dpo_t"
    return c
