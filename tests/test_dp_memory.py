"""Issue 21, item 1: the data-parallel train step's per-device memory must not grow with the device count.

With replicated parameters (mesh data N x fsdp 1) and one example per device, each device holds the same
state and the same activations whatever N; only the gradient all-reduce is added. The tiny DiT's
``reward_finetune`` step (``dit_setup.abstract_step``, the run's own step) is compiled for data 1 and data 4
on the suite's host devices and its ``memory_analysis()`` compared: the guard against a step that gathers
the global batch or the full gradients on every device, or whose state donation stops taking effect
(``benchmarks/dp_memory.py`` measures the 1.3B step the same way).
"""

import re

import jax

from experiments import dit_setup, reward_finetune
from shelllcc import parallel

LATENT, TEXT = (3, 8, 8, 16), (8, 32)


def _compile(n: int):
    c = reward_finetune.default_config()
    c.reward.manifold = "random"
    c.data.source = "random"
    c.mesh.data, c.mesh.fsdp, c.mesh.devices = n, 1, n
    c.data.batch_size, c.train.microbatch_size = n, 1
    ab = dit_setup.abstract_step(c, reward_finetune.make_loss(c), devices=jax.devices()[:n], latent_shape=LATENT,
                                 text_shape=TEXT)
    with parallel.set_mesh(ab.mesh):
        compiled = ab.step.jitted.trace(ab.state, ab.batch, ab.rng).lower().compile()
    m = compiled.memory_analysis()
    return ab, m, compiled.as_text()


def test_data_parallel_step_memory_does_not_grow_with_devices():
    ab1, m1, _ = _compile(1)
    ab4, m4, hlo4 = _compile(4)
    assert ab4.microbatches == 1 and dict(ab4.mesh.shape) == {"data": 4, "fsdp": 1}
    # the state is replicated: the same argument bytes per device; the donated state is the output (all but
    # the metrics' few scalars alias the arguments)
    assert m4.argument_size_in_bytes == m1.argument_size_in_bytes
    for m in (m1, m4):
        assert m.alias_size_in_bytes > 0 and m.output_size_in_bytes - m.alias_size_in_bytes <= 4096
    # one example per device either way: scratch within 25% of the 1-device step (a gathered global batch
    # or per-device copies of all gradients would add about 3x)
    assert m4.temp_size_in_bytes <= 1.25 * m1.temp_size_in_bytes, (m1.temp_size_in_bytes, m4.temp_size_in_bytes)
    # replicated parameters are never gathered; gradients are all-reduced
    assert not re.search(r"\sall-gather(-start)?\(", hlo4)
    assert re.search(r"\sall-reduce(-start)?\(", hlo4)
