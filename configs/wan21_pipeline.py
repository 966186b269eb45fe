"""The Wan2.1-T2V-1.3B real-scale recipe, one stage per argument: ``wan21_pipeline.py:STAGE``.

Stages (each a thin wrapper of the config it names, so the recipe values live in one place):

* ``encode``: ``experiments/encode_cache.py`` -- clips of 81 frames at 480x832 through the Wan2.1 VAE
  (float32 compute, as the diffusers Wan pipeline runs its VAE) into latents ``[21, 60, 104, 16]`` stored as
  bfloat16, with umT5 text embeddings ``[512, 4096]`` from a ``python -m third_party.umt5`` cache.
* ``manifold``: ``configs/wan21_manifold.py`` (4096 anchors, 512-wide coder, latents normalised with the
  Wan2.1 VAE's per-channel statistics).
* ``reward``: ``configs/wan21_reward.py:1.3b-lora`` (one-step reward from noise, s in [0.7, 1], AdamW
  lr 1e-5, effective batch 8, clip 1.0, LoRA rank 16, ``shell`` distance).
* ``sample``: ``experiments/sample.py`` with the Wan2.1 T2V defaults of diffusers' ``WanPipeline``:
  latents ``[21, 60, 104, 16]`` (81 x 480 x 832), UniPC, 50 steps, flow shift 3.0 (the 1.3B scheduler
  config; 5.0 is for 720p), classifier-free guidance 5.0 against the empty negative prompt (diffusers'
  default ``negative_prompt=""``), 16 fps output, latents denormalised with the Wan2.1 VAE statistics.

Paths are left empty (``--config.*`` overrides give them), so every stage's command names its inputs::

    python -m experiments.main --config=configs/wan21_pipeline.py:encode --workdir=cache/train \\
        --config.data.dataset=$BUILDER_DIR --config.vae.pretrained=$WAN/vae --config.text.umt5_cache=text.npz
    python -m experiments.main --config=configs/wan21_pipeline.py:manifold --workdir=runs/manifold \\
        --config.data.cache.dir=cache/train
    python -m experiments.main --config=configs/wan21_pipeline.py:reward --workdir=runs/shell \\
        --config.model.pretrained=$WAN/transformer --config.data.cache_dir=cache/train \\
        --config.reward.manifold=runs/manifold
    python -m experiments.main --config=configs/wan21_pipeline.py:sample --workdir=runs/shell-samples \\
        --config.model.init_from=runs/shell --config.prompts.file=prompts.txt \\
        --config.prompts.text_encoder=prompts.npz --config.vae.pretrained=$WAN/vae
"""

from experiments import encode_cache, sample
from shelllcc.models.wan_vae import WanVAEConfig

STAGES = ("encode", "manifold", "reward", "sample")

# 81 frames at 480 x 832 (Wan2.1's 480p) -> 1 + 80 / 4 latent frames at 1/8 the resolution, 16 channels
VIDEO_SHAPE = (81, 480, 832)
LATENT_SHAPE = (21, 60, 104, 16)
TEXT_SHAPE = (512, 4096)           # umT5-XXL, zero-padded to 512 tokens
FPS = 16
REWARD_ARG = "1.3b-lora"


def encode_config():
    c = encode_cache.default_config()
    c.vae.dtype = "float32"
    c.output.latent_dtype = "bfloat16"  # the DiT reads bfloat16 latents (wan21_reward: data.latent_dtype)
    c.batch_size = 1
    # ~4 MB of bf16 latents + up to 8 MB of trimmed umT5 text per clip: shards of ~0.5-1 GB
    c.output.shard_size = 128
    return c


def manifold_config():
    from configs import wan21_manifold
    return wan21_manifold.get_config()


def reward_config():
    from configs import wan21_reward
    return wan21_reward.get_config(REWARD_ARG)


def sample_config():
    reward = reward_config()
    vae = WanVAEConfig.preset("wan2.1")
    c = sample.default_config()
    m = c.model
    # the runtime knobs of the trained model (its architecture comes from init_from / pretrained)
    m.preset = reward.model.preset
    m.dtype, m.param_dtype, m.attention_impl = "bfloat16", "bfloat16", reward.model.attention_impl
    m.remat_policy = "none"            # inference: nothing to rematerialise
    c.prompts.source = "file"
    c.prompts.negative = ""            # diffusers' WanPipeline default; must be in the prompts' umT5 cache
    c.latents.shape = LATENT_SHAPE
    c.latents.latent_mean, c.latents.latent_std = tuple(vae.latents_mean), tuple(vae.latents_std)
    c.sampler.solver, c.sampler.steps, c.sampler.shift = "unipc", 50, 3.0
    c.sampler.guidance_scale = 5.0
    c.sampler.batch_size = 1
    c.vae.dtype = "float32"
    c.output.fps = FPS
    return c


def get_config(arg: str | None = None):
    if arg not in STAGES:
        raise ValueError(f"configs/wan21_pipeline.py needs a stage: wan21_pipeline.py:STAGE with STAGE one of "
                         f"{STAGES}, got {arg!r}")
    return {"encode": encode_config, "manifold": manifold_config, "reward": reward_config,
            "sample": sample_config}[arg]()
