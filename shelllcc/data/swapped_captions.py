"""Hard negative captions for a video-text matcher: a Moving Textures clip's caption with one attribute swapped.

A negative of clip ``c`` is its own caption re-rendered with the same template
(:data:`~shelllcc.data.moving_textures.CAPTION_TEMPLATES`) after one attribute (shape, colour, texture, scale,
direction or speed) is replaced by another value of that attribute, drawn uniformly. Re-rendering, not word
replacement, keeps the captions exactly what the dataset would write ("a red ..." / "an orange ...", and
"up" is not a word of "up-left"). These negatives and their balance over attributes are ours (PISCES's
matcher is trained upstream on InternVideo2's data).

Which attributes a clip's ``per_clip`` negatives swap: ``ATTRIBUTE_NAMES[(source_index * per_clip + j) % 6]``
for ``j < per_clip``, so over a cache every attribute is swapped equally often and ``per_clip = 6`` swaps each
once; the new value comes from a generator seeded by ``(seed, source_index, j)``. Everything is a pure
function of the record and the seed, so the captions, and so the text-embedding table computed from them,
are the same in every run.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from shelllcc.data import moving_textures as mt

ATTRIBUTE_NAMES: tuple[str, ...] = tuple(mt.ATTRIBUTES)


def attributes_of(record: Mapping) -> dict[str, str]:
    """The attribute values of a latent-cache record holding the label fields (``shape`` ... ``speed``: class
    indices, as the embedded benchmark's cache keeps them)."""
    missing = [k for k in ATTRIBUTE_NAMES if k not in record]
    if missing:
        raise KeyError(f"record has no attribute label field(s) {missing}; a Moving Textures cache keeps "
                       f"{list(ATTRIBUTE_NAMES)}")
    return {k: mt.ATTRIBUTES[k][int(record[k])] for k in ATTRIBUTE_NAMES}


def caption_variant(attributes: Mapping[str, str], caption: str) -> int:
    """The template index that renders ``caption`` from ``attributes``; ``ValueError`` when none does."""
    for v in range(len(mt.CAPTION_TEMPLATES)):
        if mt.caption(attributes, v) == caption:
            return v
    raise ValueError(f"caption {caption!r} is not a Moving Textures caption of {dict(attributes)}")


def swapped_caption(attributes: Mapping[str, str], caption: str, attribute: str, value: str) -> str:
    """``caption`` re-rendered with ``attribute`` set to ``value`` (which must differ from the clip's)."""
    if attribute not in mt.ATTRIBUTES or value not in mt.ATTRIBUTES[attribute]:
        raise ValueError(f"{attribute}={value!r} is not a Moving Textures attribute value")
    if attributes[attribute] == value:
        raise ValueError(f"{attribute}={value!r} is the clip's own value: not a negative")
    return mt.caption({**attributes, attribute: value}, caption_variant(attributes, caption))


def negatives(record: Mapping, per_clip: int, seed: int) -> list[tuple[str, str]]:
    """``[(attribute, caption)] * per_clip``: the record's negatives (module doc). ``record`` holds
    ``caption`` (str or bytes), ``source_index`` and the attribute label fields."""
    if per_clip < 1:
        raise ValueError(f"per_clip must be >= 1, got {per_clip}")
    attrs = attributes_of(record)
    cap = record["caption"]
    cap = cap.decode() if isinstance(cap, bytes) else str(cap)
    index = int(record["source_index"])
    out = []
    for j in range(per_clip):
        name = ATTRIBUTE_NAMES[(index * per_clip + j) % len(ATTRIBUTE_NAMES)]
        others = [v for v in mt.ATTRIBUTES[name] if v != attrs[name]]
        rng = np.random.default_rng([int(seed), index, j])
        out.append((name, swapped_caption(attrs, cap, name, others[int(rng.integers(len(others)))])))
    return out


__all__ = ["ATTRIBUTE_NAMES", "attributes_of", "caption_variant", "negatives", "swapped_caption"]
