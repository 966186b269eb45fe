"""The README's main job: the embedded benchmark end to end (experiment ``embedded_pipeline``).

Default (no argument): the VAE, text encoder and base DiT shipped in ``configs/pretrained/demo`` (made by
``:pretrain`` on one GPU; checksums verified), then on this machine: the dataset, latent caches, the
attribute classifier, the Shell-LCC manifold, every variant's fine-tuning with validation every few
steps and the checkpoint rule, test sampling and the evaluation with 95% intervals. At most 15 minutes
on two CPU cores (``benchmarks/demo_timing.py``).

Args (``--config=configs/demo.py:ARG``):

* ``quick``: a miniature of every stage, models trained here (minutes on two CPU cores, mostly compilation;
  the pipeline test), with one row of each method: the control, two Shell-LCC rows, Flow-DPO, Flow-RWR and
  Flow-NRG guidance from a reward model trained on a handful of preference pairs. Its numbers mean nothing.
* ``videoalign``: the default protocol (shipped models) with VideoAlign's rows beside the Shell-LCC ones:
  ``control``, ``flow_dpo``, ``flow_dpo_t``, ``flow_rwr``, ``nrg_reward_model``, ``nrg_shell``, ``shell_norm``,
  ``shell_band``, ``shell``; their prerequisites sized for two CPU cores (150 preference prompts, a
  reward model of the base's first 2 blocks trained 150 steps, 48 train prompts x 4 samples scored).
  Measured on two CPU cores shared with other work (load 7-14): the prerequisites 15 minutes, a trained row
  3-5 minutes, six rows about 55 minutes in all (``benchmarks/RESULTS.md``); expect less on an idle machine.
* ``judges``: the default protocol with issue 18's rows beside Flow-DPO, ``shell`` and the control:
  ``gtsvj_reward`` (one-step fine-tuning against GT-SVJ's energy judge), ``gtsvj_dpo`` (Flow-DPO on pairs the
  judge ranked), ``nrg_energy_judge`` (the base guided by the judge), ``gran_dpo_patch`` / ``gran_dpo_shell``
  (Gran-DPO, ours from HALO's abstract, with the learned patch reward model / the Shell-LCC per-patch
  distance); ``videoalign``'s prerequisites plus the energy judge, the patch reward model and the judges
  table (the BTT reward model, the energy judge and the Shell-LCC distances on the preference test pairs).
* ``rl``: issue 19's rows beside ``shell`` and the control: ``pisces`` (PISCES by backpropagation, on a
  text-video space, matcher and OT map trained here without labels), ``grpo_shell``, ``grpo_reward_model``
  and ``dance_grpo_shell`` (online RL with 2 prompts x 8 samples per step); sized for two CPU cores: the
  GRPO rows run 30 steps (validation every 10), the embedding models 300 steps each, the OT map 300.
* ``pretrain``: the recipe of the shipped models (a GPU job): 16384 training clips, the VAE, the text
  encoder and the base DiT (width 256, 5 blocks, 27000 steps at batch 256) trained here, the base checked on
  the validation prompts, then all three packed into ``pretrained.export_to``. Stops after the classifier.
* ``from_scratch``: ``pretrain``'s training of every model, then the whole protocol (a GPU job).
* ``long``: a larger benchmark on one GPU: 17 frames, a wider and deeper base trained here, three seeds,
  more validation and test prompts, longer fine-tuning.
* ``authors``: the default protocol with the Shell-LCC authors' own choices where the project departs
  from them (``../shared/AUTHORS_RECIPE.md``): bf16 weights and optimizer state, their manifold optimiser
  and anchor init, checkpoints every 5 steps, their variants only.
"""

from experiments import embedded_pipeline

ARGS = ("quick", "pretrain", "from_scratch", "long", "authors", "videoalign", "judges", "rl")


def _dit(c, dim, layers, heads, ffn):
    m = c.base.model          # the fine-tuning and sampling runs take the base's architecture
    m.dim, m.num_layers, m.num_heads, m.ffn_dim = dim, layers, heads, ffn


def _train_everything(c):
    """The GPU recipe of the VAE and the base (what ``pretrain`` ran to make the shipped models: the VAE and the
    text encoder at 8192 clips, 2026-12-01; the base with those installed, at this recipe, 2026-12-02; the
    MANIFEST holds each command)."""
    c.pretrained.dir = ""
    c.benchmark.train_size = 16384
    c.vae.train.steps, c.vae.data.batch_size, c.vae.train.log_every = 6000, 64, 500
    c.vae.train.checkpoint_every = 3000
    c.cache.batch_size, c.cache.shard_size = 64, 1024
    c.base.train.steps, c.base.data.batch_size, c.base.train.log_every = 27000, 256, 500
    c.base.train.checkpoint_every = 5000
    c.base.optim.learning_rate, c.base.optim.warmup_steps = 1e-3, 500
    c.base.flow.region_weight = 4.0
    c.base.data.in_memory, c.base.data.prefetch = True, 8
    c.classifier.steps = 500


def _videoalign_prerequisites(c):
    """The preference pairs, reward model and scored samples sized for two CPU cores (shared by the presets
    that compare other methods with Shell-LCC, so their prerequisites are built once in a workdir)."""
    v = c.videoalign
    v.preferences.num_prompts = 150
    v.reward_model.steps, v.reward_model.batch_size, v.reward_model.log_every = 150, 16, 25
    v.score.prompts, v.score.clips_per_prompt = 48, 4


def get_config(arg: str | None = None):
    c = embedded_pipeline.default_config()
    if arg == "quick":
        c.pretrained.dir = ""
        c.compile_cache_min_seconds = 0.1      # its programs compile in well under a second each
        c.benchmark.train_size, c.benchmark.validation_size, c.benchmark.test_size = 64, 8, 16
        c.vae.train.steps, c.vae.data.batch_size, c.vae.data.stats_clips, c.vae.data.eval_clips = 4, 8, 16, 8
        c.vae.model.width, c.vae.model.conv_width, c.vae.model.depth = 32, 8, 1
        c.text_encoder.dim, c.text_encoder.num_layers = 32, 1
        _dit(c, 256, 1, 4, 64)      # width 256: a full-rank head for its 4 x 4 x 16-value tokens
        c.base.model.text_dim, c.base.model.freq_dim = 32, 16
        c.base.train.steps, c.base.data.batch_size = 4, 8
        c.classifier.steps, c.classifier.batch_size = 4, 8
        c.manifold.manifold.num_anchors, c.manifold.manifold.hidden_dim = 8, 16
        c.manifold.stage1.steps, c.manifold.stage2.steps = 4, 4
        c.manifold.stage1.batch_size = c.manifold.stage2.batch_size = 256
        c.manifold.manifold.init_patches = 1024
        c.reward.train.steps, c.reward.data.batch_size = 4, 8
        c.reward.train.log_every = 2
        c.run_variants = ("control", "shell_norm", "shell_band", "flow_dpo", "flow_rwr", "nrg_reward_model")
        c.variants.shell_band.tau = "shell_norm@2"
        c.variants.flow_dpo.options = "train.log_every=1"     # its first step's loss (log 2) in the log
        v = c.videoalign
        v.preferences.num_prompts, v.preferences.pairs_per_prompt, v.preferences.degraded_per_prompt = 12, 2, 2
        v.preferences.batch_size, v.preferences.shard_size = 8, 64
        v.reward_model.steps, v.reward_model.batch_size, v.reward_model.num_blocks = 2, 4, 1
        v.reward_model.log_every, v.reward_model.eval_timesteps, v.reward_model.eval_n_boot = 1, (0.0,), 100
        v.score.prompts, v.score.clips_per_prompt, v.score.batch_size = 4, 2, 8
        v.guidance.reward_model_weight = 5.0
        c.validation.prompts, c.validation.every = 4, 2
        c.sample.sampler.steps, c.sample.sampler.batch_size = 2, 8
        c.evaluate.num_prompts, c.evaluate.montage_prompts, c.evaluate.comparison_prompts = 8, 2, 2
        c.evaluate.n_boot = 200
        for section in (c.vae.train, c.base.train):
            section.log_every, section.checkpoint_every = 2, 1000
        c.manifold.log_every = 2
    elif arg == "pretrain":
        _train_everything(c)
        c.stop_after = "classifier"
        c.pretrained.export_to = "pretrained"      # relative to the workdir
    elif arg == "from_scratch":
        _train_everything(c)
    elif arg == "long":
        _train_everything(c)
        c.benchmark.num_frames, c.benchmark.validation_size, c.benchmark.test_size = 17, 64, 128
        _dit(c, 384, 8, 6, 1536)
        c.base.train.steps, c.base.data.batch_size = 8000, 64
        c.seeds = (0, 1, 2)
        c.run_variants = ("control", "lcc", "shell_norm", "shell_band", "shell", "shell_band_data", "shell_sft",
                          "shell_drift")
        c.variants.shell_band_data.options = "train.steps=400; train.eval_every=20"
        # width 384: between lr x sqrt(1536/384) and muP's lr x 1536/384 from the authors' 1e-5 at 1536
        c.reward.optim.learning_rate = 3e-5
        c.reward.train.steps = 200
        c.validation.prompts, c.validation.every = 48, 10
        c.evaluate.num_prompts = 128
        c.sample.sampler.batch_size = 64
    elif arg == "authors":
        # ../shared/AUTHORS_RECIPE.md: their choices where the project's defaults depart from them
        for m in (c.reward.model,):
            m.param_dtype, m.dtype = "bfloat16", "bfloat16"   # bf16 weights and Adam state, no float32 master
        c.reward.optim.weight_decay = 0.01
        c.manifold.manifold.anchor_init = "random"
        c.manifold.stage1.locality = 1.0
        for s in (c.manifold.stage1, c.manifold.stage2):
            s.learning_rate, s.warmup_steps, s.grad_clip = 1e-3, 0, 0.0
        c.run_variants = ("control", "lcc", "shell_norm", "shell_band", "shell")
        c.validation.every = 5                     # they checkpoint every 5-10 steps
    elif arg == "videoalign":
        # issue 17 section 3: VideoAlign's rows next to the Shell-LCC rows, same base, evaluation and intervals
        c.run_variants = ("control", "flow_dpo", "flow_dpo_t", "flow_rwr", "nrg_reward_model", "nrg_shell",
                          "shell_norm", "shell_band", "shell")
        _videoalign_prerequisites(c)
    elif arg == "judges":
        # issue 18 section 3: GT-SVJ's and HALO's rows on the same base, evaluation and intervals
        c.run_variants = ("control", "flow_dpo", "gtsvj_reward", "gtsvj_dpo", "nrg_energy_judge", "gran_dpo_patch",
                          "gran_dpo_shell", "shell")
        _videoalign_prerequisites(c)
    elif arg == "rl":
        # issue 19 section 4: PISCES and the GRPO rows on the same base, evaluation and intervals
        c.run_variants = ("control", "pisces", "grpo_shell", "grpo_reward_model", "dance_grpo_shell", "shell")
        _videoalign_prerequisites(c)
        c.grpo.prompts_per_step = 2                  # 16 rollouts of 10 SDE steps per update on two CPU cores
        for name in ("grpo_shell", "grpo_reward_model", "dance_grpo_shell"):
            e = c.variants[name]
            e.options = "; ".join(o for o in (e.options, "train.steps=30") if o)
        e = c.videoalign.embeddings
        e.dual_steps, e.matcher_steps, e.ot_map.outer_steps = 300, 300, 300
    elif arg:
        raise ValueError(f"unknown demo config arg {arg!r}; expected nothing or one of {ARGS}")
    return c
