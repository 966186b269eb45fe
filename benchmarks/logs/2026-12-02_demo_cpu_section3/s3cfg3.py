"""Issue 13 section 3: shell_drift and control with three fine-tuning and sampling seeds (the s3 run's settings)."""
import importlib.util

_spec = importlib.util.spec_from_file_location("s3cfg", "/tmp/s3cfg.py")
_s3 = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_s3)


def get_config(arg=None):
    c = _s3.get_config()
    c.run_variants = ("control", "shell_drift")
    c.seeds = (0, 1, 2)
    return c
