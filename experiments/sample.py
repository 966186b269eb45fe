"""Experiment ``sample``: videos from the DiT for a list of prompts, with fixed per-prompt seeds.

    python -m experiments.main --config=experiments/sample.py --workdir=/tmp/samples \\
        --config.model.init_from=/runs/reward --config.prompts.cache_dir=/data/cache/val \\
        --config.vae.pretrained=Wan2.1-T2V-1.3B-Diffusers/vae

Prompts (``prompts``): the first ``count`` examples of a latent cache (``source='cache'``: their captions
and cached text embeddings; ``count <= 0`` takes all), or a text file with one prompt per line, blank
lines ignored (``source='file'``), encoded by ``prompts.text_encoder``: a saved small ``TextEncoder``
directory (:func:`shelllcc.models.saving.save_model`) or a umT5 ``.npz`` text cache
(:func:`shelllcc.data.latent_cache.precomputed_text`; every prompt must be in it).

Noise: prompt ``i`` (its position in the prompt list, 0-based) starts from
``jax.random.normal(jax.random.fold_in(jax.random.PRNGKey(seed), i), latents.shape)`` (float32), so its
sample does not depend on the batch size, on the other prompts or on their order (up to float rounding
of differently sized matmuls).

Sampling: ``flow.samplers.sample`` with Wan's schedule (``wan_sampling_schedule(steps, shift)``), jitted
once per run: every batch has the same shape. Classifier-free guidance when ``sampler.guidance_scale``
is not 1: the negative context is ``prompts.negative`` encoded by the same text encoder (for
``source='cache'``: all zeros when ``prompts.negative`` is empty, else encoded by ``prompts.text_encoder``,
which is then required).

Devices: the batch is split over the mesh's batch axes (``data`` x ``fsdp``), parameters are sharded by
``sharding_rules`` as in training. Each step computes ``rows = batch_size`` rounded up to a multiple of
the number of batch shards; rows past the batch's prompts (and the missing prompts of the last batch)
repeat its last prompt and are dropped. So with 8 devices a ``batch_size`` of 8 keeps every device busy,
while 4 leaves half of the rows as padding (or use fewer devices: ``--config.mesh.devices=4``).

Reward guidance (``sampler.guidance``, VideoAlign's Flow-NRG, paper Eq. 11): at every model evaluation with
``t <= guidance.t_max``, ``v~ = v - weight t / (1 - t) grad r`` (``flow.samplers.reward_guidance``), with

* ``kind='reward_model'``: ``r = sum_k dimension_weights_k r_k(x_t, 1000 t, y)``, the noise-aware latent
  reward model's (VQ, MQ, TA) at the current noisy state and timestep, gradient w.r.t. ``x_t``;
* ``kind='shell_lcc'`` (ours, training-free): ``r = -distance(x0_hat)`` with ``x0_hat = x_t - t v`` and the
  gradient taken w.r.t. ``x0_hat`` (not through the model), put into the same formula;
* ``kind='energy_judge'`` (GT-SVJ's judge as a guidance energy; the use in guidance is ours): ``r = -E(x0_hat)``,
  the judge's mean energy over latent frames, taken at ``x0_hat`` like ``shell_lcc`` (the judge is trained on
  clean latents).

Decoding: latents are in the model's (normalised) space; the decoder gets
``z * latents.latent_std + latents.latent_mean`` (identity when both are empty: a model trained on a
latent cache without ``data.latent_mean/std``). A diffusers Wan2.1 model works in the space normalised
by the VAE's statistics: set them to its ``latents_mean`` / ``latents_std``.

Writes under ``WORKDIR/samples/``: ``{i:04d}.mp4`` and ``{i:04d}.gif`` (``output.mp4`` / ``output.gif``),
``latents.npy`` (``[N, T', h, w, C]`` float32, normalised space; always written when no VAE is given)
and ``prompts.json`` (a list of ``{index, caption, seed}``).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from experiments import config_entry, dit_setup, reward_sources
from shelllcc import parallel
from shelllcc.data import latent_cache
from shelllcc.errors import ConfigError
from shelllcc.evaluation import media
from shelllcc.flow import samplers
from shelllcc.flow.timesteps import wan_sampling_schedule
from shelllcc.models import saving
from shelllcc.models.wan_vae import config_from_diffusers
from third_party.diffusers_wan import load_config
from third_party.diffusers_wan import load_vae as load_diffusers_vae
from third_party.safetensors_checkpoint import read_config

SAMPLES_DIR = "samples"
SOURCES = ("cache", "file")


def default_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.experiment = "sample"
    c.seed = 0
    c.mesh = dit_setup.mesh_section()
    c.sharding_rules = parallel.DEFAULT_RULES
    c.model = dit_setup.model_section()          # usually init_from=WORKDIR of a training run, or pretrained=
    c.prompts = ml_collections.ConfigDict(dict(
        source="cache",              # cache | file
        cache_dir="",                # latent cache: prompts (source='cache') and the default latent shape
        count=8,                     # source='cache': the first `count` examples (<= 0: all)
        file="",                     # source='file': one prompt per line, blank lines ignored
        text_encoder="",             # saved small TextEncoder dir, or a umT5 .npz text cache
        negative="",                 # negative prompt for guidance_scale != 1
    ))
    c.latents = ml_collections.ConfigDict(dict(
        shape=(),                    # [T', h, w, C]; empty: the latent shape of prompts.cache_dir
        latent_mean=(),              # the model's latents are (z - mean) / std; empty: identity
        latent_std=(),
    ))
    c.sampler = ml_collections.ConfigDict(dict(
        solver="unipc",              # unipc | euler
        steps=25, shift=3.0,
        guidance_scale=1.0,          # 1: no classifier-free guidance (one model call per step)
        # (lo, hi): classifier-free guidance only at noise levels lo <= sigma <= hi, the conditional model
        # elsewhere (shelllcc.flow.samplers, "guidance interval"); empty: every step
        guidance_interval=(),
        batch_size=4,                # prompts per jitted sampling call
        # reward guidance of the velocity (module doc): v~ = v - weight t / (1 - t) grad r
        guidance=ml_collections.ConfigDict(dict(
            # none | reward_model (Flow-NRG) | shell_lcc (ours, training-free) | energy_judge (GT-SVJ's -E)
            kind="none",
            weight=0.0,
            # weights of the reward model's (VQ, MQ, TA) in r; VideoAlign's Table 6 values are not in the
            # notes available here, so equal weights
            dimension_weights=(1.0, 1.0, 1.0),
            t_max=0.95,                  # guide only at t <= t_max (t / (1 - t) has a pole at 1; ours)
            reward_model="",             # a trained noise-aware reward model, or 'random' (a stand-in)
            manifold="",                 # kind=shell_lcc: a fit_manifold output (or 'random')
            manifold_kind="shell_norm",  # the distance: lcc | shell_norm | shell
            energy_judge="",             # kind=energy_judge: a train_energy_judge workdir (or 'random')
        )),
    ))
    c.vae = ml_collections.ConfigDict(dict(
        dir="",                      # a WanVAE or PatchVAE saved with shelllcc.models.saving.save_model
        pretrained="",               # a diffusers AutoencoderKLWan folder (.../vae)
        dtype="float32",             # decoder compute dtype
    ))
    c.output = ml_collections.ConfigDict(dict(fps=8, mp4=True, gif=True, save_latents=True))
    c.lock()
    return c


get_config = config_entry.defaults_entry(default_config)


# ------------------------------------------------------------------------------------------ prompts

ContextFn = Callable[[Sequence[int]], np.ndarray]      # prompt positions -> [b, L, D] float32


@dataclasses.dataclass
class Prompts:
    captions: list[str]
    contexts: ContextFn
    text_shape: tuple[int, int]                          # (L, D) of one prompt's context
    negative: np.ndarray | None                          # [L, D]; None without guidance
    description: str


def read_prompt_file(path: str) -> list[str]:
    """The non-blank lines of ``path`` (trailing whitespace stripped)."""
    if not path:
        raise ValueError("prompts.source='file' needs --config.prompts.file=/path/to/prompts.txt")
    if not os.path.isfile(path):
        raise ValueError(f"prompts.file {path!r} does not exist")
    with open(path, encoding="utf-8") as f:
        return [line.rstrip() for line in f if line.strip()]


def load_text_encoder(path: str) -> tuple[Callable[[Sequence[str]], np.ndarray], str]:
    """``(captions -> embeddings [B, L, D] float32, description)`` for a saved small ``TextEncoder``
    directory or a umT5 ``.npz`` text cache."""

    if not path:
        raise ValueError("prompts.text_encoder is empty: give a saved TextEncoder directory or a umT5 .npz cache")
    if path.endswith(".npz"):
        if not os.path.isfile(path):
            raise ValueError(f"prompts.text_encoder: umT5 text cache {path!r} does not exist")
        lookup = latent_cache.precomputed_text(path)

        def encode(captions):
            try:
                return np.asarray(lookup(list(captions))[0], np.float32)
            except KeyError as e:
                raise ValueError(f"prompts.text_encoder: {e.args[0]}") from None
        return encode, lookup.description
    try:
        info = saving.read_model_json(path)
    except FileNotFoundError:
        raise ValueError(f"prompts.text_encoder {path!r} is neither a saved TextEncoder directory (no "
                         f"{saving.MODEL_JSON}) nor a .npz text cache") from None
    if info["kind"] != "text_encoder":
        raise ValueError(f"prompts.text_encoder {path!r} holds a {info['kind']!r} model, not a text_encoder")
    fn = latent_cache.text_encoder_fn(saving.load_model(path))

    def encode(captions):
        return np.asarray(fn(list(captions))[0], np.float32)
    return encode, fn.description


def _open_cache(cache_dir: str):
    if not os.path.isdir(cache_dir):
        raise ValueError(f"prompts.cache_dir {cache_dir!r} does not exist")
    try:
        return latent_cache.open_cache(cache_dir)
    except FileNotFoundError as e:
        raise ValueError(f"prompts.cache_dir: {e}") from None


def load_prompts(p: ml_collections.ConfigDict, guidance: bool) -> Prompts:
    """The prompt list and its contexts for the ``prompts`` section (``guidance``: also the negative)."""
    if p.source not in SOURCES:
        raise ValueError(f"unknown prompts.source {p.source!r}; expected one of {SOURCES}")
    if p.source == "cache":
        if not p.cache_dir:
            raise ValueError("prompts.source='cache' needs --config.prompts.cache_dir=/path/to/latent/cache")
        cache = _open_cache(p.cache_dir)
        n = len(cache) if p.count <= 0 else min(int(p.count), len(cache))
        if n < p.count:
            print(f"note: prompts.count={p.count} but cache {p.cache_dir!r} holds {len(cache)} examples; "
                  f"sampling {n}", flush=True)
        examples = cache.__getitems__(list(range(n))) if n else []
        if not examples:
            raise ValueError(f"no prompts: latent cache {p.cache_dir!r} is empty")
        captions = [str(e["caption"]) for e in examples]
        table = np.stack([np.asarray(e["text_embeddings"], np.float32) for e in examples])
        del examples
        text_shape = tuple(table.shape[1:])
        negative = None
        if guidance:
            if p.negative:
                if not p.text_encoder:
                    raise ValueError("prompts.negative with source='cache' needs prompts.text_encoder (the encoder "
                                     "of the cache's text embeddings) to encode it")
                encode, _ = load_text_encoder(p.text_encoder)
                negative = encode([p.negative])[0]
            else:
                negative = np.zeros(text_shape, np.float32)
        return Prompts(captions, lambda idx: table[np.asarray(idx, np.int64)], text_shape, negative,
                       f"the first {n} captions of latent cache {p.cache_dir}")

    captions = read_prompt_file(p.file)
    if not captions:
        raise ValueError(f"no prompts: prompts.file {p.file!r} has no non-blank line")
    encode, description = load_text_encoder(p.text_encoder)
    first = encode(captions[:1])
    text_shape = tuple(first.shape[1:])
    negative = encode([p.negative])[0] if guidance else None
    return Prompts(captions, lambda idx: encode([captions[i] for i in idx]), text_shape, negative,
                   f"{len(captions)} prompts of {p.file} encoded by {description}")


# ------------------------------------------------------------------------------------------ checks

def planned_transformer_config(m: ml_collections.ConfigDict):
    """The DiT's config as ``dit_setup.build_model`` will build it, read without loading any weights."""
    if m.pretrained and m.init_from:
        raise ValueError("set at most one of model.pretrained (a diffusers folder) and model.init_from (a workdir)")
    if m.pretrained:
        return load_config(m.pretrained)
    if m.init_from:
        return dit_setup.transformer_config(m, dit_setup.init_from_model(m.init_from)[1]["architecture"])
    return dit_setup.transformer_config(m)


VAE_KINDS = ("wan_vae", "patch_vae")


def planned_vae_config(v: ml_collections.ConfigDict):
    """The VAE's config (``None`` when no VAE is configured), read without loading any weights."""
    if v.dir and v.pretrained:
        raise ValueError("set at most one of vae.dir (a saved VAE) and vae.pretrained (a diffusers vae folder)")
    if v.pretrained:
        try:
            return config_from_diffusers(read_config(v.pretrained))
        except FileNotFoundError as e:
            raise ValueError(f"vae.pretrained {v.pretrained!r} is not a diffusers vae folder: {e}") from None
    if v.dir:
        try:
            info = saving.read_model_json(v.dir)
        except FileNotFoundError:
            raise ValueError(f"vae.dir {v.dir!r} is not a saved model (no {saving.MODEL_JSON})") from None
        if info["kind"] not in VAE_KINDS:
            raise ValueError(f"vae.dir {v.dir!r} holds a {info['kind']!r} model, not a VAE ({', '.join(VAE_KINDS)})")
        return saving.config_from_architecture(info["kind"], info["architecture"])
    return None


def resolve_latent_shape(lat: ml_collections.ConfigDict, cache_dir: str) -> tuple[int, ...]:
    if len(lat.shape):
        shape = tuple(int(s) for s in lat.shape)
    elif cache_dir:
        shape = tuple(int(s) for s in _open_cache(cache_dir).info["fields"]["latents"]["shape"])
    else:
        raise ValueError("latents.shape is empty and there is no prompts.cache_dir to take the latent shape from; "
                         "set --config.latents.shape='(T, h, w, C)'")
    if len(shape) != 4 or min(shape) < 1:
        raise ValueError(f"latents.shape must be four positive sizes [T', h, w, C], got {shape}")
    return shape


def check_setup(shape, mean, std, text_shape, model_cfg, vae_cfg) -> None:
    """``ValueError`` naming the mismatch between latents, text, model and VAE."""
    c = shape[-1]
    if c != model_cfg.in_channels:
        raise ValueError(f"latent channel count {c} (latents.shape {shape}) != the model's in_channels "
                         f"{model_cfg.in_channels}")
    if model_cfg.out_channels != model_cfg.in_channels:
        raise ValueError(f"the model predicts {model_cfg.out_channels} channels from {model_cfg.in_channels}: "
                         f"sampling needs out_channels == in_channels")
    if len(mean) != len(std):
        raise ValueError(f"latents.latent_mean has {len(mean)} entries, latents.latent_std {len(std)}")
    if len(mean) and len(mean) != c:
        raise ValueError(f"latents.latent_mean/latent_std have {len(mean)} entries; the latents have {c} channels")
    if len(std) and min(std) <= 0:
        raise ValueError(f"latents.latent_std must be positive, got {tuple(std)}")
    if text_shape[-1] != model_cfg.text_dim:
        raise ValueError(f"the prompts' text embeddings have D={text_shape[-1]} (shape {text_shape}) but the "
                         f"model's text_dim is {model_cfg.text_dim}")
    if vae_cfg is not None and vae_cfg.z_dim != c:
        raise ValueError(f"VAE z_dim {vae_cfg.z_dim} != the model's latent channels {c} (in_channels)")


# ------------------------------------------------------------------------------------------ sampling

def prompt_noise(seed: int, indices: Sequence[int], shape: Sequence[int]) -> np.ndarray:
    """``[len(indices), *shape]`` float32: row ``k`` is ``normal(fold_in(PRNGKey(seed), indices[k]), shape)``."""
    key = jax.random.PRNGKey(seed)
    shape = tuple(int(s) for s in shape)
    out = np.empty((len(indices), *shape), np.float32)
    for k, i in enumerate(indices):
        out[k] = np.asarray(jax.random.normal(jax.random.fold_in(key, int(i)), shape, jnp.float32))
    return out


def rows_per_step(batch_size: int, mesh) -> int:
    """``batch_size`` rounded up to a multiple of the mesh's batch shards."""
    shards = parallel.num_batch_shards(mesh)
    return -(-int(batch_size) // shards) * shards


def _to_global(x: np.ndarray, sharding) -> jax.Array:
    # every process holds the whole host array (prompts, noise and contexts are deterministic)
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


def _to_host(x: jax.Array) -> np.ndarray:
    if jax.process_count() == 1:
        return np.asarray(jax.device_get(x))
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


@dataclasses.dataclass(frozen=True, eq=False)
class RewardGuidance:
    """The static part of reward guidance (hashed by identity: one compiled program per instance); the reward's
    parameters and the weight are arguments of the program."""
    apply: Callable                  # reward_sources.RewardSource.apply
    at: str                          # noisy (Flow-NRG) | x0 (ours)
    dimension_weights: tuple
    t_max: float

    def hook(self, params, weight):
        def reward_fn(x, timestep, context):
            return reward_sources.combine(self.apply(params, x, timestep, context), self.dimension_weights)
        return samplers.reward_guidance(reward_fn, weight, self.at, self.t_max)


@dataclasses.dataclass
class SamplerGuidance:
    spec: RewardGuidance
    params: Any
    weight: float
    description: str


GUIDANCE_KINDS = ("none", "reward_model", "shell_lcc", "energy_judge")


def check_guidance(g: ml_collections.ConfigDict) -> None:
    if g.kind not in GUIDANCE_KINDS:
        raise ConfigError(f"unknown sampler.guidance.kind {g.kind!r}; expected one of {GUIDANCE_KINDS}")
    if len(g.dimension_weights) != 3:
        raise ConfigError(f"sampler.guidance.dimension_weights must be 3 numbers (VQ, MQ, TA), got "
                          f"{tuple(g.dimension_weights)}")
    if not 0 < float(g.t_max) <= 1:
        raise ConfigError(f"sampler.guidance.t_max must be in (0, 1], got {g.t_max}")


def build_guidance(g: ml_collections.ConfigDict, model: nnx.Module, seed: int = 0) -> SamplerGuidance | None:
    """The ``sampler.guidance`` section as a :class:`SamplerGuidance` (``None`` for kind 'none')."""
    check_guidance(g)
    if g.kind == "none":
        return None
    if g.kind == "reward_model":
        src = reward_sources.reward_model_source(g.reward_model, model, seed, key="sampler.guidance.reward_model")
        at = "noisy"
    elif g.kind == "energy_judge":
        # the judge is trained on clean latents (t_max 0): it judges x0_hat, like the Shell-LCC distance
        src = reward_sources.energy_judge_source(g.energy_judge, model, seed, key="sampler.guidance.energy_judge")
        at = "noisy" if src.noise_aware else "x0"
    else:
        src = reward_sources.shell_lcc_source(g.manifold, g.manifold_kind, model.config.in_channels,
                                              key="sampler.guidance.manifold")
        at = "x0"
    spec = RewardGuidance(src.apply, at, tuple(float(w) for w in g.dimension_weights), float(g.t_max))
    return SamplerGuidance(spec, src.params, float(g.weight),
                           f"reward guidance x {g.weight} ({src.description}, gradient at {at})")


@functools.partial(jax.jit, static_argnames=("graphdef", "schedule", "solver", "guidance_scale", "sharding", "guide",
                                             "guidance_interval"))
def _sample_program(state, noise, context, negative, guide_params=None, guide_weight=None, *, graphdef, schedule,
                    solver, guidance_scale, sharding, guide=None, guidance_interval=None):
    # module level with static settings: samplers of equal settings and shapes share one compiled program
    model = nnx.merge(graphdef, state)
    kw = dict(negative_context=negative, guidance_scale=guidance_scale,
              guidance_interval=guidance_interval) if guidance_scale != 1.0 else {}
    if guide is not None:
        kw["velocity_guidance"] = guide.hook(guide_params, guide_weight)
    x = samplers.sample(model, noise, context, schedule, solver=solver, **kw)
    return jax.lax.with_sharding_constraint(x, sharding)


class LatentSampler:
    """The jitted sampler of one model, schedule, latent shape and batch: ``sample(indices, contexts,
    negative)`` for up to ``batch_size`` prompts at once."""

    def __init__(self, model: nnx.Module, mesh, *, latent_shape: Sequence[int], solver: str = "unipc",
                 steps: int = 25, shift: float = 3.0, guidance_scale: float = 1.0, batch_size: int = 4,
                 seed: int = 0, reward_guidance: SamplerGuidance | None = None,
                 guidance_interval: Sequence[float] = ()):
        if solver not in samplers.SOLVERS:
            raise ValueError(f"unknown sampler.solver {solver!r}; expected one of {sorted(samplers.SOLVERS)}")
        if batch_size < 1:
            raise ValueError(f"sampler.batch_size must be >= 1, got {batch_size}")
        self.mesh, self.seed = mesh, int(seed)
        self.latent_shape = tuple(int(s) for s in latent_shape)
        self.batch_size = int(batch_size)
        self.rows = rows_per_step(batch_size, mesh)
        self.guidance_scale = float(guidance_scale)
        self.guided = self.guidance_scale != 1.0
        self.schedule = wan_sampling_schedule(int(steps), float(shift))
        # the weights are an argument, not a closure: not baked into the program as constants
        self.graphdef, self.state = nnx.split(model)
        self._batch = parallel.batch_sharding(mesh)
        interval = tuple(float(v) for v in guidance_interval) or None
        if interval is not None:
            if len(interval) != 2:
                raise ValueError(f"sampler.guidance_interval must be () or (lo, hi), got {tuple(guidance_interval)}")
            samplers.step_guidance_scales(self.schedule.sigmas, self.guidance_scale, interval)   # checks lo, hi
        self._static = dict(graphdef=self.graphdef, schedule=self.schedule, solver=solver,
                            guidance_scale=self.guidance_scale, sharding=self._batch, guidance_interval=interval)
        self._guide_args = ()
        if reward_guidance is not None:
            rep = parallel.replicated(mesh)
            self._static["guide"] = reward_guidance.spec
            self._guide_args = (jax.device_put(reward_guidance.params, rep),
                                jax.device_put(jnp.asarray(reward_guidance.weight, jnp.float32), rep))

    def pad(self, values: Sequence[Any]) -> list:
        """``values`` (at most ``batch_size``) extended to ``rows`` by repeating the last one."""
        values = list(values)
        if not 1 <= len(values) <= self.batch_size:
            raise ValueError(f"a batch holds 1..{self.batch_size} prompts, got {len(values)}")
        return values + [values[-1]] * (self.rows - len(values))

    def sample(self, indices: Sequence[int], contexts: np.ndarray, negative: np.ndarray | None = None) -> jax.Array:
        """Latents ``[rows, *latent_shape]`` (on the mesh, batch-sharded) for the prompts at positions
        ``indices`` with contexts ``[len(indices), L, D]``; rows past ``len(indices)`` are padding."""
        n = len(indices)
        contexts = np.asarray(contexts, np.float32)
        if contexts.shape[0] != n:
            raise ValueError(f"{n} prompt indices but {contexts.shape[0]} contexts")
        rows = self.pad(range(n))
        noise = prompt_noise(self.seed, [indices[r] for r in rows], self.latent_shape)
        ctx = contexts[rows]
        neg = None
        if self.guided:
            if negative is None:
                raise ValueError("classifier-free guidance (sampler.guidance_scale != 1) needs a negative context")
            neg = np.broadcast_to(np.asarray(negative, np.float32), ctx.shape).copy()
            neg = _to_global(neg, self._batch)
        return _sample_program(self.state, _to_global(noise, self._batch), _to_global(ctx, self._batch), neg,
                               *self._guide_args, **self._static)


def batches(n: int, batch_size: int) -> list[list[int]]:
    return [list(range(s, min(s + batch_size, n))) for s in range(0, n, batch_size)]


def sample_latents(sampler: LatentSampler, indices: Sequence[int], contexts: ContextFn,
                   negative: np.ndarray | None = None) -> np.ndarray:
    """Latents ``[len(indices), *latent_shape]`` float32 (host) for the prompts at ``indices``,
    ``sampler.batch_size`` at a time; ``contexts(positions) -> [b, L, D]``."""
    out = []
    for b in batches(len(indices), sampler.batch_size):
        idx = [indices[k] for k in b]
        lat = sampler.sample(idx, contexts(idx), negative)
        out.append(_to_host(lat)[: len(idx)].astype(np.float32))
    return np.concatenate(out)


# ------------------------------------------------------------------------------------------ decoding

class LatentDecoder:
    """``decode(latents [rows, T', h, w, C] normalised, on the mesh) -> (uint8 [rows, T, H, W, 3],
    finite [rows] bool)``: denormalise, the VAE's ``decode`` (clamped to [-1, 1]) and convert to pixels
    on the devices, so only uint8 crosses to the host. Non-finite pixels become mid-grey (and are flagged)."""

    def __init__(self, vae: nnx.Module, mesh, mean: Sequence[float] = (), std: Sequence[float] = ()):
        graphdef, state = nnx.split(vae)
        self.state = jax.device_put(state, parallel.replicated(mesh))
        self.config = vae.config
        mean = np.asarray(mean, np.float32) if len(mean) else None
        std = np.asarray(std, np.float32) if len(std) else None
        batch = parallel.batch_sharding(mesh)

        def run(state, z):
            vae = nnx.merge(graphdef, state)
            z = z.astype(jnp.float32)
            if mean is not None:
                z = z * std + mean
            video = vae.decode(z, clamp=True).astype(jnp.float32)
            finite = jnp.all(jnp.isfinite(video), axis=(1, 2, 3, 4))
            video = jnp.nan_to_num(video, nan=0.0, posinf=1.0, neginf=-1.0)
            # the same mapping as media.to_uint8
            pixels = jnp.clip(jnp.round((video + 1.0) * 127.5), 0, 255).astype(jnp.uint8)
            return pixels, finite

        self._run = jax.jit(run, out_shardings=(batch, batch))

    def decode(self, latents: jax.Array) -> tuple[np.ndarray, np.ndarray]:
        pixels, finite = self._run(self.state, latents)
        return _to_host(pixels), _to_host(finite)


def load_vae(v: ml_collections.ConfigDict):
    dtype = jnp.dtype(v.dtype)
    if v.pretrained:
        return load_diffusers_vae(v.pretrained, dtype=dtype, param_dtype=jnp.float32)
    return saving.load_model(v.dir, dtype=dtype, param_dtype=jnp.float32)


# ------------------------------------------------------------------------------------------ the run

def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Sample, decode and write every prompt (module doc). Returns ``{"latents": [N, ...], "captions": [...],
    "out_dir": ...}``."""
    s, p, o = config.sampler, config.prompts, config.output
    if o.fps <= 0:
        raise ValueError(f"output.fps must be positive, got {o.fps}")
    if s.steps < 1:
        raise ValueError(f"sampler.steps must be >= 1, got {s.steps}")
    if s.solver not in samplers.SOLVERS:
        raise ValueError(f"unknown sampler.solver {s.solver!r}; expected one of {sorted(samplers.SOLVERS)}")
    if s.batch_size < 1:
        raise ValueError(f"sampler.batch_size must be >= 1, got {s.batch_size}")
    guided = float(s.guidance_scale) != 1.0
    check_guidance(s.guidance)

    # everything that can be checked without loading weights first
    prompts = load_prompts(p, guided)
    shape = resolve_latent_shape(config.latents, p.cache_dir)
    mean, std = tuple(config.latents.latent_mean), tuple(config.latents.latent_std)
    model_cfg = planned_transformer_config(config.model)
    vae_cfg = planned_vae_config(config.vae)
    check_setup(shape, mean, std, prompts.text_shape, model_cfg, vae_cfg)
    if prompts.negative is not None and tuple(prompts.negative.shape) != prompts.text_shape:
        raise ValueError(f"the negative prompt's context has shape {prompts.negative.shape}; the prompts' "
                         f"contexts have {prompts.text_shape}")

    mesh = dit_setup.make_mesh(config.mesh)
    n = len(prompts.captions)
    batch_size = min(int(s.batch_size), n)      # fewer prompts than a batch: no rows wasted on padding
    loaded = dit_setup.build_model(config.model, mesh, dit_setup.sharding_rules(config))
    reward_guide = build_guidance(s.guidance, loaded.model, config.seed)
    if reward_guide is not None:
        print(f"sample: {reward_guide.description}", flush=True)
    sampler = LatentSampler(loaded.model, mesh, latent_shape=shape, solver=s.solver, steps=s.steps, shift=s.shift,
                            guidance_scale=s.guidance_scale, batch_size=batch_size, seed=config.seed,
                            reward_guidance=reward_guide, guidance_interval=s.guidance_interval)
    decode = (o.mp4 or o.gif) and vae_cfg is not None
    decoder = LatentDecoder(load_vae(config.vae), mesh, mean, std) if decode else None
    print(f"sample: {n} prompts ({prompts.description}); model: {loaded.source}; latents {shape}; "
          f"{s.solver} x {s.steps} steps (shift {s.shift}), guidance {s.guidance_scale}"
          f"{f' at sigma in {tuple(s.guidance_interval)}' if len(s.guidance_interval) else ''}; batch {batch_size} "
          f"({sampler.rows} rows over {parallel.num_batch_shards(mesh)} batch shards of mesh {dict(mesh.shape)})",
          flush=True)
    if sampler.rows > batch_size:
        print(f"note: batch_size {batch_size} is padded to {sampler.rows} rows (a multiple of the "
              f"{parallel.num_batch_shards(mesh)} batch shards); a batch_size of {sampler.rows} costs the same",
              flush=True)
    if vae_cfg is None:
        print("note: no decoder given (vae.dir and vae.pretrained are empty): writing latents only, no videos",
              flush=True)

    out_dir = os.path.join(workdir, SAMPLES_DIR)
    writer = jax.process_index() == 0
    if writer:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "prompts.json"), "w") as f:
            json.dump([{"index": i, "caption": c, "seed": int(config.seed)} for i, c in enumerate(prompts.captions)],
                      f, indent=2, ensure_ascii=False)

    all_latents = np.zeros((n, *shape), np.float32)
    groups = batches(n, batch_size)
    t_start = time.time()
    for k, idx in enumerate(groups):
        t0 = time.time()
        lat = sampler.sample(idx, prompts.contexts(idx), prompts.negative)
        host = _to_host(lat)
        all_latents[idx] = host[: len(idx)]
        t_sample = time.time() - t0
        msg = f"batch {k + 1}/{len(groups)}: prompts {idx[-1] + 1}/{n} sampled in {t_sample:.1f}s"
        if decoder is not None:
            t1 = time.time()
            pixels, finite = decoder.decode(lat)
            t_decode = time.time() - t1
            t2 = time.time()
            for r, i in enumerate(idx):
                if not finite[r]:
                    print(f"warning: prompt {i}: the decoded video has non-finite values (written as grey)", flush=True)
                if writer:
                    if o.mp4:
                        media.write_mp4(os.path.join(out_dir, f"{i:04d}.mp4"), pixels[r], o.fps)
                    if o.gif:
                        media.write_gif(os.path.join(out_dir, f"{i:04d}.gif"), pixels[r], o.fps)
            msg += f", decoded in {t_decode:.1f}s, written in {time.time() - t2:.1f}s"
        print(msg, flush=True)

    if writer and (o.save_latents or decoder is None):
        np.save(os.path.join(out_dir, "latents.npy"), all_latents)
    print(f"sample: {n} prompts in {time.time() - t_start:.1f}s -> {out_dir}", flush=True)
    return {"latents": all_latents, "captions": prompts.captions, "out_dir": out_dir}
