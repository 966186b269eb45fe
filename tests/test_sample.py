"""experiments.sample and shelllcc.evaluation.media: per-prompt determinism, media round trips, end to end."""

import json
import os

import imageio.v2 as iio2
import imageio.v3 as iio
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from experiments import dit_setup, sample
from shelllcc import parallel
from shelllcc.data import latent_cache as lc
from shelllcc.evaluation import media
from shelllcc.flow import samplers
from shelllcc.flow.timesteps import wan_sampling_schedule
from shelllcc.models import saving
from shelllcc.models.text_encoder import TextEncoder, TextEncoderConfig
from shelllcc.models.wan_transformer import WanTransformer
from shelllcc.models.wan_transformer import get_config as wan_config
from tests.test_latent_cache import random_tiny_vae

WORDS = ("a", "red", "blue", "cube", "ball", "moves", "left", "right", "slowly")
FRAMES, SIZE = 5, 16          # tiny VAE: latents [2, 2, 2, 4], decoded back to 5 frames of 16 x 16


def read_mp4(path):
    return np.stack(iio2.mimread(path, format="FFMPEG"))


def read_gif(path):
    return iio.imread(path, index=None)[..., :3]


def smooth_video(t=6, h=32, w=48):
    """A slowly varying test pattern (what H.264 compresses well) that also moves from frame to frame."""
    tt, yy, xx = np.meshgrid(np.arange(t), np.arange(h), np.arange(w), indexing="ij")
    return np.stack([40 + 150 * xx / w + 6 * tt, 30 + 170 * yy / h + 4 * tt, 200 - 80 * (xx + yy) / (w + h)],
                    -1).round().astype(np.uint8)


def few_colour_video(t=5, h=15, w=21):
    """At most 256 colours per frame (GIF palettes then hold every pixel exactly), distinct frames."""
    tt, yy, xx = np.meshgrid(np.arange(t), np.arange(h), np.arange(w), indexing="ij")
    return np.stack([(xx // 3) * 30 + tt * 5, (yy // 3) * 40 + tt * 3, np.full_like(xx, 77)], -1).astype(np.uint8)


# ------------------------------------------------------------------------------------------ media

def test_to_uint8_maps_and_validates():
    v = np.array([-1.0, -0.5, 0.0, 0.999, 1.0, 3.0, -7.0], np.float32).reshape(1, 1, 7, 1)
    np.testing.assert_array_equal(media.to_uint8(v).ravel(), [0, 64, 128, 255, 255, 255, 0])
    np.testing.assert_array_equal(media.to_uint8(jnp.asarray(v, jnp.bfloat16)).ravel(), [0, 64, 128, 255, 255, 255, 0])
    u = np.zeros((2, 3, 4, 3), np.uint8)
    assert media.to_uint8(u) is u
    with pytest.raises(ValueError, match=r"\[T, H, W, 3\].*shape \(3, 4, 3\)"):
        media.to_uint8(np.zeros((3, 4, 3), np.uint8))
    with pytest.raises(ValueError, match=r"shape \(2, 3, 4, 2\)"):
        media.to_uint8(np.zeros((2, 3, 4, 2), np.float32))
    with pytest.raises(TypeError, match="int32"):
        media.to_uint8(np.zeros((2, 3, 4, 3), np.int32))
    with pytest.raises(ValueError, match="non-finite"):
        media.to_uint8(np.full((1, 2, 2, 3), np.nan, np.float32))


def test_mp4_round_trip(tmp_path):
    video = smooth_video()
    path = media.write_mp4(str(tmp_path / "sub" / "a.mp4"), video, fps=8)
    back = read_mp4(path)
    assert back.shape == video.shape and back.dtype == np.uint8
    err = np.abs(back.astype(np.float32) - video)
    assert err.mean() < 3.0, err.mean()
    assert iio2.get_reader(path, format="FFMPEG").get_meta_data()["fps"] == pytest.approx(8.0)
    assert not [f for f in os.listdir(tmp_path / "sub") if "tmp" in f]
    # float input in [-1, 1] gives the same file content as its uint8 conversion
    f = video.astype(np.float32) / 127.5 - 1.0
    np.testing.assert_array_equal(read_mp4(media.write_mp4(str(tmp_path / "f.mp4"), f, 8)), back)


def test_mp4_odd_size_is_edge_padded(tmp_path):
    video = smooth_video(t=4, h=33, w=47)
    back = read_mp4(media.write_mp4(str(tmp_path / "odd.mp4"), video, fps=10))
    assert back.shape == (4, 34, 48, 3)
    err = np.abs(back[:, :33, :47].astype(np.float32) - video)
    assert err.mean() < 3.0, err.mean()
    # the extra row / column repeat the edge pixels
    assert np.abs(back[:, 33, :47].astype(np.float32) - video[:, 32]).mean() < 4.0
    assert np.abs(back[:, :33, 47].astype(np.float32) - video[:, :, 46]).mean() < 4.0
    padded = media.pad_to_even(video)
    np.testing.assert_array_equal(padded[:, 33, :47], video[:, 32])
    np.testing.assert_array_equal(padded[:, :33, 47], video[:, :, 46])
    grey = read_mp4(media.write_mp4(str(tmp_path / "grey.mp4"), video[..., :1], fps=10))
    assert grey.shape == (4, 34, 48, 3)
    assert np.abs(grey[:, :33, :47].astype(np.float32) - video[..., :1]).mean() < 3.0


def test_gif_round_trip(tmp_path):
    video = few_colour_video()
    path = media.write_gif(str(tmp_path / "a.gif"), video, fps=5)
    back = read_gif(path)
    assert back.shape == video.shape
    np.testing.assert_array_equal(back, video)          # <= 256 colours per frame: exact
    meta = iio.immeta(path)
    assert meta["loop"] == 0 and meta["duration"] == 200
    # many colours: palette quantisation, small error
    smooth = smooth_video(t=3)
    err = np.abs(read_gif(media.write_gif(str(tmp_path / "s.gif"), smooth, 8)).astype(np.float32) - smooth)
    assert err.mean() < 4.0 and err.max() <= 24


def test_frame_grid():
    vids = [np.full((2, 3, 4, 3), 10 * (i + 1), np.uint8) for i in range(5)]
    grid = media.frame_grid(vids, ncols=2, pad=1, pad_value=255)
    assert grid.shape == (2, 3 * 3 + 2, 2 * 4 + 1, 3)
    for i in range(5):
        r, c = divmod(i, 2)
        np.testing.assert_array_equal(grid[:, r * 4:r * 4 + 3, c * 5:c * 5 + 4], vids[i])
    assert (grid[:, 3] == 255).all() and (grid[:, :, 4] == 255).all()     # separators
    assert (grid[:, 8:, 5:] == 255).all()                                   # empty last cell
    assert media.frame_grid(vids[:2], pad=0).shape == (2, 3, 8, 3)
    with pytest.raises(ValueError, match=r"video 1 has shape \(2, 3, 5, 3\)"):
        media.frame_grid([vids[0], np.zeros((2, 3, 5, 3), np.uint8)])
    with pytest.raises(ValueError, match="at least one"):
        media.frame_grid([])


# ------------------------------------------------------------------------------------------ sampling

@pytest.fixture(scope="module")
def mesh():
    return parallel.make_mesh(-1, 1)


@pytest.fixture(scope="module")
def tiny_dit(mesh):
    """The tiny preset (in_channels 16, text_dim 32), random weights, placed on the 8-device mesh."""
    return dit_setup.build_model(dit_setup.model_section(), mesh, parallel.DEFAULT_RULES).model


def test_prompt_noise_is_the_documented_formula():
    shape = (2, 4, 4, 16)
    noise = sample.prompt_noise(7, [3, 0, 3], shape)
    for row, i in zip(noise, [3, 0, 3]):
        np.testing.assert_array_equal(row, jax.random.normal(jax.random.fold_in(jax.random.PRNGKey(7), i), shape))
    assert not np.allclose(noise[0], noise[1])


def test_per_prompt_determinism(tiny_dit, mesh):
    n, shape = 5, (2, 4, 4, 16)
    contexts = np.random.default_rng(0).normal(size=(n, 6, 32)).astype(np.float32)
    negative = np.zeros((6, 32), np.float32)
    kw = dict(latent_shape=shape, solver="unipc", steps=3, shift=3.0, guidance_scale=4.0, seed=11)

    def run(batch_size, order):
        s = sample.LatentSampler(tiny_dit, mesh, batch_size=batch_size, **kw)
        return sample.sample_latents(s, order, lambda idx: contexts[idx], negative)

    base = run(2, list(range(n)))          # batches [0 1] [2 3] [4 +pad], each padded to 8 rows
    assert base.shape == (n, *shape) and np.isfinite(base).all()
    np.testing.assert_allclose(run(4, list(range(n))), base, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(run(16, list(range(n))), base, rtol=1e-5, atol=1e-5)   # 16 rows: another shape
    order = [3, 0, 4, 1, 2]
    np.testing.assert_allclose(run(4, order), base[order], rtol=1e-5, atol=1e-5)
    # different prompts give different samples
    assert np.abs(base[0] - base[1]).mean() > 1e-2

    # a prompt's sample is the plain sampler on its own noise and context (batch of one, one device)
    i = 2
    noise = jax.random.normal(jax.random.fold_in(jax.random.PRNGKey(11), i), (1, *shape))
    graphdef, state = nnx.split(tiny_dit)
    state = jax.device_put(state, jax.devices()[0])
    ref = jax.jit(lambda st, x, c, nc: samplers.sample(
        nnx.merge(graphdef, st), x, c, wan_sampling_schedule(3, 3.0), solver="unipc",
        guidance_scale=4.0, negative_context=nc))(state, noise, contexts[i:i + 1], negative[None])
    np.testing.assert_allclose(base[i], np.asarray(ref)[0], rtol=1e-5, atol=1e-5)


def test_rows_per_step(mesh):
    assert [sample.rows_per_step(b, mesh) for b in (1, 8, 9, 16)] == [8, 8, 16, 16]


# ------------------------------------------------------------------------------------------ end to end

@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A 3-clip latent cache (tiny VAE + small text encoder), the saved VAE, text encoder and a tiny DiT
    with 4 latent channels (the tiny VAE's z_dim)."""
    root = tmp_path_factory.mktemp("sample_assets")
    vae = random_tiny_vae(seed=3)
    te = TextEncoder(TextEncoderConfig(vocab=WORDS, max_len=8, dim=32, num_heads=2, text_dim=32), rngs=nnx.Rngs(1))
    rng = np.random.default_rng(5)
    captions = ["a red cube moves left", "a blue ball", "slowly a ball moves right"]
    source = [{"video": rng.integers(0, 256, (FRAMES, SIZE, SIZE, 3), dtype=np.uint8), "caption": c,
               "index": np.int64(i)} for i, c in enumerate(captions)]
    cache_dir = str(root / "cache")
    lc.encode_to_cache(source, cache_dir, encode_video=lc.vae_video_encoder(vae), encode_text=lc.text_encoder_fn(te),
                       batch_size=3, shard_size=4, progress=False)
    vae_dir = saving.save_model(str(root / "vae"), vae)
    te_dir = saving.save_model(str(root / "text_encoder"), te)
    dit = WanTransformer(wan_config("tiny", in_channels=4, out_channels=4), rngs=nnx.Rngs(2))
    train_dir = root / "train"
    saving.save_model(str(train_dir / dit_setup.MODEL_DIR), dit)
    return dict(root=root, vae=vae, cache_dir=cache_dir, vae_dir=vae_dir, te_dir=te_dir, train_dir=str(train_dir),
                captions=captions)


def base_config(assets, **over):
    c = sample.default_config()
    c.model.init_from = assets["train_dir"]
    c.prompts.cache_dir = assets["cache_dir"]
    c.sampler.steps = 2
    c.sampler.batch_size = 2          # 3 prompts: a full batch and a padded one
    c.output.fps = 4
    for k, v in over.items():
        section, key = k.split("__")
        c[section][key] = v
    return c


def test_end_to_end_cache_prompts(assets, tmp_path):
    mean, std = (0.1, -0.2, 0.3, 0.0), (1.5, 0.5, 1.0, 2.0)
    # guidance against the all-zero negative context of source='cache'
    c = base_config(assets, vae__dir=assets["vae_dir"], latents__latent_mean=mean, latents__latent_std=std,
                    sampler__guidance_scale=2.0)
    out = sample.run(c, str(tmp_path))
    d = tmp_path / sample.SAMPLES_DIR
    n = len(assets["captions"])
    assert sorted(os.listdir(d)) == sorted([f"{i:04d}.{e}" for i in range(n) for e in ("mp4", "gif")]
                                           + ["latents.npy", "prompts.json"])
    lat = np.load(d / "latents.npy")
    assert lat.shape == (n, 2, 2, 2, 4) and lat.dtype == np.float32
    np.testing.assert_array_equal(lat, out["latents"])
    cache = lc.open_cache(assets["cache_dir"])
    prompts = json.loads((d / "prompts.json").read_text())
    assert [p["caption"] for p in prompts] == [cache[i]["caption"] for i in range(n)] == assets["captions"]
    assert [p["index"] for p in prompts] == list(range(n)) and {p["seed"] for p in prompts} == {0}

    # the videos are the VAE's decoding of the denormalised latents
    vae = assets["vae"]
    frames = vae.config.video_frames(lat.shape[1])
    expected = media.to_uint8(np.asarray(nnx.jit(lambda m, z: m.decode(z))(vae, lat * np.float32(std)
                                                                            + np.float32(mean))).reshape(-1, SIZE, SIZE, 3)
                              ).reshape(n, frames, SIZE, SIZE, 3)
    assert expected.std() > 10 and ((expected > 0) & (expected < 255)).mean() > 0.25    # not flat or all saturated
    for i in range(n):
        mp4 = read_mp4(str(d / f"{i:04d}.mp4"))
        assert mp4.shape == (frames, SIZE, SIZE, 3)
        assert np.abs(mp4.astype(np.float32) - expected[i]).mean() < 12.0     # random pixels: lossy H.264
        gif = read_gif(str(d / f"{i:04d}.gif"))
        assert gif.shape == (frames, SIZE, SIZE, 3)                            # 256 pixels: exact palette
        assert np.abs(gif.astype(np.int32) - expected[i]).max() <= 1


def test_file_prompts_without_vae_match_cache_prompts(assets, tmp_path, capsys):
    """Captions from a text file through the saved text encoder give the cached embeddings of those
    captions, hence the same samples; no VAE: latents only, with a note."""
    prompt_file = tmp_path / "prompts.txt"
    prompt_file.write_text(f"\n{assets['captions'][0]}\n\n   \n{assets['captions'][1]}\n")
    # the latent shape comes from prompts.cache_dir (latents.shape is empty)
    c = base_config(assets, prompts__source="file", prompts__file=str(prompt_file),
                    prompts__text_encoder=assets["te_dir"])
    out = sample.run(c, str(tmp_path / "file"))
    assert "no decoder given" in capsys.readouterr().out
    d = tmp_path / "file" / sample.SAMPLES_DIR
    assert sorted(os.listdir(d)) == ["latents.npy", "prompts.json"]
    assert [p["caption"] for p in json.loads((d / "prompts.json").read_text())] == assets["captions"][:2]
    lat = np.load(d / "latents.npy")
    assert lat.shape == (2, 2, 2, 2, 4)
    np.testing.assert_array_equal(lat, out["latents"])

    ref = sample.run(base_config(assets, prompts__count=2), str(tmp_path / "cache"))
    assert ref["captions"] == assets["captions"][:2]
    np.testing.assert_allclose(lat, ref["latents"], rtol=1e-5, atol=1e-5)


def test_bad_inputs_are_named(assets, tmp_path):
    with pytest.raises(ValueError, match=r"latent channel count 8 .* in_channels 4"):
        sample.run(base_config(assets, latents__shape=(2, 2, 2, 8)), str(tmp_path))
    tiny16 = base_config(assets, vae__dir=assets["vae_dir"], latents__shape=(2, 2, 2, 16))
    tiny16.model.init_from = ""                                    # the 16-channel tiny preset
    with pytest.raises(ValueError, match=r"VAE z_dim 4 != the model's latent channels 16"):
        sample.run(tiny16, str(tmp_path))
    with pytest.raises(ValueError, match="prompts.cache_dir .*does not exist"):
        sample.run(base_config(assets, prompts__cache_dir=str(tmp_path / "nope")), str(tmp_path))
    with pytest.raises(ValueError, match="prompts.file .*does not exist"):
        sample.run(base_config(assets, prompts__source="file", prompts__file=str(tmp_path / "nope.txt"),
                               prompts__text_encoder=assets["te_dir"]), str(tmp_path))
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    with pytest.raises(ValueError, match="no prompts"):
        sample.run(base_config(assets, prompts__source="file", prompts__file=str(empty),
                               prompts__text_encoder=assets["te_dir"]), str(tmp_path))
    with pytest.raises(ValueError, match="latent_mean/latent_std have 2 entries"):
        sample.run(base_config(assets, latents__latent_mean=(0.0, 0.0), latents__latent_std=(1.0, 1.0)),
                   str(tmp_path))
    one = tmp_path / "one.txt"
    one.write_text("a cube\n")
    with pytest.raises(ValueError, match="latents.shape is empty"):
        sample.run(base_config(assets, prompts__source="file", prompts__file=str(one),
                               prompts__text_encoder=assets["te_dir"], prompts__cache_dir=""), str(tmp_path))
    with pytest.raises(ValueError, match="negative .* needs prompts.text_encoder"):
        sample.run(base_config(assets, sampler__guidance_scale=3.0, prompts__negative="blue"), str(tmp_path))
    assert not os.path.exists(tmp_path / sample.SAMPLES_DIR)      # every check ran before any output


def test_config_is_locked():
    c = sample.default_config()
    with pytest.raises(AttributeError):
        c.sampler.stepz = 3
    with pytest.raises(AttributeError):
        c.prompt = {}
    assert c.experiment == "sample" and c.model.preset == "tiny" and tuple(c.latents.shape) == ()
