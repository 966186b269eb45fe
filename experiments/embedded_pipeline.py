"""Experiment ``embedded_pipeline``: the whole method on the embedded benchmark, stage by stage, in one run.

Stages (each in its own directory of ``workdir``; a finished stage leaves a ``DONE`` file and a rerun
skips it, an interrupted one resumes from its checkpoints):

1. ``dataset``       the Moving Textures TFDS dataset (``data/``);
2. ``vae``           the video VAE, trained here (``vae/``, experiment ``train_vae``);
3. ``text_encoder``  the small text encoder, seeded random weights (``text_encoder/``): the closed
                     vocabulary needs no pretraining, the DiT's cross-attention learns to read it;
4. ``cache``         latents + text embeddings of the train and test splits (``latents/{train,test}``);
5. ``base``          the base DiT, flow matching on the train latents (``base/``, experiment ``sft``);
6. ``manifold``      Shell-LCC fitted on the train latents (``manifold/``, experiment ``fit_manifold``);
7. ``variants``      reward fine-tuning of copies of the base (``variants/<name>/``): ``control``
                     (continued flow matching, no reward) and one run per manifold distance;
8. ``sample``        the first ``evaluate.num_prompts`` test prompts with fixed seeds from the base and
                     every variant (``samples/<name>/``);
9. ``evaluate``      metrics, plots, montages and ``report.md`` (:mod:`experiments.embedded_evaluation`).

Every stage's settings are a full config of its experiment (``config.vae``, ``config.base``, ...), so
any knob can be set from the command line (``--config.base.train.steps=500``); the paths between
stages are filled in here. The latents the DiT and the manifold see are normalised with the per-channel
statistics the VAE stage measured.
"""

from __future__ import annotations

import copy
import json
import os
import time

import jax
import ml_collections

from experiments import config_entry, fit_manifold, reward_finetune, sample, sft, train_vae

STAGES = ("dataset", "vae", "text_encoder", "cache", "base", "manifold", "variants", "sample", "evaluate")
CONTROL = "control"
VARIANTS = (CONTROL,) + reward_finetune.KINDS
ATTRIBUTE_FIELDS = ("shape", "colour", "texture", "scale", "direction", "speed")
DONE = "DONE"


def default_config() -> ml_collections.ConfigDict:
    from configs import embedded
    c = ml_collections.ConfigDict()
    c.experiment = "embedded_pipeline"
    c.seed = 0
    c.stop_after = ""                # run the stages up to and including this one ('' : all)
    # 9 frames (3 latent frames): a clip a CPU-sized DiT learns in minutes. The textured background
    # stays: on a flat one the latents have no spread around the skeleton, the shell's premise fails
    # there, and the shell reward paints noise over it (seen in an earlier run of this pipeline)
    c.benchmark = dict(num_frames=9, height=64, width=64, train_size=1024, test_size=128, seed=0,
                       background_texture=True)
    c.vae = train_vae.default_config()
    c.vae.train.steps, c.vae.train.log_every = 400, 50
    # 4x spatial compression (latents [3, 16, 16, 16]): at 8x the 64 x 64 frames keep 8 x 8 latents and a
    # CPU-trained VAE loses the shapes; whole 9-frame clips in 32 x 32 crops
    c.vae.model.patch = 4
    c.vae.data.crop_frames, c.vae.data.crop_size, c.vae.data.batch_size = 0, 32, 16
    c.vae.loss.kl = 1e-4
    c.text_encoder = dict(max_len=16, dim=128, num_layers=2, num_heads=4, seed=0)
    c.cache = dict(batch_size=16, shard_size=256)
    c.base = embedded.get_config("sft")
    c.base.train.steps, c.base.data.batch_size, c.base.optim.warmup_steps = 1000, 16, 50
    c.base.optim.learning_rate = 1e-3
    # 4 x 4 latent positions per token: 48 tokens per clip, as many as 8x latents with Wan's (1, 2, 2)
    c.base.model.patch_size = (1, 4, 4)
    c.manifold = fit_manifold.default_config()
    c.manifold.data.source = "cache"
    c.manifold.data.test_fraction = 0.1
    c.manifold.manifold.num_anchors, c.manifold.manifold.hidden_dim = 64, 128
    c.reward = embedded.get_config("reward")     # the settings every variant starts from
    c.reward.train.steps, c.reward.data.batch_size, c.reward.optim.learning_rate = 100, 16, 1e-4
    c.reward.train.log_every = 25
    c.variants = VARIANTS
    c.sample = embedded.get_config("sample")
    c.reward.model.patch_size = c.sample.model.patch_size = c.base.model.patch_size
    c.sample.output.mp4 = c.sample.output.gif = False   # the evaluation decodes the latents losslessly
    c.sample.sampler.batch_size = 16
    from experiments import embedded_evaluation
    c.evaluate = embedded_evaluation.default_config()
    return c


# ------------------------------------------------------------------------------------------ paths

class Paths:
    def __init__(self, workdir: str):
        j = lambda *p: os.path.join(workdir, *p)  # noqa: E731
        self.root = workdir
        self.data, self.vae, self.text_encoder = j("data"), j("vae"), j("text_encoder")
        self.train_cache, self.test_cache = j("latents", "train"), j("latents", "test")
        self.base, self.manifold = j("base"), j("manifold")
        self.variant = lambda name: j("variants", name)
        self.samples = lambda name: j("samples", name)
        self.stage_marker = lambda stage: j("stages", f"{stage}.{DONE}")


def benchmark_config(b: ml_collections.ConfigDict):
    from shelllcc.data import embedded_benchmark
    return embedded_benchmark.BenchmarkConfig(num_frames=b.num_frames, height=b.height, width=b.width,
                                              train_size=b.train_size, test_size=b.test_size, seed=b.seed,
                                              background_texture=b.background_texture)


def latent_stats(paths: Paths) -> tuple[tuple[float, ...], tuple[float, ...]]:
    info = json.load(open(os.path.join(paths.vae, train_vae.RECONSTRUCTION_JSON)))
    return tuple(info["latents_mean"]), tuple(info["latents_std"])


def variant_config(config: ml_collections.ConfigDict, name: str, paths: Paths) -> ml_collections.ConfigDict:
    """The reward_finetune config of variant ``name``: ``control`` trains with the flow-matching objective
    alone; any other name is the manifold distance the generator minimises."""
    if name not in VARIANTS:
        raise ValueError(f"unknown variant {name!r}; expected some of {VARIANTS}")
    c = copy.deepcopy(config.reward)
    mean, std = latent_stats(paths)
    c.data.cache_dir, c.data.latent_mean, c.data.latent_std = paths.train_cache, mean, std
    c.model.init_from = paths.base
    c.reward.manifold = paths.manifold
    if name == CONTROL:
        c.objective.name = "sft"
    else:
        c.reward.kind = name
    return c


def check_variants(variants) -> None:
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise ValueError(f"config.variants has unknown names {unknown}; expected some of {VARIANTS}")
    if len(set(variants)) != len(variants):
        raise ValueError(f"config.variants repeats a name: {list(variants)}")


# ------------------------------------------------------------------------------------------ stages

def stage_dataset(config, paths: Paths) -> None:
    from shelllcc.data import embedded_benchmark
    embedded_benchmark.build(paths.data, benchmark_config(config.benchmark))


def _builder(config, paths: Paths):
    from shelllcc.data import embedded_benchmark
    return embedded_benchmark.build(paths.data, benchmark_config(config.benchmark), verbose=False)


def stage_vae(config, paths: Paths) -> None:
    c = copy.deepcopy(config.vae)
    c.data.dataset = _builder(config, paths).data_dir
    os.makedirs(paths.vae, exist_ok=True)
    train_vae.run(c, paths.vae)


def stage_text_encoder(config, paths: Paths) -> None:
    from flax import nnx
    from shelllcc.data import moving_textures
    from shelllcc.models import saving
    from shelllcc.models.text_encoder import TextEncoder, TextEncoderConfig, split_words
    t = config.text_encoder
    # the tokenizer's units: hyphenated directions ("down-left") are three tokens
    vocab = tuple(sorted({w for word in moving_textures.VOCABULARY for w in split_words(word)}))
    cfg = TextEncoderConfig(vocab=vocab, max_len=t.max_len, dim=t.dim, num_layers=t.num_layers,
                            num_heads=t.num_heads, text_dim=config.base.model.text_dim)
    longest = max(len(split_words(moving_textures.caption(a, v))) for a, v in _caption_probe())
    if longest + 1 > t.max_len:
        raise ValueError(f"text_encoder.max_len={t.max_len} is shorter than the longest caption ({longest} tokens + eos)")
    saving.save_model(paths.text_encoder, TextEncoder(cfg, rngs=nnx.Rngs(t.seed)),
                      extra={"note": "seeded random weights; closed vocabulary of the embedded benchmark"})
    print(f"text encoder: {len(cfg.vocab)} words, {t.num_layers} layers of width {t.dim}, output "
          f"[{t.max_len}, {cfg.text_dim}] (seeded random weights) -> {paths.text_encoder}", flush=True)


def _caption_probe():
    # the longest value of every attribute, in every caption template
    from shelllcc.data import moving_textures as mt
    longest = {k: max(v, key=len) for k, v in mt.ATTRIBUTES.items()}
    return [(longest, v) for v in range(len(mt.CAPTION_TEMPLATES))]


def stage_cache(config, paths: Paths) -> None:
    from shelllcc.data import latent_cache
    from shelllcc.models import saving
    builder = _builder(config, paths)
    vae = train_vae.load(paths.vae)
    encode_video = latent_cache.vae_video_encoder(vae)
    encode_text = latent_cache.text_encoder_fn(saving.load_model(paths.text_encoder))
    for split, out in (("train", paths.train_cache), ("test", paths.test_cache)):
        source = builder.as_data_source(split)
        latent_cache.encode_to_cache(source, out, encode_video=encode_video, encode_text=encode_text,
                                     batch_size=config.cache.batch_size, shard_size=config.cache.shard_size,
                                     keep_fields=("index",) + ATTRIBUTE_FIELDS,
                                     source_description=f"{builder.info.full_name} {split}")


def stage_base(config, paths: Paths) -> None:
    c = copy.deepcopy(config.base)
    mean, std = latent_stats(paths)
    c.data.cache_dir, c.data.latent_mean, c.data.latent_std = paths.train_cache, mean, std
    os.makedirs(paths.base, exist_ok=True)
    sft.run(c, paths.base)


def stage_manifold(config, paths: Paths) -> None:
    c = copy.deepcopy(config.manifold)
    mean, std = latent_stats(paths)
    c.data.source = "cache"
    c.data.cache.dir, c.data.cache.latent_mean, c.data.cache.latent_std = paths.train_cache, mean, std
    os.makedirs(paths.manifold, exist_ok=True)
    fit_manifold.run(c, paths.manifold)


def stage_variants(config, paths: Paths) -> None:
    for i, name in enumerate(config.variants):
        out = paths.variant(name)
        if os.path.exists(os.path.join(out, DONE)):
            print(f"variant {name}: done earlier ({out})", flush=True)
            continue
        print(f"--- variant {i + 1}/{len(config.variants)}: {name} ---", flush=True)
        os.makedirs(out, exist_ok=True)
        reward_finetune.run(variant_config(config, name, paths), out)
        open(os.path.join(out, DONE), "w").close()


def sample_config(config, paths: Paths, model_dir: str) -> ml_collections.ConfigDict:
    c = copy.deepcopy(config.sample)
    mean, std = latent_stats(paths)
    c.model.init_from = model_dir
    c.prompts.source, c.prompts.cache_dir, c.prompts.count = "cache", paths.test_cache, config.evaluate.num_prompts
    c.latents.latent_mean, c.latents.latent_std = mean, std
    c.vae.dir = os.path.join(paths.vae, train_vae.MODEL_DIR)
    return c


def model_dirs(config, paths: Paths) -> dict[str, str]:
    return {"base": paths.base, **{name: paths.variant(name) for name in config.variants}}


def stage_sample(config, paths: Paths) -> None:
    for name, model_dir in model_dirs(config, paths).items():
        print(f"--- samples of {name} ---", flush=True)
        sample.run(sample_config(config, paths, model_dir), paths.samples(name))


def stage_evaluate(config, paths: Paths) -> None:
    from experiments import embedded_evaluation
    embedded_evaluation.run(config, paths)


RUNNERS = {"dataset": stage_dataset, "vae": stage_vae, "text_encoder": stage_text_encoder, "cache": stage_cache,
           "base": stage_base, "manifold": stage_manifold, "variants": stage_variants, "sample": stage_sample,
           "evaluate": stage_evaluate}


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Run (or finish) every stage; returns ``{stage: seconds}`` of the stages run now."""
    check_variants(config.variants)
    if config.stop_after and config.stop_after not in STAGES:
        raise ValueError(f"config.stop_after={config.stop_after!r} is not a stage; stages: {STAGES}")
    if jax.process_count() > 1:
        raise ValueError("embedded_pipeline runs in one process (its stages are small); run the stages' "
                         "experiments separately for multi-process training")
    paths = Paths(os.path.abspath(workdir))
    os.makedirs(os.path.dirname(paths.stage_marker("x")), exist_ok=True)
    stages = STAGES[:STAGES.index(config.stop_after) + 1] if config.stop_after else STAGES
    timings_path = os.path.join(paths.root, "timings.json")
    timings = json.load(open(timings_path)) if os.path.exists(timings_path) else {}
    t_run = time.time()
    for i, stage in enumerate(stages):
        marker = paths.stage_marker(stage)
        head = f"[stage {i + 1}/{len(STAGES)}: {stage}]"
        if os.path.exists(marker):
            print(f"{head} done earlier; skipped", flush=True)
            continue
        print(f"\n{head} starting ({time.time() - t_run:.0f}s into this run)", flush=True)
        t0 = time.time()
        RUNNERS[stage](config, paths)
        timings[stage] = round(time.time() - t0, 1)
        open(marker, "w").close()
        with open(timings_path, "w") as f:
            json.dump(timings, f, indent=1)
        print(f"{head} finished in {timings[stage]:.0f}s", flush=True)
    total = time.time() - t_run
    print(f"\nembedded_pipeline: {len(stages)} stages in {total:.0f}s this run; per stage (s): "
          + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()), flush=True)
    if "evaluate" in stages:
        print(f"report: {os.path.join(paths.root, 'report.md')}", flush=True)
    return timings


get_config = config_entry.defaults_entry(default_config)
