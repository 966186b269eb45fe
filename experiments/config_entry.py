"""``get_config`` for an experiment module, so that ``--config=experiments/NAME.py`` gives its defaults."""

from __future__ import annotations

from typing import Callable

import ml_collections


def defaults_entry(default_config: Callable[[], ml_collections.ConfigDict]):
    def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
        """The experiment's defaults, every field settable with ``--config.*``; no argument."""
        if arg:
            raise ValueError(f"an experiment's own config takes no argument, got {arg!r}; use a file in configs/")
        return default_config()
    return get_config
