"""PISCES's rewards (issue 19 part 2): the OT map's and critic's losses against float64 numpy and central
differences; the trained map beats the raw embeddings and a mismatched baseline on held-out synthetic pairs; the
semantic reward's fusion (a flat plan is no plan), its padding (no part in the transport), its gradients (none
through the plan); reward_finetune with ``reward.kind='pisces'`` raises R_Q + R_S; train_ot_map and its bad
configs; the reward source."""

import copy
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from shelllcc.errors import ConfigError
from shelllcc.models import saving
from shelllcc.models.video_text import DualEncoder, DualEncoderConfig, MatchingModel, MatchingModelConfig
from shelllcc.rewards import optimal_transport as ot
from shelllcc.rewards import pisces

# ------------------------------------------------------------------------------------------ numpy statements


def _np_gelu(x):          # jax.nn.gelu's default (tanh) form
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))


def _np_net(params, x, eps):
    """The trunk ``(Linear -> LayerNorm -> GELU)*`` then the output Linear, from the module's pure dict."""
    for lin, norm in zip(params["trunk"]["linears"].values(), params["trunk"]["norms"].values()):
        h = x @ np.asarray(lin["kernel"]) + np.asarray(lin["bias"])
        mu, var = h.mean(-1, keepdims=True), h.var(-1, keepdims=True)
        x = _np_gelu((h - mu) / np.sqrt(var + eps) * np.asarray(norm["scale"]) + np.asarray(norm["bias"]))
    return x @ np.asarray(params["out"]["kernel"]) + np.asarray(params["out"]["bias"])


def _f64(module):
    state = nnx.state(module, nnx.Param)
    nnx.update(module, jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), state))
    return module


def test_losses_match_float64_numpy_and_central_differences():
    cfg = pisces.TransportMapConfig(dim=5, hidden=(7, 6))
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((9, 5)), rng.standard_normal((11, 5))
    with jax.enable_x64(True):
        tmap = _f64(pisces.TransportMap(cfg, rngs=nnx.Rngs(0)))
        critic = _f64(pisces.Critic(cfg, rngs=nnx.Rngs(1)))
        pt = nnx.to_pure_dict(nnx.state(tmap, nnx.Param))
        pf = nnx.to_pure_dict(nnx.state(critic, nnx.Param))
        tx = _np_net(pt, x, cfg.layer_norm_eps)
        f = lambda a: _np_net(pf, a, cfg.layer_norm_eps)[:, 0]  # noqa: E731
        want_t = np.mean((tx - x) ** 2) - np.mean(f(tx))
        want_f = np.mean(f(tx)) - np.mean(f(y))
        xj, yj = jnp.asarray(x), jnp.asarray(y)
        got_t, mt = pisces.map_loss(tmap, critic, xj)
        got_f, _ = pisces.critic_loss(tmap, critic, xj, yj)
        np.testing.assert_allclose(float(got_t), want_t, rtol=1e-12)
        np.testing.assert_allclose(float(got_f), want_f, rtol=1e-12)
        np.testing.assert_allclose(float(mt["map_cost"]), np.mean((tx - x) ** 2), rtol=1e-12)
        # the pure forms on given values
        np.testing.assert_allclose(float(pisces.map_loss_from_values(xj, jnp.asarray(tx), jnp.asarray(f(tx)))),
                                   want_t, rtol=1e-12)

        # gradients of L_T w.r.t. T's parameters and of L_f w.r.t. f's, by central differences
        gt_, gs = nnx.split(tmap, nnx.Param)
        gf_, fs = nnx.split(critic, nnx.Param)
        lt = jax.jit(lambda s: pisces.map_loss(nnx.merge(gt_, s), critic, xj)[0])
        lf = jax.jit(lambda s: pisces.critic_loss(tmap, nnx.merge(gf_, s), xj, yj)[0])
        for loss, state in ((lt, gs), (lf, fs)):
            grad = jax.grad(loss)(state)
            leaves, tree = jax.tree.flatten(state)
            gleaves = jax.tree.leaves(grad)
            h = 1e-6
            for i, (leaf, g) in enumerate(zip(leaves, gleaves)):
                flat = np.asarray(leaf).ravel()
                for j in rng.choice(flat.size, size=min(3, flat.size), replace=False):
                    def at(delta):
                        e = flat.copy()
                        e[j] += delta
                        new = list(leaves)
                        new[i] = jnp.asarray(e.reshape(np.shape(leaf)))
                        return float(loss(jax.tree.unflatten(tree, new)))
                    fd = (at(h) - at(-h)) / (2 * h)
                    np.testing.assert_allclose(np.asarray(g).ravel()[j], fd, rtol=1e-5, atol=1e-8)
        # f's loss sends no gradient into T (T(x) is a constant there)
        gt_in_f = jax.grad(lambda s: pisces.critic_loss(nnx.merge(gt_, s), critic, xj, yj)[0])(gs)
        assert all(np.all(np.asarray(a) == 0) for a in jax.tree.leaves(gt_in_f))


def _synthetic_pairs(n, dim, seed):
    """Unit text embeddings around a common direction; video = normalise(A x + b + noise) with ``A`` symmetric
    positive definite, so ``x -> A x + b`` is a gradient of a convex function: Brenier's OT map of the two
    (noise-free) distributions, which keeps the pairing."""
    world = np.random.default_rng(1234)
    mu = world.standard_normal(dim)
    m = world.standard_normal((dim, dim)) * 0.3
    a = (np.eye(dim) + (m + m.T) / 2)
    a = a @ a.T * 0.5 + 0.5 * np.eye(dim)
    b = world.standard_normal(dim)
    rng = np.random.default_rng(seed)
    x = mu + 0.7 * rng.standard_normal((n, dim))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    y = x @ a.T + b + 0.05 * rng.standard_normal((n, dim))
    return x.astype(np.float32), (y / np.linalg.norm(y, axis=1, keepdims=True)).astype(np.float32)


def test_trained_map_beats_raw_and_mismatched_on_held_out_pairs():
    x, y = _synthetic_pairs(1536, 16, seed=0)
    xh, yh = _synthetic_pairs(256, 16, seed=1)
    tmap, _, hist = pisces.train_transport_map(
        x, y, pisces.TransportMapConfig(dim=16, hidden=(64, 64)),
        pisces.OTTrainConfig(outer_steps=300, batch_size=128, learning_rate=1e-3, log_every=100))
    assert [h["step"] for h in hist] == [100, 200, 300]
    mapped = np.asarray(tmap(jnp.asarray(xh)))
    cos = lambda a, b: float(np.mean(np.asarray(pisces.cosine(a, b))))  # noqa: E731
    matched, raw, mismatched = cos(yh, mapped), cos(yh, xh), cos(yh, np.roll(mapped, 1, axis=0))
    print(f"held out: cos(e_v, T(e_t)) {matched:.3f}, raw {raw:.3f}, mismatched {mismatched:.3f}")
    assert matched > raw + 0.3 and matched > mismatched + 0.01


# ------------------------------------------------------------------------------------------ the semantic reward

SMALL = dict(latent_channels=16, text_dim=32, dim=32, num_heads=4, video_layers=1, text_layers=1)


@pytest.fixture(scope="module")
def matcher_inputs():
    m = MatchingModel(MatchingModelConfig(**SMALL, cross_layers=2), rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    z = jnp.asarray(rng.standard_normal((2, 2, 4, 4, 16)), jnp.float32)
    mask = jnp.arange(8)[None] < jnp.array([[3], [6]])
    t = jnp.asarray(rng.standard_normal((2, 8, 32)), jnp.float32) * mask[..., None]
    return m, z, t, mask


def test_flat_plan_is_the_matcher_alone(matcher_inputs):
    m, z, t, mask = matcher_inputs
    flat = lambda attn, *a, **k: jnp.full(attn.shape, 1.0 / attn.shape[-1])  # noqa: E731
    got, want, sink = jax.jit(lambda zz: (pisces.semantic_reward(m, zz, t, mask, plan_fn=flat),
                                          jax.nn.sigmoid(m.match_logits(zz, t, mask)),
                                          pisces.semantic_reward(m, zz, t, mask)))(z)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)
    # PISCES's own plan does change the probability
    assert np.all(np.abs(np.asarray(sink) - np.asarray(want)) > 1e-5)


def test_padding_takes_no_part_in_the_transport():
    rng = np.random.default_rng(3)
    b, h, length, n, dh = 1, 2, 6, 12, 8
    attn = jax.nn.softmax(jnp.asarray(rng.standard_normal((b, h, length, n)), jnp.float32), axis=-1)
    q = jnp.asarray(rng.standard_normal((b, h, length, dh)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((b, h, n, dh)), jnp.float32)
    frames = np.repeat(np.arange(3), 4).astype(np.int32)
    pos = rng.uniform(size=(n, 2)).astype(np.float32)
    mask = jnp.arange(length)[None] < 4
    plan = jax.jit(lambda a, qq, kk: pisces.pisces_plan_fn(tol=1e-7, max_iters=2000)(
        a, qq, kk, frames, pos, text_mask=mask))(attn, q, k)
    # the real rows alone, as their own problem
    alone = jax.jit(jax.vmap(lambda qq, kk, a: ot.token_transport_plan(
        ot.pisces_cost(qq, kk, a, frames, pos, num_frames=3), 0.05, 0.9, 2000, 1e-7)))
    want = alone(q[0, :, :4], k[0], attn[0, :, :4])
    np.testing.assert_allclose(np.asarray(plan[0, :, :4]), np.asarray(want), atol=1e-4)
    # padding rows are flat after the fusion: their attention is left as it was
    np.testing.assert_allclose(np.asarray(jax.nn.softmax(jnp.log(attn + 1e-6) + jnp.log(plan + 1e-6))[0, :, 4:]),
                               np.asarray(attn[0, :, 4:]), atol=1e-5)


def test_gradients_reach_the_latents_and_none_go_through_the_plan(matcher_inputs):
    m, z, t, mask = matcher_inputs
    real = pisces.pisces_plan_fn()

    def with_plans(zz):
        plans = {}

        def record(attn, *a, layer=0, **k):
            plans[layer] = real(attn, *a, layer=layer, **k)
            return plans[layer]
        return pisces.semantic_reward(m, zz, t, mask, plan_fn=record), plans
    _, plans = jax.jit(with_plans)(z)
    frozen = lambda attn, *a, layer=0, **k: plans[layer]  # noqa: E731
    g, g_const = jax.jit(lambda zz: (
        jax.grad(lambda y: jnp.sum(pisces.semantic_reward(m, y, t, mask)))(zz),
        jax.grad(lambda y: jnp.sum(pisces.semantic_reward(m, y, t, mask, plan_fn=frozen)))(zz)))(z)
    assert np.all(np.isfinite(np.asarray(g))) and float(jnp.max(jnp.abs(g))) > 0
    # the plan is a constant of the gradient: the same as with the plan's values fixed beforehand
    np.testing.assert_allclose(np.asarray(g), np.asarray(g_const), rtol=1e-4, atol=1e-7)


# ------------------------------------------------------------------------------------------ experiments


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Random small embedding models and map saved as train_embeddings / train_ot_map lay them out, for latents
    [2, 2, 2, 16] and text [6, 32] (tests.helpers.write_tiny_latent_cache's)."""
    root = tmp_path_factory.mktemp("pisces")
    emb_dir = root / "embeddings"
    dual = DualEncoder(DualEncoderConfig(**SMALL, patch_size=(1, 1, 1), embed_dim=16), rngs=nnx.Rngs(0))
    matcher = MatchingModel(MatchingModelConfig(**SMALL, patch_size=(1, 1, 1), cross_layers=1), rngs=nnx.Rngs(1))
    saving.save_model(str(emb_dir / "dual" / "model"), dual)
    saving.save_model(str(emb_dir / "matcher" / "model"), matcher)
    tmap = pisces.TransportMap(pisces.TransportMapConfig(dim=16, hidden=(32, 32)), rngs=nnx.Rngs(2))
    saving.save_model(str(root / "map" / "model"), tmap)
    from tests.helpers import write_tiny_latent_cache
    return {"embeddings": str(emb_dir), "map": str(root / "map"),
            "train": write_tiny_latent_cache(str(root / "train"), n=24, size=16),
            "test": write_tiny_latent_cache(str(root / "test"), n=8, size=16, seed=1)}


def test_train_ot_map_runs_saves_and_evaluates(saved, tmp_path):
    from experiments import main as main_lib
    from experiments import train_ot_map as tom
    c = tom.default_config()
    c.embeddings, c.data.train, c.data.test = saved["embeddings"], saved["train"], saved["test"]
    c.map.hidden = (32, 32)
    c.train.outer_steps, c.train.batch_size, c.train.log_every = 6, 8, 3
    _, report = tom.run(c, str(tmp_path / "a"))
    assert report["pairs"] == 8
    for k in ("matched_mapped", "matched_raw", "mismatched_mapped", "mismatched_raw", "train_matched_mapped"):
        assert -1 <= report[k] <= 1, k
    assert set(report["retrieval_mapped"]) == {"t2v@1", "v2t@1", "t2v@5", "v2t@5"}
    rows = [json.loads(line) for line in open(tmp_path / "a" / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [3, 6]
    assert pisces.load_transport_map(str(tmp_path / "a")).config.dim == 16
    assert saving.read_model_json(str(tmp_path / "a" / "critic"))["kind"] == pisces.CRITIC_KIND
    assert set(json.load(open(tmp_path / "a" / "timing.json"))) == {"embed_s", "train_s"}
    assert "train_ot_map" in main_lib.EXPERIMENTS
    cases = [("embeddings", "", "embeddings is empty"), ("train.map_updates", 0, "train.map_updates=0"),
             ("train.learning_rate", 0.0, "train.learning_rate=0.0"), ("map.hidden", (), r"map.hidden=\(\)"),
             ("data.latent_mean", (0.0,) * 3, "data.latent_mean has 3 entries")]
    for key, value, msg in cases:
        bad = tom.default_config()
        bad.embeddings, bad.data.train = saved["embeddings"], saved["train"]
        if "." in key:
            section, name = key.split(".")
            bad[section][name] = value
        else:
            bad[key] = value
        if key == "data.latent_mean":
            bad.data.latent_std = (1.0,) * 3
        with pytest.raises(ConfigError, match=msg):
            tom.run(bad, str(tmp_path / key))
    bad = tom.default_config()
    bad.embeddings, bad.data.train = saved["map"], saved["train"]
    with pytest.raises(ConfigError, match="embeddings .* not a video_text_dual_encoder"):
        tom.run(bad, str(tmp_path / "wrong_kind"))


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    from shelllcc.models.wan_transformer import WanTransformer, get_config
    gen = WanTransformer(get_config("tiny", text_dim=32), rngs=nnx.Rngs(3))
    return saving.save_model(str(tmp_path_factory.mktemp("base") / "model"), gen)


def test_reward_finetune_pisces_raises_the_rewards(saved, base_dir, tmp_path):
    from experiments import reward_finetune
    c = reward_finetune.default_config()
    c.model.init_from, c.mesh.devices = base_dir, 1
    c.data.cache_dir, c.data.batch_size = saved["train"], 8
    c.reward.kind = "pisces"
    c.reward.pisces.embeddings, c.reward.pisces.ot_map = saved["embeddings"], saved["map"]
    c.objective.drift_weight = 1.0
    c.lora.rank = 4
    c.optim.learning_rate = 1e-2
    c.train.steps, c.train.log_every, c.train.checkpoint_every, c.train.async_checkpoints = 10, 1, 10, False
    os.makedirs(tmp_path / "rf")
    reward_finetune.run(c, str(tmp_path / "rf"))
    rows = [json.loads(line) for line in open(tmp_path / "rf" / "metrics.jsonl")]
    d = [r["reward"] for r in rows if "reward" in r]
    rq, rs = [r["pisces_quality"] for r in rows if "reward" in r], [r["pisces_semantic"] for r in rows if "reward" in r]
    print("d:", np.round(d, 4).tolist())
    assert len(d) == 10 and np.mean(d[-3:]) < np.mean(d[:3]), d
    np.testing.assert_allclose(d, -(np.asarray(rq) + np.asarray(rs)), rtol=1e-5)
    assert all("drift_penalty" in r for r in rows if "reward" in r)
    cases = [("embeddings", "", "reward.pisces.embeddings is empty"), ("mass", 1.5, "reward.pisces.mass=1.5"),
             ("max_iters", 0, "reward.pisces.max_iters=0"), ("ot_map", str(tmp_path / "none"), "reward.pisces: ")]
    for key, value, msg in cases:
        bad = copy.deepcopy(c)
        bad.reward.pisces[key] = value
        os.makedirs(tmp_path / f"bad_{key}")
        with pytest.raises(ConfigError, match=msg):
            reward_finetune.run(bad, str(tmp_path / f"bad_{key}"))


def test_reward_source(saved):
    from experiments import reward_sources
    src = reward_sources.pisces_source(saved["embeddings"], saved["map"])
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((3, 2, 2, 2, 16)), jnp.float32)
    ctx = jnp.asarray(rng.standard_normal((3, 6, 32)), jnp.float32).at[:, 4:].set(0.0)
    r = np.asarray(jax.jit(src.apply)(src.params, x, jnp.zeros((3,)), ctx))
    graphs = pisces.load_models(saved["embeddings"], saved["map"]).graphs
    _, rq, rs = jax.jit(lambda p, z, c: pisces.pisces_rewards(p, graphs, z, c))(src.params, x, ctx)
    assert r.shape == (3,) and not src.noise_aware
    np.testing.assert_allclose(r, np.asarray(rq) + np.asarray(rs), rtol=1e-5)
    assert np.all((np.asarray(rs) > 0) & (np.asarray(rs) < 1)) and np.all(np.abs(np.asarray(rq)) <= 1 + 1e-6)
    with pytest.raises(ConfigError, match="sampler.guidance.pisces.ot_map is empty"):
        reward_sources.pisces_source(saved["embeddings"], "", key="sampler.guidance.pisces")


# ------------------------------------------------------------------------------------------ the embedded benchmark

def test_embedded_row_its_step_and_its_cost(tmp_path):
    """The pisces row and its embeddings step, quick-sized: the step built end to end on a synthetic cache (both
    experiments), the row's config reading its outputs, its marker naming the step, its cost (no labels)."""
    from experiments import embedded_evaluation as ee
    from experiments import embedded_pipeline as ep
    from experiments import embedded_videoalign as va
    from tests.test_embeddings import synthetic_records, text_encoder, write_cache
    c = ep.default_config()
    c.run_variants = ("pisces",)
    assert va.steps_needed(c) == ("embeddings",)
    ep.check_config(c)
    rec = ep.variant_record(c, "pisces", 0, {k: "h" for k in ("base", "manifold", "classifier", "cache", "vae")})
    assert rec["inputs"]["videoalign embeddings"] == va.records(c, {"cache": "h", "base": "h"})["embeddings"]["hash"]
    for key, value, msg in (("dual_steps", 0, "config.videoalign.embeddings.dual_steps=0"),
                            ("ot_map.map_updates", 0, "config.videoalign.embeddings.ot_map.map_updates=0"),
                            ("num_heads", 5, r"config.videoalign.embeddings \(as train_embeddings's config\): "
                                             "dual.dim=128 is not divisible")):
        bad = copy.deepcopy(c)
        *sec, name = key.split(".")
        (bad.videoalign.embeddings[sec[0]] if sec else bad.videoalign.embeddings)[name] = value
        with pytest.raises(ConfigError, match=msg):
            ep.check_config(bad)

    # the step on a synthetic cache of latents [2, 8, 8, 16] and text [16, 32]
    paths = ep.Paths(str(tmp_path / "w"))
    enc = text_encoder()
    saving.save_model(paths.text_encoder, enc)
    write_cache(paths.train_cache, synthetic_records(64, seed=0), enc)
    write_cache(paths.cache("validation"), synthetic_records(16, seed=1, start=10_000), enc)
    os.makedirs(paths.vae)
    with open(os.path.join(paths.vae, "reconstruction.json"), "w") as f:
        json.dump({"latents_mean": [0.0] * 16, "latents_std": [1.0] * 16}, f)
    v = c.videoalign.embeddings
    v.dim, v.video_layers, v.text_layers, v.cross_layers = 32, 1, 1, 1
    v.dual_steps = v.matcher_steps = 4
    v.batch_size, v.log_every = 16, 2
    v.ot_map.hidden, v.ot_map.outer_steps, v.ot_map.batch_size, v.ot_map.log_every = (32, 32), 3, 16, 3
    c.reward.mesh.devices = 1
    out = va.step_dir(paths, "embeddings")
    os.makedirs(out)
    va.build_embeddings(c, paths, out)
    models = pisces.load_models(va.embeddings_dir(paths), va.ot_map_dir(paths))
    assert models.merge()[2].config.dim == 512
    r = ep.variant_config(c, "pisces", paths, 0)
    assert (r.reward.kind, r.reward.pisces.embeddings, r.reward.pisces.ot_map) == (
        "pisces", va.embeddings_dir(paths), va.ot_map_dir(paths))
    assert (r.objective.name, r.objective.drift_weight, r.lora.rank) == ("one_step", 1.0, 8)
    pre = va.prerequisite_costs(paths)
    assert pre["embeddings_train_s"] > 0 and pre["ot_map_eval"]["pairs"] == 16
    cost = ee.costs(c, paths, ("pisces",), (0,))["pisces"]
    assert cost["labels"] == 0 and cost["ot_map_train_s"] == pre["ot_map_train_s"]
    assert "embeddings " in ee.cost_table({"pisces": cost}) and "OT map on 16" in va.pisces_notes(pre)
