"""Experiments: each module defines its config schema (``default_config``) and ``run(config, workdir)``."""
