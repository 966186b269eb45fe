"""Fit a Shell-LCC manifold to the built-in synthetic latent set (the manifold fit alone, in a minute).

Data: latents whose every position lies on the shell of one of 8 Gaussians in D=16, so the true
manifold is known and the distance table can be read: real latents lie on the shell (shell ~ 0),
blurred ones fall inside it (small lcc, large shell), noised ones outside.

Args (``--config=configs/synthetic_manifold.py:ARG``): ``quick`` for a seconds-long smoke run.
"""

from experiments import fit_manifold


def get_config(arg: str | None = None):
    c = fit_manifold.default_config()
    c.data.source = "synthetic"
    c.manifold.num_anchors = 64
    c.manifold.hidden_dim = 128
    c.stage1.steps, c.stage2.steps = 1000, 500
    if arg == "quick":
        c.data.synthetic.num_videos = 16
        c.manifold.num_anchors, c.manifold.hidden_dim = 16, 32
        c.stage1.steps, c.stage2.steps = 40, 20
        c.stage1.batch_size = c.stage2.batch_size = 256
        c.log_every, c.checkpoint_every = 10, 30
    elif arg:
        raise ValueError(f"unknown synthetic_manifold config arg {arg!r}; expected nothing or 'quick'")
    return c
