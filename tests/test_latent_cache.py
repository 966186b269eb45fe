"""shelllcc.data.latent_cache: encode clips to an ArrayRecord cache of latents + text, resume, read back."""

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from shelllcc.data import latent_cache as lc
from shelllcc.data import readers
from shelllcc.models.text_encoder import TextEncoder, TextEncoderConfig
from shelllcc.models.wan_vae import WanVAE, WanVAEConfig

N = 10            # not a multiple of BATCH or SHARD: padded batches and a short last shard
BATCH = 3
SHARD = 4         # shards of 4 with batches of 3: every shard ends in a padded batch
FRAMES, SIZE = 5, 16
WORDS = ("a", "red", "blue", "cube", "ball", "moves", "left", "right")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_source(n=N, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        words = rng.choice(WORDS, size=int(rng.integers(1, 6)))
        out.append({"video": rng.integers(0, 256, (FRAMES, SIZE, SIZE, 3), dtype=np.uint8),
                    # bytes, as TFDS Text features arrive from a data source
                    "caption": (" ".join(words) + f" {i}").encode(),
                    "index": np.int64(i), "label": np.int64(i % 3)})
    return out


def random_tiny_vae(seed=0):
    """The tiny WanVAE with random weights. Built abstractly and filled leaf by leaf: eager NNX init of
    the VAE takes ~20 s on CPU, and the values only need to be random and fixed."""
    abstract = nnx.eval_shape(lambda: WanVAE(WanVAEConfig.preset("tiny"), rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    rng = np.random.default_rng(seed)

    def fill(x):
        if len(x.shape) >= 2:  # conv kernels: unit-variance fan-in scaling keeps activations O(1)
            return jnp.asarray(rng.normal(size=x.shape) / np.sqrt(np.prod(x.shape[:-1])), x.dtype)
        return jnp.asarray(1.0 + 0.1 * rng.normal(size=x.shape), x.dtype)

    return nnx.merge(graphdef, jax.tree.map(fill, state))


@pytest.fixture(scope="module")
def models():
    vae = random_tiny_vae()
    te = TextEncoder(TextEncoderConfig(vocab=WORDS, max_len=8, dim=32, num_heads=2, text_dim=24),
                     rngs=nnx.Rngs(1))
    # Built once: each helper jits its function, compiled once for the BATCH shape.
    return {"vae": vae, "te": te, "video": lc.vae_video_encoder(vae), "text": lc.text_encoder_fn(te)}


@pytest.fixture(scope="module")
def source():
    return make_source()


@pytest.fixture(scope="module")
def reference(models, source):
    """Per-clip expected outputs, from the models called directly on all clips at once."""
    videos = jnp.asarray(np.stack([e["video"] for e in source]), jnp.float32) / 127.5 - 1.0
    latents = np.asarray(nnx.jit(lambda m, v: m.encode(v))(models["vae"], videos))
    emb, lengths = models["te"].encode([e["caption"].decode() for e in source])
    return {"latents": latents, "text": np.asarray(emb), "lengths": np.asarray(lengths)}


def encode(src, out_dir, models, **kw):
    args = dict(encode_video=models["video"], encode_text=models["text"], batch_size=BATCH,
                shard_size=SHARD, keep_fields=("index", "label"), progress=False)
    args.update(kw)
    return lc.encode_to_cache(src, str(out_dir), **args)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory, models, source):
    d = tmp_path_factory.mktemp("cache") / "full"
    summary = encode(source, d, models, progress=True)
    assert summary["shards_written"] == 3 and summary["clips_encoded"] == N
    return d


def shard_files(d):
    return sorted(f for f in os.listdir(d) if f.endswith(".array_record"))


# --------------------------------------------------------------------------------------------------

def test_cache_matches_encoders(cache_dir, source, reference):
    cache = lc.open_cache(str(cache_dir), verify=True)
    assert len(cache) == N
    assert shard_files(cache_dir) == [f"cache-0000{s}-of-00003.array_record" for s in range(3)]
    info = json.loads((cache_dir / "cache.json").read_text())
    assert [info["finished_shards"][n]["records"] for n in info["shards"]] == [4, 4, 2]
    assert info["fields"]["latents"] == {"shape": [2, 2, 2, 4], "dtype": "float32"}
    assert info["fields"]["text_embeddings"] == {"shape": [8, 24], "dtype": "float32"}
    assert "weights_sha256" in info["video_encoder"] and "TextEncoder" in info["text_encoder"]

    examples = cache.__getitems__(list(range(N)))
    for i, ex in enumerate(examples):
        assert set(ex) == {"latents", "text_embeddings", "text_length", "caption", "source_index",
                           "index", "label"}
        # padded batches did not leak: example i is clip i, and nothing else is in the cache
        assert int(ex["source_index"]) == i and int(ex["index"]) == i and int(ex["label"]) == i % 3
        assert ex["caption"] == source[i]["caption"].decode()
        assert ex["latents"].dtype == np.float32
        np.testing.assert_allclose(ex["latents"], reference["latents"][i], rtol=1e-5, atol=1e-6)
        assert int(ex["text_length"]) == reference["lengths"][i]
        np.testing.assert_allclose(ex["text_embeddings"], reference["text"][i], rtol=1e-5, atol=1e-6)
        # zero past the length, restored by the reader from the trimmed record
        assert not ex["text_embeddings"][int(ex["text_length"]):].any()
        np.testing.assert_array_equal(cache[i]["latents"], ex["latents"])
    assert cache[-1]["source_index"] == N - 1
    with pytest.raises(IndexError):
        cache[N]


def test_resume_after_kill_is_identical(tmp_path, cache_dir, models, source):
    calls = {"n": 0}

    def dying_encoder(video):
        calls["n"] += 1
        if calls["n"] == 4:  # shard 0 took calls 1-2, shard 1 got one batch in: "killed" mid-shard
            raise KeyboardInterrupt("simulated kill")
        return models["video"](video)

    d = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        encode(source, d, models, encode_video=dying_encoder,
               video_encoder_description=models["video"].description)
    info = json.loads((d / "cache.json").read_text())
    assert list(info["finished_shards"]) == ["cache-00000-of-00003.array_record"] and not info["complete"]
    assert os.path.exists(d / "cache-00001-of-00003.array_record.tmp")  # the partial shard
    with pytest.raises(ValueError, match="incomplete"):
        lc.open_cache(str(d))
    first = os.stat(d / "cache-00000-of-00003.array_record")

    summary = encode(source, d, models)
    assert summary["shards_skipped"] == 1 and summary["shards_written"] == 2
    assert summary["clips_encoded"] == N - SHARD
    # the finished shard was not rewritten; the partial one was redone, not appended to
    assert os.stat(d / "cache-00000-of-00003.array_record").st_mtime_ns == first.st_mtime_ns
    assert not [f for f in os.listdir(d) if f.endswith(".tmp")]
    assert shard_files(d) == shard_files(cache_dir)
    for name in shard_files(d):
        assert (d / name).read_bytes() == (cache_dir / name).read_bytes(), name
    a, b = (json.loads((x / "cache.json").read_text()) for x in (d, cache_dir))
    for x in (a, b):
        del x["created"], x["completed"]
    assert a == b

    cache = lc.open_cache(str(d), verify=True)
    assert sorted(int(ex["source_index"]) for ex in cache.__getitems__(range(N))) == list(range(N))

    # a complete cache is left alone
    again = encode(source, d, models)
    assert again["shards_written"] == 0 and again["clips_encoded"] == 0


def test_resume_refuses_different_settings(cache_dir, models, source):
    with pytest.raises(ValueError, match="shard_size"):
        encode(source, cache_dir, models, shard_size=5)
    with pytest.raises(ValueError, match="num_examples"):
        encode(source[:9], cache_dir, models)
    with pytest.raises(ValueError, match="text_encoder"):
        encode(source, cache_dir, models, text_encoder_description="another text encoder")
    lc.open_cache(str(cache_dir))  # untouched


def test_make_dataset_over_cache(cache_dir):
    ds = readers.make_dataset(lc.open_cache(str(cache_dir)), batch_size=4, seed=0, num_epochs=1)
    batches = list(ds)
    assert len(batches) == N // 4
    seen = []
    for b in batches:
        assert b["latents"].shape == (4, 2, 2, 2, 4) and b["latents"].dtype == np.float32
        assert b["text_embeddings"].shape == (4, 8, 24)
        assert b["text_length"].shape == (4,) and b["index"].shape == (4,)
        assert b["caption"].dtype == object and all(isinstance(c, str) for c in b["caption"])
        seen += b["source_index"].tolist()
    assert len(set(seen)) == len(seen) == 8


def test_open_cache_errors(tmp_path, cache_dir):
    with pytest.raises(FileNotFoundError, match="no latent cache"):
        lc.open_cache(str(tmp_path / "nothing"))
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ["cache.json"] + shard_files(cache_dir)[1:]:
        (broken / name).write_bytes((cache_dir / name).read_bytes())
    with pytest.raises(FileNotFoundError, match="cache-00000-of-00003"):
        lc.open_cache(str(broken))


def test_precomputed_text_and_bfloat16_latents(tmp_path, source):
    from third_party.umt5 import write_text_cache

    captions = [e["caption"].decode() for e in source]
    rng = np.random.default_rng(3)
    lengths = rng.integers(1, 7, size=N).astype(np.int32)
    emb = rng.normal(size=(N, 8, 6)).astype(np.float32)
    emb[np.arange(8)[None, :] >= lengths[:, None]] = 0.0
    npz = write_text_cache(captions, emb, lengths, str(tmp_path / "umt5.npz"), trim=True)
    text = lc.precomputed_text(npz)
    assert "umt5.npz" in text.description

    def fake_video(v):  # cheap stand-in for a VAE: [B, T, H, W, 3] -> [B, 2, 4, 4, 3]
        return v[:, ::4, ::4, ::4].astype(np.float32) / 255.0

    d = tmp_path / "c"
    lc.encode_to_cache(source, str(d), encode_video=fake_video, encode_text=text, batch_size=4,
                       shard_size=8, latent_dtype="bfloat16", keep_fields=(), progress=False)
    cache = lc.open_cache(str(d))
    for i in range(N):
        ex = cache[i]
        np.testing.assert_array_equal(ex["text_embeddings"], emb[i])
        assert ex["text_length"] == lengths[i]
        assert ex["latents"].dtype == ml_dtypes.bfloat16
        want = fake_video(source[i]["video"][None])[0].astype(ml_dtypes.bfloat16)
        np.testing.assert_array_equal(ex["latents"], want)
    assert lc.open_cache(str(d), latent_dtype=np.float32)[0]["latents"].dtype == np.float32

    with pytest.raises(KeyError, match="not in the cache"):
        text(["not in the cache"])
    bad = [dict(source[0], caption=b"an unknown caption")]
    with pytest.raises(KeyError, match="an unknown caption"):
        lc.encode_to_cache(bad, str(tmp_path / "bad"), encode_video=fake_video, encode_text=text,
                           batch_size=2, shard_size=2, progress=False)


def test_refuses_to_trim_nonzero_text(tmp_path, source):
    def dense_text(captions):
        return np.ones((len(captions), 4, 2), np.float32), np.full((len(captions),), 2, np.int32)

    with pytest.raises(ValueError, match="non-zero past its length"):
        lc.encode_to_cache(source[:2], str(tmp_path / "c"), encode_video=lambda v: v[:, :1].astype(np.float32),
                           encode_text=dense_text, batch_size=2, shard_size=2, progress=False)
    lc.encode_to_cache(source[:2], str(tmp_path / "d"), encode_video=lambda v: v[:, :1].astype(np.float32),
                       encode_text=dense_text, batch_size=2, shard_size=2, progress=False, trim_text=False)
    assert lc.open_cache(str(tmp_path / "d"))[1]["text_embeddings"].sum() == 8


def test_record_format_is_deterministic():
    ex = {"b": np.arange(6, dtype=">i4").reshape(2, 3), "a": np.float32(1.5), "s": "héllo", "raw": b"\x00x\x00",
          "z": np.ones((2, 1), ml_dtypes.bfloat16), "n": 7}
    data = lc.serialize_record(ex)
    assert data == lc.serialize_record(dict(reversed(list(ex.items()))))
    back = lc.deserialize_record(data)
    assert back["b"].dtype == np.int32 and back["b"].tolist() == [[0, 1, 2], [3, 4, 5]]
    assert back["a"] == np.float32(1.5) and back["a"].shape == ()
    assert back["s"] == "héllo" and back["raw"] == b"\x00x\x00" and back["n"] == 7
    assert back["z"].dtype == ml_dtypes.bfloat16 and back["z"].shape == (2, 1)


def test_tfds_source_without_tensorflow(tmp_path):
    """Build a tiny embedded benchmark, cache it and read the cache through grain, in a fresh process
    that must never import TensorFlow."""
    code = textwrap.dedent(f"""
        import sys
        import numpy as np
        from shelllcc.data import embedded_benchmark, latent_cache, readers
        b = embedded_benchmark.build({str(tmp_path / 'tfds')!r}, embedded_benchmark.BenchmarkConfig(
            num_frames=5, height=16, width=16, train_size=10, test_size=2), verbose=False)
        src = b.as_data_source("train")
        out = {str(tmp_path / 'cache')!r}
        latent_cache.encode_to_cache(
            src, out, encode_video=lambda v: v[:, ::4, ::8, ::8].astype(np.float32),
            encode_text=lambda c: (np.ones((len(c), 3, 2), np.float32), np.full(len(c), 3, np.int32)),
            batch_size=4, shard_size=5, keep_fields=("index", "colour"), progress=False)
        cache = latent_cache.open_cache(out)
        batch = next(iter(readers.make_dataset(cache, batch_size=5, seed=1)))
        assert batch["latents"].shape == (5, 2, 2, 2, 3), batch["latents"].shape
        assert sorted(int(cache[i]["index"]) for i in range(10)) == list(range(10))
        assert cache[0]["caption"] == src[0]["caption"].decode()
        np.testing.assert_array_equal(cache[3]["latents"], src[3]["video"][::4, ::8, ::8])
        bad = [m for m in sys.modules if m == "tensorflow" or m.startswith("tensorflow.")]
        assert not bad, bad
        print("OK")
    """)
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "OK" in res.stdout, res.stdout[-2000:] + res.stderr[-4000:]
