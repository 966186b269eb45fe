"""Dry run of the Wan2.1-T2V-1.3B real-scale recipe (configs/wan21_pipeline.py) with abstract shapes only.

Nothing of the 1.3B model is allocated: ``nnx.eval_shape`` / ``jax.eval_shape`` trace the programs the
README's commands run (the reward fine-tuning step with LoRA and its reward, the VAE encode/decode of
81 x 480 x 832 clips, the 50-step guided sampler) and we check shapes, dtypes and sizes. The configs are
the ones the commands load (``configs/wan21_pipeline.py``, parsed by ml_collections' config flags as
``experiments.main`` parses them).

One setting differs from the GPU run: ``model.attention_impl`` is ``cudnn`` in the recipe and cannot be
traced without cuDNN (``jax.nn.dot_product_attention(implementation='cudnn')`` checks for it while tracing),
so the dry run traces ``xla`` attention, which has the same inputs and outputs.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import flags
from flax import nnx
from ml_collections import config_flags

from configs import wan21_pipeline
from experiments import dit_setup, encode_cache, reward_finetune, sample
from shelllcc import parallel
from shelllcc.models.wan_transformer import WanTransformer
from shelllcc.models.wan_vae import WanVAE, WanVAEConfig
from shelllcc.training import train_state as ts
from shelllcc.training.step import jit_train_step, make_train_step, microbatch_count, train_state_shardings

LATENTS = (21, 60, 104, 16)         # 81 frames at 480 x 832
TEXT = (512, 4096)
# parameters of the 'wan2.1-t2v-1.3b' preset (every one filled from the diffusers checkpoint by
# third_party.diffusers_wan.load_transformer, which refuses missing or extra tensors)
PARAMS_1_3B = 1_418_996_800
TRACE_ATTENTION = "xla"             # module doc: cudnn cannot be traced on a machine without cuDNN

# the --config flags of the README's commands (paths are placeholders: nothing is opened)
COMMANDS = {
    "encode": ["--config.data.dataset=/data/tfds/shelllcc_video_folder/x/1.0.0",
               "--config.vae.pretrained=Wan2.1-T2V-1.3B-Diffusers/vae", "--config.text.umt5_cache=text.npz"],
    "manifold": ["--config.data.cache.dir=cache/train"],
    "reward": ["--config.model.pretrained=Wan2.1-T2V-1.3B-Diffusers/transformer", "--config.data.cache_dir=cache/train",
               "--config.reward.manifold=runs/manifold"],
    "sample": ["--config.model.init_from=runs/shell", "--config.prompts.file=prompts.txt",
               "--config.prompts.text_encoder=prompts.npz", "--config.vae.pretrained=Wan2.1-T2V-1.3B-Diffusers/vae"],
}


def parse(stage: str, *extra: str):
    """The config ``python -m experiments.main --config=configs/wan21_pipeline.py:STAGE FLAGS`` runs with."""
    argv = ["main", f"--config={wan21_pipeline.__file__}:{stage}", *COMMANDS[stage], *extra]
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=True, sys_argv=argv)
    fv(argv)
    return fv.config


def abstract(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


def test_stage_configs_are_consistent():
    enc, man, rew, smp = (parse(s) for s in wan21_pipeline.STAGES)
    vae = WanVAEConfig.preset("wan2.1")
    assert enc.experiment == "encode_cache" and enc.output.latent_dtype == "bfloat16" and enc.vae.dtype == "float32"
    assert encode_cache.check_video((81, 480, 832, 3), vae) == LATENTS
    # one latent space: the manifold, the DiT's data and the sampler's decoding use the VAE's statistics
    stats = (tuple(vae.latents_mean), tuple(vae.latents_std))
    assert (tuple(man.data.cache.latent_mean), tuple(man.data.cache.latent_std)) == stats
    assert (tuple(rew.data.latent_mean), tuple(rew.data.latent_std)) == stats
    assert (tuple(smp.latents.latent_mean), tuple(smp.latents.latent_std)) == stats
    # the reference recipe, untouched (configs/wan21_reward.py:1.3b-lora)
    assert rew.model.preset == "wan2.1-t2v-1.3b" and rew.lora.rank == 16 and rew.data.batch_size == 8
    assert (rew.optim.learning_rate, rew.optim.grad_clip, rew.objective.s_lo, rew.objective.s_hi) == (1e-5, 1.0, 0.7, 1.0)
    assert rew.data.latent_dtype == "bfloat16" and rew.reward.kind == "shell"
    # diffusers' WanPipeline defaults for Wan2.1-T2V-1.3B at 480p
    assert tuple(smp.latents.shape) == LATENTS and smp.sampler.solver == "unipc"
    assert (smp.sampler.steps, smp.sampler.shift, smp.sampler.guidance_scale) == (50, 3.0, 5.0)
    assert smp.prompts.source == "file" and smp.output.fps == 16
    # the sampler's checks with the planned model and VAE (what sample.run checks before loading weights)
    sample.check_setup(LATENTS, smp.latents.latent_mean, smp.latents.latent_std, TEXT,
                       dit_setup.transformer_config(rew.model), vae)
    # the README's overrides land; a misspelt key is refused
    assert man.data.cache.dir == "cache/train" and rew.reward.manifold == "runs/manifold"
    with pytest.raises(Exception, match="cache_dri"):
        parse("reward", "--config.data.cache_dri=x")
    with pytest.raises(ValueError, match="needs a stage"):
        wan21_pipeline.get_config(None)


@pytest.fixture(scope="module")
def reward_setup():
    """The reward config's DiT with LoRA applied, abstract, on a 1-device mesh (as dit_setup.run_training
    builds it), and the loss of reward_finetune.make_loss with a manifold of the wan21_manifold size."""
    c = parse("reward", f"--config.model.attention_impl={TRACE_ATTENTION}", "--config.reward.manifold=random",
              "--config.mesh.devices=1")
    man = parse("manifold")
    with c.unlocked():
        c.reward.random.num_anchors, c.reward.random.hidden_dim = man.manifold.num_anchors, man.manifold.hidden_dim
        c.reward.random.patch_size = man.manifold.patch_size
    mesh = dit_setup.make_mesh(c.mesh)
    rules = dit_setup.sharding_rules(c)
    cfg = dit_setup.transformer_config(c.model)

    def build():
        return dit_setup.split_trainable(WanTransformer(cfg, rngs=nnx.Rngs(c.model.seed)), c.lora, c.seed)

    graphdef, trainable, frozen = nnx.eval_shape(build)
    with dit_setup.sharding_context(mesh, rules):
        param_sh = dit_setup.state_shardings(trainable, mesh)
        frozen_sh = dit_setup.state_shardings(frozen, mesh)
    setup = dit_setup.Setup(graphdef, nnx.to_pure_dict(trainable), nnx.to_pure_dict(frozen), mesh, param_sh)
    loss_fn, extra, extra_sh = reward_finetune.make_loss(c)(setup)
    return dict(config=c, cfg=cfg, mesh=mesh, rules=rules, setup=setup, trainable=trainable, frozen_sh=frozen_sh,
                loss_fn=loss_fn, extra=abstract(extra), extra_sh=extra_sh, manifold_config=man)


def test_abstract_1_3b_transformer(reward_setup):
    s, cfg = reward_setup["setup"], reward_setup["cfg"]
    assert (cfg.dim, cfg.num_layers, cfg.num_heads, cfg.ffn_dim, cfg.text_dim) == (1536, 30, 12, 8960, 4096)
    n_frozen = sum(x.size for x in jax.tree.leaves(s.frozen_model))
    n_lora = sum(x.size for x in jax.tree.leaves(s.params))
    assert n_frozen == PARAMS_1_3B
    # rank 16 on q, k, v, o of both attentions: 8 x 30 x 16 x (1536 + 1536) adapter weights
    assert n_lora == 8 * 30 * 16 * (1536 + 1536)
    assert {x.dtype for x in jax.tree.leaves(s.frozen_model)} <= {jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32)}
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves((s.params, s.frozen_model)))


def test_reward_train_step_traces(reward_setup):
    """The jitted step of reward_finetune (make_train_step + jit_train_step, shardings included) on the
    recipe's effective batch of 8 = 8 microbatches of [1, 21, 60, 104, 16] on one device."""
    r = reward_setup
    c, s, mesh = r["config"], r["setup"], r["mesh"]
    optimizer, schedule = dit_setup.optimizer_from(c, s.params)
    k = microbatch_count(c.data.batch_size, c.train.microbatch_size, mesh)
    assert k == 8
    frozen = {"model": s.frozen_model, **r["extra"]}
    state = jax.eval_shape(lambda p, f: ts.create(p, optimizer, f), s.params, frozen)
    with dit_setup.sharding_context(mesh, r["rules"]):
        opt_sh = parallel.optimizer_shardings(optimizer, r["trainable"], mesh)
    frozen_sh = {"model": r["frozen_sh"], **r["extra_sh"]}
    state_sh = train_state_shardings(s.param_shardings, opt_sh, frozen_sh, mesh)
    step = jit_train_step(make_train_step(r["loss_fn"], optimizer, schedule, k), state_sh, mesh)
    b = c.data.batch_size
    batch = {"latents": jax.ShapeDtypeStruct((b, *LATENTS), jnp.dtype(c.data.latent_dtype)),
             "context": jax.ShapeDtypeStruct((b, *TEXT), jnp.float32)}
    with jax.set_mesh(mesh):
        new_state, metrics = jax.eval_shape(step.jitted, state, batch, jax.ShapeDtypeStruct((2,), jnp.uint32))
    assert jax.tree.structure(new_state) == jax.tree.structure(state)
    for a, b_ in zip(jax.tree.leaves(new_state), jax.tree.leaves(state)):
        assert (a.shape, a.dtype) == (b_.shape, b_.dtype)
    assert metrics["loss"].shape == () and metrics["loss"].dtype == jnp.float32
    assert {"reward", "grad_norm", "learning_rate", "skipped"} <= set(metrics)
    assert all(m.shape == () for m in metrics.values())

    # one microbatch's loss directly: a scalar from latents [1, 21, 60, 104, 16] bf16 and context [1, 512, 4096]
    one = {"latents": jax.ShapeDtypeStruct((1, *LATENTS), jnp.bfloat16), "context": jax.ShapeDtypeStruct((1, *TEXT),
                                                                                                         jnp.float32)}
    with jax.set_mesh(mesh):
        loss, aux = jax.eval_shape(r["loss_fn"], s.params, frozen, one, jax.ShapeDtypeStruct((2,), jnp.uint32))
    assert loss.shape == () and loss.dtype == jnp.float32 and aux["reward"].shape == ()


def wan21_vae_parameter_count(base=96, z=16, mult=(1, 2, 4, 4), res_blocks=2, temporal=(False, True, True)):
    """The Wan2.1 VAE's parameter count from its dimensions (diffusers AutoencoderKLWan's layout): 3x3x3 causal
    convolutions with bias, RMS norms with a gain only, residual blocks with a 1x1x1 shortcut where the width
    changes, one attention block (1x1 qkv and output projections) in each mid block, stride-2 3x3 spatial
    resamplers (plus a 3x1x1 temporal convolution where time is down- or upsampled; the decoder's upsamplers
    halve the width, and its temporal upsampling doubles the channels before the shuffle)."""
    conv3 = lambda i, o: 27 * i * o + o
    conv1 = lambda i, o: i * o + o
    res = lambda i, o: i + conv3(i, o) + o + conv3(o, o) + (conv1(i, o) if i != o else 0)
    mid = lambda d: 2 * res(d, d) + d + conv1(d, 3 * d) + conv1(d, d)
    n = conv1(2 * z, 2 * z) + conv1(z, z)                          # quant_conv, post_quant_conv
    dims = [base * m for m in (1, *mult)]                          # encoder: 96, 96, 192, 384, 384
    n += conv3(3, dims[0])
    for level, (i, o) in enumerate(zip(dims[:-1], dims[1:])):
        for _ in range(res_blocks):
            n, i = n + res(i, o), o
        if level < len(mult) - 1:
            n += 9 * o * o + o + (3 * o * o + o if temporal[level] else 0)
    n += mid(dims[-1]) + dims[-1] + conv3(dims[-1], 2 * z)
    dims = [base * m for m in (mult[-1], *mult[::-1])]             # decoder: 384, 384, 384, 192, 96
    n += conv3(z, dims[0]) + mid(dims[0])
    for level, (i, o) in enumerate(zip(dims[:-1], dims[1:])):
        i = i // 2 if level else i
        for _ in range(res_blocks + 1):
            n, i = n + res(i, o), o
        if level < len(mult) - 1:
            n += 9 * o * (o // 2) + o // 2 + (3 * o * 2 * o + 2 * o if temporal[::-1][level] else 0)
    return n + dims[-1] + conv3(dims[-1], 3)


def test_wan_vae_encode_decode_81x480x832():
    vae = nnx.eval_shape(lambda: WanVAE(WanVAEConfig.preset("wan2.1"), rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(vae)
    n = sum(x.size for x in jax.tree.leaves(state))
    assert n == wan21_vae_parameter_count() == 126_892_531
    video = jax.ShapeDtypeStruct((1, 81, 480, 832, 3), jnp.float32)
    z = jax.eval_shape(lambda st, x: nnx.merge(graphdef, st).encode(x), state, video)
    assert (z.shape, z.dtype) == ((1, *LATENTS), jnp.float32)
    back = jax.eval_shape(lambda st, x: nnx.merge(graphdef, st).decode(x), state, z)
    assert (back.shape, back.dtype) == ((1, 81, 480, 832, 3), jnp.float32)


def test_sampler_program():
    """sample's jitted program for the sample stage's settings (50 UniPC steps under lax.scan, guidance 5
    with a negative context) from the abstract 1.3B DiT: output latents [rows, 21, 60, 104, 16] float32."""
    c = parse("sample", f"--config.model.attention_impl={TRACE_ATTENTION}", "--config.mesh.devices=1")
    mesh = dit_setup.make_mesh(c.mesh)
    model = nnx.eval_shape(lambda: WanTransformer(dit_setup.transformer_config(c.model), rngs=nnx.Rngs(0)))
    s = c.sampler
    sampler = sample.LatentSampler(model, mesh, latent_shape=c.latents.shape, solver=s.solver, steps=s.steps,
                                   shift=s.shift, guidance_scale=s.guidance_scale, batch_size=s.batch_size)
    assert sampler.guided and len(sampler.schedule.timesteps) == 50 and sampler.rows == 1
    rows = sampler.rows
    program = functools.partial(sample._sample_program, graphdef=sampler.graphdef, schedule=sampler.schedule,
                                solver=s.solver, guidance_scale=sampler.guidance_scale,
                                sharding=parallel.batch_sharding(mesh))
    noise = jax.ShapeDtypeStruct((rows, *LATENTS), jnp.float32)
    ctx = jax.ShapeDtypeStruct((rows, *TEXT), jnp.float32)
    with jax.set_mesh(mesh):
        out = jax.eval_shape(program, abstract(sampler.state), noise, ctx, ctx)
    assert (out.shape, out.dtype) == ((rows, *LATENTS), jnp.float32)
    # the first sigma is 1 (pure noise) and the schedule is diffusers' shifted one
    assert np.isclose(float(sampler.schedule.sigmas[0]), 1.0)
