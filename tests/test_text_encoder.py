"""Small text encoder: tokenizer rules, shapes, masking, determinism."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from shelllcc.models.text_encoder import (
    EOS_ID,
    PAD_ID,
    UNK_ID,
    TextEncoder,
    TextEncoderConfig,
    WordTokenizer,
    split_words,
    vocab_from_captions,
)

# eager NNX dispatches op by op; one compiled forward keeps the file fast
forward = nnx.jit(lambda m, ids, mask: m(ids, mask))

VOCAB = ("a", "red", "car", "drives", "on", "the", "road", "blue", "sky", ",", ".")


def make(seed=0, **kw):
    cfg = TextEncoderConfig(vocab=VOCAB, **{**dict(max_len=12, dim=32, num_layers=2, num_heads=4,
                                                    text_dim=24), **kw})
    return TextEncoder(cfg, rngs=nnx.Rngs(seed)), cfg


def test_tokenizer_rules():
    tok = WordTokenizer(VOCAB, max_len=8)
    assert split_words("A Red, CAR.") == ["a", "red", ",", "car", "."]
    ids, mask = tok(["A red car.", "a PURPLE car", ""])
    assert ids.shape == mask.shape == (3, 8) and ids.dtype == np.int32 and mask.dtype == bool
    idx = tok.index
    np.testing.assert_array_equal(ids[0, :5], [idx["a"], idx["red"], idx["car"], idx["."], EOS_ID])
    assert ids[1, 1] == UNK_ID  # out of vocabulary -> <unk>
    assert tok.decode(ids[1]) == ["a", "<unk>", "car", "<eos>"]
    np.testing.assert_array_equal(mask.sum(1), [5, 4, 1])  # empty caption: just <eos>
    assert np.all(ids[~mask] == PAD_ID)
    # truncation keeps <eos> last
    long_ids, long_mask = tok("a red car drives on the road , a blue sky")
    assert long_mask.all() and long_ids[0, -1] == EOS_ID
    assert tok.vocab_size == len(VOCAB) + 3
    assert WordTokenizer(VOCAB, 4, append_eos=False)("a car")[1].sum() == 2


def test_tokenizer_rejects_non_strings():
    tok = WordTokenizer(VOCAB, max_len=8)
    with pytest.raises(TypeError, match="index 1"):
        tok(["a car", 3])
    with pytest.raises(TypeError):
        tok(None)
    with pytest.raises(TypeError):
        tok.encode(b"bytes")
    with pytest.raises(ValueError):
        WordTokenizer(("Red",), 4)  # not lower case
    with pytest.raises(ValueError):
        WordTokenizer(("red", "red"), 4)


def test_vocab_from_captions():
    v = vocab_from_captions(["The red car", "the blue car", "a car"])
    assert v == ("car", "the", "a", "blue", "red")
    assert vocab_from_captions(["The red car", "the blue car"], min_count=2) == ("car", "the")
    with pytest.raises(TypeError):
        vocab_from_captions(["ok", 1.0])


def test_shapes_and_zero_padding():
    model, cfg = make()
    ids, mask = cfg.tokenizer()(["a red car drives on the road", "blue sky", ""])
    emb, lengths = forward(model, ids, mask), mask.sum(1)
    assert emb.shape == (3, cfg.max_len, cfg.text_dim) and emb.dtype == jnp.float32
    np.testing.assert_array_equal(lengths, [8, 3, 1])
    emb = np.asarray(emb)
    for b, n in enumerate(lengths):
        assert np.all(emb[b, n:] == 0.0)
        assert np.all(np.abs(emb[b, :n]).sum(-1) > 0)
    # shorter sequences than max_len are accepted
    short = forward(model, ids[:, :9], mask[:, :9])
    np.testing.assert_allclose(short, emb[:, :9], rtol=1e-5, atol=1e-6)
    # the convenience path tokenizes and encodes the same way
    e2, l2 = model.encode(["blue sky"])
    np.testing.assert_allclose(e2[0], emb[1], rtol=1e-5, atol=1e-6)
    assert l2.tolist() == [3]
    with pytest.raises(ValueError):
        model(np.zeros((1, cfg.max_len + 1), np.int32), np.ones((1, cfg.max_len + 1), bool))


def test_padding_does_not_affect_valid_positions():
    model, cfg = make(seed=1)
    ids, mask = cfg.tokenizer()(["a red car on the road", "sky"])
    ref = np.asarray(forward(model, ids, mask))
    # garbage in the padded slots (any ids) must not change the valid outputs
    rng = np.random.default_rng(0)
    noisy = np.where(mask, ids, rng.integers(0, cfg.vocab_size, ids.shape)).astype(np.int32)
    out = np.asarray(forward(model, noisy, mask))
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)
    # a caption's embedding does not depend on its batch-mates
    alone = np.asarray(forward(model, ids[1:], mask[1:]))
    np.testing.assert_allclose(alone[0], ref[1], rtol=1e-5, atol=1e-6)


def test_determinism_unk_and_jit():
    m1, cfg = make(seed=3)
    m2, _ = make(seed=3)
    m3, _ = make(seed=4)
    ids, mask = cfg.tokenizer()(["a red car", "a zebra car"])
    a, b, c = (np.asarray(forward(m, ids, mask)) for m in (m1, m2, m3))
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)
    # unknown words share the <unk> embedding: "zebra" and "giraffe" encode identically
    u1 = forward(m1, *cfg.tokenizer()(["a zebra car"]))
    u2 = forward(m1, *cfg.tokenizer()(["a giraffe car"]))
    np.testing.assert_array_equal(u1, u2)
    np.testing.assert_array_equal(cfg.tokenizer()("a zebra car")[0], cfg.tokenizer()("a giraffe car")[0])
    eager = m1(ids, mask)
    np.testing.assert_allclose(eager, a, rtol=1e-5, atol=1e-6)


def test_gradients_flow_and_bf16():
    model, cfg = make(seed=5)
    ids, mask = cfg.tokenizer()(["a red car", "the blue sky ."])

    def loss(m):
        return jnp.mean(m(ids, mask) ** 2)

    grads = nnx.jit(nnx.grad(loss))(model)
    leaves = jax.tree.leaves(nnx.state(grads, nnx.Param))
    assert leaves and all(np.all(np.isfinite(g)) for g in leaves)
    assert any(float(jnp.abs(g).sum()) > 0 for g in leaves)
    mb, cfgb = make(seed=5, dtype=jnp.bfloat16)
    out = forward(mb, ids, mask)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(forward(model, ids, mask)),
                               atol=0.1)
