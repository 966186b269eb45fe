"""Experiment ``train_energy_judge``: GT-SVJ's energy-based video judge (``../shared/ALIGNMENT_METHODS.md`` section 2;
issue 18 part 1), then a preference head on the pairs.

The model (:class:`shelllcc.rewards.energy_judge.EnergyJudge`) is the embeddings and the first ``energy.num_blocks``
blocks of a DiT (``model.init_from``, ``model.pretrained``, or a seeded random one), with one energy per latent
frame from an MLP head; a clip's energy is the frames' mean. Two stages, each through the one training stack
(``dit_setup.run_training`` with its own :class:`~experiments.dit_setup.ModelHooks`: sharded step, checkpoints
with exact resume, SIGTERM, metrics), each in its own folder:

1. ``energy/``: the contrastive objective (:func:`~shelllcc.rewards.energy_judge.make_energy_loss_fn`, beta
   ``energy.beta`` = 0.2) with real clips of ``data.cache_dir`` as positives and per clip one negative: with
   probability ``energy.generated_rate`` (0.3) a generated clip of ``data.generated_dir`` (a latent cache of the
   base's samples, stored normalised as ``score_samples`` and ``sample`` write them), else the real clip
   perturbed (:mod:`shelllcc.data.latent_negatives`, ``energy.perturbations`` at ``energy.strength``). With
   no ``data.generated_dir`` every negative is a perturbed real clip (the source's 0.3 share of generated
   clips is then 0; the run says so). Trained: LoRA rank ``lora.rank`` (8, the source's) on the kept blocks
   and the energy head (``energy_hidden``, ``energy_out``); ``lora.rank=0`` trains the head alone.
   ``energy.num_blocks=0`` keeps ``round(energy.block_fraction * L)`` (at least one) of the base's ``L``
   blocks: a third, the source's.
2. ``preference/`` (when ``preference.train`` names a pair cache, the same data ``train_reward_model`` reads):
   a BT / BTT head on the judge's features (``preference.loss``). **Ours** (the source's heads are not
   specified): a second MLP head (``preference_hidden``, ``preference_out``) reads the per-frame features
   averaged over frames and gives three rewards (VQ, MQ, TA); the backbone, its merged LoRA and the energy head
   stay frozen, so the judge's energy, its reward ``-E``, is stage 1's exactly. The judge reads no text: its
   TA output has no prompt to align with.

Normalisation: ``data.latent_mean`` / ``latent_std`` normalise the real cache as the base was trained; the
generated and pair caches are read as stored (already normalised).

Writes under ``workdir``: ``energy/`` and ``preference/`` (each ``checkpoints/``, ``metrics.jsonl``, ``model/``,
``DONE`` once finished), ``model/`` (the final judge, LoRA merged, kind ``energy_judge``: load it with
:func:`shelllcc.rewards.energy_judge.load_energy_judge`; its reward is ``-E``), and ``eval.json``: on the held-out
real clips of ``eval.cache_dir`` their energy against each perturbation's (the share of clips ranked below
their own negative), and on ``preference.test`` the accuracies with and without ties per dimension of ``-E``
and of the preference head (:mod:`shelllcc.evaluation.judges`).
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from experiments import config_entry, dit_setup, stage_markers
from shelllcc.data import latent_cache, latent_negatives, preference_cache, readers
from shelllcc.errors import ConfigError
from shelllcc.evaluation import judges
from shelllcc.models import saving
from shelllcc.rewards import energy_judge as ej
from shelllcc.rewards import reward_model as rm
from shelllcc.training import lora as lora_lib

STAGES = ("energy", "preference")
ENERGY_HEAD = ("energy_hidden", "energy_out")
PREFERENCE_HEAD = ("preference_hidden", "preference_out")
EVAL_JSON = "eval.json"
DONE = "DONE"


def default_config() -> ml_collections.ConfigDict:
    c = dit_setup.common_config("train_energy_judge")
    c.model.scan_layers = False           # the judge runs its few blocks one by one
    c.lora.rank, c.lora.alpha = 8, 8.0    # the source's rank; alpha = rank (scale 1) is ours
    # ours (the source names no targets): self-attention and the feed-forward; the cross-attention reads the
    # judge's zero prompt, adapting it would only learn a bias
    c.lora.targets = tuple(f"self_attn.{p}" for p in ("query", "key", "value", "out")) + ("ffn.up", "ffn.down")
    c.energy = ml_collections.ConfigDict(dict(
        num_blocks=0,                     # blocks of the base kept; 0: round(block_fraction * the base's layers)
        block_fraction=1 / 3,             # GT-SVJ: a third of the blocks
        head_hidden=0,                    # the heads' width (0: the model's dim)
        beta=ej.GT_SVJ_BETA,              # the energy-magnitude regulariser
        generated_rate=ej.GENERATED_NEGATIVE_RATE,   # share of negatives that are generated clips (with data.generated_dir)
        strength=0.5,                     # the perturbations' strength in [0, 1]
        perturbations=tuple(latent_negatives.PERTURBATIONS),
        t_max=0.0,                        # inputs noised at t ~ U[0, t_max) (0: clean latents, the judge's use)
        seed=0,                           # the heads' init
    ))
    c.data.generated_dir = ""             # a latent cache of generated clips (normalised); '' : perturbations only
    c.data.batch_size = 16
    c.preference = ml_collections.ConfigDict(dict(
        train="", validation="", test="",  # pair caches (preference_cache); no train: no preference stage
        steps=200, batch_size=16, learning_rate=1e-3,
        loss="btt",                       # btt | bt | regression
        theta=5.0,                        # BTT's tie parameter (> 1)
        t_max=0.0,
    ))
    c.eval = ml_collections.ConfigDict(dict(
        cache_dir="",                     # held-out real clips (normalised like data.cache_dir); '' : none
        clips=64, batch_size=16, seed=0,
    ))
    c.train.steps, c.train.log_every, c.train.checkpoint_every = 300, 25, 100
    c.optim.learning_rate = 1e-3
    return c


# ------------------------------------------------------------------------------------------ checks

def check_config(config: ml_collections.ConfigDict) -> None:
    e, p = config.energy, config.preference
    if not (isinstance(e.num_blocks, int) and e.num_blocks >= 0):
        raise ConfigError(f"energy.num_blocks={e.num_blocks!r} must be an integer >= 0 (0: energy.block_fraction)")
    if not 0.0 < e.block_fraction <= 1.0:
        raise ConfigError(f"energy.block_fraction={e.block_fraction} must be in (0, 1]")
    if not e.beta > 0:
        raise ConfigError(f"energy.beta={e.beta} must be > 0 (at 0 the contrastive loss is unbounded below)")
    if not 0.0 <= e.generated_rate <= 1.0:
        raise ConfigError(f"energy.generated_rate={e.generated_rate} must be in [0, 1]")
    if not 0.0 < e.strength <= 1.0:
        raise ConfigError(f"energy.strength={e.strength} must be in (0, 1] (0 makes every negative a positive)")
    bad = [x for x in e.perturbations if x not in latent_negatives.PERTURBATIONS]
    if not len(e.perturbations) or bad:
        raise ConfigError(f"energy.perturbations={tuple(e.perturbations)}: expected a non-empty subset of "
                          f"{tuple(latent_negatives.PERTURBATIONS)}")
    for section, t in (("energy", e.t_max), ("preference", p.t_max)):
        if not 0.0 <= t <= 1.0:
            raise ConfigError(f"{section}.t_max={t} must be in [0, 1]")
    if not (isinstance(config.lora.rank, int) and config.lora.rank >= 0):
        raise ConfigError(f"lora.rank={config.lora.rank!r} must be an integer >= 0 (0: the energy head alone)")
    if p.loss not in rm.LOSSES:
        raise ConfigError(f"preference.loss={p.loss!r}; expected one of {rm.LOSSES}")
    if not p.theta > 1.0:
        raise ConfigError(f"preference.theta={p.theta} must be > 1 (BTT's tie probability is 0 at 1)")
    if config.model.pretrained and config.model.init_from:
        raise ConfigError("set at most one of model.pretrained and model.init_from")
    if config.data.source != "cache" or not config.data.cache_dir:
        raise ConfigError("data.cache_dir is empty: the judge's positives are real clips of a latent cache "
                          "(data.source='cache')")
    if (p.validation or p.test) and not p.train:
        raise ConfigError("preference.validation / preference.test are set but preference.train is empty: "
                          "no preference head to evaluate")


def kept_blocks(config, layers: int) -> int:
    e = config.energy
    n = e.num_blocks or max(1, round(e.block_fraction * layers))
    if n > layers:
        raise ConfigError(f"energy.num_blocks={n} exceeds the base's {layers} layers")
    return n


def _check_cache(path: str, key: str, field: str, gcfg) -> tuple:
    try:
        fields = latent_cache.open_cache(path).info["fields"]
    except (FileNotFoundError, ValueError) as err:
        raise ConfigError(f"{key} {path!r}: {err}") from None
    if field not in fields:
        raise ConfigError(f"{key} {path!r} has no field {field!r} (fields: {sorted(fields)})")
    shape = tuple(fields[field]["shape"])
    if shape[-1] != gcfg.in_channels:
        raise ConfigError(f"{key} {path!r}: latents have {shape[-1]} channels, the base reads {gcfg.in_channels}")
    if any(s % q for s, q in zip(shape[:3], gcfg.patch_size)):
        raise ConfigError(f"{key} {path!r}: latent grid {shape[:3]} is not divisible by the patch {gcfg.patch_size}")
    return shape


# ------------------------------------------------------------------------------------------ stage 1: energy

def _head_filter(names):
    return nnx.All(nnx.Param, lambda path, _v: bool(path) and str(path[0]) in names)


def _build_energy(config, mesh, rules) -> dit_setup.LoadedModel:
    loaded = dit_setup.build_model(config.model, mesh, rules)
    gcfg, layers = loaded.model.config, loaded.model.config.num_layers
    n = kept_blocks(config, layers)
    real = _check_cache(config.data.cache_dir, "data.cache_dir", "latents", gcfg)
    if config.data.generated_dir:
        gen = _check_cache(config.data.generated_dir, "data.generated_dir", "latents", gcfg)
        if gen != real:
            raise ConfigError(f"data.generated_dir: latents {gen} differ from data.cache_dir's {real}")
    judge = ej.EnergyJudge(loaded.model, n, head_hidden=config.energy.head_hidden,
                           preference_head=bool(config.preference.train), rngs=nnx.Rngs(config.energy.seed))
    return dit_setup.LoadedModel(judge, f"{loaded.source}: its first {n} of {layers} blocks + energy head")


def _split_energy(model, config):
    if config.lora.rank:
        # the kept blocks only: the judge has no other Dense of the targets
        lora_lib.apply_lora(model, rank=config.lora.rank, alpha=config.lora.alpha, targets=tuple(config.lora.targets),
                            rngs=nnx.Rngs(config.seed + 1))
        return nnx.split(model, nnx.Any(lora_lib.LoRAParam, _head_filter(ENERGY_HEAD)), ...)
    return nnx.split(model, _head_filter(ENERGY_HEAD), ...)


class _WithGenerated:
    """Real batches (``latents``, normalised) zipped with generated ones (``generated``); one state for both."""

    def __init__(self, real, generated):
        self.real, self.generated = real, generated

    def __iter__(self):
        return self

    def __next__(self):
        batch = dict(next(self.real))
        batch.pop("context", None)          # the judge reads no text
        batch["generated"] = next(self.generated)["generated"]
        return batch

    def get_state(self):
        return {"real": self.real.get_state(), "generated": self.generated.get_state()}

    def set_state(self, state):
        self.real.set_state(state["real"])
        self.generated.set_state(state["generated"])


class _Generated:
    def __call__(self, record: dict) -> dict:
        return {"generated": np.asarray(record["latents"], np.float32)}


def _batches_energy(config):
    real = dit_setup.host_batches(config.data, config.seed)
    if not config.data.generated_dir:
        return real
    d = config.data
    ds = readers.make_dataset(latent_cache.open_cache(d.generated_dir), batch_size=d.batch_size // jax.process_count(),
                              seed=config.seed + 1, transform=_Generated())
    return _WithGenerated(real, iter(ds))


def _export(model, config, workdir: str, extra: dict) -> str:
    lora_lib.merge_lora(model)            # no-op without adapters (the preference stage)
    return saving.save_model(os.path.join(workdir, dit_setup.MODEL_DIR), model,
                             extra={**extra, "energy": config.energy.to_dict(),
                                    "preference": config.preference.to_dict()})


def _frozen_sources(config) -> dict:
    m = config.model
    return {"model.pretrained": m.pretrained, "model.init_from": m.init_from,
            "model.seed": m.seed if not (m.pretrained or m.init_from) else None,
            "energy.num_blocks": config.energy.num_blocks,
            "energy.block_fraction": config.energy.block_fraction, "energy.head_hidden": config.energy.head_hidden,
            "energy.seed": config.energy.seed, "preference head": bool(config.preference.train),
            "lora.rank": config.lora.rank, "lora.alpha": config.lora.alpha, "lora.targets": list(config.lora.targets)}


def _cache_identity(path: str) -> dict:
    info = latent_cache.open_cache(path).info
    return {"num_examples": info.get("num_examples"), "created": info.get("created"),
            "source": info.get("source_description")}


def _resume_energy(config, model, extra_frozen) -> dict:
    del extra_frozen
    out = {f"model.{k}": v for k, v in saving.architecture(model.config, ej.KIND).items()}
    out["data.batch_size"] = config.data.batch_size
    out["data.cache_dir (its cache)"] = _cache_identity(config.data.cache_dir)
    out["data.latent_mean"], out["data.latent_std"] = list(config.data.latent_mean), list(config.data.latent_std)
    out["data.generated_dir (its cache)"] = (_cache_identity(config.data.generated_dir) if config.data.generated_dir
                                             else None)
    for k in ("beta", "generated_rate", "strength", "perturbations", "t_max"):
        v = config.energy[k]
        out[f"energy.{k}"] = list(v) if isinstance(v, tuple) else v
    return out


def energy_hooks() -> dit_setup.ModelHooks:
    return dit_setup.ModelHooks(
        what="the energy judge", build=_build_energy, split=_split_energy, batches=_batches_energy, export=_export,
        frozen_sources=_frozen_sources, resume_settings=_resume_energy,
        describe=lambda config: (f"LoRA rank {config.lora.rank} (alpha {config.lora.alpha}) on the kept blocks + "
                                 "energy head" if config.lora.rank else "the energy head alone")
        + f"; contrastive loss, beta {config.energy.beta}")


def make_energy_loss(config: ml_collections.ConfigDict):
    e = config.energy

    def build(setup: dit_setup.Setup):
        inner = ej.make_energy_loss_fn(setup.graphdef, beta=float(e.beta), strength=float(e.strength),
                                       perturbations=tuple(e.perturbations), generated_rate=float(e.generated_rate),
                                       t_max=float(e.t_max))

        def loss_fn(params, frozen, batch, key):
            return inner(params, frozen["model"], batch, key)
        return loss_fn, {}, {}

    return build


# ------------------------------------------------------------------------------------------ stage 2: preference

def _energy_model_dir(workdir: str) -> str:
    return os.path.join(workdir, "energy", dit_setup.MODEL_DIR)


def _preference_config(config) -> ml_collections.ConfigDict:
    """The run config of the preference stage: the preference section's run length, batch and learning rate."""
    p = config.preference
    c = copy.deepcopy(config)
    c.train.steps, c.data.batch_size, c.optim.learning_rate = int(p.steps), int(p.batch_size), float(p.learning_rate)
    return c


def _build_preference(config, path: str) -> dit_setup.LoadedModel:
    judge = ej.load_energy_judge(path)
    fields = preference_cache.open_pair_cache(config.preference.train, "preference.train").info["fields"]
    shape = tuple(fields["z_a"]["shape"])
    if shape[-1] != judge.config.in_channels:
        raise ConfigError(f"preference.train {config.preference.train!r}: latents have {shape[-1]} channels, the "
                          f"judge reads {judge.config.in_channels}")
    return dit_setup.LoadedModel(judge, f"the energy stage's judge {path}")


def _batches_preference(config):
    n_proc = jax.process_count()
    if config.data.batch_size % n_proc:
        raise ConfigError(f"preference.batch_size={config.data.batch_size} is not divisible by {n_proc} processes")
    cache = preference_cache.open_pair_cache(config.preference.train, "preference.train")
    return iter(readers.make_dataset(cache, batch_size=config.data.batch_size // n_proc, seed=config.seed,
                                     transform=_PairNoText()))


class _PairNoText:
    def __call__(self, record: dict) -> dict:
        return {"z_a": np.asarray(record["z_a"], np.float32), "z_b": np.asarray(record["z_b"], np.float32),
                "labels": np.asarray(record["labels"], np.int32)}


def _resume_preference(config, model, extra_frozen) -> dict:
    del extra_frozen
    out = {f"model.{k}": v for k, v in saving.architecture(model.config, ej.KIND).items()}
    out["data.batch_size"] = config.data.batch_size
    out["preference.train (its cache)"] = _cache_identity(config.preference.train)
    for k in ("loss", "theta", "t_max"):
        out[f"preference.{k}"] = config.preference[k]
    return out


def preference_hooks(energy_dir: str) -> dit_setup.ModelHooks:
    """The preference stage's hooks: the judge exported by the energy stage at ``energy_dir``, its preference
    head trained (placed by the run like any model: its parameters carry no sharded axes)."""
    return dit_setup.ModelHooks(
        what="the energy judge's preference head",
        build=lambda config, mesh, rules: _build_preference(config, energy_dir),
        split=lambda model, config: nnx.split(model, _head_filter(PREFERENCE_HEAD), ...),
        batches=_batches_preference, export=_export,
        frozen_sources=lambda config: {"energy stage (its model)": _model_identity(energy_dir)},
        resume_settings=_resume_preference,
        describe=lambda config: f"the preference head alone (backbone and energy head frozen); loss "
                                f"{config.preference.loss}")


def _model_identity(path: str) -> dict:
    info = saving.read_model_json(path)
    return {k: info.get(k) for k in ("kind", "architecture", "extra")}


def make_preference_loss(config: ml_collections.ConfigDict):
    p = config.preference

    def build(setup: dit_setup.Setup):
        inner = ej.make_preference_loss_fn(setup.graphdef, p.loss, float(p.t_max), float(p.theta))

        def loss_fn(params, frozen, batch, key):
            return inner(params, frozen["model"], batch, key)
        return loss_fn, {}, {}

    return build


# ------------------------------------------------------------------------------------------ evaluation

def _energy_score(judge):
    graphdef, state = nnx.split(judge)

    def score(params, z):
        return -ej.clip_energy(nnx.merge(graphdef, params), z, 0.0)
    return score, state


def _preference_score(judge):
    graphdef, state = nnx.split(judge)

    def score(params, z):
        return nnx.merge(graphdef, params).preferences(z, jnp.zeros((z.shape[0],), jnp.float32))
    return score, state


def held_out_energies(judge, clips: np.ndarray, config) -> dict:
    """Per perturbation: the clips' mean energy, their negatives', and the share of clips below their own negative."""
    e = config.eval
    score, state = _energy_score(judge)
    fn = jax.jit(score)

    def energies(z):
        out = [np.asarray(-fn(state, jnp.asarray(z[lo:lo + e.batch_size]))) for lo in range(0, len(z), e.batch_size)]
        return np.concatenate(out)

    real = energies(clips)
    report = {"clips": int(len(clips)), "energy_real": float(np.mean(real)), "by_perturbation": {}}
    for i, name in enumerate(config.energy.perturbations):
        neg, _ = latent_negatives.random_negatives(jax.random.fold_in(jax.random.PRNGKey(e.seed), i),
                                                   jnp.asarray(clips), float(config.energy.strength), (name,))
        en = energies(np.asarray(neg))
        report["by_perturbation"][name] = {"energy": float(np.mean(en)), "real_below": float(np.mean(real < en))}
    return report


def _read_clips(path: str, n: int, mean, std) -> np.ndarray:
    cache = latent_cache.open_cache(path)
    recs = cache.__getitems__(list(range(min(n, len(cache)))))
    z = np.stack([np.asarray(r["latents"], np.float32) for r in recs])
    if len(mean):
        z = (z - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return z


def evaluate(config, workdir: str) -> dict:
    """``eval.json`` of the exported judge (module doc)."""
    judge = ej.load_energy_judge(os.path.join(workdir, dit_setup.MODEL_DIR))
    report: dict = {"energy": config.energy.to_dict(), "lora_rank": config.lora.rank}
    if config.eval.cache_dir:
        clips = _read_clips(config.eval.cache_dir, config.eval.clips, config.data.latent_mean, config.data.latent_std)
        report["held_out"] = held_out_energies(judge, clips, config)
        print("eval: held-out real clips below their negatives: " + ", ".join(
            f"{k} {v['real_below']:.2f}" for k, v in report["held_out"]["by_perturbation"].items()), flush=True)
    if config.preference.test:
        test = preference_cache.read_all(preference_cache.open_pair_cache(config.preference.test, "preference.test"))
        found = {}
        score, state = _energy_score(judge)
        found["energy_judge"] = {"diffs": judges.source_differences(score, state, test["z_a"], test["z_b"],
                                                                    config.eval.batch_size),
                                 "description": "GT-SVJ energy judge, -(E(A) - E(B)) (no annotation but real vs fake)"}
        if judge.config.preference_head:
            score, state = _preference_score(judge)
            found["energy_judge_head"] = {
                "diffs": judges.source_differences(score, state, test["z_a"], test["z_b"], config.eval.batch_size),
                "description": f"its preference head ({config.preference.loss}, ours) on the pairs"}
        report["judges"] = judges.judges_table(found, test["labels"])
        print("eval: judges\n" + judges.table_markdown(report["judges"]), flush=True)
    tmp = os.path.join(workdir, EVAL_JSON + ".tmp")
    with open(tmp, "w") as f:
        json.dump(report, f, indent=1)
    os.replace(tmp, os.path.join(workdir, EVAL_JSON))
    return report


# ------------------------------------------------------------------------------------------ the run

def _stage_record(config, stage: str, upstream: str = "") -> dict:
    keys = ("model", "lora", "energy", "data", "train", "optim", "seed") if stage == "energy" else ("preference",)
    settings = stage_markers.settings_of(config, keys)
    return stage_markers.record(settings, {"energy": upstream} if upstream else {})


def _run_stage(name: str, config, out: str, make_loss, hooks, rec: dict):
    marker = os.path.join(out, DONE)
    old = stage_markers.read(marker)
    if old is not None and old.get("hash") == rec["hash"]:
        print(f"stage {name}: done earlier; skipped", flush=True)
        return None
    if old is not None:
        raise ConfigError(f"stage {name} in {out} was finished with other settings "
                          f"({stage_markers.what_changed(old, rec)}); use a new workdir")
    os.makedirs(out, exist_ok=True)
    print(f"--- stage {name} ---", flush=True)
    state = dit_setup.run_training(config, out, make_loss, hooks=hooks)
    stage_markers.write(marker, rec)
    return state


def run(config: ml_collections.ConfigDict, workdir: str):
    check_config(config)
    os.makedirs(workdir, exist_ok=True)
    if not config.data.generated_dir:
        print("data: no data.generated_dir: every negative is a perturbed real clip (no generated ones)", flush=True)
    timing = {}
    t0 = time.time()
    rec = _stage_record(config, "energy")
    state = _run_stage("energy", config, os.path.join(workdir, "energy"), make_energy_loss(config), energy_hooks(),
                       rec)
    timing["energy_s"] = time.time() - t0
    final = _energy_model_dir(workdir)
    if config.preference.train:
        t0 = time.time()
        c = _preference_config(config)
        state = _run_stage("preference", c, os.path.join(workdir, "preference"), make_preference_loss(c),
                           preference_hooks(final), _stage_record(config, "preference", rec["hash"])) or state
        final = os.path.join(workdir, "preference", dit_setup.MODEL_DIR)
        timing["preference_s"] = time.time() - t0
    out = os.path.join(workdir, dit_setup.MODEL_DIR)
    if os.path.exists(out + ".tmp"):
        shutil.rmtree(out + ".tmp")
    shutil.copytree(final, out + ".tmp")
    if os.path.exists(out):
        shutil.rmtree(out)
    os.replace(out + ".tmp", out)
    print(f"the judge: {out} (from {final})", flush=True)
    t0 = time.time()
    report = evaluate(config, workdir) if (config.eval.cache_dir or config.preference.test) else None
    timing["eval_s"] = time.time() - t0
    with open(os.path.join(workdir, "timing.json"), "w") as f:
        json.dump(timing, f)
    return state, report


get_config = config_entry.defaults_entry(default_config)
