"""Experiment ``score_samples``: VideoAlign's offline data for Flow-DPO and Flow-RWR (paper 4.2): sample
``score.clips_per_prompt`` clips per prompt from a model, score each clip with a reward, write latent caches.

    python -m experiments.main --config=configs/videoalign.py:score --workdir=W/score \\
        --config.model.init_from=W/base --config.prompts.cache_dir=W/latents/train \\
        --config.score.reward_model=W/reward_model

Sampling: ``experiments/sample.py``'s :class:`~experiments.sample.LatentSampler` (same ``prompts``, ``latents``
and ``sampler`` sections); clip ``k`` of prompt ``i`` starts from the noise of index ``i * K + k`` (``K`` the
clips per prompt): ``normal(fold_in(PRNGKey(seed), i * K + k))``, so every clip has its own seed, recorded in
the caches as ``clip``.

Scoring (``score.reward``), one number per clip, higher is better:

* ``reward_model``: ``r = (VQ + MQ + TA) / 3`` of the latent reward model at ``score.reward_model``
  (``experiments.reward_sources``; ``random`` is a stand-in for smoke runs) on the clean latents at timestep 0;
* ``energy_judge``: ``r = -E`` of GT-SVJ's energy judge at ``score.energy_judge`` on the clean latents;
* ``shell_lcc``: ``r = -distance`` of the clip to the manifold ``score.manifold`` (``score.manifold_kind``).

Outputs under ``WORKDIR`` (each written whole, then renamed into place):

* ``dpo_cache/`` (``output.dpo``): per prompt the best clip as the winner and the worst as the loser: fields
  ``latents`` (winner), ``loser_latents``, ``text_embeddings``, ``reward_w``, ``reward_l``, ``clip_w``,
  ``clip_l``, ``prompt``; a prompt whose best and worst rewards differ by ``score.tie_margin`` or less is
  skipped (its pair is a tie) and listed in the summary;
* ``rwr_cache/`` (``output.rwr``): every clip: ``latents``, ``text_embeddings``, ``reward``, ``clip``, ``prompt``;
* ``score_summary.json``: every clip's reward (and its VQ / MQ / TA where the reward has them), the pairs,
  the skipped ties, the counts.

Latents are stored in the sampler's (normalised) space, so train on them with empty ``data.latent_mean/std``.
"""

from __future__ import annotations

import json
import os
import shutil
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from experiments import config_entry, dit_setup, reward_sources, sample
from shelllcc.data import latent_cache
from shelllcc.errors import ConfigError

DPO_DIR, RWR_DIR, SUMMARY = "dpo_cache", "rwr_cache", "score_summary.json"
REWARDS = ("reward_model", "shell_lcc", "energy_judge")


def default_config() -> ml_collections.ConfigDict:
    base = sample.default_config()
    c = ml_collections.ConfigDict()
    c.experiment = "score_samples"
    c.seed = 0
    c.mesh = base.mesh
    c.sharding_rules = base.sharding_rules
    c.model = base.model
    c.prompts = base.prompts
    c.latents = base.latents
    c.sampler = base.sampler
    c.score = ml_collections.ConfigDict(dict(
        reward="reward_model",       # reward_model | shell_lcc | energy_judge
        energy_judge="",             # reward=energy_judge: a train_energy_judge workdir
        reward_model="",             # a trained latent reward model, or 'random' (a stand-in)
        manifold="",                 # reward=shell_lcc: a fit_manifold output (or 'random')
        manifold_kind="shell_norm",  # lcc | shell_norm | shell
        clips_per_prompt=4,          # K clips per prompt (VideoAlign samples several per prompt)
        tie_margin=0.0,              # DPO: no pair when best - worst <= tie_margin
        batch_size=8,                # clips per reward call
    ))
    c.output = ml_collections.ConfigDict(dict(dpo=True, rwr=True, shard_size=256))
    c.lock()
    return c


get_config = config_entry.defaults_entry(default_config)


def check_config(config: ml_collections.ConfigDict) -> None:
    sc = config.score
    if sc.reward not in REWARDS:
        raise ConfigError(f"unknown score.reward {sc.reward!r}; expected one of {REWARDS}")
    if sc.clips_per_prompt < 2:
        raise ConfigError(f"score.clips_per_prompt must be >= 2 (a pair needs two clips), got {sc.clips_per_prompt}")
    if sc.tie_margin < 0:
        raise ConfigError(f"score.tie_margin must be >= 0, got {sc.tie_margin}")
    if not (config.output.dpo or config.output.rwr):
        raise ConfigError("output.dpo and output.rwr are both False: nothing to write")
    sample.check_guidance(config.sampler.guidance)


# ------------------------------------------------------------------------------------------ caches

def text_lengths(contexts: np.ndarray) -> np.ndarray:
    """Per row of ``[N, L, D]``: one past the last non-zero token (the cache stores only the tokens before it)."""
    nonzero = np.any(contexts != 0, axis=-1)                        # [N, L]
    last = contexts.shape[1] - np.argmax(nonzero[:, ::-1], axis=1)
    return np.where(nonzero.any(axis=1), last, 0).astype(np.int32)


def write_latent_cache(out_dir: str, latents: np.ndarray, contexts: np.ndarray, captions: list[str],
                       fields: dict[str, np.ndarray], description: str, shard_size: int = 256) -> dict:
    """A latent cache (``shelllcc.data.latent_cache`` layout) of given arrays: ``latents [N, ...]``, text
    ``contexts [N, L, D]`` (zero past each prompt's tokens), ``captions`` and per-example ``fields`` (``[N, ...]``
    each). Written to ``out_dir + '.partial'`` and renamed over ``out_dir``: the cache appears whole or not at all.

    ``encode_to_cache`` gets a row index as the "video" and identity "encoders" that look the rows up: its
    encoders are called in turn on the same batch, the video one first, so the text one reads the rows it saw.
    """
    n = len(latents)
    if not (len(contexts) == len(captions) == n and all(len(v) == n for v in fields.values())):
        raise ValueError(f"write_latent_cache: {n} latents but {len(contexts)} contexts, {len(captions)} captions, "
                         f"fields {({k: len(v) for k, v in fields.items()})}")
    lengths = text_lengths(contexts)
    rows: list[np.ndarray] = []

    def encode_video(batch):
        r = np.asarray(batch)[:, 0]
        rows[:] = [r]
        return latents[r]

    def encode_text(_captions):
        return contexts[rows[0]], lengths[rows[0]]

    source = [{"row": np.array([i], np.int64), "caption": captions[i], **{k: v[i] for k, v in fields.items()}}
              for i in range(n)]
    tmp = out_dir + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)
    summary = latent_cache.encode_to_cache(source, tmp, encode_video=encode_video, encode_text=encode_text,
                                           batch_size=8, shard_size=max(8, int(shard_size)), keep_fields=tuple(fields),
                                           video_key="row", video_encoder_description=description,
                                           text_encoder_description=description, source_description=description,
                                           progress=False)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
    summary["out_dir"] = out_dir
    return summary


def make_pairs(rewards: np.ndarray, margin: float) -> tuple[list[tuple[int, int, int]], list[dict]]:
    """Per prompt (row of ``rewards [N, K]``) the (prompt, best clip, worst clip) pair, or a skipped tie when
    ``best - worst <= margin``. Clip numbers are positions within the prompt's K clips."""
    pairs, ties = [], []
    for i, r in enumerate(rewards):
        best, worst = int(np.argmax(r)), int(np.argmin(r))
        if r[best] - r[worst] <= margin:
            ties.append({"prompt": i, "best": float(r[best]), "worst": float(r[worst])})
        else:
            pairs.append((i, best, worst))
    return pairs, ties


# ------------------------------------------------------------------------------------------ the run

def run(config: ml_collections.ConfigDict, workdir: str, reward_source: reward_sources.RewardSource | None = None) -> dict:
    """Sample, score and write the caches (module doc). ``reward_source`` replaces the configured reward
    (tests, or a reward of one's own following :mod:`experiments.reward_sources`' protocol)."""
    check_config(config)
    s, sc = config.sampler, config.score
    k_clips = int(sc.clips_per_prompt)
    guided = float(s.guidance_scale) != 1.0
    prompts = sample.load_prompts(config.prompts, guided)
    shape = sample.resolve_latent_shape(config.latents, config.prompts.cache_dir)
    model_cfg = sample.planned_transformer_config(config.model)
    sample.check_setup(shape, tuple(config.latents.latent_mean), tuple(config.latents.latent_std), prompts.text_shape,
                       model_cfg, None)
    n = len(prompts.captions)
    mesh = dit_setup.make_mesh(config.mesh)
    loaded = dit_setup.build_model(config.model, mesh, dit_setup.sharding_rules(config))
    if reward_source is None:
        if sc.reward == "reward_model":
            reward_source = reward_sources.reward_model_source(sc.reward_model, loaded.model, config.seed,
                                                               key="score.reward_model")
        elif sc.reward == "energy_judge":
            reward_source = reward_sources.energy_judge_source(sc.energy_judge, key="score.energy_judge")
        else:
            reward_source = reward_sources.shell_lcc_source(sc.manifold, sc.manifold_kind, shape[-1],
                                                            key="score.manifold")
    guide = sample.build_guidance(s.guidance, loaded.model, config.seed)
    total = n * k_clips
    batch_size = min(int(s.batch_size), total)
    sampler = sample.LatentSampler(loaded.model, mesh, latent_shape=shape, solver=s.solver, steps=s.steps,
                                   shift=s.shift, guidance_scale=s.guidance_scale, batch_size=batch_size,
                                   seed=config.seed, reward_guidance=guide,
                                   guidance_interval=s.get("guidance_interval", ()))
    print(f"score_samples: {n} prompts x {k_clips} clips ({prompts.description}); model {loaded.source}; "
          f"{s.solver} x {s.steps} steps; reward: {reward_source.description}", flush=True)

    # sampling: clip c = i * K + k has prompt i and the noise of index c
    clips = np.arange(total)
    latents = np.zeros((total, *shape), np.float32)
    groups = sample.batches(total, batch_size)
    t0 = time.time()
    for g, idx in enumerate(groups):
        ids = [int(clips[j]) for j in idx]
        lat = sampler.sample(ids, prompts.contexts([c // k_clips for c in ids]), prompts.negative)
        latents[idx] = sample._to_host(lat)[: len(idx)]
        print(f"sampled {idx[-1] + 1}/{total} clips ({time.time() - t0:.1f}s)", flush=True)
    del sampler

    # scoring, in fixed-size batches (the last padded) so the reward compiles once
    contexts = np.asarray(prompts.contexts(list(range(n))), np.float32)
    apply = jax.jit(reward_source.apply)
    params = reward_source.params
    sb = min(int(sc.batch_size), total)
    raw = []
    for start in range(0, total, sb):
        idx = np.arange(start, min(start + sb, total))
        pad = np.concatenate([idx, np.full(sb - len(idx), idx[-1])])
        out = apply(params, jnp.asarray(latents[pad]), jnp.zeros((sb,), jnp.float32),
                    jnp.asarray(contexts[pad // k_clips]))
        raw.append(np.asarray(out, np.float32)[: len(idx)])
        print(f"scored {idx[-1] + 1}/{total} clips", flush=True)
    raw = np.concatenate(raw)
    if raw.ndim == 2 and raw.shape[1] != 3:
        raise ValueError(f"the reward returned {raw.shape[1]} values per clip; expected 3 (VQ, MQ, TA) or 1")
    reward = raw.mean(axis=1) if raw.ndim == 2 else raw                 # r = (VQ + MQ + TA) / 3
    if not np.all(np.isfinite(reward)):
        raise ValueError(f"the reward is not finite for clips {np.flatnonzero(~np.isfinite(reward))[:8].tolist()}")
    per_prompt = reward.reshape(n, k_clips)
    pairs, ties = make_pairs(per_prompt, float(sc.tie_margin))

    summary = {"prompts": n, "clips_per_prompt": k_clips, "clips": total, "pairs": len(pairs), "ties": ties,
               "tie_margin": float(sc.tie_margin), "reward": reward_source.description,
               "rewards": per_prompt.tolist(), "pair_list": [list(p) for p in pairs]}
    if raw.ndim == 2:
        summary["dimensions"] = {d: raw[:, j].reshape(n, k_clips).tolist() for j, d in enumerate(("VQ", "MQ", "TA"))}
    desc = (f"score_samples: model {loaded.source}; {s.solver} x {s.steps}, seed {config.seed}; "
            f"reward {reward_source.description}")
    caption = lambda i: prompts.captions[i]  # noqa: E731
    if jax.process_index() == 0:
        if config.output.dpo:
            if pairs:
                p = np.asarray(pairs, np.int64)
                w, lo = p[:, 0] * k_clips + p[:, 1], p[:, 0] * k_clips + p[:, 2]
                out = write_latent_cache(
                    os.path.join(workdir, DPO_DIR), latents[w], contexts[p[:, 0]], [caption(i) for i in p[:, 0]],
                    {"loser_latents": latents[lo], "reward_w": reward[w], "reward_l": reward[lo],
                     "clip_w": w, "clip_l": lo, "prompt": p[:, 0]}, desc + " (DPO pairs)", config.output.shard_size)
                summary["dpo_cache"] = out["out_dir"]
            else:
                print("warning: every prompt's clips tie within score.tie_margin: no DPO cache written", flush=True)
        if config.output.rwr:
            prompt = clips // k_clips
            out = write_latent_cache(os.path.join(workdir, RWR_DIR), latents, contexts[prompt],
                                     [caption(i) for i in prompt], {"reward": reward, "clip": clips, "prompt": prompt},
                                     desc + " (RWR clips)", config.output.shard_size)
            summary["rwr_cache"] = out["out_dir"]
        with open(os.path.join(workdir, SUMMARY + ".tmp"), "w") as f:
            json.dump(summary, f, indent=1)
        os.replace(os.path.join(workdir, SUMMARY + ".tmp"), os.path.join(workdir, SUMMARY))
    gap = per_prompt.max(axis=1) - per_prompt.min(axis=1)
    print(f"score_samples: {total} clips scored (reward mean {reward.mean():.4g}, min {reward.min():.4g}, max "
          f"{reward.max():.4g}); {len(pairs)} DPO pairs, {len(ties)} prompts skipped as ties (best - worst <= "
          f"{sc.tie_margin}); mean best-worst gap {gap.mean():.4g} -> {workdir}", flush=True)
    # the summary's lists, then the arrays under the names a caller reads
    return {**summary, "latents": latents, "rewards": reward, "pairs": pairs, "ties": ties}


__all__ = ["default_config", "run", "write_latent_cache", "make_pairs", "text_lengths"]
