"""Packed (one-file, checksummed) models, and the pretrained models this repository ships."""

import json
import os
import shutil

import jax
import numpy as np
import pytest
from flax import nnx

from shelllcc.models import packed
from shelllcc.models.text_encoder import TextEncoder, TextEncoderConfig
from shelllcc.models.wan_transformer import WanTransformer, get_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIPPED = os.path.join(ROOT, "configs", "pretrained", "demo")


def _dit(seed=0, dim=32):
    return WanTransformer(get_config("tiny", dim=dim, num_layers=2, num_heads=2, ffn_dim=64, text_dim=16,
                                     freq_dim=16), rngs=nnx.Rngs(seed))


def _flat(model):
    return [np.asarray(x) for x in jax.tree.leaves(nnx.state(model, nnx.Param).to_pure_dict())]


def test_round_trip_is_the_float16_rounding(tmp_path):
    model = _dit()
    path = str(tmp_path / "m.npz")
    sha = packed.pack_model(path, model)
    back = packed.unpack_model(path, expected_sha256=sha, expected_bytes=os.path.getsize(path))
    assert type(back) is WanTransformer and back.config == model.config
    for a, b in zip(_flat(model), _flat(back)):
        assert b.dtype == np.float32
        np.testing.assert_array_equal(b, a.astype(np.float16).astype(np.float32))
    # float32 storage is exact
    sha32 = packed.pack_model(path, model, dtype="float32")
    for a, b in zip(_flat(model), _flat(packed.unpack_model(path, expected_sha256=sha32))):
        np.testing.assert_array_equal(a, b)


def test_corrupt_truncated_and_mismatched_files_are_refused(tmp_path):
    enc = TextEncoder(TextEncoderConfig(vocab=("a", "b"), max_len=4, dim=8, num_layers=1, num_heads=2,
                                        text_dim=8), rngs=nnx.Rngs(0))
    d = str(tmp_path)
    files = {"base": {"file": "base.npz", "sha256": packed.pack_model(os.path.join(d, "base.npz"), _dit())},
             "text": {"file": "text.npz", "sha256": packed.pack_model(os.path.join(d, "text.npz"), enc)}}
    packed.write_manifest(d, files, {"command": "test"})
    model, entry = packed.unpack_from_manifest(d, "base")
    assert entry["bytes"] == os.path.getsize(os.path.join(d, "base.npz"))

    data = bytearray(open(os.path.join(d, "base.npz"), "rb").read())
    data[len(data) // 2] ^= 0xFF
    open(os.path.join(d, "base.npz"), "wb").write(bytes(data))
    with pytest.raises(ValueError, match=r"base\.npz.*SHA-256"):
        packed.unpack_from_manifest(d, "base")
    open(os.path.join(d, "base.npz"), "wb").write(bytes(data[:1000]))
    with pytest.raises(ValueError, match=r"base\.npz.*truncated"):
        packed.unpack_from_manifest(d, "base")
    with pytest.raises(ValueError, match=r"cannot be read"):
        packed.unpack_model(os.path.join(d, "base.npz"))
    with pytest.raises(ValueError, match="lists no model 'vae'"):
        packed.unpack_from_manifest(d, "vae")

    # parameters that do not fit the stored architecture (another model's weights under this file's header)
    other = str(tmp_path / "other.npz")
    packed.pack_model(other, _dit(dim=48))
    with np.load(other) as z:
        arrays = {k: z[k] for k in z.files}
    with np.load(str(tmp_path / "text.npz")) as z:
        arrays["model.json"] = z["model.json"]
    np.savez(str(tmp_path / "mixed.npz"), **arrays)
    with pytest.raises(ValueError, match="does not match its text_encoder architecture"):
        packed.unpack_model(str(tmp_path / "mixed.npz"))


def test_shipped_models_verify_and_a_corrupt_copy_is_refused(tmp_path):
    from configs import demo
    from experiments import embedded_pipeline
    manifest = packed.read_manifest(SHIPPED)
    assert set(manifest["files"]) == {"vae", "text_encoder", "base"}
    total = sum(e["bytes"] for e in manifest["files"].values())
    assert total <= 20e6
    for name, e in manifest["files"].items():
        assert packed.sha256_file(os.path.join(SHIPPED, e["file"])) == e["sha256"], name
    prov = manifest["provenance"]
    assert prov["commit"] != "unknown" and "pretrain" in prov["command"]
    # the pipeline installs from a copy; one flipped byte in the base and it stops, naming the file
    copy = str(tmp_path / "pretrained")
    shutil.copytree(SHIPPED, copy)
    c = demo.get_config()
    c.pretrained.dir = copy
    model, _ = embedded_pipeline._pretrained(c, "text_encoder")
    data = bytearray(open(os.path.join(copy, "base.npz"), "rb").read())
    data[-100] ^= 0x01
    open(os.path.join(copy, "base.npz"), "wb").write(bytes(data))
    with pytest.raises(ValueError, match=r"base\.npz"):
        embedded_pipeline._pretrained(c, "base")
    c.benchmark.num_frames = 17
    with pytest.raises(ValueError, match="benchmark.num_frames"):
        embedded_pipeline._pretrained(c, "vae")
    json.dumps(prov)      # the provenance is plain JSON
