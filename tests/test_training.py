"""shelllcc.training: optimizers and masks, the guarded update, microbatching, writers, distributed detection."""

import os
import struct
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from shelllcc.training import distributed, optimizers
from shelllcc.training import step as step_lib
from shelllcc.training import train_state as ts

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _params():
    k = jax.random.split(jax.random.PRNGKey(0), 3)
    return {"blocks": {0: {"attn": {"kernel": jax.random.normal(k[0], (4, 3)), "bias": jnp.zeros(3)}},
                       1: {"attn": {"kernel": jax.random.normal(k[1], (4, 3)), "bias": jnp.ones(3)}}},
            "head": {"kernel": jax.random.normal(k[2], (3, 2))}}


@pytest.mark.parametrize("kind", ["constant", "cosine", "linear"])
def test_schedules_match_formula(kind):
    cfg = optimizers.OptimizerConfig(learning_rate=2e-3, schedule=kind, warmup_steps=10, total_steps=110,
                                     end_lr_fraction=0.1)
    sched = optimizers.make_schedule(cfg)
    for step in [0, 5, 10, 35, 60, 109, 110]:
        if step < 10:
            want = 2e-3 * step / 10
        else:
            frac = min((step - 10) / 100, 1.0)
            want = {"constant": 2e-3,
                    "cosine": 2e-3 * (0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * frac))),
                    "linear": 2e-3 * (1 - 0.9 * frac)}[kind]
        assert float(sched(step)) == pytest.approx(want, rel=1e-5, abs=1e-12), (kind, step)


def test_adamw_step_matches_numpy_restatement():
    """One clipped AdamW step against a float64 re-statement, with the decay mask skipping vectors."""
    params = _params()
    grads = jax.tree.map(lambda x: 3.0 * jnp.ones_like(x), params)
    cfg = optimizers.OptimizerConfig(learning_rate=0.1, schedule="constant", total_steps=10, weight_decay=0.5,
                                     grad_clip=1.0)
    tx = optimizers.make_optimizer(cfg, params)
    updates, _ = tx.update(grads, tx.init(params), params)
    gnorm = np.sqrt(sum(9.0 * x.size for x in jax.tree.leaves(params)))
    for (path, u), p in zip(jax.tree_util.tree_flatten_with_path(updates)[0], jax.tree.leaves(params)):
        g = 3.0 / gnorm                                       # clipped to global norm 1
        m, v = 0.1 * g, 0.001 * g * g                         # first Adam step, bias-corrected below
        adam = (m / 0.1) / (np.sqrt(v / 0.001) + 1e-8)
        decay = 0.5 * np.asarray(p, np.float64) if p.ndim >= 2 else 0.0
        # float32 tolerance: 1 - b2 in float32 is off by 1.3e-5 relative, which sqrt halves
        np.testing.assert_allclose(np.asarray(u), -0.1 * (adam + decay), rtol=1e-5, atol=1e-6, err_msg=str(path))


def test_freeze_patterns_zero_updates_and_skip_state():
    params = _params()
    cfg = optimizers.OptimizerConfig(learning_rate=0.1, freeze=("blocks.0.*",))
    tx = optimizers.make_optimizer(cfg, params)
    state = tx.init(params)
    grads = jax.tree.map(jnp.ones_like, params)
    updates, _ = tx.update(grads, state, params)
    assert not np.any(np.asarray(updates["blocks"][0]["attn"]["kernel"]))
    assert np.all(np.asarray(updates["blocks"][1]["attn"]["kernel"]) != 0)
    # the frozen subtree holds no Adam moments
    n_state = sum(x.size for x in jax.tree.leaves(state))
    n_train = sum(x.size for x in jax.tree.leaves(params)) - 15
    assert n_state <= 2 * n_train + 8
    with pytest.raises(ValueError, match="match no parameter"):
        optimizers.make_optimizer(optimizers.OptimizerConfig(freeze=("blocks.9.*",)), params)


def test_optimizer_config_rejects_unknown_and_bad_values():
    with pytest.raises(ValueError, match="unknown optimizer settings"):
        optimizers.OptimizerConfig.from_config({"learnign_rate": 1.0}, 10)
    with pytest.raises(ValueError, match="schedule"):
        optimizers.OptimizerConfig(schedule="exp")


def test_apply_gradients_skips_non_finite():
    params = _params()
    tx = optimizers.make_optimizer(optimizers.OptimizerConfig(learning_rate=0.1), params)
    state = ts.create(params, tx)
    good = jax.tree.map(jnp.ones_like, params)
    s1, m1 = ts.apply_gradients(state, good, jnp.float32(1.0), tx)
    ref_updates, _ = tx.update(good, state.opt_state, params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6),
                 s1.params, optax.apply_updates(params, ref_updates))
    assert int(s1.skipped) == 0 and int(s1.step) == 1
    bad = jax.tree.map(lambda g: g.at[(0,) * g.ndim].set(jnp.nan), good)
    s2, m2 = ts.apply_gradients(s1, bad, jnp.float32(1.0), tx)
    s3, m3 = ts.apply_gradients(s2, good, jnp.float32(jnp.inf), tx)
    for s in (s2, s3):
        jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), s.params, s1.params)
        jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), s.opt_state, s1.opt_state)
    assert (int(s2.skipped), int(s3.skipped), int(s3.step)) == (1, 2, 3)
    assert float(m3["skipped"]) == 2.0 and float(m2["update_norm"]) == 0.0


def test_optimizer_without_params_builds_the_same_decay_mask():
    """``make_optimizer(cfg)`` (no parameter tree: the mask is computed from the tree optax is given)
    makes the same updates as ``make_optimizer(cfg, params)``; freezing needs the paths."""
    params = _params()
    cfg = optimizers.OptimizerConfig(learning_rate=0.1, schedule="cosine", warmup_steps=2, total_steps=6,
                                     weight_decay=0.5, grad_clip=1.0)
    with_params, without = optimizers.make_optimizer(cfg, params), optimizers.make_optimizer(cfg)
    s1, s2, p1, p2 = with_params.init(params), without.init(params), params, params
    for i in range(4):
        grads = jax.tree.map(lambda x: (i + 1.0) * jnp.cos(x + i), params)
        u1, s1 = with_params.update(grads, s1, p1)
        u2, s2 = without.update(grads, s2, p2)
        jax.tree.map(np.testing.assert_array_equal, u1, u2)
        p1, p2 = optax.apply_updates(p1, u1), optax.apply_updates(p2, u2)
    with pytest.raises(ValueError, match="needs the parameters"):
        optimizers.make_optimizer(optimizers.OptimizerConfig(freeze=("blocks.0.*",)))


def test_checkpointer_meta_and_a_step_saved_twice(tmp_path):
    """``meta(step)`` reads a checkpoint's meta alone; a second save at a saved step keeps the first."""
    from shelllcc.training.checkpoints import Checkpointer
    ckpt = Checkpointer(str(tmp_path), max_to_keep=3, asynchronous=False)
    items = {"w": jnp.arange(4.0)}
    ckpt.save(3, items, jax.random.PRNGKey(1), meta={"stage": 1})
    ckpt.save(3, {"w": jnp.zeros(4)}, jax.random.PRNGKey(2), meta={"stage": 2}, force=True)
    ckpt.wait_until_finished()
    assert ckpt.all_steps() == [3] and ckpt.meta(3) == {"stage": 1, "step": 3}
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), items)
    key = jax.random.PRNGKey(1)
    got, rng, data_state, meta = ckpt.restore(3, abstract, jax.ShapeDtypeStruct(key.shape, key.dtype))
    np.testing.assert_array_equal(got["w"], np.arange(4.0))
    np.testing.assert_array_equal(rng, key)
    assert data_state is None and meta["stage"] == 1
    ckpt.close()


@pytest.mark.parametrize("damage", ["garbled_arrays", "truncated_meta", "missing_data_state"])
def test_resume_skips_an_unreadable_latest_checkpoint(tmp_path, capsys, damage):
    """A damaged newest checkpoint is moved aside with a one-line reason and the one before is resumed;
    the step can then be saved again; a refused resume (UserError) is not mistaken for damage."""
    from shelllcc.errors import InputFileError, UserError
    from shelllcc.training.checkpoints import UNREADABLE_DIR, Checkpointer
    ckpt = Checkpointer(str(tmp_path), max_to_keep=5, asynchronous=False)
    for step in (2, 4, 6):
        ckpt.save(step, {"w": jnp.full(64, float(step))}, jax.random.PRNGKey(step), data_state={"at": step})
    ckpt.close()
    root = tmp_path / "orbax" / "6"
    if damage == "garbled_arrays":
        files = [p for p in root.rglob("*") if p.is_file() and p.stat().st_size > 64 and "state" in str(p)]
        assert files
        for p in files:
            p.write_bytes(b"\x00garbage" * 8)
    elif damage == "truncated_meta":
        metas = [p for p in root.rglob("*") if p.is_file() and "meta" in str(p.parent.name)]
        assert metas
        for p in metas:
            p.write_text('{"step": ')
    else:
        for p in (tmp_path / "data_state" / "6").iterdir():
            p.unlink()
    abstract = {"w": jax.ShapeDtypeStruct((64,), jnp.float32)}
    key = jax.random.PRNGKey(0)
    rng_target = jax.ShapeDtypeStruct(key.shape, key.dtype)

    def attempt(step):
        meta = ckpt.meta(step)
        return ckpt.restore(step, abstract, rng_target), meta

    ckpt = Checkpointer(str(tmp_path), max_to_keep=5, asynchronous=False)
    step, ((items, _, data_state, _), _) = ckpt.resume_newest(attempt)
    assert step == 4 and data_state == {"at": 4}
    np.testing.assert_array_equal(items["w"], np.full(64, 4.0))
    out = capsys.readouterr().out
    assert "checkpoint 6" in out and "unreadable" in out and len(out.strip().splitlines()) == 1
    assert (tmp_path / UNREADABLE_DIR / "6" / "reason.txt").exists() and ckpt.all_steps() == [2, 4]
    ckpt.save(6, {"w": jnp.full(64, 60.0)}, jax.random.PRNGKey(6), data_state={"at": 60})
    ckpt.wait_until_finished()
    assert ckpt.all_steps() == [2, 4, 6]

    def refuse(step):
        raise UserError("resume refused: reward.kind differs")

    with pytest.raises(UserError, match="reward.kind"):
        ckpt.resume_newest(refuse)
    ckpt = Checkpointer(str(tmp_path), max_to_keep=5, asynchronous=False)   # a refusal closed the other
    assert ckpt.all_steps() == [2, 4, 6]                 # nothing moved aside for a refusal

    def broken(step):
        raise OSError("Errno 5")

    with pytest.raises(InputFileError, match="no readable checkpoint"):
        ckpt.resume_newest(broken)
    ckpt.close()


def test_loop_eta_counts_the_later_phase():
    """``eta_s`` is the remaining steps of this phase plus ``later_steps``, at the measured rate."""
    from shelllcc.training import loop

    def step_fn(state, batch, rng):
        return state.replace(step=state.step + 1), {"loss": jnp.float32(batch)}

    state = ts.create({"w": jnp.zeros(2)}, optax.sgd(0.1))
    writer = _Recorder()
    loop.train(step_fn, state, jax.random.PRNGKey(0), iter(range(100)),
               settings=loop.LoopSettings(total_steps=8, log_every=4, later_steps=30), checkpointer=None,
               writer=writer)
    row = writer.scalars[4]
    assert row["loss"] == pytest.approx(np.mean([0, 1, 2, 3]))    # batches 0-3, averaged
    assert row["eta_s"] * row["steps_per_s"] == pytest.approx(8 - 4 + 30, rel=1e-6)
    assert writer.scalars[8]["eta_s"] * writer.scalars[8]["steps_per_s"] == pytest.approx(30, rel=1e-6)


class _Recorder:
    def __init__(self):
        self.scalars = {}

    def write_scalars(self, step, scalars):
        self.scalars[step] = dict(scalars)

    def write_texts(self, step, texts):
        pass

    def flush(self):
        pass


@pytest.mark.parametrize("case", ["exploding", "skipping"])
def test_loop_fails_a_diverged_run_before_its_final_save(tmp_path, case):
    """A loss growing 10x a step (lr 1e3 reached 4.8e16 and exited 0), or most steps skipped as non-finite:
    TrainingFailed at a log point, naming the step; the checkpoints written before stay, no final one."""
    from shelllcc.errors import TrainingFailed
    from shelllcc.training import loop
    from shelllcc.training.checkpoints import Checkpointer

    def step_fn(state, k, rng):
        if case == "exploding":
            return state.replace(step=state.step + 1), {"loss": jnp.float32(10.0 ** k), "skipped": state.skipped}
        skip = jnp.int32(k >= 3)
        return (state.replace(step=state.step + 1, skipped=state.skipped + skip),
                {"loss": jnp.where(skip, jnp.nan, 1.0), "skipped": (state.skipped + skip).astype(jnp.float32)})

    state = ts.create({"w": jnp.zeros(2)}, optax.sgd(0.1))
    ckpt = Checkpointer(str(tmp_path), max_to_keep=10, asynchronous=False)
    writer = _Recorder()
    want = "diverged: loss 5.5e\\+08 at step 10" if case == "exploding" else "17 of the 20 steps up to step 20"
    with pytest.raises(TrainingFailed, match=want):
        loop.train(step_fn, state, jax.random.PRNGKey(0), iter(range(100)),
                   settings=loop.LoopSettings(total_steps=40, log_every=2, checkpoint_every=4), checkpointer=ckpt,
                   writer=writer)
    assert max(ckpt.all_steps()) < 40
    ckpt.close()


def test_loop_reports_the_running_skip_count_not_its_mean():
    from shelllcc.training import loop

    def step_fn(state, k, rng):
        skip = jnp.int32(k in (1, 2))
        new = state.replace(step=state.step + 1, skipped=state.skipped + skip)
        return new, {"loss": jnp.float32(1.0), "skipped": new.skipped.astype(jnp.float32)}

    writer = _Recorder()
    loop.train(step_fn, ts.create({"w": jnp.zeros(2)}, optax.sgd(0.1)), jax.random.PRNGKey(0), iter(range(100)),
               settings=loop.LoopSettings(total_steps=10, log_every=5), checkpointer=None, writer=writer)
    assert writer.scalars[5]["skipped"] == 2.0 and writer.scalars[10]["skipped"] == 2.0


@pytest.mark.parametrize("asynchronous", [True, False])
def test_sigterm_right_after_a_periodic_save_saves_nothing_twice(tmp_path, asynchronous):
    """SIGTERM while the periodic save of step s is being written: the guard's save at s is the same
    checkpoint and is not written again (orbax raised StepAlreadyExistsError, exit 1 instead of 143)."""
    from shelllcc.training import loop
    from shelllcc.training.checkpoints import Checkpointer, Preempted, PreemptionGuard

    guard = PreemptionGuard()

    def batches():
        for k in range(100):
            if k == 3:              # during step 3; its periodic save of step 4 is then the guard's step
                guard.request()
            yield k

    def step_fn(state, k, rng):
        return state.replace(step=state.step + 1, params={"w": state.params["w"] + 1.0}), {"loss": jnp.float32(1.0)}

    state = ts.create({"w": jnp.zeros((256, 1024))}, optax.sgd(0.1))    # 1 MiB: the async write is still running
    ckpt = Checkpointer(str(tmp_path), max_to_keep=2, asynchronous=asynchronous)
    with pytest.raises(Preempted, match="at step 4"):
        loop.train(step_fn, state, jax.random.PRNGKey(0), batches(),
                   settings=loop.LoopSettings(total_steps=10, log_every=5, checkpoint_every=1), checkpointer=ckpt,
                   writer=_Recorder(), guard=guard)
    ckpt.wait_until_finished()
    assert ckpt.latest_step() == 4
    ckpt.close()


def test_microbatch_accumulation_equals_full_batch():
    """k microbatches of a mean loss give the full batch's loss and gradient (and one update)."""
    w = {"w": jnp.arange(6.0).reshape(3, 2) / 5}
    x = jax.random.normal(jax.random.PRNGKey(1), (8, 3))

    def loss_fn(params, frozen, batch, key):
        loss = jnp.mean((batch["x"] @ params["w"]) ** 2)
        return loss, {"loss": loss}

    tx = optax.sgd(0.1)
    full = step_lib.make_train_step(loss_fn, tx, None, 1)
    micro = step_lib.make_train_step(loss_fn, tx, None, 4)
    rng = jax.random.PRNGKey(0)
    s_full, m_full = jax.jit(full)(ts.create(w, tx), {"x": x}, rng)
    s_micro, m_micro = jax.jit(micro)(ts.create(w, tx), {"x": x}, rng)
    np.testing.assert_allclose(s_micro.params["w"], s_full.params["w"], rtol=1e-6)
    np.testing.assert_allclose(m_micro["loss"], m_full["loss"], rtol=1e-6)
    np.testing.assert_allclose(m_micro["grad_norm"], m_full["grad_norm"], rtol=1e-6)


def test_distributed_detection():
    assert distributed.detect({}) is None
    assert distributed.detect({"JAX_COORDINATOR_ADDRESS": "h:1234"}) == "explicit"
    assert distributed.detect({"SLURM_NTASKS": "4", "SLURM_JOB_ID": "7"}) == "slurm"
    assert distributed.detect({"SLURM_NTASKS": "1", "SLURM_JOB_ID": "7"}) is None
    assert distributed.detect({"OMPI_COMM_WORLD_SIZE": "2"}) == "mpi"
    assert distributed.detect({"TPU_WORKER_HOSTNAMES": "a,b"}) == "tpu"
    assert distributed.detect({"TPU_WORKER_HOSTNAMES": "a"}) is None
    args = distributed.explicit_arguments({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2",
                                           "JAX_PROCESS_ID": "1", "JAX_LOCAL_DEVICE_IDS": "2,3"})
    assert args == dict(coordinator_address="h:1", num_processes=2, process_id=1, local_device_ids=[2, 3])
    with pytest.raises(ValueError, match="JAX_NUM_PROCESSES"):
        distributed.maybe_initialize("auto", {"JAX_COORDINATOR_ADDRESS": "h:1"})
    assert distributed.maybe_initialize("off", {"JAX_COORDINATOR_ADDRESS": "h:1"}) is False
    assert distributed.maybe_initialize("auto", {}) is False


def _read_tfevents(path):
    """Scalars of a TensorBoard event file, parsed from its record framing with tensorboardX's protos."""
    from tensorboardX.proto import event_pb2
    out = {}
    with open(path, "rb") as f:
        data = f.read()
    pos = 0
    while pos < len(data):
        (length,) = struct.unpack("<Q", data[pos:pos + 8])
        event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
        pos += 12 + length + 4
        for v in event.summary.value:
            out[(v.tag, event.step)] = v.simple_value
    return out


def test_metric_writers_without_tensorflow(tmp_path):
    """The writers import without TensorFlow; TensorBoard, jsonl and console all receive the scalars."""
    code = textwrap.dedent(f"""
        import json, os, sys
        from shelllcc.training import metric_writers
        w = metric_writers.create_writer({str(tmp_path)!r}, process_index=0)
        w.write_scalars(5, {{"loss": 0.25, "steps_per_s": 3.0}})
        w.write_scalars(10, {{"loss": 0.125, "steps_per_s": 4.0}})
        w.flush(); w.close()
        print("TF", "tensorflow" in sys.modules)
    """)
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "TF False" in out.stdout
    assert "[train] step 5 steps_per_s=3 | loss=0.25" in out.stdout
    events = [f for f in os.listdir(tmp_path / "tensorboard") if f.startswith("events.out.tfevents")]
    scalars = _read_tfevents(tmp_path / "tensorboard" / events[0])
    assert scalars[("loss", 5)] == pytest.approx(0.25) and scalars[("loss", 10)] == pytest.approx(0.125)
    rows = [__import__("json").loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert rows == [{"step": 5, "loss": 0.25, "steps_per_s": 3.0}, {"step": 10, "loss": 0.125, "steps_per_s": 4.0}]


def test_async_writer_keeps_order_and_raises_on_flush():
    """The background thread writes in call order; an error inside it surfaces at the next flush."""
    from shelllcc.training import metric_writers

    class Recorder(metric_writers.MetricWriter):
        def __init__(self):
            self.rows = []

        def write_scalars(self, step, scalars):
            if scalars.get("boom"):
                raise OSError("disk full")
            self.rows.append((step, scalars["x"]))

    rec = Recorder()
    w = metric_writers.AsyncWriter(rec)
    for i in range(200):
        w.write_scalars(i, {"x": jnp.float32(i) * 0.5})
    w.flush()
    assert rec.rows == [(i, i * 0.5) for i in range(200)]
    assert all(type(v) is float for _, v in rec.rows)     # host floats, not device arrays
    w.write_scalars(200, {"x": 1.0, "boom": 1.0})
    with pytest.raises(OSError, match="disk full"):
        w.flush()
    w.write_scalars(201, {"x": 2.0})
    w.close()
    assert rec.rows[-1] == (201, 2.0)


def test_writer_is_silent_on_other_processes(tmp_path, capsys):
    from shelllcc.training import metric_writers
    w = metric_writers.create_writer(str(tmp_path), process_index=1, asynchronous=False)
    w.write_scalars(1, {"loss": 1.0})
    w.flush()
    assert capsys.readouterr().out == "" and not os.listdir(tmp_path)


def test_adam_moments_sharded_like_their_parameters():
    from flax import nnx

    from shelllcc import parallel
    mesh = parallel.make_mesh(data=4, fsdp=2)
    variables = {"a": {"kernel": nnx.Param(jnp.zeros((8, 6)), out_sharding=("embed", None), eager_sharding=False)},
                 "b": nnx.Param(jnp.zeros((3,)), out_sharding=(None,), eager_sharding=False)}
    params = {"a": {"kernel": jnp.zeros((8, 6))}, "b": jnp.zeros((3,))}
    with parallel.sharding_context(mesh, parallel.DEFAULT_RULES):
        sh = parallel.shardings(variables, mesh)
        opt = optimizers.make_optimizer(optimizers.OptimizerConfig(), params)
        opt_sh = parallel.optimizer_shardings(opt, nnx.State(variables), mesh)
    assert sh["a"]["kernel"].spec == jax.sharding.PartitionSpec("fsdp", None)
    assert jax.tree.structure(opt_sh) == jax.tree.structure(jax.eval_shape(opt.init, params))
    specs = {jax.tree_util.keystr(p): s.spec for p, s in jax.tree_util.tree_flatten_with_path(opt_sh)[0]}
    mu = [k for k in specs if "mu" in k and "kernel" in k]
    assert mu and all(specs[k] == jax.sharding.PartitionSpec("fsdp", None) for k in mu)
    assert all(s == jax.sharding.PartitionSpec() for k, s in specs.items() if "count" in k)
