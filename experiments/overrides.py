"""Dotted-key overrides of a locked config: ablation variants and the embedded pipeline's variant options."""

from __future__ import annotations


def apply_overrides(config, overrides: dict, what: str) -> None:
    """Set ``{dotted.key: value}`` in ``config`` with ml_collections' flattened update (which casts the value to
    the field's type); a key that does not exist, locked config or not, or a value of the wrong type is an
    error naming ``what`` and the key."""
    for key, value in overrides.items():
        *parents, last = key.split(".")
        node = config
        for part in parents:
            node = node.get(part) if hasattr(node, "get") else None
        if node is None or not hasattr(node, "keys") or last not in node:
            raise KeyError(f"{what}: no config key {key!r}")
        try:
            config.update_from_flattened_dict({key: value})
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
