"""umT5 embedding precompute on a tiny random UMT5 with a locally built tokenizer (no network)."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from third_party import umt5

WORDS = ["a", "red", "car", "drives", "on", "the", "road", "blue", "sky", "cat", "sits", ",", "."]
CAPTIONS = ["A red car drives on the road.", "blue   sky", "", "a cat &amp; a car",
            "the red cat sits on the blue car , a red car drives on the road"]


@pytest.fixture(scope="module")
def wan_root(tmp_path_factory):
    """A Wan-style root: ``tokenizer/`` (WordLevel + ``</s>`` appended) and ``text_encoder/``."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

    root = tmp_path_factory.mktemp("wan")
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.normalizer = normalizers.Lowercase()
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(str(root / "tokenizer"))
    torch.manual_seed(0)
    cfg = UMT5Config(vocab_size=len(vocab), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                     relative_attention_num_buckets=8, relative_attention_max_distance=16,
                     pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    UMT5EncoderModel(cfg).eval().save_pretrained(str(root / "text_encoder"))
    return root


def test_clean_caption():
    assert umt5.clean_caption("  a&amp;amp;b \n\t c ") == "a&b c"
    with pytest.raises(TypeError):
        umt5.clean_caption(3)


def test_encode_matches_direct_forward(wan_root):
    from transformers import AutoTokenizer, UMT5EncoderModel
    L = 16
    emb, lengths = umt5.encode_captions(CAPTIONS, str(wan_root), max_length=L, batch_size=2)
    assert emb.shape == (len(CAPTIONS), L, 32) and emb.dtype == np.float32
    assert lengths.dtype == np.int32
    # lengths: words (after cleaning) + </s>, truncated at L
    np.testing.assert_array_equal(lengths, [9, 3, 1, 6, 16])

    tok = AutoTokenizer.from_pretrained(str(wan_root / "tokenizer"))
    model = UMT5EncoderModel.from_pretrained(str(wan_root / "text_encoder")).eval()
    cleaned = [umt5.clean_caption(c) for c in CAPTIONS]
    enc = tok(cleaned, padding="max_length", max_length=L, truncation=True, return_tensors="pt")
    with torch.no_grad():
        ref = model(enc.input_ids, enc.attention_mask).last_hidden_state.numpy()
    for i, n in enumerate(lengths):
        np.testing.assert_allclose(emb[i, :n], ref[i, :n], rtol=1e-5, atol=1e-5)
        assert np.all(emb[i, n:] == 0.0)
        assert np.all(np.abs(emb[i, :n]).sum(-1) > 0)
    # the batch split does not matter; a loaded model can be passed in
    emb1, len1 = umt5.encode_captions(CAPTIONS, max_length=L, batch_size=5, model=model, tokenizer=tok)
    np.testing.assert_allclose(emb1, emb, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(len1, lengths)
    with pytest.raises(TypeError, match="index 1"):
        umt5.encode_captions(["ok", None], model=model, tokenizer=tok)


def test_matches_wan_pipeline_prompt_embeds(wan_root):
    """Same numbers as diffusers' WanPipeline._get_t5_prompt_embeds (the convention's source)."""
    from types import SimpleNamespace

    from diffusers import WanPipeline
    from transformers import AutoTokenizer, UMT5EncoderModel
    tok = AutoTokenizer.from_pretrained(str(wan_root / "tokenizer"))
    model = UMT5EncoderModel.from_pretrained(str(wan_root / "text_encoder")).eval()
    host = SimpleNamespace(tokenizer=tok, text_encoder=model, _execution_device=torch.device("cpu"))
    with torch.no_grad():
        ref = WanPipeline._get_t5_prompt_embeds(host, prompt=CAPTIONS, max_sequence_length=24,
                                                device=torch.device("cpu"), dtype=torch.float32)
    emb, _ = umt5.encode_captions(CAPTIONS, max_length=24, model=model, tokenizer=tok)
    np.testing.assert_allclose(emb, ref.numpy(), rtol=1e-5, atol=1e-5)


def test_cache_roundtrip(wan_root, tmp_path):
    emb, lengths = umt5.encode_captions(CAPTIONS, str(wan_root), max_length=20, batch_size=3)
    path = umt5.write_text_cache(CAPTIONS, emb, lengths, str(tmp_path / "sub" / "cache.npz"))
    caps, emb2, len2 = umt5.read_text_cache(path)
    assert caps == CAPTIONS
    np.testing.assert_array_equal(emb2, emb)
    np.testing.assert_array_equal(len2, lengths)
    with np.load(path, allow_pickle=False) as f:  # plain arrays, no pickles
        assert set(f.files) == {"captions", "embeddings", "lengths", "max_length"}
    # trimmed + float16 storage restores the full shape
    p2 = umt5.write_text_cache(CAPTIONS, emb, lengths, str(tmp_path / "trim"), trim=True,
                               store_dtype="float16")
    assert p2.endswith(".npz")
    with np.load(p2) as f:
        assert f["embeddings"].shape[1] == lengths.max()
    _, emb3, _ = umt5.read_text_cache(p2)
    assert emb3.shape == emb.shape
    np.testing.assert_allclose(emb3, emb, rtol=2e-3, atol=2e-3)
    with pytest.raises(ValueError):
        umt5.write_text_cache(CAPTIONS[:2], emb, lengths, str(tmp_path / "bad.npz"))


def test_cli(wan_root, tmp_path):
    txt = tmp_path / "caps.jsonl"
    txt.write_text("\n".join(json.dumps({"caption": c}) for c in CAPTIONS[:3]) + "\n")
    out = tmp_path / "cli.npz"
    r = subprocess.run([sys.executable, "-m", "third_party.umt5", "--model", str(wan_root),
                        "--captions", str(txt), "--out", str(out), "--max-length", "12",
                        "--batch-size", "2"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "3/3 captions" in r.stderr
    caps, emb, lengths = umt5.read_text_cache(str(out))
    assert caps == CAPTIONS[:3] and emb.shape == (3, 12, 32)
    ref, ref_len = umt5.encode_captions(CAPTIONS[:3], str(wan_root), max_length=12)
    np.testing.assert_allclose(emb, ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(lengths, ref_len)
    plain = tmp_path / "caps.txt"
    plain.write_text("first caption\n\nsecond\n")
    assert umt5.read_captions(str(plain)) == ["first caption", "second"]
