"""experiments.encode_cache: a TFDS video split -> latent cache, equal to encoding the clips directly;
resume; umT5 text caches; the captions file; every misconfiguration named."""

import hashlib
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from experiments import encode_cache
from shelllcc.data import embedded_benchmark, latent_cache, moving_textures
from shelllcc.models import saving
from shelllcc.models.text_encoder import TextEncoder, TextEncoderConfig, split_words
from tests.test_latent_cache import random_tiny_vae
from third_party import umt5

# Latents (text embeddings) are compared with a direct jitted vae.encode (text encoder call) of all clips
# at once; the cache encodes them in batches of 2, so XLA may order float32 sums differently (seen: 1.6e-6
# at values ~3): the tolerance is 1e-5 times the largest magnitude.
TOL = 1e-5


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("encode_cache")
    builder = embedded_benchmark.build(str(root / "tfds"), embedded_benchmark.BenchmarkConfig(
        train_size=4, test_size=2, num_frames=5, height=16, width=16), verbose=False)
    vae = random_tiny_vae(seed=4)
    vocab = tuple(sorted({w for word in moving_textures.VOCABULARY for w in split_words(word)}))
    te = TextEncoder(TextEncoderConfig(vocab=vocab, max_len=16, dim=32, num_heads=2, num_layers=1, text_dim=24),
                     rngs=nnx.Rngs(1))
    train = builder.as_data_source("train")
    examples = [train[i] for i in range(len(train))]
    videos = np.stack([e["video"] for e in examples])
    captions = [e["caption"].decode() for e in examples]
    direct = np.asarray(jax.jit(lambda v: vae.encode(v.astype(jnp.float32) / 127.5 - 1.0))(videos))
    return dict(root=root, builder_dir=builder.data_dir, vae=vae, te=te, examples=examples, captions=captions,
                direct=direct, vae_dir=saving.save_model(str(root / "vae"), vae),
                te_dir=saving.save_model(str(root / "te"), te))


def make_config(assets, **over):
    c = encode_cache.default_config()
    c.data.dataset = assets["builder_dir"]
    c.vae.dir = assets["vae_dir"]
    c.text.encoder_dir = assets["te_dir"]
    c.batch_size = 2
    c.output.shard_size = 3            # 4 clips: shards of 3 and 1; not a multiple of the batch (padded)
    for key, value in over.items():
        section, name = key.split("__") if "__" in key else (None, key)
        (c[section] if section else c)[name] = value
    c.lock()                           # as experiments.main does: a misspelt key is an error
    return c


def read_all(out_dir, **kw):
    cache = latent_cache.open_cache(str(out_dir), verify=True, **kw)
    return cache, [cache[i] for i in range(len(cache))]


def shard_hashes(out_dir):
    return {f: hashlib.sha256((out_dir / f).read_bytes()).hexdigest() for f in sorted(os.listdir(out_dir))
            if f.endswith(".array_record")}


def test_cache_equals_direct_encoding_and_resumes(assets, tmp_path, capsys):
    work = tmp_path / "work"
    summary = encode_cache.run(make_config(assets), str(work))
    out = capsys.readouterr().out
    assert "note: output.shard_size=3 is not a multiple of batch_size=2" in out
    assert "encode_cache: done. 4 clips in 2 shards" in out

    cache, records = read_all(work)
    assert len(records) == 4 and summary["num_shards"] == 2 and summary["clips_encoded"] == 4
    lat = np.stack([r["latents"] for r in records])
    assert lat.shape == (4, 2, 2, 2, 4) and lat.dtype == np.float32
    scale = np.abs(assets["direct"]).max()
    assert scale > 0.1
    np.testing.assert_allclose(lat, assets["direct"], rtol=0, atol=TOL * scale)

    # text: the saved encoder's embeddings of the captions, zero past each length
    emb, lengths = latent_cache.text_encoder_fn(assets["te"])(assets["captions"])
    emb = np.asarray(emb)
    np.testing.assert_allclose(np.stack([r["text_embeddings"] for r in records]), emb, rtol=0,
                               atol=TOL * np.abs(emb).max())
    np.testing.assert_array_equal([r["text_length"] for r in records], lengths)
    assert [r["caption"] for r in records] == assets["captions"]
    assert [int(r["source_index"]) for r in records] == [0, 1, 2, 3]
    # keep_fields=("*",): every field but the clip and the caption, as the source had it
    for r, e in zip(records, assets["examples"]):
        for field in ("index", "colour", "shape", "direction"):
            assert r[field] == e[field]
        assert "video" not in r
    saved = json.loads((work / encode_cache.SUMMARY_FILE).read_text())
    assert saved["latents"] == {"shape": [2, 2, 2, 4], "dtype": "float32"} and saved["num_examples"] == 4
    assert cache.info["source_description"].endswith("split=train (4 clips of (5, 16, 16, 3))")

    # a second run finds the cache complete and writes nothing
    before = shard_hashes(work)
    again = encode_cache.run(make_config(assets), str(work))
    assert again["shards_written"] == 0 and again["shards_skipped"] == 2 and again["clips_encoded"] == 0

    # an interrupted run (the last shard missing, cache.json not complete) is finished to the same bytes
    info = json.loads((work / "cache.json").read_text())
    last = info["shards"][-1]
    os.remove(work / last)
    del info["finished_shards"][last]
    info["complete"] = False
    (work / "cache.json").write_text(json.dumps(info))
    with pytest.raises(ValueError, match="incomplete"):
        latent_cache.open_cache(str(work))
    resumed = encode_cache.run(make_config(assets), str(work))
    assert resumed["shards_written"] == 1 and resumed["shards_skipped"] == 1 and resumed["clips_encoded"] == 1
    assert shard_hashes(work) == before
    assert read_all(work)[0].info["complete"]

    # resuming with other settings is refused, naming the difference
    with pytest.raises(ValueError, match="latent_dtype: cache has None, this run 'bfloat16'"):
        encode_cache.run(make_config(assets, output__latent_dtype="bfloat16"), str(work))


def write_umt5(path, captions, dim=12, max_length=10, seed=0):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, max_length + 1, len(captions)).astype(np.int32)
    emb = rng.standard_normal((len(captions), max_length, dim)).astype(np.float32)
    emb[np.arange(max_length)[None, :] >= lengths[:, None]] = 0.0
    return umt5.write_text_cache(captions, emb, lengths, str(path), trim=True), emb, lengths


def test_umt5_cache_bfloat16_latents_and_captions_file(assets, tmp_path, capsys):
    caps = assets["captions"]
    # the split's captions are found by a pass that skips decoding the clips; missing ones stop the run
    partial, _, _ = write_umt5(tmp_path / "partial.npz", caps[:2] + ["an unrelated caption"])
    work = tmp_path / "work"
    with pytest.raises(ValueError, match=r"of the \d+ distinct captions of split 'train' are not in text.umt5_cache"):
        encode_cache.run(make_config(assets, text__encoder_dir="", text__umt5_cache=partial), str(work))
    distinct = list(dict.fromkeys(caps))
    assert umt5.read_captions(str(work / encode_cache.CAPTIONS_FILE)) == distinct
    assert not (work / "cache.json").exists()                    # nothing encoded

    # captions_only writes the same file and needs no encoder
    only = encode_cache.run(make_config(assets, vae__dir="", text__encoder_dir="", captions_only=True),
                            str(tmp_path / "caps"))
    assert only["num_captions"] == len(distinct)
    assert umt5.read_captions(only["captions_file"]) == distinct

    # a complete cache (captions in another order, an extra one): rows looked up by caption
    full_caps = ["an unrelated caption"] + distinct[::-1]
    full, emb, lengths = write_umt5(tmp_path / "text.npz", full_caps)
    encode_cache.run(make_config(assets, text__encoder_dir="", text__umt5_cache=full,
                                 output__latent_dtype="bfloat16", data__keep_fields=("index",)), str(work))
    assert "captions are all in the umT5 cache" in capsys.readouterr().out
    cache, records = read_all(work)
    assert cache.info["fields"]["text_embeddings"] == {"shape": [10, 12], "dtype": "float32"}
    for r, c in zip(records, caps):
        j = full_caps.index(c)
        np.testing.assert_array_equal(r["text_embeddings"], emb[j])
        assert r["text_length"] == lengths[j]
        assert set(r) == {"latents", "text_embeddings", "text_length", "caption", "source_index", "index"}
    lat = np.stack([r["latents"] for r in records])
    assert lat.dtype == jnp.bfloat16
    # bfloat16 storage of the float32 encoding: within bf16 rounding (2^-8 relative) of the direct latents
    np.testing.assert_allclose(lat.astype(np.float32), assets["direct"], rtol=2 ** -8, atol=TOL)


def test_compute_dtype_knob(assets, tmp_path):
    """vae.dtype=bfloat16 encodes in bfloat16 (the latents then carry bf16 error) and is recorded."""
    work = tmp_path / "bf16"
    encode_cache.run(make_config(assets, vae__dtype="bfloat16", data__split="train[:2]", output__shard_size=2),
                     str(work))
    cache, records = read_all(work)
    assert "compute_dtype=bfloat16" in cache.info["video_encoder"]
    assert cache.info["source_description"].split()[1] == "split=train[:2]"
    lat = np.stack([r["latents"] for r in records]).astype(np.float32)
    direct = assets["direct"][:2]
    rel = np.linalg.norm(lat - direct) / np.linalg.norm(direct)
    assert 0 < rel < 0.05, rel


@pytest.mark.parametrize("over, match", [
    (dict(data__dataset=""), r"needs --config.data.dataset"),
    (dict(vae__dir=""), r"needs vae.pretrained .* or vae.dir .*; both are empty"),
    (dict(vae__pretrained="/x/vae"), r"set only one of vae.pretrained .* and vae.dir"),
    (dict(text__encoder_dir=""), r"needs text.umt5_cache .* or text.encoder_dir .*; both are empty"),
    (dict(text__umt5_cache="/x/text.npz"), r"set only one of text.umt5_cache .* and text.encoder_dir"),
    (dict(batch_size=0), r"batch_size must be >= 1"),
    (dict(output__shard_size=0), r"output.shard_size must be >= 1"),
    (dict(output__latent_dtype="int8"), r"output.latent_dtype='int8'"),
    (dict(vae__dtype="float64"), r"vae.dtype='float64'"),
    (dict(text__encoder_dir="", text__umt5_cache="/nonexistent/text.npz"), r"text.umt5_cache .* does not exist"),
])
def test_config_errors(assets, tmp_path, over, match):
    with pytest.raises(ValueError, match=match):
        encode_cache.run(make_config(assets, **over), str(tmp_path / "w"))


def test_source_and_model_errors(assets, tmp_path):
    w = str(tmp_path / "w")
    with pytest.raises(FileNotFoundError, match="has no split 'validation'"):
        encode_cache.run(make_config(assets, data__split="validation"), w)
    with pytest.raises(FileNotFoundError, match="cannot open TFDS dataset"):
        encode_cache.run(make_config(assets, data__dataset=str(tmp_path / "nothing")), w)
    with pytest.raises(ValueError, match=r"data.video_key='clip' is not a feature"):
        encode_cache.run(make_config(assets, data__video_key="clip"), w)
    with pytest.raises(ValueError, match=r"data.keep_fields names \['label'\]"):
        encode_cache.run(make_config(assets, data__keep_fields=("index", "label")), w)
    with pytest.raises(ValueError, match=r"holds a 'text_encoder' model, not a VAE"):
        encode_cache.run(make_config(assets, vae__dir=assets["te_dir"]), w)
    with pytest.raises(ValueError, match=r"vae.dir .* is not a saved model"):
        encode_cache.run(make_config(assets, vae__dir=str(tmp_path)), w)
    with pytest.raises(ValueError, match=r"holds a 'wan_vae' model, not a text_encoder"):
        encode_cache.run(make_config(assets, text__encoder_dir=assets["vae_dir"]), w)
    with pytest.raises(ValueError, match=r"vae.pretrained .* is not a diffusers vae folder"):
        encode_cache.run(make_config(assets, vae__dir="", vae__pretrained=str(tmp_path)), w)
    assert not os.path.exists(os.path.join(w, "cache.json"))


def test_get_config_is_the_default_and_locks():
    c = encode_cache.get_config()
    assert c.experiment == "encode_cache" and c.data.keep_fields == ("*",) and c.output.dir == ""
    with pytest.raises(ValueError, match="takes no argument"):
        encode_cache.get_config("x")
