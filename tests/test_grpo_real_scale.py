"""GRPO on Wan2.1-T2V-1.3B (configs/wan21_grpo.py) with abstract shapes only, as
tests/test_videoalign_real_scale.py does for VideoAlign: the presets parsed as experiments.main parses them,
and the jitted step (rollout of G x P clips with the SDE, Shell-LCC rewards, timestep-accumulated update with
the KL to the zero-adapter reference) traced with ``jax.eval_shape`` on 81 x 480 x 832 latents. Nothing of the
1.3B model is allocated; attention traced with ``xla``."""

import jax
import jax.numpy as jnp
import pytest
from absl import flags
from ml_collections import config_flags

from configs import grpo as grpo_configs
from configs import wan21_grpo, wan21_pipeline
from experiments import dit_setup, grpo

LATENTS, TEXT = wan21_pipeline.LATENT_SHAPE, wan21_pipeline.TEXT_SHAPE
LORA_1_3B_R32 = 8 * 30 * 32 * (1536 + 1536)      # rank 32 on q, k, v, o of both attentions in 30 blocks


def parse(path: str, arg: str, *extra: str):
    argv = ["main", f"--config={path}:{arg}", *extra]
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=True, sys_argv=argv)
    fv(argv)
    return fv.config


def test_presets_hold_the_sections_settings():
    for path, args in ((wan21_grpo.__file__, wan21_grpo.ARGS), (grpo_configs.__file__, grpo_configs.ARGS)):
        for arg in args:
            c = parse(path, arg)
            s = grpo.settings(c)
            g = c.grpo
            assert (g.sde_a, g.clip_eps, g.adv_clip, g.sampling_steps) == (0.7, 1e-4, 5.0, 10)
            if "dance" in arg:
                assert (s.kind, s.use_kl, s.keep, s.fraction) == ("dance_grpo", False, 4, 0.6)
            else:
                assert (s.kind, s.use_kl, g.kl_with_dt, g.kl_weight) == ("flow_grpo", True, False, 0.04)
    assert parse(wan21_grpo.__file__, "shell").model.preset == "wan2.1-t2v-1.3b"
    with pytest.raises(ValueError, match="unknown wan21_grpo config arg"):
        wan21_grpo.get_config("grpo")


@pytest.mark.parametrize("arg,latents,text", [("shell", LATENTS, TEXT),
                                              ("smoke", wan21_grpo.SMOKE_LATENTS, wan21_grpo.SMOKE_TEXT)])
def test_step_traces_at_real_size(arg, latents, text):
    c = parse(wan21_grpo.__file__, arg, "--config.model.attention_impl=xla", "--config.data.source=random",
              "--config.mesh.devices=1", "--config.reward.manifold=random")
    c = grpo.with_batch(c)
    ab = dit_setup.abstract_step(c, grpo.make_loss(c), devices=jax.devices()[:1], latent_shape=latents,
                                 text_shape=text)
    assert ab.trainable_params == LORA_1_3B_R32 and ab.microbatches == 1
    assert {k: v.shape for k, v in ab.batch.items()} == {"latents": (16, *latents), "context": (16, *text)}
    with jax.set_mesh(ab.mesh):
        new_state, metrics = jax.eval_shape(ab.step.jitted, ab.state, ab.batch, ab.rng)
    for a, b in zip(jax.tree.leaves(new_state.params), jax.tree.leaves(ab.state.params)):
        assert (a.shape, a.dtype) == (b.shape, b.dtype)
    assert {"loss", "reward_mean", "reward_group_std", "clip_fraction", "kl", "ratio_mean", "approx_kl",
            "samples_drawn", "grad_norm"} <= set(metrics)
    assert all(m.shape == () and m.dtype == jnp.float32 for m in metrics.values())
