"""Smoke run of every stage of the Wan2.1-1.3B real-scale recipe with random weights at reduced resolution.

    python benchmarks/wan_pipeline_smoke.py --preset wan2.1 --out /tmp/wan_smoke     # one GPU (H100/H200)
    python benchmarks/wan_pipeline_smoke.py --preset tiny --out /tmp/tiny_smoke      # CPU, a few minutes

Stages, each a subprocess with its own log (``OUT/logs/NN_<stage>.log``), the recipe's stages run exactly as
the README's commands (``python -m experiments.main --config=configs/wan21_pipeline.py:STAGE``):

1. ``videos``: ``--clips`` synthetic captioned mp4 clips (``shelllcc.data.moving_textures``, rendered at a
   quarter of the resolution and upscaled 4x) in ``OUT/videos`` with ``captions.jsonl``;
   ``shelllcc.data.video_folder.build`` into ``OUT/tfds``.
2. ``captions``: ``encode_cache`` with ``captions_only`` -- the split's captions for umT5.
3. ``models``: no network on the GPU machines, so no real weights: a random VAE of the preset's size
   (``wan2.1``: the released architecture, 127M parameters) saved with ``saving.save_model``, and a fake umT5
   cache ``OUT/models/text.npz`` (random ``[N, 512, 4096]`` embeddings, zero past random lengths, in
   ``third_party.umt5``'s format) holding the captions, the sampling prompts and the empty negative prompt.
4. ``encode``: ``wan21_pipeline.py:encode`` (``vae.dir`` = the random VAE, ``vae.dtype`` = ``--vae-dtype``).
5. ``manifold``: ``wan21_pipeline.py:manifold`` on the cache with few steps (``wan2.1``: the recipe's 4096
   anchors and 512-wide coder).
6. ``reward``: ``wan21_pipeline.py:reward`` (``wan21_reward.py:1.3b-lora``) from a seeded random init of the
   1.3B DiT (no ``model.pretrained``), a few steps of the recipe's effective batch 8.
7. ``sample``: ``wan21_pipeline.py:sample`` with the fine-tuned model, the random VAE decoding, 2 prompts,
   few steps, guidance 5.

Presets: ``wan2.1``: 33 frames at 240 x 416 (latents ``[9, 30, 52, 16]``), the Wan2.1 VAE and the 1.3B DiT,
the recipe's dtypes and cuDNN attention. ``tiny``: 9 frames at 32 x 48, a narrow VAE of the same topology
(z_dim 16), the ``tiny`` DiT (text dim 32), default attention: for CPUs.

After each stage its outputs are checked (cache complete with the expected latent shape, finite losses, mp4s
written); the run stops at the first failure, printing the stage, the reason and the tail of its log.
``OUT/summary.json``: per stage the command, return code, wall time, check result and log path. Exit code 0
when every stage passed, 1 otherwise. ``OUT`` is emptied first if an earlier run of this script made it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import sys
import time

import harness

MARKER = ".wan_pipeline_smoke"
SUBDIRS = ("videos", "tfds", "captions", "models", "cache", "manifold", "reward", "sample", "logs")
STAGE_DIRS = {"videos": ("videos", "tfds"), "captions": ("captions",), "models": ("models",), "encode": ("cache",),
              "manifold": ("manifold",), "reward": ("reward",), "sample": ("sample",)}
PIPELINE = "configs/wan21_pipeline.py"
PROMPTS = ("a red striped circle moving left slowly", "a blue checked square moving up at fast speed")

PRESETS = {
    "wan2.1": dict(frames=33, height=240, width=416, text=(512, 4096), vae="wan2.1", dit=(),
                   vae_dtype="bfloat16", encode_batch=1, shard_size=4,
                   manifold=("--config.stage1.steps=40", "--config.stage2.steps=20", "--config.log_every=10",
                             "--config.checkpoint_every=40"),
                   reward=("--config.train.steps=3", "--config.train.log_every=1", "--config.train.checkpoint_every=2"),
                   sample=("--config.sampler.steps=4", "--config.sampler.batch_size=2")),
    "tiny": dict(frames=9, height=32, width=48, text=(16, 32), vae="tiny16", vae_dtype="float32", encode_batch=2,
                 shard_size=4,
                 dit=("--config.model.preset=tiny", "--config.model.attention_impl="),
                 manifold=("--config.manifold.num_anchors=16", "--config.manifold.hidden_dim=16",
                           "--config.manifold.init_patches=2048", "--config.stage1.batch_size=256",
                           "--config.stage2.batch_size=256", "--config.stage1.steps=20", "--config.stage2.steps=10",
                           "--config.log_every=10", "--config.checkpoint_every=20"),
                 reward=("--config.train.steps=3", "--config.train.log_every=1", "--config.train.checkpoint_every=2",
                         "--config.data.batch_size=2"),
                 sample=("--config.sampler.steps=2", "--config.sampler.batch_size=2")),
}


class Paths:
    def __init__(self, out: str):
        self.out = os.path.abspath(out)
        for name in SUBDIRS:
            setattr(self, name, os.path.join(self.out, name))
        self.builder_file = os.path.join(self.tfds, "builder_dir.txt")
        self.vae = os.path.join(self.models, "vae")
        self.text = os.path.join(self.models, "text.npz")
        self.prompts = os.path.join(self.models, "prompts.txt")
        self.summary = os.path.join(self.out, "summary.json")


def latent_shape(p: dict) -> tuple[int, int, int, int]:
    return (1 + (p["frames"] - 1) // 4, p["height"] // 8, p["width"] // 8, 16)


# ------------------------------------------------------------------------------------------ internal stages

def stage_videos(args, paths: Paths) -> None:
    """Synthetic clips as mp4 + captions.jsonl, then the TFDS build of the folder."""
    import numpy as np

    from shelllcc.data import moving_textures as mt
    from shelllcc.data import video_folder
    from shelllcc.evaluation import media

    p = PRESETS[args.preset]
    spec = mt.ClipSpec(num_frames=p["frames"], height=p["height"] // 4, width=p["width"] // 4, seed=args.seed)
    os.makedirs(paths.videos, exist_ok=True)
    with open(os.path.join(paths.videos, "captions.jsonl"), "w") as f:
        for i in range(args.clips):
            ex = mt.generate_example(args.seed, i, spec)
            video = np.repeat(np.repeat(ex["video"], 4, axis=1), 4, axis=2)      # 4x nearest upscale
            name = f"clip_{i:03d}.mp4"
            media.write_mp4(os.path.join(paths.videos, name), video, fps=16)
            f.write(json.dumps({"file": name, "caption": ex["caption"]}) + "\n")
    print(f"wrote {args.clips} clips of {video.shape} to {paths.videos}", flush=True)
    builder = video_folder.build(paths.tfds, video_folder.VideoFolderConfig(
        video_dir=paths.videos, num_frames=p["frames"], height=p["height"], width=p["width"], fps=None))
    with open(paths.builder_file, "w") as f:
        f.write(builder.data_dir)


def stage_models(args, paths: Paths) -> None:
    """A random VAE of the preset (saved) and a fake umT5 cache of the captions, prompts and ''."""
    import jax
    import numpy as np
    from flax import nnx

    from shelllcc.models import saving
    from shelllcc.models.wan_vae import WanVAE, WanVAEConfig
    from third_party import umt5

    p = PRESETS[args.preset]
    cfg = WanVAEConfig.preset("wan2.1") if p["vae"] == "wan2.1" else \
        WanVAEConfig(base_dim=8, z_dim=16, dim_mult=(1, 2, 2, 2), num_res_blocks=1)   # wan2.1 latent stats
    t0 = time.time()
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: WanVAE(cfg, rngs=nnx.Rngs(args.seed))))
    abstract = abstract.to_pure_dict()
    rng = np.random.default_rng(args.seed)

    # Seeded numpy values instead of the modules' initialisers: an XLA init program of the VAE takes about a
    # minute to compile. Kernels: normal with fan-in scaling (activations stay O(1)); biases: small; norm
    # scales: about 1.
    def fill(path, x):
        if len(x.shape) >= 2:
            value = rng.standard_normal(x.shape, np.float32) / np.sqrt(np.prod(x.shape[:-1]))
        elif getattr(path[-1], "key", None) == "bias":
            value = 0.02 * rng.standard_normal(x.shape, np.float32)
        else:
            value = 1.0 + 0.1 * rng.standard_normal(x.shape, np.float32)
        return jax.numpy.asarray(value, x.dtype)

    state = jax.tree_util.tree_map_with_path(fill, abstract)
    vae = nnx.merge(graphdef, state)
    n = sum(x.size for x in jax.tree.leaves(state))
    saving.save_model(paths.vae, vae, extra={"note": "random weights (wan_pipeline_smoke)"})
    print(f"random VAE ({p['vae']}, {n / 1e6:.1f}M parameters) in {time.time() - t0:.1f}s -> {paths.vae}", flush=True)

    captions = umt5.read_captions(os.path.join(paths.captions, "captions.jsonl"))
    with open(paths.prompts, "w") as f:
        f.write("\n".join(PROMPTS) + "\n")
    entries = list(dict.fromkeys([*captions, *PROMPTS, ""]))       # "" : the sampler's negative prompt
    length, dim = p["text"]
    rng = np.random.default_rng(args.seed)
    lengths = rng.integers(2, min(length, 40) + 1, len(entries)).astype(np.int32)
    lengths[entries.index("")] = 1                                   # umT5 of "": just </s>
    emb = np.zeros((len(entries), length, dim), np.float32)
    for i, ln in enumerate(lengths):
        emb[i, :ln] = rng.standard_normal((ln, dim)).astype(np.float32) * 0.2
    umt5.write_text_cache(entries, emb, lengths, paths.text, trim=True)
    print(f"fake umT5 cache: {len(entries)} entries [{length}, {dim}] ({len(captions)} captions, {len(PROMPTS)} "
          f"prompts, the empty negative) -> {paths.text}", flush=True)


INTERNAL = {"videos": stage_videos, "models": stage_models}


# ------------------------------------------------------------------------------------------ the runner

def main_command(stage: str, workdir: str, *flags: str) -> list[str]:
    return [sys.executable, "-m", "experiments.main", f"--config={PIPELINE}:{stage}", f"--workdir={workdir}", *flags]


def plan(args, paths: Paths) -> tuple[list[tuple[str, list[str] | None]], str]:
    """``([(stage, command)], vae dtype)``; the commands of the stages that read the builder directory are
    built when they run (``None`` here)."""
    p = PRESETS[args.preset]
    me = [sys.executable, os.path.abspath(__file__), "--preset", args.preset, "--out", paths.out,
          "--clips", str(args.clips), "--seed", str(args.seed)]
    shape = "(" + ",".join(map(str, latent_shape(p))) + ")"
    vae_dtype = args.vae_dtype or p["vae_dtype"]
    return [
        ("videos", [*me, "--internal", "videos"]),
        ("captions", None),      # needs the builder dir
        ("models", [*me, "--internal", "models"]),
        ("encode", None),
        ("manifold", main_command("manifold", paths.manifold, f"--config.data.cache.dir={paths.cache}",
                                  *p["manifold"])),
        ("reward", main_command("reward", paths.reward, f"--config.data.cache_dir={paths.cache}",
                                f"--config.reward.manifold={paths.manifold}", *p["dit"], *p["reward"])),
        ("sample", main_command("sample", paths.sample, f"--config.model.init_from={paths.reward}",
                                f"--config.prompts.file={paths.prompts}", f"--config.prompts.text_encoder={paths.text}",
                                f"--config.vae.dir={paths.vae}", f"--config.vae.dtype={vae_dtype}",
                                f"--config.latents.shape={shape}", *p["dit"], *p["sample"])),
    ], vae_dtype


def late_command(stage: str, args, paths: Paths, vae_dtype: str) -> list[str]:
    p = PRESETS[args.preset]
    with open(paths.builder_file) as f:
        builder = f.read().strip()
    if stage == "captions":
        return main_command("encode", paths.captions, f"--config.data.dataset={builder}", "--config.captions_only=True")
    return main_command("encode", paths.cache, f"--config.data.dataset={builder}", f"--config.vae.dir={paths.vae}",
                        f"--config.vae.dtype={vae_dtype}", f"--config.text.umt5_cache={paths.text}",
                        f"--config.batch_size={p['encode_batch']}", f"--config.output.shard_size={p['shard_size']}")


def _metrics(workdir: str) -> list[dict]:
    path = os.path.join(workdir, "metrics.jsonl")
    return [json.loads(line) for line in open(path)] if os.path.exists(path) else []


def check(stage: str, args, paths: Paths) -> str:
    """What the stage should have produced; returns a short description, raises ``AssertionError``."""
    p = PRESETS[args.preset]
    if stage == "videos":
        with open(paths.builder_file) as f:
            builder = f.read().strip()
        report = json.load(open(os.path.join(builder, "build_report.json")))
        n = sum(report["clips"].values())
        assert n == args.clips, f"{n} clips built from {args.clips} videos; report {report['skipped']}"
        return f"{n} clips at {builder}"
    if stage == "captions":
        lines = open(os.path.join(paths.captions, "captions.jsonl")).read().splitlines()
        assert lines, "no captions written"
        return f"{len(lines)} distinct captions"
    if stage == "models":
        assert os.path.exists(os.path.join(paths.vae, "model.json")) and os.path.exists(paths.text)
        return f"VAE at {paths.vae}, text cache {os.path.getsize(paths.text) / 2**20:.1f} MiB"
    if stage == "encode":
        info = json.load(open(os.path.join(paths.cache, "cache.json")))
        assert info["complete"] and info["num_examples"] == args.clips, (info["complete"], info["num_examples"])
        lat = info["fields"]["latents"]
        assert tuple(lat["shape"]) == latent_shape(p) and lat["dtype"] == "bfloat16", lat
        assert tuple(info["fields"]["text_embeddings"]["shape"]) == p["text"], info["fields"]["text_embeddings"]
        return f"{info['num_examples']} clips, latents {lat['shape']} {lat['dtype']}"
    if stage == "manifold":
        assert os.path.isdir(os.path.join(paths.manifold, "manifold")), "no manifold/ written"
        d = json.load(open(os.path.join(paths.manifold, "distances.json")))
        real = d["real (held out)"]
        assert all(math.isfinite(v) for v in real.values()), real
        return f"held-out shell distance {real['shell']:.4g}, lcc {real['lcc']:.4g}"
    if stage == "reward":
        assert os.path.exists(os.path.join(paths.reward, "model", "model.json")), "no model/ exported"
        rows = [r for r in _metrics(paths.reward) if "loss" in r]
        assert rows, "no loss in metrics.jsonl"
        last = rows[-1]
        assert math.isfinite(last["loss"]), f"non-finite loss {last}"
        assert last.get("skipped", 0) == 0, f"skipped (non-finite) updates: {last}"
        return f"step {last.get('step')}: loss {last['loss']:.4g}, reward {last.get('reward', float('nan')):.4g}"
    if stage == "sample":
        import numpy as np
        d = os.path.join(paths.sample, "samples")
        mp4s = sorted(f for f in os.listdir(d) if f.endswith(".mp4"))
        assert len(mp4s) == len(PROMPTS), f"{len(mp4s)} mp4s for {len(PROMPTS)} prompts"
        lat = np.load(os.path.join(d, "latents.npy"))
        assert lat.shape == (len(PROMPTS), *latent_shape(p)) and np.isfinite(lat).all(), (lat.shape,)
        return f"{len(mp4s)} videos, latents {lat.shape}"
    raise KeyError(stage)


def tail(path: str, lines: int = 60) -> str:
    with open(path, errors="replace") as f:
        return "".join(f.readlines()[-lines:])


def prepare_out(out: str, only: set | None) -> Paths:
    """Empty what this script wrote in ``out`` before (only the ``only`` stages' outputs when given)."""
    paths = Paths(out)
    if os.path.isdir(paths.out) and os.listdir(paths.out) and not os.path.exists(os.path.join(paths.out, MARKER)):
        raise SystemExit(f"--out {paths.out} is not empty and was not made by this script; choose another directory")
    names = SUBDIRS if only is None else [d for st in only for d in STAGE_DIRS[st]]
    for name in names:
        shutil.rmtree(getattr(paths, name), ignore_errors=True)
    if os.path.exists(paths.summary):
        os.remove(paths.summary)
    os.makedirs(paths.logs, exist_ok=True)
    open(os.path.join(paths.out, MARKER), "w").close()
    return paths


def run_all(args) -> int:
    only = set(args.stages.split(",")) if args.stages else None
    if only is not None and only - set(STAGE_DIRS):
        raise SystemExit(f"--stages: unknown {sorted(only - set(STAGE_DIRS))}; stages are {list(STAGE_DIRS)}")
    paths = prepare_out(args.out, only)
    stages, vae_dtype = plan(args, paths)
    summary = {"preset": args.preset, "out": paths.out, "clips": args.clips, "latent_shape": latent_shape(PRESETS[args.preset]),
               "vae_dtype": vae_dtype, "host": platform.node(), "python": sys.executable,
               "started": time.strftime("%Y-%m-%d %H:%M:%S"), "stages": [], "ok": False, "failed_stage": None}
    t_all = time.time()
    for k, (stage, cmd) in enumerate(stages, 1):
        if only is not None and stage not in only:
            continue
        cmd = cmd or late_command(stage, args, paths, vae_dtype)
        log_path = os.path.join(paths.logs, f"{k:02d}_{stage}.log")
        print(f"[{k}/{len(stages)}] {stage}: {' '.join(cmd)}", flush=True)
        done = harness.run(cmd, timeout=args.timeout, log=log_path, expects_result=False)
        rc, wall = -9 if done.rc is None else done.rc, done.wall_s   # -9: killed at the timeout
        entry = {"stage": stage, "command": cmd, "rc": rc, "wall_s": round(wall, 1), "log": log_path}
        if rc == 0:
            try:
                entry["check"] = check(stage, args, paths)
            except (AssertionError, OSError, ValueError, KeyError) as e:
                entry["check_failed"] = f"{type(e).__name__}: {e}"
        devices = [line for line in open(log_path, errors="replace") if line.startswith("devices:")]
        if devices:
            entry["devices"] = devices[0].strip()
        summary["stages"].append(entry)
        ok = rc == 0 and "check_failed" not in entry
        print(f"    {'ok' if ok else 'FAILED'}: rc {rc} in {wall:.1f}s; "
              f"{entry.get('check') or entry.get('check_failed') or ''}", flush=True)
        if not ok:
            summary["failed_stage"] = stage
            summary["total_s"] = round(time.time() - t_all, 1)
            json.dump(summary, open(paths.summary, "w"), indent=2)
            why = entry.get("check_failed") or f"exit code {rc}"
            print(f"\nstage {stage!r} failed ({why}). Last lines of {log_path}:\n{'-' * 80}\n{tail(log_path)}"
                  f"{'-' * 80}\nsummary: {paths.summary}", flush=True)
            return 1
    summary["ok"] = True
    summary["total_s"] = round(time.time() - t_all, 1)
    json.dump(summary, open(paths.summary, "w"), indent=2)
    print(f"\nall {len(summary['stages'])} stages passed in {summary['total_s']:.0f}s; summary: {paths.summary}",
          flush=True)
    for e in summary["stages"]:
        print(f"  {e['stage']:9s} {e['wall_s']:7.1f}s  {e.get('check', '')}", flush=True)
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), required=True)
    ap.add_argument("--out", required=True, help="logs, summary.json and every stage's outputs")
    ap.add_argument("--clips", type=int, default=8, help="synthetic videos (one clip each)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--vae-dtype", default="", help="VAE compute dtype for encode and sample (default: the preset's)")
    ap.add_argument("--timeout", type=int, default=3600, help="seconds per stage")
    ap.add_argument("--stages", default="", help="comma list: rerun only these stages (after fixing a failure; "
                                                 "the earlier stages' outputs in OUT are reused)")
    ap.add_argument("--internal", choices=sorted(INTERNAL), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.internal:
        INTERNAL[args.internal](args, Paths(args.out))
        return 0
    return run_all(args)


if __name__ == "__main__":
    sys.exit(main())
