"""Run an experiment from a config file.

    python -m experiments.main --config=configs/demo.py --workdir=/tmp/demo
    python -m experiments.main --config=configs/demo.py:quick --config.stage1.steps=200 --workdir=/tmp/d

``config.experiment`` names the module in ``experiments/`` that runs it. Configs are locked: a
misspelt ``--config.*`` key is an error, not a silently ignored setting.
"""

from __future__ import annotations

import importlib
import os

from absl import app, flags, logging
from ml_collections import config_flags

EXPERIMENTS = ("fit_manifold",)

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file, e.g. configs/demo.py[:arg].",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and outputs.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # orbax logs every file it writes at INFO
    config = _CONFIG.value
    if config.experiment not in EXPERIMENTS:
        raise app.UsageError(f"config.experiment={config.experiment!r} is not one of {EXPERIMENTS}")
    workdir = os.path.abspath(_WORKDIR.value)
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(config.to_json_best_effort(indent=2))
    importlib.import_module(f"experiments.{config.experiment}").run(config, workdir)


if __name__ == "__main__":
    app.run(main)
