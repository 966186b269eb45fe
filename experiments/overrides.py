"""Dotted-key overrides of a locked config: ablation variants and the embedded pipeline's variant options."""

from __future__ import annotations


def apply_overrides(config, overrides: dict, what: str) -> None:
    """Set ``{dotted.key: value}`` in ``config``; a key that does not exist is a ``KeyError`` naming ``what``."""
    for key, value in overrides.items():
        parent = config
        parts = key.split(".")
        for part in parts[:-1]:
            if part not in parent:
                raise KeyError(f"{what}: no config key {key!r} (at {part!r})")
            parent = parent[part]
        if parts[-1] not in parent:
            raise KeyError(f"{what}: no config key {key!r}")
        try:
            parent[parts[-1]] = value
        except TypeError as e:
            raise TypeError(f"{what}: {key}={value!r}: {e}") from None


def parse_overrides(text: str, what: str) -> dict:
    """``"a.b=1; c=(1, 2); d=name"`` -> ``{"a.b": 1, "c": (1, 2), "d": "name"}`` (Python literals, else strings)."""
    import ast
    out = {}
    for item in (t.strip() for t in text.split(";")):
        if not item:
            continue
        if "=" not in item:
            raise ValueError(f"{what}: {item!r} is not key=value (items are separated by ';')")
        key, raw = (x.strip() for x in item.split("=", 1))
        try:
            out[key] = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            out[key] = raw
    return out
