"""Shared test helpers."""

import jax
import jax.numpy as jnp
import numpy as np

from shelllcc.manifold.params import ManifoldConfig, init_params


def random_manifold(seed: int = 0, dim: int = 16, num_anchors: int = 32, hidden_dim: int = 24):
    """Random parameters with every part non-trivial (BN statistics, scale, shift, shell weights)."""
    cfg = ManifoldConfig(dim=dim, num_anchors=num_anchors, hidden_dim=hidden_dim)
    keys = jax.random.split(jax.random.PRNGKey(seed), 8)
    p = init_params(keys[0], cfg, jax.random.normal(keys[1], (num_anchors, dim)))
    p = p.replace(
        scale=jnp.asarray(1.3, jnp.float32), shift=0.2 * jax.random.normal(keys[2], (dim,)),
        bn=p.bn.replace(mean=0.1 * jax.random.normal(keys[3], (hidden_dim,)),
                        var=jax.random.uniform(keys[4], (hidden_dim,), minval=0.5, maxval=2.0)),
        coder=p.coder.replace(bn_scale=jax.random.uniform(keys[5], (hidden_dim,), minval=0.5, maxval=1.5)),
        shell=p.shell.replace(w1=0.3 * jax.random.normal(keys[6], (hidden_dim, dim)) / np.sqrt(hidden_dim),
                              b1=0.1 * jax.random.normal(keys[7], (dim,))))
    return p, cfg


def rel_err(a, b) -> float:
    """``||a - b|| / ||b||`` in float64."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def write_tiny_latent_cache(out_dir: str, n: int = 24, frames: int = 5, size: int = 16, channels: int = 16,
                            text_len: int = 6, text_dim: int = 32, seed: int = 0, nan_clips: tuple = ()) -> str:
    """A latent cache of ``n`` clips through fixed random numpy "encoders" (no models needed): latents
    ``[1 + (frames - 1) // 4, size // 8, size // 8, channels]``, text ``[text_len, text_dim]``; the clips
    of ``nan_clips`` get one NaN latent value each (as a diverged encoder would write them)."""
    from shelllcc.data import latent_cache

    rng = np.random.default_rng(seed)
    proj = rng.standard_normal((3 * 64, channels)).astype(np.float32) / 8.0
    table = rng.standard_normal((257, text_dim)).astype(np.float32)

    encoded = [0]

    def encode_video(video):
        v = np.asarray(video, np.float32) / 127.5 - 1.0            # [B, T, H, W, 3]
        b, t, h, w, _ = v.shape
        v = v[:, ::4]                                              # T' = 1 + (T - 1) // 4
        v = v.reshape(b, v.shape[1], h // 8, 8, w // 8, 8, 3).transpose(0, 1, 2, 4, 3, 5, 6)
        out = v.reshape(b, v.shape[1], h // 8, w // 8, 3 * 64) @ proj
        for j in range(b):     # batches arrive in source order, none padded while n is a multiple of 4
            if encoded[0] + j in nan_clips:
                out[j, 0, 0, 0, 0] = np.nan
        encoded[0] += b
        return out

    def encode_text(captions):
        emb = np.zeros((len(captions), text_len, text_dim), np.float32)
        lengths = np.zeros((len(captions),), np.int32)
        for i, c in enumerate(captions):
            ids = list(c.encode())[:text_len]
            emb[i, :len(ids)] = table[ids]
            lengths[i] = len(ids)
        return emb, lengths

    encode_video.description = f"test projection seed={seed}"
    encode_text.description = f"test byte table seed={seed}"
    source = [{"video": rng.integers(0, 256, (frames, size, size, 3), dtype=np.uint8),
               "caption": f"clip {i}", "index": np.int64(i)} for i in range(n)]
    latent_cache.encode_to_cache(source, out_dir, encode_video=encode_video, encode_text=encode_text,
                                 batch_size=4, shard_size=8, progress=False)
    return out_dir
