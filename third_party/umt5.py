"""Precompute umT5 text embeddings (Wan2.1's text encoder) with ``transformers``; write a cache.

Wan's convention, reproduced here: each caption is cleaned (``ftfy`` when installed, HTML
entities unescaped twice, whitespace collapsed), tokenized with padding to ``max_length`` (512
for Wan) and truncation, with the tokenizer's special tokens (umT5 appends ``</s>``); the
encoder runs with the attention mask; the output is kept for the caption's ``length`` real tokens
(the attention mask's count) and set to zero beyond it. Result: ``[N, max_length, d_model]``
float32 and ``lengths [N]``.

``model_path`` is either a ``UMT5EncoderModel`` directory or a Wan diffusers checkpoint root with
``text_encoder/`` and ``tokenizer/`` subfolders. ``torch`` and ``transformers`` are imported
lazily, inside the functions, so importing this module costs nothing.

The cache file's format belongs to the library (:mod:`shelllcc.data.text_cache`, which reads it for
training); this module only writes it.

CLI::

    python -m third_party.umt5 --model PATH --captions FILE.txt|FILE.jsonl --out cache.npz
"""

from __future__ import annotations

import argparse
import html
import os
import re
import sys
import time
from typing import Sequence

import numpy as np

from shelllcc.data.text_cache import read_captions, read_text_cache, write_text_cache  # noqa: F401 (CLI and callers)

_DTYPES = ("float32", "bfloat16", "float16")


def clean_caption(text: str) -> str:
    """The Wan pipeline's prompt cleaning: ftfy (if installed), double HTML unescape, whitespace."""
    if not isinstance(text, str):
        raise TypeError(f"caption must be str, got {type(text).__name__}")
    try:
        import ftfy  # optional, as in diffusers
        text = ftfy.fix_text(text)
    except ImportError:
        pass
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip()


def resolve_paths(model_path: str, tokenizer_path: str | None = None) -> tuple[str, str]:
    """``(encoder_dir, tokenizer_dir)``: a Wan checkpoint root maps to its subfolders."""
    enc = model_path
    if os.path.isdir(os.path.join(model_path, "text_encoder")):
        enc = os.path.join(model_path, "text_encoder")
    if tokenizer_path is None:
        root_tok = os.path.join(model_path, "tokenizer")
        tokenizer_path = root_tok if os.path.isdir(root_tok) else enc
    return enc, tokenizer_path


def load_umt5(model_path: str, tokenizer_path: str | None = None, dtype: str = "float32",
              device: str = "cpu"):
    """``(tokenizer, encoder)`` from disk; the encoder in eval mode on ``device``."""
    import torch
    from transformers import AutoTokenizer, UMT5EncoderModel

    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {_DTYPES}, got {dtype!r}")
    enc_dir, tok_dir = resolve_paths(model_path, tokenizer_path)
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    import transformers
    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    # the keyword was renamed torch_dtype -> dtype in transformers 4.56
    key = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"
    model = UMT5EncoderModel.from_pretrained(enc_dir, **{key: getattr(torch, dtype)})
    return tokenizer, model.to(device).eval()


def encode_captions(captions: Sequence[str], model_path: str | None = None, max_length: int = 512,
                    batch_size: int = 8, dtype: str = "float32", device: str = "cpu", *,
                    tokenizer_path: str | None = None, model=None, tokenizer=None,
                    clean: bool = True, progress: bool = False):
    """umT5 embeddings of ``captions`` in Wan's convention (module doc).

    Args:
      captions: the strings (a non-string raises ``TypeError``).
      model_path: encoder directory or Wan checkpoint root (ignored when ``model`` and ``tokenizer``
        are given, e.g. to reuse a loaded model).
      max_length: tokens per caption (Wan: 512); longer captions are truncated.
      batch_size: captions per forward pass.
      dtype: the encoder's compute dtype; the result is float32 either way.
      clean: apply :func:`clean_caption` first (the pipeline always does).
      progress: print a line per batch to stderr.

    Returns ``(embeddings float32 [N, max_length, D], lengths int32 [N])``.
    """
    import torch

    captions = list(captions)
    for i, c in enumerate(captions):
        if not isinstance(c, str):
            raise TypeError(f"captions must be str, got {type(c).__name__} at index {i}")
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    if model is None or tokenizer is None:
        if model_path is None:
            raise ValueError("give model_path, or both model and tokenizer")
        tokenizer, model = load_umt5(model_path, tokenizer_path, dtype, device)
    dev = next(model.parameters()).device
    dim = model.config.d_model
    out = np.zeros((len(captions), max_length, dim), np.float32)
    lengths = np.zeros((len(captions),), np.int32)
    texts = [clean_caption(c) for c in captions] if clean else captions
    t0 = time.time()
    for start in range(0, len(texts), batch_size):
        chunk = texts[start:start + batch_size]
        tok = tokenizer(chunk, padding="max_length", max_length=max_length, truncation=True,
                        add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
        mask = tok.attention_mask
        with torch.inference_mode():
            hidden = model(tok.input_ids.to(dev), mask.to(dev)).last_hidden_state
        hidden = hidden.float().cpu().numpy()
        n_tok = mask.sum(dim=1).numpy().astype(np.int32)
        for j, n in enumerate(n_tok):
            out[start + j, :n] = hidden[j, :n]  # beyond n stays zero
        lengths[start:start + len(chunk)] = n_tok
        if progress:
            done = start + len(chunk)
            rate = done / max(time.time() - t0, 1e-9)
            print(f"[umt5] {done}/{len(texts)} captions ({rate:.1f}/s)", file=sys.stderr, flush=True)
    return out, lengths


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m third_party.umt5", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="UMT5EncoderModel dir or Wan diffusers root")
    p.add_argument("--tokenizer", default=None, help="tokenizer dir (default: next to the model)")
    p.add_argument("--captions", required=True, help=".txt (one per line) or .jsonl")
    p.add_argument("--field", default=None, help="jsonl field holding the caption")
    p.add_argument("--out", required=True, help="output .npz")
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--dtype", default="float32", choices=_DTYPES)
    p.add_argument("--device", default="cpu")
    p.add_argument("--trim", action="store_true", help="store only up to the longest caption")
    p.add_argument("--store-dtype", default="float32", choices=("float32", "float16"))
    args = p.parse_args(argv)

    captions = read_captions(args.captions, args.field)
    print(f"[umt5] {len(captions)} captions from {args.captions}", file=sys.stderr)
    emb, lengths = encode_captions(captions, args.model, args.max_length, args.batch_size,
                                   args.dtype, args.device, tokenizer_path=args.tokenizer,
                                   progress=True)
    path = write_text_cache(captions, emb, lengths, args.out, trim=args.trim,
                            store_dtype=args.store_dtype)
    print(f"[umt5] wrote {path}: embeddings {emb.shape}, max length {int(lengths.max(initial=0))}",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
