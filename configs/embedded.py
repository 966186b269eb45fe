"""The embedded benchmark's DiT stages: ``embedded.py:sft`` (base model), ``embedded.py:reward`` (Shell-LCC
reward fine-tuning of that base) and ``embedded.py:sample``.

Paths come from the run (the demo pipeline fills them in; by hand, pass them as flags)::

    python -m experiments.main --config=configs/embedded.py:sft --workdir=W/base \\
        --config.data.cache_dir=W/latents/train
    python -m experiments.main --config=configs/embedded.py:reward --workdir=W/shell \\
        --config.data.cache_dir=W/latents/train --config.model.init_from=W/base --config.reward.manifold=W/manifold

The DiT is small enough to train on a laptop CPU: 4 blocks of width 128 over latents of 5 x 8 x 8 x 16
(17 frames of 64 x 64 through the benchmark's VAE) with the small text encoder's 128-d context.
"""

from experiments import embedded_pipeline

ARGS = embedded_pipeline.DIT_STAGES


def get_config(arg: str | None = None):
    return embedded_pipeline.dit_stage_config(arg)
