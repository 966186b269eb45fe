"""shelllcc: Shell-LCC manifold rewards and video diffusion post-training in JAX."""

__version__ = "0.1.0"
