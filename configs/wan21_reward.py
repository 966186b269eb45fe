"""Wan2.1 T2V reward fine-tuning with the reference recipe: ``wan21_reward.py:SIZE-MODE``.

SIZE is ``1.3b`` or ``14b``; MODE is ``lora`` (rank 16, alpha 16 on q/k/v/o of both attention layers, bf16
base) or ``full`` (float32 master weights). Recipe: one-step reward from noise, s ~ U[0.7, 1.0], AdamW at
lr 1e-5, effective batch 8, gradient clipping at 1.0, ``shell`` distance.

    python -m experiments.main --config=configs/wan21_reward.py:1.3b-lora --workdir=runs/wan13b-shell \\
        --config.model.pretrained=Wan2.1-T2V-1.3B-Diffusers/transformer \\
        --config.data.cache_dir=cache/train --config.reward.manifold=runs/manifold

Effective batch 8 = ``data.batch_size``; each device runs ``train.microbatch_size`` (1) examples per forward
pass and gradients accumulate over ``8 / (microbatch_size x devices)`` passes. 14B spreads its weights over
every device (``mesh.fsdp = -1``): full fine-tuning of 14B needs about 230 GB of weights + Adam state.

TPU pods: ``SIZE-MODE-POD`` (e.g. ``14b-full-v5p64``, ``1.3b-lora-2xv5p64``) adds a pod's mesh (see
:func:`pod_mesh`); attention is ``flash`` (cuDNN on GPU, the Pallas TPU flash kernel on TPU). Check that a
preset fits before booking the pod: ``python benchmarks/tpu_aot.py --config configs/wan21_reward.py:ARG``.
"""

import math

from experiments import reward_finetune
from shelllcc.models.wan_vae import WanVAEConfig

BASE_ARGS = ("1.3b-lora", "1.3b-full", "14b-lora", "14b-full")
PRESETS = {"1.3b": "wan2.1-t2v-1.3b", "14b": "wan2.1-t2v-14b"}
# TPU pod presets, SIZE-MODE-POD; POD is Cloud TPU's slice name (v5p-N: N TensorCores = N/2 chips; v6e-N:
# N chips) with an "Nx" prefix for N slices joined over DCN. Per pod: the topology (per slice) and slices.
PODS = {
    "v5p8": ("v5p:2x2x1", 1),
    "v5p16": ("v5p:2x2x2", 1),
    "v5p64": ("v5p:4x4x2", 1),
    "v5p128": ("v5p:4x4x4", 1),
    "2xv5p64": ("v5p:4x4x2", 2),
    "v6e4": ("v6e:2x2", 1),
    "v6e8": ("v6e:2x4", 1),
    "v6e16": ("v6e:4x4", 1),
    "v6e64": ("v6e:8x8", 1),
    "2xv6e16": ("v6e:4x4", 2),
}
ARGS = BASE_ARGS + tuple(f"{a}-{pod}" for a in BASE_ARGS for pod in PODS)


def pod_mesh(c, size: str, mode: str, pod: str) -> None:
    """Mesh and batch of a pod preset. Within a slice (ICI): 1.3B LoRA is data parallel; 1.3B full shards
    its float32 weights and Adam state over 4 chips (23 GB replicated would not leave room for activations on
    a 32 GB v6e); 14B LoRA shards over 8 chips (or the slice), 14B full over the whole slice (230 GB of
    state). Across slices (DCN) only the data axis runs, so per-layer FSDP gathers never leave a slice.
    One example per chip per pass (``train.microbatch_size``), and a global batch of at least the recipe's 8
    and one example per chip: an example's 32760 tokens are not split over chips."""
    topology, slices = PODS[pod]
    chips = slices * math.prod(int(x) for x in topology.split(":")[1].split("x"))
    per_slice = chips // slices
    fsdp = {("1.3b", "lora"): 1, ("1.3b", "full"): min(per_slice, 4),
            ("14b", "lora"): min(per_slice, 8), ("14b", "full"): per_slice}[(size, mode)]
    c.mesh.data, c.mesh.fsdp, c.mesh.slices, c.mesh.tpu_topology = -1, fsdp, slices, topology
    c.data.batch_size = max(8, chips)


def get_config(arg: str | None = None):
    arg = arg or "1.3b-lora"
    if arg not in ARGS:
        raise ValueError(f"unknown wan21_reward config arg {arg!r}; expected one of {ARGS}")
    size, mode, *pod = arg.split("-")
    c = reward_finetune.default_config()
    c.model.preset = PRESETS[size]
    c.model.dtype = "bfloat16"
    c.model.param_dtype = "bfloat16" if mode == "lora" else "float32"
    c.model.attention_impl = "flash"      # cuDNN on GPU, the Pallas flash kernel on TPU (the mesh's platform)
    # 1.3B: keep each block's attention output and softmax statistics (+5 GB at 81 x 480 x 832, 14% faster
    # per step than full remat on an H200, benchmarks/RESULTS.md); 14B: full remat (5x larger activations)
    c.model.remat_policy = "attention_forward_saveable" if size == "1.3b" else "full"
    c.lora.rank = 16 if mode == "lora" else 0
    c.lora.alpha = 16.0
    if size == "14b":
        c.mesh.data, c.mesh.fsdp = 1, -1
        c.model.random_init = "devices"      # a host-side init of 14B did not fit the host's memory
    c.data.source = "cache"
    c.data.batch_size = 8
    c.data.latent_dtype = "bfloat16"
    vae = WanVAEConfig.preset("wan2.1")
    c.data.latent_mean, c.data.latent_std = tuple(vae.latents_mean), tuple(vae.latents_std)
    c.train.steps = 2000
    c.train.microbatch_size = 1
    c.train.log_every, c.train.checkpoint_every, c.train.keep_checkpoints = 10, 200, 3
    c.optim.learning_rate = 1e-5
    c.optim.schedule = "constant"
    c.optim.grad_clip = 1.0
    c.objective.name, c.objective.s_lo, c.objective.s_hi = "one_step", 0.7, 1.0
    c.reward.kind = "shell"
    c.reward.compute_dtype = "bfloat16"
    c.reward.chunk_size = 24000   # the Pallas kernels' best chunk on an H200 (0.37 GB; benchmarks/RESULTS.md)
    if pod:
        pod_mesh(c, size, mode, pod[0])
    return c
