"""The DiT experiments end to end on CPU: sharded == single device, SIGTERM + exact resume, checkpoints
moving between device counts, LoRA keeping the base frozen, ablations, locked configs."""

import json
import os
import signal
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from flax import nnx

from experiments import main as main_lib
from experiments import reward_finetune, sft
from shelllcc.models import saving
from shelllcc.models.wan_transformer import WanTransformer
from shelllcc.models.wan_transformer import get_config as wan_config
from tests.helpers import write_tiny_latent_cache
from tests.xla_flags import subprocess_xla_flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Parameters after a few Adam steps at lr 1e-3: Adam divides by sqrt(v), so a gradient element near 0
# turns float32 reduction-order noise (sharded vs not) into update differences of up to ~lr; 1e-5 is 1% of
# one step's size. Losses and gradient norms are compared at rtol 1e-4.
PARAM_ATOL = 1e-5


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return write_tiny_latent_cache(str(tmp_path_factory.mktemp("cache") / "train"), n=24, size=32)


@pytest.fixture(scope="module")
def base_model_dir(tmp_path_factory):
    model = WanTransformer(wan_config("tiny"), rngs=nnx.Rngs(3))
    return saving.save_model(str(tmp_path_factory.mktemp("base") / "model"), model)


def _common(c, cache_dir, steps):
    c.data.cache_dir = cache_dir
    c.data.batch_size = 8
    c.train.steps = steps
    c.train.log_every = 1
    c.train.checkpoint_every = 2
    return c


def sft_config(cache_dir, steps=4):
    c = _common(sft.default_config(), cache_dir, steps)
    c.optim.learning_rate = 1e-3
    return c


def reward_config(cache_dir, base_model_dir, steps=3):
    c = _common(reward_finetune.default_config(), cache_dir, steps)
    c.model.init_from = base_model_dir
    c.reward.manifold = "random"
    c.optim.learning_rate = 1e-3
    return c


def exported(workdir):
    """The parameters a run exported to ``workdir/model`` (read onto one device, whatever wrote them)."""
    return nnx.state(saving.load_model(os.path.join(workdir, "model")), nnx.Param).to_pure_dict()


def metrics(workdir):
    """The last row written for each step (a resumed run appends rows for the steps it redoes)."""
    rows = {}
    for line in open(os.path.join(workdir, "metrics.jsonl")):
        row = json.loads(line)
        rows[row["step"]] = {k: v for k, v in row.items() if k not in ("steps_per_s", "eta_s")}
    return rows


def assert_trees_close(a, b, rtol, atol):
    flat_a = jax.tree_util.tree_flatten_with_path(a)[0]
    flat_b = jax.tree.leaves(b)
    assert len(flat_a) == len(flat_b)
    for (path, x), y in zip(flat_a, flat_b):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol,
                                   err_msg=jax.tree_util.keystr(path))


def assert_metrics_close(a, b, steps, rtol=1e-5, atol=1e-7):
    for s in steps:
        assert a[s].keys() == b[s].keys()
        for k in a[s]:
            np.testing.assert_allclose(a[s][k], b[s][k], rtol=rtol, atol=atol, err_msg=f"step {s} {k}")


@pytest.mark.parametrize("variant", ["lora-one_step-drift-shell", "full-noised_data-shell_band"])
def test_sharded_reward_step_equals_single_device(tmp_path, cache_dir, base_model_dir, variant):
    """reward_finetune on a (data 4, fsdp 2) mesh of 8 devices == on one device (float32; PARAM_ATOL)."""
    runs = {}
    for name, mesh in (("single", dict(devices=1, data=1, fsdp=1)), ("sharded", dict(devices=0, data=4, fsdp=2))):
        c = reward_config(cache_dir, base_model_dir)
        if variant.startswith("lora"):
            c.lora.rank, c.objective.drift_weight, c.reward.kind = 4, 1.0, "shell"
        else:
            c.objective.name, c.reward.kind = "noised_data", "shell_band"
        c.mesh.devices, c.mesh.data, c.mesh.fsdp = mesh["devices"], mesh["data"], mesh["fsdp"]
        main_lib.run_one(c, str(tmp_path / name))
        runs[name] = (exported(str(tmp_path / name)), metrics(str(tmp_path / name)))
    assert_trees_close(runs["sharded"][0], runs["single"][0], rtol=1e-5, atol=PARAM_ATOL)
    assert_metrics_close(runs["sharded"][1], runs["single"][1], [1, 2, 3], rtol=1e-4, atol=1e-6)
    assert runs["single"][1][3]["skipped"] == 0
    # training moved the weights
    base = exported(os.path.dirname(base_model_dir))
    moved = [float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
             for x, y in zip(jax.tree.leaves(runs["single"][0]), jax.tree.leaves(base))]
    assert max(moved) > 1e-4
    if variant.startswith("lora"):
        # LoRA: only the adapted q/k/v/o kernels change (merged on export); everything else is the base
        flat = jax.tree_util.tree_flatten_with_path(runs["single"][0])[0]
        for (path, x), y, m in zip(flat, jax.tree.leaves(base), moved):
            keys = jax.tree_util.keystr(path)
            adapted = "attn" in keys and keys.endswith("['kernel']") and any(
                f"['{p}']" in keys for p in ("query", "key", "value", "out"))
            assert (m > 0) == adapted, keys


def _config_file(tmp_path, cache_dir, steps, checkpoint_every):
    path = tmp_path / "cfg.py"
    path.write_text(textwrap.dedent(f"""
        from experiments import sft
        def get_config(arg=None):
            c = sft.default_config()
            c.data.cache_dir = {cache_dir!r}
            c.data.batch_size = 8
            c.mesh.data, c.mesh.fsdp = 4, 2
            c.optim.learning_rate = 1e-3
            c.train.steps = {steps}
            c.train.log_every = 1
            c.train.checkpoint_every = {checkpoint_every}
            return c
    """))
    return str(path)


def _cmd(cfg, workdir):
    return [sys.executable, "-m", "experiments.main", f"--config={cfg}", f"--workdir={workdir}"]


def test_sigterm_saves_and_resume_matches_uninterrupted(tmp_path, cache_dir):
    """SIGTERM mid-run: checkpoint at the current step, exit 143; the resumed run ends with the same
    parameters (bit-identical) and per-step metrics as a run that never stopped."""
    steps = 24
    cfg = _config_file(tmp_path, cache_dir, steps, checkpoint_every=12)
    env = dict(os.environ, XLA_FLAGS=subprocess_xla_flags(8))
    straight = tmp_path / "straight"
    out = subprocess.run(_cmd(cfg, straight), cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]

    killed = tmp_path / "killed"
    proc = subprocess.Popen(_cmd(cfg, killed), cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    for line in proc.stdout:
        if line.startswith("[sft] step 5/"):
            proc.send_signal(signal.SIGTERM)
            break
    rest, err = proc.communicate(timeout=600)
    assert proc.returncode == 143, (rest[-2000:], err[-3000:])
    assert "SIGTERM: saved a checkpoint at step" in rest
    stopped = int(rest.split("saved a checkpoint at step ")[1].split(",")[0])
    assert 5 <= stopped < steps
    assert str(stopped) in os.listdir(killed / "checkpoints" / "orbax")
    assert not (killed / "model").exists()

    out = subprocess.run(_cmd(cfg, killed), cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"resumed from {killed / 'checkpoints'} at step {stopped}" in out.stdout
    a, b = exported(str(killed)), exported(str(straight))
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)
    m_killed, m_straight = metrics(str(killed)), metrics(str(straight))
    assert_metrics_close(m_killed, m_straight, range(1, steps + 1), rtol=0, atol=0)


def test_checkpoint_moves_between_8_devices_and_1(tmp_path, cache_dir):
    """Two steps on one mesh, two more on the other, == four on 8 devices (float32; PARAM_ATOL)."""
    def run(workdir, devices, steps):
        c = sft_config(cache_dir, steps)
        c.mesh.devices, c.mesh.data, c.mesh.fsdp = (1, 1, 1) if devices == 1 else (0, 4, 2)
        main_lib.run_one(c, str(workdir))

    run(tmp_path / "ref", 8, 4)
    for first, second in ((8, 1), (1, 8)):
        w = tmp_path / f"{first}to{second}"
        run(w, first, 2)
        run(w, second, 4)
        assert_trees_close(exported(str(w)), exported(str(tmp_path / "ref")), rtol=1e-5, atol=PARAM_ATOL)
        assert_metrics_close(metrics(str(w)), metrics(str(tmp_path / "ref")), [1, 2, 3, 4], rtol=1e-4, atol=1e-6)


def test_ablation_runs_variants_and_skips_finished(tmp_path, cache_dir, capsys):
    import ml_collections
    base = sft_config(cache_dir, 2)
    # one device: the variants' orchestration is under test here (sharding has the tests above)
    base.mesh.devices, base.mesh.data, base.mesh.fsdp = 1, 1, 1
    c = ml_collections.ConfigDict({"ablation": {"base": base, "variants": (
        ("lr-a", {"optim.learning_rate": 1e-3}), ("lr-b", {"optim.learning_rate": 1e-4}))}})
    main_lib.run_variants(c, str(tmp_path))
    for name in ("lr-a", "lr-b"):
        assert (tmp_path / name / "DONE").exists()
        assert json.load(open(tmp_path / name / "config.json"))["optim"]["learning_rate"] == \
            {"lr-a": 1e-3, "lr-b": 1e-4}[name]
    capsys.readouterr()
    main_lib.run_variants(c, str(tmp_path))
    assert capsys.readouterr().out.count("already done, skipped") == 2


def test_ablation_config_expands_and_rejects_typos():
    from configs import ablation
    variants = main_lib.expand_variants(ablation.get_config())
    names = [n for n, _ in variants]
    assert len(names) == len(set(names)) == 2 * (1 + 4 * 2)
    by_name = dict(variants)
    v = by_name["shell_band-noised_data-lr3e-05"]
    assert (v.reward.kind, v.objective.name, v.optim.learning_rate) == ("shell_band", "noised_data", 3e-5)
    assert by_name["control-lr1e-05"].objective.name == "sft"
    bad = ablation.get_config()
    bad.ablation.variants = (("x", {"reward.knd": "lcc"}),)
    with pytest.raises(KeyError, match="reward.knd"):
        main_lib.expand_variants(bad)


@pytest.mark.parametrize("arg", ["1.3b-lora", "1.3b-full", "14b-lora", "14b-full"])
def test_wan_configs_follow_the_reference_recipe(arg):
    from configs import wan21_reward
    c = wan21_reward.get_config(arg)
    # a config file sets values of the experiment's schema and adds no key of its own
    assert set(c.to_dict()) == set(reward_finetune.default_config().to_dict())
    assert c.optim.learning_rate == 1e-5 and c.optim.grad_clip == 1.0 and c.data.batch_size == 8
    assert (c.objective.name, c.objective.s_lo, c.objective.s_hi) == ("one_step", 0.7, 1.0)
    assert c.lora.rank == (16 if arg.endswith("lora") else 0)
    assert len(c.data.latent_mean) == len(c.data.latent_std) == 16


def test_misspelt_config_key_is_an_error(tmp_path, cache_dir):
    cfg = _config_file(tmp_path, cache_dir, 2, 2)
    out = subprocess.run(_cmd(cfg, tmp_path / "w") + ["--config.optim.learnign_rate=0.1"], cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode != 0 and "learnign_rate" in out.stderr


def test_two_processes_equal_one_process_with_two_devices(tmp_path, cache_dir):
    """jax.distributed on localhost: 2 processes x 1 CPU device, each producing its own half of every
    batch, train to the same parameters as 1 process with 2 devices. (Seeded random latents, whose global
    batch is the same however it is split; a latent cache gives each process a disjoint shard of the
    examples, so its batches differ from a single process's by design: see test_readers.)"""
    import socket
    cfg = _config_file(tmp_path, cache_dir, 4, checkpoint_every=2)
    flags = ["--config.mesh.data=2", "--config.mesh.fsdp=1", "--config.data.source=random",
             "--config.data.random_latent_shape=(2,4,4,16)", "--config.data.random_text_shape=(6,32)"]
    one = subprocess.run(_cmd(cfg, tmp_path / "one") + flags, cwd=REPO, capture_output=True, text=True,
                         env=dict(os.environ, XLA_FLAGS=subprocess_xla_flags(2)), timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    procs = [subprocess.Popen(_cmd(cfg, tmp_path / "two") + flags, cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True,
                              env=dict(os.environ, XLA_FLAGS=subprocess_xla_flags(1),
                                       JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES="2",
                                       JAX_PROCESS_ID=str(i)))
             for i in range(2)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][-3000:] + outs[1][-3000:]
    assert "process 1 of 2" in outs[1] and "devices: 2 x cpu over 2 process(es)" in outs[0]
    # each process saved its own iterator position (4 batches of its shard)
    for i in range(2):
        state = json.load(open(tmp_path / "two" / "checkpoints" / "data_state" / "4" / f"process_{i}.json"))
        assert state["data_state"] == {"index": 4}
    assert_trees_close(exported(str(tmp_path / "two")), exported(str(tmp_path / "one")), rtol=1e-5, atol=PARAM_ATOL)
    assert_metrics_close(metrics(str(tmp_path / "two")), metrics(str(tmp_path / "one")), [1, 2, 3, 4], rtol=1e-4,
                         atol=1e-6)


def test_wan_manifold_config_uses_the_reward_configs_latent_space():
    from configs import wan21_manifold, wan21_reward
    from experiments import fit_manifold
    m, r = wan21_manifold.get_config(), wan21_reward.get_config("1.3b-lora")
    assert m.data.cache.latent_mean == r.data.latent_mean and m.data.cache.latent_std == r.data.latent_std
    assert (m.manifold.num_anchors, m.manifold.hidden_dim) == (4096, 512)
    assert set(m.to_dict()) == set(fit_manifold.default_config().to_dict())


def test_resume_refuses_other_frozen_weights(tmp_path, cache_dir, base_model_dir):
    """Checkpoints hold the trained part only: resuming with another base model or manifold is an error."""
    c = reward_config(cache_dir, base_model_dir, steps=2)
    c.lora.rank = 4
    c.mesh.devices, c.mesh.data, c.mesh.fsdp = 1, 1, 1      # one device: the refusal is under test
    main_lib.run_one(c, str(tmp_path))
    c2 = reward_config(cache_dir, base_model_dir, steps=3)
    c2.lora.rank = 4
    c2.mesh.devices, c2.mesh.data, c2.mesh.fsdp = 1, 1, 1
    c2.model.init_from = ""
    with pytest.raises(ValueError, match="model.init_from: checkpoint"):
        main_lib.run_one(c2, str(tmp_path))
