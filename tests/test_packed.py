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


def test_shipped_base_gives_the_same_output_stacked_and_per_block():
    """The shipped base is stored per block (``params/blocks.0....``, checksummed). Loaded stacked (the
    default, converted on load) and per block, it gives the output the code before stacked blocks gave
    (``tests/fixtures/shipped_base_output.npz``, written at 7288349), in float32 to 1e-5 relative (max
    abs difference over max abs output): the programs differ only in the order of float32 roundings."""
    ref = np.load(os.path.join(ROOT, "tests", "fixtures", "shipped_base_output.npz"))
    manifest = packed.read_manifest(SHIPPED)
    assert str(ref["base_sha256"]) == manifest["files"]["base"]["sha256"]
    with np.load(os.path.join(SHIPPED, "base.npz")) as z:
        assert "params/blocks.0.ffn.up.kernel" in z.files and "params/blocks.ffn.up.kernel" not in z.files
    stacked, _ = packed.unpack_from_manifest(SHIPPED, "base")
    per_block, _ = packed.unpack_from_manifest(SHIPPED, "base", scan_layers=False)
    assert stacked.config.scan_layers and stacked.blocks.ffn.up.kernel.shape[0] == stacked.config.num_layers
    assert not per_block.config.scan_layers and len(per_block.blocks) == per_block.config.num_layers
    # the stacked weights are exactly the per-block ones
    for i in range(per_block.config.num_layers):
        np.testing.assert_array_equal(np.asarray(stacked.blocks.ffn.up.kernel[...][i]),
                                      np.asarray(per_block.blocks[i].ffn.up.kernel[...]))
    args = (ref["latents"], ref["timestep"], ref["context"])
    scale = np.abs(ref["output"]).max()
    with jax.default_matmul_precision("float32"):
        for model in (stacked, per_block):
            y = np.asarray(jax.jit(lambda a, b, c, m=model: m(a, b, c))(*args))
            assert np.abs(y - ref["output"]).max() / scale < 1e-5


@pytest.mark.parametrize("scan_layers", [True, False])
def test_saved_and_packed_models_hold_the_per_block_layout(tmp_path, scan_layers):
    """Saving writes one entry per block whatever the layout; each layout loads what the other saved."""
    from shelllcc.models import saving
    from shelllcc.models.wan_transformer import convert_layout
    base = _dit()
    model = convert_layout(base, scan_layers=scan_layers)
    per_block = convert_layout(base, scan_layers=False)
    want = {k: np.asarray(v) for k, v in packed._flat(nnx.to_pure_dict(nnx.state(per_block, nnx.Param))).items()}
    assert "blocks.1.ffn.up.kernel" in want
    path = str(tmp_path / "m.npz")
    packed.pack_model(path, model, dtype="float32")
    with np.load(path) as z:
        assert {k[len("params/"):] for k in z.files if k.startswith("params/")} == set(want)
    saving.save_model(str(tmp_path / "saved"), model)
    import orbax.checkpoint as ocp
    with ocp.StandardCheckpointer() as ckptr:
        raw = ckptr.restore(str(tmp_path / "saved" / "params"))     # no target: the tree as written
    assert set(raw["blocks"]) == {"0", "1"}
    for other in (True, False):
        for loaded in (packed.unpack_model(path, scan_layers=other),
                       saving.load_model(str(tmp_path / "saved"), scan_layers=other)):
            assert loaded.config.scan_layers == other
            got = packed._flat(nnx.to_pure_dict(nnx.state(convert_layout(loaded, scan_layers=False), nnx.Param)))
            assert set(got) == set(want)
            for k in want:
                np.testing.assert_array_equal(np.asarray(got[k]), want[k])
