"""train_embeddings end to end on a small synthetic Moving Textures cache: held-out retrieval above chance, the
matcher's per-attribute report, the swapped captions' embeddings computed by the cache's text encoder, both
stages resuming exactly, and bad configs as one-line errors naming the key."""

import json
import os
import shutil

import jax
import numpy as np
import pytest
from flax import nnx

from experiments import main as main_lib
from experiments import train_embeddings as te
from shelllcc.data import swapped_captions as sc
from shelllcc.data import text_cache
from shelllcc.errors import ConfigError
from shelllcc.models import saving
from shelllcc.rewards import embeddings as emb
from tests.test_embeddings import synthetic_records, text_encoder, write_cache


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    root = tmp_path_factory.mktemp("emb")
    enc = text_encoder()
    enc_dir = saving.save_model(str(root / "text_encoder"), enc)
    train = write_cache(str(root / "train"), synthetic_records(512, seed=0), enc)
    test = write_cache(str(root / "test"), synthetic_records(64, seed=1, start=10_000), enc)
    return {"train": train, "test": test, "text_encoder": enc_dir, "encoder": enc}


def _config(c_, steps=120):
    c = te.default_config()
    c.mesh.devices = 1
    c.data.train, c.data.test, c.data.batch_size = c_["train"], c_["test"], 32
    c.negatives.text_encoder = c_["text_encoder"]
    small = dict(dim=32, num_heads=4, video_layers=1, text_layers=1)
    for section in te.STAGES:
        c[section].update(small)
        c[section].steps = steps
    c.dual.embed_dim = 64
    c.matcher.cross_layers = 1
    c.train.log_every, c.train.checkpoint_every, c.train.async_checkpoints = 20, steps // 2, False
    c.optim.learning_rate = 2e-3
    return c


def _flat(model):
    tree = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    return sorted(((jax.tree_util.keystr(k), np.asarray(v)) for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]),
                  key=lambda kv: kv[0])


def _copy_checkpoints(src, dst, stage, drop: str):
    for part in ("orbax", "data_state"):
        shutil.copytree(src / stage / "checkpoints" / part, dst / stage / "checkpoints" / part,
                        ignore=lambda d, names: [drop] if os.path.basename(d) == part else [])


def test_trains_retrieves_held_out_clips_and_resumes_exactly(caches, tmp_path):
    a = tmp_path / "a"
    _, report = te.run(_config(caches), str(a))
    print("eval:", json.dumps(report))
    r = report["retrieval"]
    assert report["clips"] == 64 and r["chance@1"] == 1 / 64
    assert r["t2v@1"] > 3 / 64 and r["v2t@1"] > 3 / 64 and r["t2v@5"] > 0.2
    m = report["matcher"]
    assert set(m["by_attribute"]) == set(sc.ATTRIBUTE_NAMES)
    assert all(0 <= x["ranked"] <= 1 and 0 <= x["classified"] <= 1 for x in m["by_attribute"].values())
    # the negatives' table holds the text encoder's own embedding of every swapped caption
    captions, embs, lengths = text_cache.read_text_cache(str(a / te.NEGATIVES_NPZ))
    want, want_len = caches["encoder"].encode(captions[:5])
    np.testing.assert_allclose(embs[:5], np.asarray(want), atol=1e-5)
    np.testing.assert_array_equal(lengths[:5], np.asarray(want_len))
    assert len(captions) > 512                       # 6 per training clip, 6 per test clip, few coincide
    # both models exported, of their kinds, and the stage markers written
    dual, matcher = emb.load_dual_encoder(str(a / "dual")), emb.load_matcher(str(a / "matcher"))
    assert dual.config.embed_dim == 64 and matcher.config.cross_layers == 1
    assert (a / "dual" / te.DONE).exists() and (a / "matcher" / te.DONE).exists()
    # a rerun skips both stages
    te.run(_config(caches), str(a))

    # exact resume: the dual stage stopped after step 60 (the matcher not started) ...
    _copy_checkpoints(a, tmp_path / "b", "dual", "120")
    te.run(_config(caches), str(tmp_path / "b"))
    # ... and the matcher stopped after step 60, the dual stage finished
    shutil.copytree(a / "dual", tmp_path / "c" / "dual")
    _copy_checkpoints(a, tmp_path / "c", "matcher", "120")
    te.run(_config(caches), str(tmp_path / "c"))
    for stage, load in (("dual", emb.load_dual_encoder), ("matcher", emb.load_matcher)):
        want = _flat(load(str(a / stage)))
        for other in ("b", "c"):
            got = _flat(load(str(tmp_path / other / stage)))
            assert [p for p, _ in got] == [p for p, _ in want]
            for (path, x), (_, y) in zip(want, got):
                np.testing.assert_allclose(y, x, rtol=1e-6, atol=1e-7, err_msg=f"{other} {stage}: {path}")


def test_bad_config_names_the_key(caches, tmp_path):
    cases = [("negatives.per_clip", 0, "negatives.per_clip=0"),
             ("dual.temperature", 0.0, "dual.temperature=0.0"),
             ("dual.num_heads", 5, "dual.dim=32 is not divisible by dual.num_heads=5"),
             ("matcher.cross_layers", 0, "matcher.cross_layers=0"),
             ("matcher.patch_size", (1, 3, 3), r"matcher.patch_size=\(1, 3, 3\) does not divide"),
             ("data.latent_mean", (0.0, 1.0), "data.latent_mean has 2 entries"),
             ("train.microbatch_size", 8, "train.microbatch_size=8"),
             ("data.train", str(tmp_path / "none"), "data.train .*none"),
             ("negatives.text_cache", str(tmp_path / "x.npz"), "set one of negatives.text_encoder")]
    for key, value, msg in cases:
        c = _config(caches, steps=2)
        section, name = key.split(".")
        c[section][name] = value
        if key == "data.latent_mean":
            c.data.latent_std = (1.0, 1.0)
        with pytest.raises(ConfigError, match=msg):
            te.run(c, str(tmp_path / key))
    # a cache without the attribute labels cannot give swapped captions
    from tests.helpers import write_tiny_latent_cache
    c = _config(caches, steps=2)
    c.data.train = write_tiny_latent_cache(str(tmp_path / "tiny"))
    with pytest.raises(ConfigError, match=r"data.train .* has no field\(s\) \['shape'"):
        te.run(c, str(tmp_path / "tiny_run"))
    # a text cache missing captions is named
    c = _config(caches, steps=2)
    c.negatives.text_encoder = ""
    c.negatives.text_cache = text_cache.write_text_cache(["a red circle"], np.zeros((1, 16, 32)), [3],
                                                         str(tmp_path / "few.npz"))
    with pytest.raises(ConfigError, match="negatives.text_cache .* lacks"):
        te.run(c, str(tmp_path / "few_run"))
    assert "train_embeddings" in main_lib.EXPERIMENTS
