"""Issue 13 section 3 on the full-rank base: the no-early-stopping variants for 200 steps, judged at their last step."""
from configs import demo

LONG = "train.steps=200; train.eval_every=20"


def get_config(arg=None):
    c = demo.get_config()
    c.run_variants = ("control", "shell_sft", "shell_drift", "shell_norm_sft", "shell_norm_drift")
    for name in c.run_variants:
        e = c.variants[name]
        e.options = "; ".join(o for o in (e.options, LONG) if o)
        e.rule = "final"
    return c
