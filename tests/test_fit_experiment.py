"""Fitting steps, manifold save/load, and the fit_manifold experiment end to end (with resume)."""

import functools
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import synthetic_manifold
from experiments import fit_manifold
from shelllcc.data.latent_files import load_latent_files
from shelllcc.manifold import fit, io
from shelllcc.manifold.params import ManifoldConfig
from tests.helpers import random_manifold

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _opt():
    return fit.make_optimizer(fit.OptimConfig(learning_rate=1e-2, warmup_steps=1, total_steps=10))


def _leaves_equal(a, b):
    return all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_stage_steps_touch_only_their_parameters():
    params, cfg = random_manifold(0)
    z = np.random.default_rng(0).standard_normal((128, 16)).astype(np.float32)
    opt = _opt()
    s1 = jax.tree.map(jnp.copy, fit.init_state(params, opt, 1))
    step1 = jax.jit(functools.partial(fit.stage1_step, optimizer=opt, config=cfg))
    for _ in range(2):
        s1, _ = step1(s1, z)
    assert _leaves_equal(s1.params.shell, params.shell)
    assert not _leaves_equal(s1.params.coder, params.coder)
    assert not np.allclose(s1.params.bn.mean, params.bn.mean) and int(s1.params.bn.count) == 2

    s2 = jax.tree.map(jnp.copy, fit.init_state(params, opt, 2))
    step2 = jax.jit(functools.partial(fit.stage2_step, optimizer=opt, config=cfg))
    for _ in range(2):
        s2, _ = step2(s2, z)
    for name in ("anchors", "scale", "shift", "coder", "bn"):
        assert _leaves_equal(getattr(s2.params, name), getattr(params, name)), name
    assert not _leaves_equal(s2.params.shell, params.shell)


def test_non_finite_step_is_skipped_and_counted():
    params, cfg = random_manifold(1)
    opt = _opt()
    state = jax.tree.map(jnp.copy, fit.init_state(params, opt, 1))
    step = jax.jit(functools.partial(fit.stage1_step, optimizer=opt, config=cfg))
    z = np.random.default_rng(1).standard_normal((64, 16)).astype(np.float32)
    state, _ = step(state, z)
    before = jax.device_get(state)
    bad = z.copy()
    bad[3, 2] = np.nan
    state, metrics = step(state, bad)
    assert int(state.skipped) == 1 and float(metrics["skipped"]) == 1.0
    assert _leaves_equal(state.params, before.params) and _leaves_equal(state.opt_state, before.opt_state)
    state, _ = step(state, z)
    assert int(state.skipped) == 1 and not _leaves_equal(state.params, before.params)


def test_save_load_manifold_round_trip(tmp_path):
    params, cfg = random_manifold(2)
    io.save_manifold(str(tmp_path / "m"), params, cfg, extra={"shell_band_target": 1.25})
    loaded, cfg2, extra = io.load_manifold(str(tmp_path / "m"))
    assert cfg2 == cfg and extra == {"shell_band_target": 1.25}
    assert _leaves_equal(loaded, params)
    with pytest.raises(FileNotFoundError, match="not a saved manifold"):
        io.load_manifold(str(tmp_path / "nothing"))
    bad_cfg = ManifoldConfig(dim=16, num_anchors=31, hidden_dim=24)
    with pytest.raises(ValueError, match=r"anchors: has \(32, 16\), config implies \(31, 16\)"):
        io.save_manifold(str(tmp_path / "b"), params, bad_cfg)


def _quick_config(**overrides):
    c = synthetic_manifold.get_config("quick")
    c.unlock()
    for key, value in overrides.items():
        node = c
        *path, last = key.split(".")
        for part in path:
            node = node[part]
        node[last] = value
    c.lock()
    return c


def test_experiment_fits_saves_and_ranks_degraded_latents(tmp_path, capsys):
    results = fit_manifold.run(_quick_config(), str(tmp_path))
    out = capsys.readouterr().out
    assert "[fit_manifold] step 60/60" in out and "stage=2" in out and "manifold distances" in out
    for name in ("manifold/manifold.json", "metrics.jsonl", "distances.json"):
        assert os.path.exists(tmp_path / name), name
    params, cfg, extra = io.load_manifold(str(tmp_path / "manifold"))
    assert cfg.dim == 16 and "shell_band_target" in extra
    real = results["real (held out)"]
    pulled = results["pulled to skeleton (x0.3)"]
    assert pulled["lcc"] < real["lcc"]          # lcc rewards mean regression ...
    assert pulled["shell"] > real["shell"]      # ... the shell penalises it.


def test_experiment_resume_reproduces_uninterrupted_run(tmp_path, capsys):
    cfg = _quick_config(checkpoint_every=30)
    fit_manifold.run(cfg, str(tmp_path / "a"))
    full, _, _ = io.load_manifold(str(tmp_path / "a" / "manifold"))

    fit_manifold.run(cfg, str(tmp_path / "b"))
    # Kill the run after step 30: drop what came later, as if it had died there.
    shutil.rmtree(tmp_path / "b" / "checkpoints" / "60")
    shutil.rmtree(tmp_path / "b" / "manifold")
    capsys.readouterr()
    fit_manifold.run(cfg, str(tmp_path / "b"))
    assert "resumed from" in capsys.readouterr().out
    resumed, _, _ = io.load_manifold(str(tmp_path / "b" / "manifold"))
    for a, b in zip(jax.tree.leaves(full), jax.tree.leaves(resumed)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-6, atol=1e-7)


def test_npy_latent_source_counts_bad_files(tmp_path):
    rng = np.random.default_rng(3)
    folder = tmp_path / "lat"
    folder.mkdir()
    for i in range(6):   # channels-first, as the reference scripts write them
        np.save(folder / f"v{i}.npy", rng.standard_normal((2, 16, 2, 8, 8)).astype(np.float32))
    (folder / "broken.npy").write_bytes(b"\x93NUMPY garbage")
    np.save(folder / "wrong_rank.npy", np.zeros((3, 3), np.float32))
    np.save(folder / "other_shape.npy", np.zeros((1, 16, 2, 4, 4), np.float32))
    latents, report = load_latent_files(str(folder / "*.npy"), layout="channels_first")
    assert latents.shape == (12, 2, 8, 8, 16)
    assert report["used"] == 6 and report["files"] == 9
    assert sum(report["skipped"].values()) == 3 and report["skipped"]["shape_mismatch"] == 1
    with pytest.raises(FileNotFoundError, match="no latent files match"):
        load_latent_files(str(tmp_path / "none" / "*.npy"))

    cfg = _quick_config(**{"data.source": "npy", "data.npy.pattern": str(folder / "*.npy"),
                           "data.npy.layout": "channels_first", "data.test_fraction": 0.25})
    results = fit_manifold.run(cfg, str(tmp_path / "work"))
    assert np.isfinite(results["real (held out)"]["shell"])


def test_cli_rejects_misspelt_config_key(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.main", "--config=configs/synthetic_manifold.py:quick", "--config.stage1.stepz=3",
         f"--workdir={tmp_path}"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "stepz" in proc.stderr


def test_cache_source_normalises_like_the_dit_experiments(tmp_path):
    """data.source='cache': the latents of a latent cache, normalised (x - mean) / std per channel."""
    from shelllcc.data.latent_cache import open_cache
    from tests.helpers import write_tiny_latent_cache
    cache_dir = write_tiny_latent_cache(str(tmp_path / "cache"), n=10, size=32)
    c = fit_manifold.default_config()
    c.data.source = "cache"
    c.data.cache.dir = cache_dir
    c.data.cache.max_examples = 6
    mean, std = tuple(float(i) / 10 for i in range(16)), tuple(1.0 + i / 5 for i in range(16))
    c.data.cache.latent_mean, c.data.cache.latent_std = mean, std
    c.data.test_fraction = 0.5
    splits = fit_manifold.load_latents(c)
    cache = open_cache(cache_dir)
    want = (np.stack([cache[i]["latents"] for i in range(6)]) - np.asarray(mean)) / np.asarray(std)
    got = np.concatenate([splits.test_latents.reshape(-1, 16), splits.train_patches])
    np.testing.assert_allclose(np.sort(got, axis=0), np.sort(want.reshape(-1, 16), axis=0), rtol=1e-6, atol=1e-6)
    assert "6 of 10 latents (normalised)" in splits.description
    c.data.cache.latent_mean = mean[:4]
    with pytest.raises(ValueError, match="latent_mean has 4 entries"):
        fit_manifold.load_latents(c)
