"""Dry run of VideoAlign's methods on Wan2.1-T2V-1.3B (configs/wan21_videoalign.py) with abstract shapes only,
as tests/test_real_scale_dry_run.py does for the Shell-LCC recipe: the configs the README's commands load
(parsed as experiments.main parses them), the paper's settings, and the jitted train steps of Flow-DPO and
Flow-RWR traced (``jax.eval_shape``) on the real shapes with the recipe's 64 microbatches. Nothing of the 1.3B
model is allocated. Attention is traced with ``xla`` (cuDNN cannot be traced without cuDNN; same inputs and
outputs)."""

import jax
import jax.numpy as jnp
import pytest
from absl import flags
from flax import nnx
from ml_collections import config_flags

from configs import wan21_pipeline, wan21_videoalign
from experiments import dit_setup, flow_dpo, flow_rwr
from shelllcc.models.wan_transformer import WanTransformer
from shelllcc.rewards import reward_model as rm
from shelllcc.training import lora as lora_lib

LATENTS, TEXT = wan21_pipeline.LATENT_SHAPE, wan21_pipeline.TEXT_SHAPE
LORA_1_3B_R64 = 8 * 30 * 64 * (1536 + 1536)      # rank 64 on q, k, v, o of both attentions in 30 blocks


def parse(arg: str, *extra: str):
    argv = ["main", f"--config={wan21_videoalign.__file__}:{arg}", *extra]
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=True, sys_argv=argv)
    fv(argv)
    return fv.config


def test_configs_hold_the_papers_settings():
    for arg in ("flow_dpo", "flow_dpo_t", "flow_rwr", "sft"):
        c = parse(arg, "--config.data.cache_dir=runs/va-score/dpo_cache")
        assert (c.lora.rank, c.lora.alpha, c.optim.learning_rate, c.data.batch_size) == (64, 128.0, 5e-6, 64)
        assert c.model.preset == "wan2.1-t2v-1.3b" and c.model.param_dtype == "bfloat16"
        assert c.data.latent_mean == () and c.data.latent_dtype == "bfloat16"   # the caches are normalised latents
        if arg == "sft":
            assert c.experiment == "sft"
        elif arg != "flow_rwr":
            assert (c.dpo.beta, c.dpo.time_dependent) == (500.0, arg == "flow_dpo_t")
            flow_dpo.check_config(c)
        else:
            flow_rwr.check_config(c)
    smp = wan21_pipeline.sample_config()
    for arg in ("score", "guided"):
        c = parse(arg)
        assert tuple(c.latents.shape) == LATENTS and tuple(c.latents.latent_std) == tuple(smp.latents.latent_std)
        assert (c.sampler.solver, c.sampler.steps, c.sampler.shift, c.sampler.guidance_scale) == ("unipc", 50, 3.0, 5.0)
    assert parse("score").score.clips_per_prompt == 4 and parse("guided").sampler.guidance.kind == "reward_model"
    with pytest.raises(ValueError, match="unknown wan21_videoalign config arg"):
        wan21_videoalign.get_config("dpo")


@pytest.mark.parametrize("arg", ["flow_dpo", "flow_rwr"])
def test_train_step_traces_at_81x480x832(arg):
    """The step run_training jits (dit_setup.abstract_step: LoRA split, optimizer, the method's loss, 64
    microbatches of one pair / clip) traced on the real shapes; data from the random source's extra fields."""
    module = flow_dpo if arg == "flow_dpo" else flow_rwr
    c = parse(arg, "--config.model.attention_impl=xla", "--config.data.source=random", "--config.mesh.devices=1")
    ab = dit_setup.abstract_step(c, module.make_loss(c), devices=jax.devices()[:1], latent_shape=LATENTS,
                                 text_shape=TEXT)
    assert ab.microbatches == 64 and ab.trainable_params == LORA_1_3B_R64
    extra = {"flow_dpo": {"loser_latents": (64, *LATENTS)}, "flow_rwr": {"reward": (64,)}}[arg]
    assert {k: v.shape for k, v in ab.batch.items()} == {"latents": (64, *LATENTS), "context": (64, *TEXT), **extra}
    with jax.set_mesh(ab.mesh):
        new_state, metrics = jax.eval_shape(ab.step.jitted, ab.state, ab.batch, ab.rng)
    for a, b in zip(jax.tree.leaves(new_state), jax.tree.leaves(ab.state)):
        assert (a.shape, a.dtype) == (b.shape, b.dtype)
    expected = {"accuracy", "margin", "err_ref_w"} if arg == "flow_dpo" else {"ess", "weight_max", "sft"}
    assert expected | {"loss", "grad_norm"} <= set(metrics)
    assert all(m.shape == () and m.dtype == jnp.float32 for m in metrics.values())


def test_reward_model_on_the_first_blocks_of_the_1_3b_dit_traces():
    """configs/wan21_videoalign.py:reward_model: the first 8 of 30 blocks with LoRA r 64 and the readout,
    built from nnx.eval_shape; its BTT loss on one pair of 81 x 480 x 832 latents traced."""
    c = parse("reward_model", "--config.model.attention_impl=xla", "--config.data.train=pairs/train")
    r = c.reward_model
    cfg = dit_setup.transformer_config(c.model)

    def build():
        model = rm.LatentRewardModel(WanTransformer(cfg, rngs=nnx.Rngs(0)), r.num_blocks, rngs=nnx.Rngs(r.seed))
        lora_lib.apply_lora(model, rank=c.lora.rank, alpha=c.lora.alpha, targets=tuple(c.lora.targets),
                            rngs=nnx.Rngs(1))
        return nnx.split(model, rm.trainable_filter(r.backbone), ...)

    graphdef, trainable, frozen = nnx.eval_shape(build)
    n_lora = sum(x.size for p, x in jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(trainable))
                 if "lora" in jax.tree_util.keystr(p))
    assert n_lora == 8 * 8 * 64 * (1536 + 1536)            # q, k, v, o of both attentions in 8 blocks
    loss_fn = rm.make_loss_fn(graphdef, r.loss, r.t_max, r.theta)
    pair = {"z_a": jax.ShapeDtypeStruct((1, *LATENTS), jnp.float32), "z_b": jax.ShapeDtypeStruct((1, *LATENTS), jnp.float32),
            "context": jax.ShapeDtypeStruct((1, *TEXT), jnp.float32), "labels": jax.ShapeDtypeStruct((1, 3), jnp.int32)}
    loss, metrics = jax.eval_shape(loss_fn, nnx.to_pure_dict(trainable), nnx.to_pure_dict(frozen), pair,
                                   jax.ShapeDtypeStruct((2,), jnp.uint32))
    assert loss.shape == () and loss.dtype == jnp.float32 and "acc_without_ties" in metrics
