"""The text-video embedding space (issue 19): losses against float64 numpy, the attention hook (no hook = the
identity hook; a plan fused as PISCES does), save/load, swapped captions, and the property that both models
trained on a small synthetic set generalise to held-out clips (retrieval and matching above chance)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from shelllcc.data import latent_cache
from shelllcc.data import moving_textures as mt
from shelllcc.data import swapped_captions as sc
from shelllcc.models import saving
from shelllcc.models.text_encoder import TextEncoder, TextEncoderConfig, split_words
from shelllcc.models.video_text import DualEncoder, DualEncoderConfig, MatchingModel, MatchingModelConfig, token_grid
from shelllcc.rewards import embeddings as emb

LATENT = (2, 8, 8, 16)
TEXT_LEN, TEXT_DIM = 16, 32
SMALL = dict(latent_channels=16, text_dim=TEXT_DIM, dim=32, num_heads=4, video_layers=1, text_layers=1)


# ------------------------------------------------------------------------------------------ synthetic data

def text_encoder(seed: int = 0) -> TextEncoder:
    """The embedded pipeline's kind of text encoder: seeded random weights over the Moving Textures words."""
    vocab = tuple(sorted({w for word in mt.VOCABULARY for w in split_words(word)}))   # as the pipeline's stage
    return TextEncoder(TextEncoderConfig(vocab=vocab, max_len=TEXT_LEN, dim=32, num_layers=1, num_heads=4,
                                         text_dim=TEXT_DIM), rngs=nnx.Rngs(seed))


def synthetic_records(n: int, seed: int, start: int = 0, noise: float = 0.7) -> list[dict]:
    """Clips whose latents are a sum of one fixed pattern per attribute value plus noise (the patterns are
    the same for every ``seed``: a split is another draw of clips of one world)."""
    world = np.random.default_rng(1234)
    patterns = {k: world.standard_normal((len(v),) + LATENT).astype(np.float32) for k, v in mt.ATTRIBUTES.items()}
    out = []
    for i in range(start, start + n):
        rng = np.random.default_rng([seed, i])
        attrs = mt.sample_attributes(rng)
        labels = mt.attribute_labels(attrs)
        z = sum(patterns[k][labels[k]] for k in mt.ATTRIBUTES) / np.sqrt(len(mt.ATTRIBUTES))
        z = z + noise * rng.standard_normal(LATENT).astype(np.float32)
        out.append({"video": z.astype(np.float32), "caption": mt.caption(attrs, int(rng.integers(3))),
                    "index": np.int64(i), **{k: np.int64(v) for k, v in labels.items()}})
    return out


def write_cache(out_dir: str, records: list[dict], encoder: TextEncoder) -> str:
    encode_video = lambda v: np.asarray(v, np.float32)  # noqa: E731  (the records hold latents already)
    encode_video.description = "identity (synthetic latents)"
    latent_cache.encode_to_cache(records, out_dir, encode_video=encode_video,
                                 encode_text=latent_cache.text_encoder_fn(encoder), batch_size=8, shard_size=64,
                                 keep_fields=("index",) + sc.ATTRIBUTE_NAMES, progress=False)
    return out_dir


def arrays(records, encoder):
    z = np.stack([r["video"] for r in records])
    t, lengths = encoder.encode([r["caption"] for r in records])
    return z, np.asarray(t), np.arange(TEXT_LEN)[None] < np.asarray(lengths)[:, None]


# ------------------------------------------------------------------------------------------ losses

def _np_log_softmax(x, axis):
    m = x.max(axis=axis, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=axis, keepdims=True))


def test_info_nce_matches_float64_numpy():
    rng = np.random.default_rng(0)
    v = rng.standard_normal((7, 12))
    t = rng.standard_normal((7, 12))
    v, t = v / np.linalg.norm(v, axis=1, keepdims=True), t / np.linalg.norm(t, axis=1, keepdims=True)
    s = 14.3
    logits = s * v @ t.T
    want = -0.5 * (np.mean(np.diag(_np_log_softmax(logits, 1))) + np.mean(np.diag(_np_log_softmax(logits, 0))))
    got = emb.info_nce_loss(jnp.asarray(v, jnp.float32), jnp.asarray(t, jnp.float32), s)
    np.testing.assert_allclose(float(got), want, rtol=1e-5)
    # a perfect alignment at a large scale costs nothing; swapping two captions costs
    assert float(emb.info_nce_loss(jnp.eye(4), jnp.eye(4), 100.0)) < 1e-6
    assert float(emb.info_nce_loss(jnp.eye(4), jnp.eye(4)[jnp.array([1, 0, 2, 3])], 100.0)) > 40


def test_matching_bce_matches_float64_numpy():
    rng = np.random.default_rng(1)
    pos, neg = 3 * rng.standard_normal(9), 3 * rng.standard_normal(9)
    want = 0.5 * (np.mean(-np.log(1 / (1 + np.exp(-pos)))) + np.mean(-np.log(1 - 1 / (1 + np.exp(-neg)))))
    got = emb.matching_bce_loss(jnp.asarray(pos, jnp.float32), jnp.asarray(neg, jnp.float32))
    np.testing.assert_allclose(float(got), want, rtol=1e-5)


def test_fuse_plan_matches_numpy_and_the_plan_gets_no_gradient():
    rng = np.random.default_rng(2)
    a = rng.dirichlet(np.ones(6), size=(2, 3, 4))
    p = rng.dirichlet(np.ones(6), size=(2, 3, 4))
    x = np.log(a + 1e-6) + np.log(p + 1e-6)
    want = np.exp(_np_log_softmax(x, -1))
    np.testing.assert_allclose(np.asarray(emb.fuse_plan(jnp.asarray(a), jnp.asarray(p))), want, rtol=1e-5, atol=1e-7)
    # a uniform plan leaves the attention as it was (up to the 1e-6 floor)
    np.testing.assert_allclose(np.asarray(emb.fuse_plan(jnp.asarray(a), jnp.full(a.shape, 1 / 6))), a, atol=1e-5)
    plan = jnp.asarray(p, jnp.float32)
    hook = emb.plan_transform(lambda attn, *args, **kw: plan * jnp.sum(attn))   # a plan that depends on attn
    g = jax.grad(lambda s: jnp.sum(hook(jnp.asarray(a, jnp.float32) * s, None, None, None, None)[..., 0]))(1.0)
    g_fused = jax.grad(lambda s: jnp.sum(emb.fuse_plan(jnp.asarray(a, jnp.float32) * s,
                                                       plan * jnp.sum(jnp.asarray(a, jnp.float32)))[..., 0]))(1.0)
    np.testing.assert_allclose(float(g), float(g_fused), rtol=1e-5)      # the plan's own dependence is cut


def test_retrieval_recall_by_hand():
    v = np.eye(4)
    t = np.eye(4)[[0, 1, 3, 2]]            # captions 2 and 3 point at each other's clips
    r = emb.retrieval_recall(v, t, ks=(1, 2))
    assert r["t2v@1"] == r["v2t@1"] == 0.5
    # at 2: only the swapped clip is strictly more similar; the two tied at 0 with the true one do not count
    assert r["t2v@2"] == r["v2t@2"] == 1.0


# ------------------------------------------------------------------------------------------ models

def test_protocols_shapes_and_token_grid():
    dual = DualEncoder(DualEncoderConfig(**SMALL), rngs=nnx.Rngs(0))
    matcher = MatchingModel(MatchingModelConfig(**SMALL), rngs=nnx.Rngs(1))
    assert isinstance(dual, emb.VideoTextEmbedder) and isinstance(matcher, emb.TokenMatcher)
    z = jnp.ones((3,) + LATENT)
    t = jnp.ones((3, TEXT_LEN, TEXT_DIM))
    mask = jnp.arange(TEXT_LEN)[None] < jnp.array([[4], [16], [1]])
    ev, et = dual.embed_video(z), dual.embed_text(t, mask)
    assert ev.shape == et.shape == (3, emb.EMBED_DIM)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(ev), axis=1), 1.0, rtol=1e-5)
    assert matcher.match_logits(z, t, mask).shape == (3,)
    f, pos = token_grid(LATENT, (1, 2, 2))
    assert f.tolist() == [0] * 16 + [1] * 16
    np.testing.assert_allclose(pos[:4], [[0.125, 0.125], [0.125, 0.375], [0.125, 0.625], [0.125, 0.875]])
    # padding does not change a caption's embedding
    t2 = t.at[0, 4:].set(5.0)
    np.testing.assert_allclose(np.asarray(dual.embed_text(t2, mask)[0]), np.asarray(et[0]), atol=1e-6)


def test_attention_hook_identity_equals_no_hook_and_sees_the_grid():
    matcher = MatchingModel(MatchingModelConfig(**SMALL, cross_layers=2), rngs=nnx.Rngs(1))
    rng = np.random.default_rng(3)
    z = jnp.asarray(rng.standard_normal((2,) + LATENT), jnp.float32)
    t = jnp.asarray(rng.standard_normal((2, TEXT_LEN, TEXT_DIM)), jnp.float32)
    mask = jnp.arange(TEXT_LEN)[None] < jnp.array([[5], [9]])
    plain = matcher.match_logits(z, t, mask)
    np.testing.assert_array_equal(np.asarray(matcher.match_logits(z, t, mask, emb.identity_transform)),
                                  np.asarray(plain))
    seen = []

    def spy(attn, q, k, frame_index, positions, *, text_mask, layer):
        seen.append((attn.shape, q.shape, k.shape, frame_index.tolist(), positions.shape, text_mask.shape, layer))
        return attn
    matcher.match_logits(z, t, mask, spy)
    n = 32
    assert [s[-1] for s in seen] == [0, 1]
    assert seen[0][:3] == ((2, 4, TEXT_LEN, n), (2, 4, TEXT_LEN, 8), (2, 4, n, 8))
    assert seen[0][3] == token_grid(LATENT, (1, 2, 2))[0].tolist() and seen[0][4:6] == ((n, 2), (2, TEXT_LEN))
    # a plan that is not uniform changes the logits; one put only on frame 1 moves them further than noise
    frame1 = jnp.asarray(token_grid(LATENT, (1, 2, 2))[0] == 1, jnp.float32)
    hook = emb.plan_transform(lambda attn, *a, **kw: jnp.broadcast_to(frame1 / frame1.sum(), attn.shape))
    assert not np.allclose(np.asarray(matcher.match_logits(z, t, mask, hook)), np.asarray(plain), atol=1e-4)


def test_save_load_exact(tmp_path):
    dual = DualEncoder(DualEncoderConfig(**SMALL, learn_temperature=False, temperature=0.05), rngs=nnx.Rngs(4))
    matcher = MatchingModel(MatchingModelConfig(**SMALL, cross_layers=3), rngs=nnx.Rngs(5))
    z = jnp.asarray(np.random.default_rng(0).standard_normal((2,) + LATENT), jnp.float32)
    t = jnp.asarray(np.random.default_rng(1).standard_normal((2, TEXT_LEN, TEXT_DIM)), jnp.float32)
    mask = jnp.broadcast_to(jnp.arange(TEXT_LEN)[None] < 7, (2, TEXT_LEN))
    saving.save_model(str(tmp_path / "dual"), dual)
    saving.save_model(str(tmp_path / "m" / "model"), matcher)
    d2, m2 = emb.load_dual_encoder(str(tmp_path / "dual")), emb.load_matcher(str(tmp_path / "m"))
    assert d2.config == dual.config and m2.config == matcher.config
    for a, b in ((dual.embed_video(z), d2.embed_video(z)), (dual.embed_text(t, mask), d2.embed_text(t, mask)),
                 (matcher(z, t, mask), m2(z, t, mask)), (dual.logit_scale(), d2.logit_scale())):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(ValueError, match="not a video_text_matcher"):
        emb.load_matcher(str(tmp_path / "dual"))


def test_fixed_temperature_gets_no_gradient():
    for learn in (True, False):
        dual = DualEncoder(DualEncoderConfig(**SMALL, learn_temperature=learn), rngs=nnx.Rngs(0))
        g = nnx.grad(lambda m: m.logit_scale())(dual)
        assert (float(g["log_temperature"][...]) != 0.0) == learn


@pytest.mark.parametrize("kw, match", [(dict(dim=30), "divisible by num_heads"), (dict(patch_size=(1, 2)), "three"),
                                       (dict(temperature=0.0), "temperature")])
def test_bad_model_configs(kw, match):
    with pytest.raises(ValueError, match=match):
        DualEncoderConfig(**{**SMALL, **kw})
    with pytest.raises(ValueError, match="cross_layers"):
        MatchingModelConfig(**SMALL, cross_layers=0)
    dual = DualEncoder(DualEncoderConfig(**SMALL), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="channels"):
        dual.embed_video(jnp.ones((1, 2, 8, 8, 4)))
    with pytest.raises(ValueError, match="not divisible"):
        dual.embed_video(jnp.ones((1, 2, 7, 8, 16)))
    with pytest.raises(ValueError, match="mask"):
        dual.embed_text(jnp.ones((1, TEXT_LEN, TEXT_DIM)), None)


# ------------------------------------------------------------------------------------------ swapped captions

def test_swapped_captions_change_exactly_one_attribute():
    table = {}
    for r in synthetic_records(40, seed=5):
        attrs = sc.attributes_of(r)
        variant = sc.caption_variant(attrs, r["caption"])
        neg = sc.negatives({**r, "source_index": r["index"]}, 6, seed=0)
        assert [a for a, _ in neg] == [sc.ATTRIBUTE_NAMES[(int(r["index"]) * 6 + j) % 6] for j in range(6)]
        assert sorted(a for a, _ in neg) == sorted(sc.ATTRIBUTE_NAMES)
        for name, cap in neg:
            # the negative is the dataset's own caption of attributes differing in `name` only, same template
            new = {k: next(v for v in mt.ATTRIBUTES[k] if mt.caption({**attrs, k: v}, variant) == cap)
                   if k == name else attrs[k] for k in mt.ATTRIBUTES}
            assert new[name] != attrs[name] and mt.caption(new, variant) == cap
        table[int(r["index"])] = neg
    again = {int(r["index"]): sc.negatives({**r, "source_index": r["index"]}, 6, seed=0)
             for r in synthetic_records(40, seed=5)}
    assert again == table
    with pytest.raises(ValueError, match="not a Moving Textures caption"):
        sc.caption_variant(sc.attributes_of(synthetic_records(1, 5)[0]), "clip 0")


# ------------------------------------------------------------------------------------------ trained: a property

def _train(model, loss_of, batches, steps: int, lr: float):
    graphdef, params = nnx.split(model, nnx.Param)
    tx = optax.adam(lr)
    opt = tx.init(params)

    @jax.jit
    def step(params, opt, batch):
        loss, g = jax.value_and_grad(lambda p: loss_of(nnx.merge(graphdef, p), batch))(params)
        upd, opt = tx.update(g, opt, params)
        return optax.apply_updates(params, upd), opt, loss

    losses = []
    for i in range(steps):
        params, opt, loss = step(params, opt, batches(i))
        losses.append(float(loss))
    return nnx.merge(graphdef, params), losses


@pytest.fixture(scope="module")
def data():
    enc = text_encoder()
    train, test = synthetic_records(1024, seed=0), synthetic_records(64, seed=1, start=10_000)
    return enc, arrays(train, enc), arrays(test, enc), train, test


def test_dual_encoder_retrieves_held_out_clips_above_chance(data):
    _, (z, t, m), (zt, tt, mt_), _, _ = data
    rng = np.random.default_rng(0)
    order = [rng.permutation(len(z)) for _ in range(300 * 32 // len(z) + 1)]

    def batches(i):
        idx = order[(i * 32) // len(z)][(i * 32) % len(z):][:32]
        return z[idx], t[idx], m[idx]

    def loss_of(model, b):
        return emb.info_nce_loss(model.embed_video(b[0]), model.embed_text(b[1], b[2]), model.logit_scale())

    dual = DualEncoder(DualEncoderConfig(**SMALL, embed_dim=64), rngs=nnx.Rngs(0))
    before = emb.retrieval_recall(dual.embed_video(zt), dual.embed_text(tt, mt_))
    dual, losses = _train(dual, loss_of, batches, 300, 2e-3)
    after = emb.retrieval_recall(dual.embed_video(zt), dual.embed_text(tt, mt_))
    print("dual encoder: losses", losses[0], losses[-1], "held out before", before, "after", after)
    assert np.mean(losses[-20:]) < 0.5 * np.mean(losses[:20])
    # 64 held-out clips: chance is 1/64 at recall@1 and 5/64 at recall@5
    assert after["t2v@1"] > 4 / 64 and after["v2t@1"] > 4 / 64
    assert after["t2v@5"] > 0.3 and after["v2t@5"] > 0.3


def test_matcher_prefers_true_captions_over_swapped_ones(data):
    enc, (z, t, m), (zt, tt, mt_), train, test = data

    def negative_arrays(records, per_clip, seed):
        caps = [c for r in records for _, c in sc.negatives({**r, "source_index": r["index"]}, per_clip, seed)]
        e, lengths = enc.encode(caps)
        shape = (len(records), per_clip)
        return (np.asarray(e).reshape(shape + (TEXT_LEN, TEXT_DIM)),
                (np.arange(TEXT_LEN)[None] < np.asarray(lengths)[:, None]).reshape(shape + (TEXT_LEN,)))

    nt, nm = negative_arrays(train, 6, 0)
    et, em = negative_arrays(test, 6, 1)
    rng = np.random.default_rng(1)

    def batches(i):
        idx = rng.choice(len(z), 32, replace=False)
        j = rng.integers(6, size=32)
        return z[idx], t[idx], m[idx], nt[idx, j], nm[idx, j]

    def loss_of(model, b):
        return emb.matching_bce_loss(model(b[0], b[1], b[2]), model(b[0], b[3], b[4]))

    matcher = MatchingModel(MatchingModelConfig(**SMALL, cross_layers=1), rngs=nnx.Rngs(0))
    # 1024 clips: on 256 the matcher memorises the training pairs (train loss 0.32, held out at chance)
    matcher, losses = _train(matcher, loss_of, batches, 400, 1e-3)
    pos = np.asarray(matcher(zt, tt, mt_))
    wins = np.stack([pos > np.asarray(matcher(zt, et[:, a], em[:, a])) for a in range(6)], axis=1)   # [clip, attr]
    print("matcher: losses", losses[0], losses[-1], "held-out true > swapped per attribute",
          dict(zip(sc.ATTRIBUTE_NAMES, wins.mean(0).round(2))))
    assert wins.mean() > 0.62                 # chance: 0.5 (measured: 0.75)
