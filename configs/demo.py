"""The README's main job: the embedded benchmark end to end (experiment ``embedded_pipeline``).

Builds the Moving Textures dataset, trains the VAE, caches latents, trains the base DiT, fits the
Shell-LCC manifold, fine-tunes the base with no reward (control) and with every manifold distance,
samples the test prompts from each model and writes ``results.json``, ``report.md`` and pictures
into the workdir. About 15 minutes on two CPU cores; a rerun skips finished stages.

Args (``--config=configs/demo.py:ARG``): none for the full demo; ``quick`` for a miniature of every
stage (tens of seconds; the pipeline test); numbers from ``quick`` mean nothing. ``long``: the same
pipeline with a base model trained long enough to draw the scenes (a wider DiT, 15k steps; minutes on
one GPU, hours on a laptop CPU), which is what the claim under test needs (README: the embedded benchmark).
"""

from experiments import embedded_pipeline


def get_config(arg: str | None = None):
    c = embedded_pipeline.default_config()
    if arg == "quick":
        c.benchmark.train_size, c.benchmark.test_size = 64, 16
        c.vae.train.steps, c.vae.data.batch_size, c.vae.data.stats_clips, c.vae.data.eval_clips = 4, 8, 16, 8
        c.vae.model.width, c.vae.model.conv_width = 32, 8
        c.text_encoder.dim, c.text_encoder.num_layers = 32, 1
        c.base.model.dim, c.base.model.num_layers, c.base.model.num_heads, c.base.model.ffn_dim = 32, 1, 2, 64
        c.base.model.text_dim, c.base.model.freq_dim = 32, 16
        c.base.train.steps, c.base.data.batch_size = 4, 8
        c.manifold.manifold.num_anchors, c.manifold.manifold.hidden_dim = 8, 16
        c.manifold.stage1.steps, c.manifold.stage2.steps = 4, 4
        c.manifold.stage1.batch_size = c.manifold.stage2.batch_size = 256
        c.manifold.manifold.init_patches = 1024
        c.reward.train.steps, c.reward.data.batch_size = 2, 8
        c.sample.sampler.steps = 2
        c.evaluate.num_prompts, c.evaluate.montage_prompts, c.evaluate.comparison_prompts = 8, 2, 2
        c.evaluate.classifier.steps = 4
        for section in (c.vae.train, c.base.train, c.reward.train):
            section.log_every, section.checkpoint_every = 2, 1000
        c.manifold.log_every = 2
        for m in (c.reward.model, c.sample.model):
            for k in ("dim", "num_layers", "num_heads", "ffn_dim", "text_dim", "freq_dim"):
                m[k] = c.base.model[k]
    elif arg == "long":
        c.vae.train.steps, c.vae.data.batch_size, c.vae.train.log_every = 3000, 32, 250
        for m in (c.base.model, c.reward.model, c.sample.model):
            m.dim, m.num_layers, m.num_heads, m.ffn_dim = 256, 6, 4, 1024
        c.base.train.steps, c.base.data.batch_size, c.base.train.log_every = 15000, 32, 500
        c.base.train.checkpoint_every = 5000
        c.reward.train.steps, c.reward.data.batch_size, c.reward.optim.learning_rate = 300, 32, 3e-5
        c.reward.train.log_every = 50
    elif arg:
        raise ValueError(f"unknown demo config arg {arg!r}; expected nothing, 'quick' or 'long'")
    return c
