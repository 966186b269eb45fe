"""What ``sft``, ``reward_finetune`` and ``sample`` share: the DiT (built, loaded, adapted, sharded), the latent
batches, and the generic jitted train step with gradient accumulation.

Config sections defined here (each experiment's ``default_config`` includes them):

* ``model``: preset + architecture overrides, dtypes, attention kernel, remat; weights from a diffusers
  ``transformer/`` folder (``pretrained``), from an earlier run of this project (``init_from``: its
  workdir), or random (``seed``).
* ``lora``: rank (0: full fine-tuning), alpha, target module patterns.
* ``data``: the latent cache (``source='cache'``) or seeded Gaussian latents of a fixed shape
  (``source='random'``: smoke and speed runs, no files).
* ``mesh``, ``sharding_rules``: the ('data', 'fsdp') mesh and the logical-axis rules for parameters (flax's
  ``nnx.logical_axis_rules``; see :func:`sharding_context`).

:func:`run_training` trains the DiT by default; another model (the latent reward model of
``train_reward_model``) passes its :class:`ModelHooks` (build, split, batches, export, resume settings) and
shares the rest of the stack.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from clu import parameter_overview
from flax import nnx

from shelllcc import errors, parallel
from shelllcc.data import latent_cache, random_latents, readers
from shelllcc.models import saving
from shelllcc.models.wan_transformer import LAYERS, LOGICAL_AXES, WanTransformer, stack_blocks, stacked_layout
from shelllcc.models.wan_transformer import get_config as wan_config
from shelllcc.training import checkpoints, loop, metric_writers, optimizers
from shelllcc.training import lora as lora_lib
from shelllcc.training import train_state as ts
from shelllcc.training.step import LossFn, jit_train_step, make_train_step, microbatch_count, train_state_shardings
from third_party.diffusers_wan import load_transformer

ARCH_OVERRIDES = ("dim", "num_layers", "num_heads", "ffn_dim", "text_dim", "freq_dim")
MODEL_DIR = "model"           # where a run exports its final DiT (loadable by init_from / sample)


# ------------------------------------------------------------------------------------------ config sections

def model_section() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        preset="tiny",               # tiny | wan2.1-t2v-1.3b | wan2.1-t2v-14b
        # architecture overrides of the preset (0: keep the preset's value)
        dim=0, num_layers=0, num_heads=0, ffn_dim=0, text_dim=0, freq_dim=0,
        patch_size=(),               # (pt, ph, pw) latent positions per token; empty: the preset's (1, 2, 2)
        dtype="float32", param_dtype="float32",
        # '' (jax default) | xla | cudnn (GPU) | tpu_flash (Pallas, TPU) | flash (the mesh platform's fused
        # attention: cudnn on GPU, tpu_flash on TPU, xla elsewhere)
        attention_impl="",
        remat_policy="none",
        scan_layers=True,            # stacked blocks run by one nnx.scan (XLA compiles one block); False: a loop
        pretrained="",               # diffusers transformer/ folder
        init_from="",                # workdir of an earlier sft / reward_finetune run (its model/)
        seed=0,                      # random init when neither of the above is set
        # where a random init is drawn: host (one program on the host CPU, then placed: fast to compile) or
        # devices (one program per parameter, born sharded on the mesh; no host copy: for 14B)
        random_init="host",
    ))


def lora_section() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(rank=0, alpha=16.0, targets=lora_lib.DEFAULT_TARGETS))


def data_section() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        source="cache",              # cache | random
        cache_dir="",                # a latent cache written by shelllcc.data.latent_cache
        batch_size=8,                # global batch per optimizer step
        prefetch=2,
        latent_dtype="float32",
        # per-channel normalisation x -> (x - mean) / std applied to cached latents (empty: none)
        latent_mean=(), latent_std=(),
        # a cache field on the latent grid [T, H, W] handed to the loss as batch["weight_map"] (empty: none),
        # e.g. the embedded benchmark's "object_mask" for sft's flow.region_weight
        weight_field="",
        # further cache fields handed to the loss as batch[name] (empty: none), e.g. ("loser_latents",) for
        # flow_dpo or ("reward",) for flow_rwr; a field shaped like `latents` is normalised like them (mean/std,
        # latent_dtype), any other is float32 as stored
        extra_fields=(),
        # source='cache': read and normalise the whole cache once and gather batches from memory (the same
        # batches, order and resume state as the streaming reader); for caches that fit in host memory, where
        # the per-example reader cannot keep an accelerator busy (a small model at a large batch)
        in_memory=False,
        # source='random': latent [T, H, W, C] and text [L, D] shapes
        random_latent_shape=(3, 8, 8, 16), random_text_shape=(8, 32),
    ))


def mesh_section() -> ml_collections.ConfigDict:
    # data / fsdp: axis sizes (one may be -1: all devices the other leaves); devices: use the first N
    # devices only (0: all; single-process runs); slices: TPU slices joined over DCN (multi-slice), with
    # data / fsdp sizing one slice and the data axis also spanning the slices (parallel.make_mesh);
    # tpu_topology: the TPU slice a pod preset is sized for (e.g. 'v5p:4x4x2'; what benchmarks/tpu_aot.py
    # compiles for; a run uses the devices it has)
    return ml_collections.ConfigDict(dict(data=-1, fsdp=1, devices=0, slices=1, tpu_topology=""))


def sharding_rules(config) -> tuple:
    """``config.sharding_rules`` as ``((logical, mesh axes), ...)`` with tuples, whatever the config made of them."""
    return tuple((str(a), b if isinstance(b, str) or b is None else tuple(b)) for a, b in config.sharding_rules)


def make_mesh(mesh_cfg, devices=None):
    """The run's mesh over ``devices`` (default: this job's; a TPU topology's compile-only devices when a
    step is compiled ahead of time, ``benchmarks/tpu_aot.py``)."""
    slices = mesh_cfg.get("slices", 1)
    if devices is not None:
        devices = list(devices)
        if mesh_cfg.devices:
            devices = devices[:mesh_cfg.devices]
        return parallel.make_mesh(mesh_cfg.data, mesh_cfg.fsdp, devices, slices=slices)
    if mesh_cfg.devices:
        if jax.process_count() > 1:
            raise ValueError("mesh.devices selects a subset of devices and only works with one process")
        if mesh_cfg.devices > jax.device_count():
            raise ValueError(f"mesh.devices={mesh_cfg.devices} but only {jax.device_count()} devices are present")
        devices = jax.devices()[:mesh_cfg.devices]
    return parallel.make_mesh(mesh_cfg.data, mesh_cfg.fsdp, devices, slices=slices)


# ------------------------------------------------------------------------------------------ the model

def attention_impl(m: ml_collections.ConfigDict, platform: str | None = None) -> str | None:
    """``model.attention_impl`` resolved for ``platform`` (the mesh's devices', ``parallel.mesh_platform``;
    default: the default backend's)."""
    from shelllcc.models.wan_transformer import resolve_attention_impl
    return resolve_attention_impl(m.attention_impl or None, platform or jax.default_backend())


def transformer_config(m: ml_collections.ConfigDict, arch: dict | None = None, platform: str | None = None):
    runtime = dict(dtype=jnp.dtype(m.dtype), param_dtype=jnp.dtype(m.param_dtype),
                   attention_impl=attention_impl(m, platform), remat_policy=m.remat_policy,
                   scan_layers=bool(m.scan_layers))
    if arch is not None:
        return saving.config_from_architecture("wan_transformer", arch, **runtime)
    overrides = {k: int(m[k]) for k in ARCH_OVERRIDES if m[k]}
    if len(m.patch_size):
        if len(m.patch_size) != 3:
            raise ValueError(f"model.patch_size must be (pt, ph, pw), got {tuple(m.patch_size)}")
        overrides["patch_size"] = tuple(int(p) for p in m.patch_size)
    return wan_config(m.preset, **overrides, **runtime)


def sharding_context(mesh, rules):
    """The mesh and flax's logical axis rules for the DiT (``parallel.sharding_context``): models and
    optimizer states built inside are born sharded, and :func:`state_shardings` resolves names."""
    return parallel.sharding_context(mesh, rules, LOGICAL_AXES)


def state_shardings(state: nnx.State, mesh) -> dict:
    """``NamedSharding``s of ``state``'s variables as a pure dict (the structure of ``state.to_pure_dict()``),
    resolved from their logical axis names by the rules in context (:func:`sharding_context`)."""
    return parallel.shardings(parallel.variables_dict(state), mesh)


@dataclasses.dataclass
class LoadedModel:
    model: WanTransformer            # holds the (placed) weights
    source: str                      # human-readable origin of the weights


def init_from_model(init_from: str) -> tuple[str, dict]:
    """``(saved model directory, its model.json)`` for ``model.init_from``: an earlier run's workdir (its
    ``model/``) or a saved model directory itself; anything but a ``wan_transformer`` is refused."""
    path = os.path.join(init_from, MODEL_DIR) if os.path.isdir(os.path.join(init_from, MODEL_DIR)) else init_from
    info = saving.read_model_json(path)
    if info["kind"] != "wan_transformer":
        raise ValueError(f"model.init_from {init_from!r} holds a {info['kind']!r} model, not a wan_transformer")
    return path, info


def build_model(m: ml_collections.ConfigDict, mesh, rules) -> LoadedModel:
    """The DiT with weights from ``pretrained``, ``init_from`` or a seeded random init, sharded by ``rules``
    (flax resolves the parameters' logical axis names under :func:`sharding_context`)."""
    if m.pretrained and m.init_from:
        raise ValueError("set at most one of model.pretrained (a diffusers folder) and model.init_from (a workdir)")
    platform = parallel.mesh_platform(mesh)
    if m.pretrained:
        model = load_transformer(m.pretrained, dtype=jnp.dtype(m.dtype), param_dtype=jnp.dtype(m.param_dtype),
                                 mesh=mesh, rules=rules, attention_impl=attention_impl(m, platform),
                                 remat_policy=m.remat_policy, scan_layers=bool(m.scan_layers))
        return LoadedModel(model, f"diffusers {m.pretrained}")
    if m.init_from:
        path, info = init_from_model(m.init_from)
        cfg = transformer_config(m, info["architecture"], platform)
        with sharding_context(mesh, rules):
            abstract = nnx.eval_shape(lambda: WanTransformer(cfg, rngs=nnx.Rngs(0)))
            shardings = state_shardings(nnx.state(abstract, nnx.Param), mesh)
        model = saving.load_model(path, shardings=lambda _: shardings,
                                  dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                                  attention_impl=cfg.attention_impl, remat_policy=cfg.remat_policy,
                                  scan_layers=cfg.scan_layers)
        return LoadedModel(model, f"saved model {path}")
    cfg = transformer_config(m, platform=platform)
    with sharding_context(mesh, rules):
        abstract = nnx.eval_shape(lambda: WanTransformer(cfg, rngs=nnx.Rngs(m.seed)))
        graphdef, abs_state = nnx.split(abstract)
        shardings = state_shardings(abs_state, mesh)

    # Drawn by one compiled program on the host CPU, then placed: eager init compiles one program per
    # parameter shape, and XLA:GPU takes minutes to compile the one-program init of the 1.3B model
    # (threefry for 1.4e9 numbers); threefry gives the same numbers on every backend. The host program
    # runs outside the mesh (its parameters are born unsharded, on the CPU); without a CPU backend the
    # model is built under the mesh by one program whose parameters are born sharded.
    def init():
        return nnx.to_pure_dict(nnx.state(WanTransformer(cfg, rngs=nnx.Rngs(m.seed))))

    t0 = time.perf_counter()
    if m.random_init not in ("host", "devices"):
        raise errors.ConfigError(f"model.random_init={m.random_init!r}; expected 'host' or 'devices'")
    try:
        host_device = jax.local_devices(backend="cpu")[0]
    except RuntimeError:          # a process started with JAX_PLATFORMS excluding cpu
        host_device = None
    if m.random_init == "devices":
        with sharding_context(mesh, rules):
            params = parallel.init_per_leaf(init, shardings, log=lambda s: print(s, flush=True))
    elif host_device is None:
        with sharding_context(mesh, rules):
            params = jax.jit(init, out_shardings=shardings)()
    else:
        with jax.default_device(host_device):
            params = jax.jit(init)()
        params = parallel.place(params, shardings)
    params = jax.block_until_ready(params)
    return LoadedModel(nnx.merge(graphdef, params), f"random init (seed {m.seed}, {time.perf_counter() - t0:.1f}s)")


def describe_params(params: Any) -> str:
    return parameter_overview.get_parameter_overview(params, include_stats=False)


# ------------------------------------------------------------------------------------------ data

class _Normalize:
    """One cache record -> the step's example: normalised latents, float32 text, the weight map if asked."""

    def __init__(self, mean, std, dtype, weight_field: str = "", latent_fields: tuple = (), other_fields: tuple = ()):
        self.mean = None if not len(mean) else np.asarray(mean, np.float32)
        self.std = None if not len(std) else np.asarray(std, np.float32)
        self.dtype = np.dtype(dtype) if dtype != "bfloat16" else jnp.bfloat16
        self.weight_field = weight_field
        # data.extra_fields split by shape: a loser's latents must live in the winner's (normalised) space
        self.latent_fields, self.other_fields = tuple(latent_fields), tuple(other_fields)

    def _latents(self, x) -> np.ndarray:
        lat = np.asarray(x, np.float32)
        if self.mean is not None:
            lat = (lat - self.mean) / self.std
        return lat.astype(self.dtype)

    def __call__(self, batch: dict) -> dict:
        out = {"latents": self._latents(batch["latents"]), "context": np.asarray(batch["text_embeddings"], np.float32)}
        if self.weight_field:
            out["weight_map"] = np.asarray(batch[self.weight_field], np.float32)
        for name in self.latent_fields:
            out[name] = self._latents(batch[name])
        for name in self.other_fields:
            out[name] = np.asarray(batch[name], np.float32)
        return out


RESERVED_BATCH_KEYS = ("latents", "context", "weight_map")


def extra_field_shapes(d: ml_collections.ConfigDict, fields: dict) -> tuple[tuple[str, ...], dict]:
    """``(latent-shaped fields, {other field: shape})`` of ``data.extra_fields`` against a cache's ``fields``
    (``cache.json``); a missing or reserved name is a one-line ``ConfigError`` naming ``data.extra_fields``."""
    lat_shape = tuple(fields["latents"]["shape"])
    latent_like, others = [], {}
    for name in d.get("extra_fields", ()):
        if name in RESERVED_BATCH_KEYS:
            raise errors.ConfigError(f"data.extra_fields: {name!r} is a batch entry of its own "
                                     f"({', '.join(RESERVED_BATCH_KEYS)}); name other cache fields")
        if name not in fields:
            raise errors.ConfigError(f"data.extra_fields: {name!r} is not a field of cache {d.cache_dir!r} "
                                     f"(fields: {sorted(fields)})")
        shape = tuple(fields[name]["shape"])
        if shape == lat_shape:
            latent_like.append(name)
        else:
            others[name] = shape
    return tuple(latent_like), others


def host_batches(d: ml_collections.ConfigDict, seed: int):
    """This process's batch iterator (with ``get_state``/``set_state``) for the ``data`` section."""
    if len(d.latent_mean) != len(d.latent_std):
        raise ValueError(f"data.latent_mean has {len(d.latent_mean)} entries, data.latent_std {len(d.latent_std)}")
    n_proc = jax.process_count()
    if d.batch_size % n_proc:
        raise ValueError(f"data.batch_size={d.batch_size} is not divisible by {n_proc} processes")
    if d.source == "random":
        for name in d.get("extra_fields", ()):
            if name in RESERVED_BATCH_KEYS:
                raise errors.ConfigError(f"data.extra_fields: {name!r} is a batch entry of its own "
                                         f"({', '.join(RESERVED_BATCH_KEYS)}); name other fields")
        if d.get("weight_field", ""):
            raise ValueError(f"data.weight_field={d.weight_field!r} needs data.source='cache' (random latents have no fields)")
        # extra fields as abstract_step assumes them: '*latents' latent-shaped, others one number per example
        return random_latents.RandomLatentBatches(seed, d.batch_size, d.random_latent_shape, d.random_text_shape,
                                                  jax.process_index(), n_proc, d.get("extra_fields", ()))
    if d.source != "cache":
        raise ValueError(f"unknown data.source {d.source!r}; expected 'cache' or 'random'")
    if not d.cache_dir:
        raise ValueError("data.source='cache' needs --config.data.cache_dir=/path/to/latent/cache")
    cache = latent_cache.open_cache(d.cache_dir)
    lat_shape = tuple(cache.info["fields"]["latents"]["shape"])
    if d.latent_mean and len(d.latent_mean) != lat_shape[-1]:
        raise ValueError(f"data.latent_mean has {len(d.latent_mean)} entries; cache {d.cache_dir!r} latents have "
                         f"{lat_shape[-1]} channels")
    weight_field = d.get("weight_field", "")
    if weight_field:
        fields = cache.info["fields"]
        if weight_field not in fields:
            raise ValueError(f"data.weight_field={weight_field!r} is not a field of cache {d.cache_dir!r} "
                             f"(fields: {sorted(fields)})")
        if tuple(fields[weight_field]["shape"]) != lat_shape[:-1]:
            raise ValueError(f"data.weight_field={weight_field!r} has shape {tuple(fields[weight_field]['shape'])} in "
                             f"cache {d.cache_dir!r}; the latent grid is {lat_shape[:-1]}")
    latent_like, others = extra_field_shapes(d, cache.info["fields"])
    transform = _Normalize(d.latent_mean, d.latent_std, d.latent_dtype, weight_field, latent_like, tuple(others))
    if d.get("in_memory", False):
        # the same batches in the same order (and the same resume state), gathered from arrays
        return readers.InMemoryBatches(cache, batch_size=d.batch_size // n_proc, seed=seed, transform=transform,
                                       name=d.cache_dir)
    # per example, in grain's reader threads; the iterator keeps grain's own state for exact resume
    return iter(readers.make_dataset(cache, batch_size=d.batch_size // n_proc, seed=seed, transform=transform))


def device_batches(host_iter, mesh, prefetch: int):
    return readers.prefetch_to_device(host_iter, size=max(prefetch, 1), sharding=parallel.batch_sharding(mesh))


# ------------------------------------------------------------------------------------------ the step

def split_trainable(model: nnx.Module, lora_cfg, seed: int):
    """``(graphdef, trainable, frozen_model)`` as pure dicts: the LoRA adapters under LoRA (applied here),
    else every parameter (frozen part empty)."""
    if lora_cfg.rank:
        lora_lib.apply_lora(model, rank=lora_cfg.rank, alpha=lora_cfg.alpha, targets=tuple(lora_cfg.targets),
                            rngs=nnx.Rngs(seed + 1))
        graphdef, trainable, frozen = nnx.split(model, lora_lib.lora_filter, ...)
    else:
        graphdef, trainable, frozen = nnx.split(model, nnx.Param, ...)
    return graphdef, trainable, frozen


def layer_axes(state: nnx.State) -> dict:
    """Per parameter of ``state`` (as a pure dict): how many leading axes are stacked layers ('layers')."""
    return jax.tree.map(lambda v: sum(n == LAYERS for n in (v.get_metadata().get("out_sharding") or ())),
                        parallel.variables_dict(state), is_leaf=lambda x: isinstance(x, nnx.Variable))


def optimizer_from(config, params, layer_axes=None) -> tuple[Any, Any]:
    """The run's optimizer and schedule; ``layer_axes`` (:func:`layer_axes`) keeps the weight-decay mask
    of stacked blocks what it is per block (a stacked bias is still a vector)."""
    ocfg = optimizers.OptimizerConfig.from_config(config.optim, config.train.steps)
    return optimizers.make_optimizer(ocfg, params, layer_axes), optimizers.make_schedule(ocfg)


# ------------------------------------------------------------------------------------------ the run

def train_section(steps: int = 1000) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        steps=steps,
        microbatch_size=0,           # examples per device per forward pass; 0: the whole batch at once
        log_every=50,
        checkpoint_every=500,
        eval_every=0,                # steps between calls of the run's evaluation hook (0: none)
        keep_checkpoints=3,
        async_checkpoints=True,
    ))


def optim_section(learning_rate: float = 1e-4) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        learning_rate=learning_rate, schedule="constant", warmup_steps=0, end_lr_fraction=0.0,
        b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0, decay_vectors=False, grad_clip=1.0, freeze=(),
    ))


def common_config(experiment: str) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.experiment = experiment
    c.seed = 0
    c.mesh = mesh_section()
    c.sharding_rules = parallel.DEFAULT_RULES
    c.model = model_section()
    c.lora = lora_section()
    c.data = data_section()
    c.train = train_section()
    c.optim = optim_section()
    return c


def frozen_sources(config) -> dict:
    """Where the weights that checkpoints do not hold come from: a resumed run must rebuild them the same way."""
    m = config.model
    out = {"model.pretrained": m.pretrained, "model.init_from": m.init_from,
           "model.seed": m.seed if not (m.pretrained or m.init_from) else None,
           "lora.rank": config.lora.rank, "lora.alpha": config.lora.alpha, "lora.targets": list(config.lora.targets)}
    return out


# frozen inputs of a loss (make_loss's extra_frozen) by the setting they come from; 'reference' is a copy
# of the starting weights, covered by frozen_sources
FROZEN_INPUT_SETTINGS = {"manifold": "reward.manifold (its content)", "reward_target": "reward.shell_band_target",
                         "dpo_settings": "dpo.beta / dpo.time_dependent", "rwr_temperature": "rwr.temperature"}


def resume_settings(config, model_config, extra_frozen: dict) -> dict:
    """What a resumed run must share with its checkpoint beyond the shapes the restore checks: the model's
    architecture (``num_heads`` splits the same weights another way), the batch size (the data iterator's
    state counts batches), the data and the loss, and the content of its frozen inputs (a manifold replaced
    at the same path is another reward)."""
    out = {f"model.{k}": v for k, v in saving.architecture(model_config, "wan_transformer").items()}
    out["data.batch_size"], out["data.source"] = config.data.batch_size, config.data.source
    if config.data.source == "cache" and config.data.cache_dir:
        info = latent_cache.open_cache(config.data.cache_dir).info
        out["data.cache_dir (its cache)"] = {"num_examples": info.get("num_examples"), "created": info.get("created"),
                                             "source": info.get("source_description")}
    if "objective" in config:
        out["objective.name"] = config.objective.name
    if "reward" in config:
        out["reward.kind"] = config.reward.kind
    for section in ("dpo", "rwr", "grpo"):   # the methods' own settings, by name and value
        if section in config:
            out.update({f"{section}.{k}": v for k, v in config[section].items()})
    for k, v in sorted(extra_frozen.items()):
        if k != "reference":
            out[FROZEN_INPUT_SETTINGS.get(k, f"frozen input {k!r}")] = checkpoints.tree_sha256(v)
    return out


def check_frozen_sources(saved: dict | None, current: dict, where: str) -> None:
    if saved is None:
        return
    diff = {k: (saved.get(k), v) for k, v in current.items() if saved.get(k) != v}
    if diff:
        shown = "; ".join(f"{k}: checkpoint {a!r}, now {b!r}" for k, (a, b) in sorted(diff.items()))
        raise errors.ConfigError(f"cannot resume from {where}: the frozen weights would come from elsewhere than when it "
                         f"was written ({shown}); use a new workdir or the original settings")


def _map_block_dicts(tree: Any, fn: Callable[[dict], dict]) -> Any:
    # every dict holding the DiT's 'blocks': the parameters and the optimizer's copies of them (Adam's moments)
    holds_blocks = lambda x: isinstance(x, dict) and "blocks" in x  # noqa: E731
    return jax.tree.map(lambda x: fn(x) if holds_blocks(x) else x, tree, is_leaf=holds_blocks)


def restore_checkpoint(ckpt, step: int, target: Any, rng_target: Any):
    """``ckpt.restore(step, target, rng_target)``, also for a checkpoint written with one entry per block
    (a run started before stacked blocks, or with ``model.scan_layers=False``) when ``target`` has the
    stacked layout: its arrays are restored per block at their rows' shardings and stacked onto ``target``'s."""
    try:
        return ckpt.restore(step, target, rng_target)
    except Exception as stacked_error:
        if not any(stacked_layout(d) for d in _dicts_with_blocks(target)):
            raise

        def per_block(d: dict) -> dict:
            if not stacked_layout(d):
                return d

            def row(a):
                return jax.ShapeDtypeStruct(a.shape[1:], a.dtype, sharding=saving.row_sharding(a.sharding))

            n = {x.shape[0] for x in jax.tree.leaves(d["blocks"])}.pop()
            return {**d, "blocks": {i: jax.tree.map(row, d["blocks"]) for i in range(n)}}

        try:
            items, rng, data_state, meta = ckpt.restore(step, _map_block_dicts(target, per_block), rng_target)
        except Exception:
            raise stacked_error from None
        stacked_sh = iter([d for d in _dicts_with_blocks(target) if stacked_layout(d)])

        def stack(d: dict) -> dict:
            if stacked_layout(d):
                return d
            sh = next(stacked_sh)["blocks"]
            flat = {jax.tree_util.keystr(p): a.sharding for p, a in jax.tree_util.tree_flatten_with_path(sh)[0]}
            return stack_blocks(d, lambda path, leaves: jax.jit(
                lambda *xs: jnp.stack(xs), out_shardings=flat[jax.tree_util.keystr(path)])(*leaves))

        print(f"checkpoint {step} holds one entry per block: stacked for scan_layers", flush=True)
        return _map_block_dicts(items, stack), rng, data_state, meta


def _dicts_with_blocks(tree: Any) -> list[dict]:
    found: list[dict] = []
    _map_block_dicts(tree, lambda d: found.append(d) or d)
    return found


@dataclasses.dataclass
class Setup:
    """What a DiT experiment's ``make_loss`` gets to build its loss from."""
    graphdef: Any                    # the (possibly LoRA-adapted) model's graph
    params: Any                      # trainable parameters (pure dict)
    frozen_model: Any                # the rest of the model's state (pure dict; base weights under LoRA)
    mesh: Any
    param_shardings: Any             # shardings of ``params`` (for copies of them, e.g. a frozen reference)


# A loss may carry ``loss_fn.prepare_batch(batch, frozen) -> batch``: run on the whole global batch before the
# microbatch split (shelllcc.training.step.make_train_step), for what it normalises over the batch.
# Or ``loss_fn.make_train_step(optimizer, schedule, microbatches) -> (state, batch, rng) -> (state, metrics)``:
# a step of its own in place of make_train_step's (grpo samples its batch inside the step).
MakeLoss = Callable[[Setup], tuple[LossFn, dict, dict]]


@dataclasses.dataclass
class StepParts:
    """What :func:`run_training` and :func:`abstract_step` build alike around the DiT's trainable/frozen split."""

    params: Any                      # trainable parameters (pure dict; arrays or abstract)
    frozen_pure: Any                 # the frozen DiT weights (pure dict)
    optimizer: Any
    param_sh: Any
    frozen_sh: dict                  # {"model": ..., **the loss's extra frozen inputs' shardings}
    extra_frozen: dict               # the loss's extra frozen inputs (a manifold, a reference model)
    state_sh: Any
    step: Any                        # the jitted, sharded, state-donating train step


def step_parts(config, make_loss: MakeLoss, mesh, rules, graphdef, trainable, frozen_model) -> StepParts:
    """Optimizer, shardings, the experiment's loss and the jitted step for a split DiT, built once for a run
    and for an abstract compile (``tpu_aot.py``), so the two cannot drift apart."""
    k = microbatch_count(config.data.batch_size, config.train.microbatch_size, mesh)
    params, frozen_pure = nnx.to_pure_dict(trainable), nnx.to_pure_dict(frozen_model)
    optimizer, schedule = optimizer_from(config, params, layer_axes(trainable))
    with sharding_context(mesh, rules):      # the optimizer state is sharded like its parameters
        param_sh = state_shardings(trainable, mesh)
        frozen_model_sh = state_shardings(frozen_model, mesh)
        opt_sh = parallel.optimizer_shardings(optimizer, trainable, mesh)
    loss_fn, extra_frozen, extra_sh = make_loss(Setup(graphdef, params, frozen_pure, mesh, param_sh))
    frozen_sh = {"model": frozen_model_sh, **extra_sh}
    state_sh = train_state_shardings(param_sh, opt_sh, frozen_sh, mesh)
    # a loss may bring its own step (grpo: rollout, then updates on it) on the same state and shardings
    custom = getattr(loss_fn, "make_train_step", None)
    raw = (custom(optimizer, schedule, k) if custom is not None else
           make_train_step(loss_fn, optimizer, schedule, k, getattr(loss_fn, "prepare_batch", None)))
    step = jit_train_step(raw, state_sh, mesh)
    return StepParts(params, frozen_pure, optimizer, param_sh, frozen_sh, extra_frozen, state_sh, step)


@dataclasses.dataclass
class ModelHooks:
    """What :func:`run_training` trains, beyond the stack it shares (optimizer, step, checkpoints, loop):
    the DiT by default (:func:`dit_hooks`); another model (e.g. the latent reward model of
    ``train_reward_model``) gives its own. Each takes the run's config."""

    what: str                                              # for the progress lines, e.g. "the DiT"
    build: Callable[[Any, Any, Any], LoadedModel]          # (config, mesh, rules) -> the placed model
    split: Callable[[nnx.Module, Any], tuple]              # (model, config) -> (graphdef, trainable, frozen)
    batches: Callable[[Any], Any]                          # config -> host batch iterator (get/set_state)
    export: Callable[[nnx.Module, Any, str, dict], str]    # (trained model, config, workdir, extra) -> dir
    frozen_sources: Callable[[Any], dict]                  # config -> where the non-checkpointed weights come from
    resume_settings: Callable[[Any, nnx.Module, dict], dict]   # (config, model, extra_frozen) -> must-match settings
    describe: Callable[[Any], str]                         # config -> what is trained, e.g. "LoRA rank 8"


def _export_dit(model, config, workdir: str, extra: dict) -> str:
    if config.lora.rank:
        lora_lib.merge_lora(model)
    return saving.save_model(os.path.join(workdir, MODEL_DIR), model, extra=extra)


def dit_hooks() -> ModelHooks:
    """The DiT experiments' hooks (``sft``, ``reward_finetune``): what run_training did before hooks existed."""
    return ModelHooks(
        what="the DiT",
        build=lambda config, mesh, rules: build_model(config.model, mesh, rules),
        split=lambda model, config: split_trainable(model, config.lora, config.seed),
        batches=lambda config: host_batches(config.data, config.seed),
        export=_export_dit,
        frozen_sources=frozen_sources,
        resume_settings=lambda config, model, extra: resume_settings(config, model.config, extra),
        describe=lambda config: (f"LoRA rank {config.lora.rank} (alpha {config.lora.alpha})" if config.lora.rank
                                 else "full fine-tuning"))


def run_training(config: ml_collections.ConfigDict, workdir: str, make_loss: MakeLoss,
                 on_eval: Callable[[int, nnx.Module], None] | None = None,
                 hooks: ModelHooks | None = None) -> ts.TrainState:
    """Build model, data, optimizer and step for a DiT experiment, restore the latest checkpoint if any,
    train, and export the final (LoRA-merged) model to ``workdir/model``.

    ``on_eval(step, model)`` (with ``train.eval_every > 0``) gets the model with the weights after
    ``step`` updates (LoRA adapters still separate), e.g. to sample validation prompts.

    ``make_loss(setup) -> (loss_fn, extra_frozen, extra_frozen_shardings)``: the experiment's loss and any
    frozen inputs it needs (a manifold, a reference model) with their shardings; they are placed in
    ``state.frozen`` next to ``"model"``.

    ``hooks`` (default :func:`dit_hooks`): which model is built, split, fed and exported; everything else
    (optimizer, sharded step, checkpoints with exact resume, SIGTERM, metrics) is the same for every model.
    """
    hooks = hooks or dit_hooks()

    mesh = make_mesh(config.mesh)
    rules = sharding_rules(config)
    k = microbatch_count(config.data.batch_size, config.train.microbatch_size, mesh)
    print(f"devices: {jax.device_count()} x {jax.devices()[0].device_kind} over {jax.process_count()} process(es); "
          f"mesh {dict(mesh.shape)}; global batch {config.data.batch_size}"
          + (f" in {k} microbatches" if k > 1 else ""), flush=True)

    print(f"building {hooks.what} ...", flush=True)
    loaded = hooks.build(config, mesh, rules)
    graphdef, trainable, frozen_model = hooks.split(loaded.model, config)
    parts = step_parts(config, make_loss, mesh, rules, graphdef, trainable, frozen_model)
    params, frozen_pure, optimizer = parts.params, parts.frozen_pure, parts.optimizer
    param_sh, state_sh, step_fn = parts.param_sh, parts.state_sh, parts.step
    frozen, frozen_sh = {"model": frozen_pure, **parts.extra_frozen}, parts.frozen_sh
    abstract = jax.eval_shape(lambda p: ts.create(p, optimizer), params)
    resume = hooks.resume_settings(config, loaded.model, parts.extra_frozen)

    n_train = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    n_frozen = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(frozen_pure))
    what = hooks.describe(config)
    print(f"model: {loaded.source}; {what}: {n_train:,} trainable, {n_frozen:,} frozen parameters", flush=True)
    if jax.process_index() == 0:
        overview = describe_params(params)
        with open(os.path.join(workdir, "parameters.txt"), "w") as f:
            f.write(overview + "\n")
        lines = overview.splitlines()
        print("\n".join(lines if len(lines) <= 40 else lines[:20] + [f"... ({len(lines) - 40} rows omitted; "
                                                                    f"full table in parameters.txt) ..."] + lines[-20:]),
              flush=True)

    host_iter = hooks.batches(config)      # bad data settings stop the run before any file
    ckpt = checkpoints.Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=config.train.keep_checkpoints,
                                    asynchronous=config.train.async_checkpoints)
    rep = parallel.replicated(mesh)
    # a global (replicated) array: checkpoints of several processes cannot hold a process-local one
    rng = parallel.place(jax.random.PRNGKey(config.seed), rep)
    frozen = parallel.place(frozen, frozen_sh)

    def resume_from(step):
        # before the arrays: a changed setting is named, not reported as a shape the restore cannot match
        saved = ckpt.meta(step)
        check_frozen_sources(saved.get("frozen_sources"), hooks.frozen_sources(config), ckpt.directory)
        checkpoints.check_resume_settings(saved.get("resume_settings"), resume, f"{ckpt.directory} (step {step})")
        target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                              ts.checkpoint_items(abstract), ts.checkpoint_items(state_sh))
        return restore_checkpoint(ckpt, step, target, jax.ShapeDtypeStruct(rng.shape, rng.dtype, sharding=rep))

    found = ckpt.resume_newest(resume_from)
    if found is None:
        params = parallel.place(params, param_sh)
        with sharding_context(mesh, rules):     # the optimizer state is born sharded like its parameters
            state = jax.jit(lambda p, f: ts.create(p, optimizer, f), out_shardings=state_sh)(params, frozen)
    else:
        latest, (items, rng, data_state, meta) = found
        state = ts.from_checkpoint_items(items, frozen)
        if data_state is not None:
            host_iter.set_state(data_state)
        print(f"resumed from {ckpt.directory} at step {latest}", flush=True)
    del params, frozen_pure, trainable, frozen_model, loaded
    batches = device_batches(host_iter, mesh, config.data.prefetch)
    writer = metric_writers.create_writer(workdir, prefix=config.experiment, total_steps=config.train.steps)
    settings = loop.LoopSettings(config.train.steps, config.train.log_every, config.train.checkpoint_every,
                                 config.train.eval_every)
    hook = None
    if on_eval is not None and config.train.eval_every:
        def hook(step, state):
            on_eval(step, nnx.merge(graphdef, state.params, state.frozen["model"]))
    try:
        with checkpoints.PreemptionGuard() as guard:
            state = loop.train(step_fn, state, rng, batches, settings=settings, checkpointer=ckpt, writer=writer,
                               guard=guard, data_state=batches.get_state, meta={"experiment": config.experiment,
                                                                         "frozen_sources": hooks.frozen_sources(config),
                                                                         "resume_settings": resume},
                               on_eval=hook)
    finally:
        batches.close() if hasattr(batches, "close") else None
        ckpt.close()
        writer.close()
    skipped = int(jax.device_get(state.skipped))
    model = nnx.merge(graphdef, state.params, state.frozen["model"])
    out = hooks.export(model, config, workdir, {"experiment": config.experiment, "steps": config.train.steps,
                                                "skipped_updates": skipped})
    print(f"exported the trained model to {out}; non-finite updates skipped: {skipped}", flush=True)
    return state


@dataclasses.dataclass
class AbstractStep:
    """A DiT experiment's jitted train step with abstract arguments: compiled ahead of time for a mesh of
    devices this process may not have (``benchmarks/tpu_aot.py``), nothing of the model allocated."""
    step: Any                        # shelllcc.training.step.jit_train_step's result (``.jitted``)
    state: Any                       # ts.TrainState of ShapeDtypeStructs
    batch: dict                      # the global batch's ShapeDtypeStructs
    rng: Any
    mesh: Any
    microbatches: int
    trainable_params: int
    frozen_params: int
    param_bytes: int                 # trainable + frozen model weights, in their dtypes
    model_config: Any                # the WanTransformerConfig, kernels resolved for the mesh's platform

    @property
    def attention_impl(self) -> str | None:
        return self.model_config.attention_impl


def abstract_step(config: ml_collections.ConfigDict, make_loss: MakeLoss, devices=None,
                  latent_shape: tuple = (), text_shape: tuple = ()) -> AbstractStep:
    """What :func:`run_training` builds and jits (mesh, rules, DiT with LoRA split, optimizer, shardings, the
    experiment's loss, microbatches), from ``nnx.eval_shape`` instead of weights, over ``devices``.

    ``latent_shape`` ``[T, H, W, C]`` and ``text_shape`` ``[L, D]`` are one example's batch entries (a cache
    holds them; default: ``data.random_latent_shape`` / ``random_text_shape``). Extra frozen inputs of the
    loss (a reward manifold) are built by ``make_loss`` as in a run, then made abstract.
    """
    mesh = make_mesh(config.mesh, devices)
    platform = parallel.mesh_platform(mesh)
    rules = sharding_rules(config)
    k = microbatch_count(config.data.batch_size, config.train.microbatch_size, mesh)
    cfg = transformer_config(config.model, platform=platform)
    with sharding_context(mesh, rules):
        graphdef, trainable, frozen_model = nnx.eval_shape(
            lambda: split_trainable(WanTransformer(cfg, rngs=nnx.Rngs(config.model.seed)), config.lora, config.seed))
    parts = step_parts(config, make_loss, mesh, rules, graphdef, trainable, frozen_model)
    params, frozen_pure, step = parts.params, parts.frozen_pure, parts.step

    def abstract(tree):
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)

    frozen = {"model": frozen_pure, **abstract(parts.extra_frozen)}
    state = jax.eval_shape(lambda p, f: ts.create(p, parts.optimizer, f), params, frozen)

    d = config.data
    latent = tuple(latent_shape or d.random_latent_shape)
    text = tuple(text_shape or d.random_text_shape)
    b = d.batch_size
    latent_dtype = jnp.bfloat16 if d.latent_dtype == "bfloat16" else jnp.dtype(d.latent_dtype)
    batch = {"latents": jax.ShapeDtypeStruct((b, *latent), latent_dtype),
             "context": jax.ShapeDtypeStruct((b, *text), jnp.float32)}
    if d.get("weight_field", ""):
        batch["weight_map"] = jax.ShapeDtypeStruct((b, *latent[:-1]), jnp.float32)
    if len(d.get("extra_fields", ())):
        # shapes from the cache when there is one; else a name ending in 'latents' is latent-shaped, any
        # other field one number per example (a reward)
        if d.source == "cache" and d.cache_dir and os.path.isdir(d.cache_dir):
            latent_like, others = extra_field_shapes(d, latent_cache.open_cache(d.cache_dir).info["fields"])
        else:
            latent_like = tuple(f for f in d.extra_fields if f.endswith("latents"))
            others = {f: () for f in d.extra_fields if f not in latent_like}
        for name in latent_like:
            batch[name] = jax.ShapeDtypeStruct((b, *latent), latent_dtype)
        for name, shape in others.items():
            batch[name] = jax.ShapeDtypeStruct((b, *shape), jnp.float32)
    count = lambda tree: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))  # noqa: E731
    nbytes = lambda tree: sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))  # noqa: E731
    return AbstractStep(step, state, batch, jax.ShapeDtypeStruct((2,), jnp.uint32), mesh, k, count(params),
                        count(frozen_pure), nbytes(params) + nbytes(frozen_pure), cfg)
