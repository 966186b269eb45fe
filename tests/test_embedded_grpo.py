"""The GRPO rows of the embedded benchmark (experiments/embedded_grpo.py) wired at the quick config's size:
entries, checks, the prerequisites they name, their run configs, one step of a row's config on a tiny base,
and their costs. (Not in configs/demo.py:quick's run_variants: the whole pipeline stays as fast as it was.)"""

import json
import os

import pytest
from flax import nnx

from configs import demo
from experiments import dit_setup, embedded_grpo, embedded_pipeline, embedded_validation, grpo
from experiments import embedded_evaluation as ev
from experiments import embedded_videoalign as va
from shelllcc.errors import ConfigError
from shelllcc.models import saving
from shelllcc.models.wan_transformer import WanTransformer
from tests.helpers import write_tiny_latent_cache

ROWS = ("grpo_shell", "grpo_reward_model", "dance_grpo_shell")


def quick_with_rows():
    c = demo.get_config("quick")
    c.run_variants = ("control",) + ROWS
    c.grpo.group_size, c.grpo.prompts_per_step, c.grpo.sampling_steps = 4, 1, 2   # dance: best 4 of 4
    return c


def fake_paths(tmp_path):
    paths = embedded_pipeline.Paths(str(tmp_path))
    os.makedirs(paths.vae)
    with open(os.path.join(paths.vae, "reconstruction.json"), "w") as f:
        json.dump({"latents_mean": [0.0] * 16, "latents_std": [1.0] * 16}, f)
    return paths


def test_rows_are_checked_and_configured(tmp_path):
    c = quick_with_rows()
    embedded_pipeline.check_config(c)
    assert set(va.steps_needed(c)) == {"pairs", "reward_model"}          # grpo_reward_model's reward model
    paths = fake_paths(tmp_path)
    shell = embedded_pipeline.variant_config(c, "grpo_shell", paths, 2)
    rm = embedded_pipeline.variant_config(c, "grpo_reward_model", paths, 2)
    dance = embedded_pipeline.variant_config(c, "dance_grpo_shell", paths, 2)
    assert (shell.experiment, shell.reward.source, shell.reward.kind) == ("grpo", "shell_lcc", "shell_norm")
    assert shell.reward.manifold == paths.manifold and shell.data.cache_dir == paths.train_cache
    assert shell.model.init_from == paths.base and shell.seed == 2 and shell.train.eval_every == c.validation.every
    assert rm.reward.source == "reward_model" and rm.reward.reward_model == va.reward_model_dir(paths)
    s = grpo.settings(dance)
    assert (s.kind, s.use_kl, s.keep, s.fraction) == ("dance_grpo", False, 4, 0.6)
    assert shell.optim.learning_rate == c.reward.optim.learning_rate and shell.train.steps == c.reward.train.steps
    rec = embedded_pipeline.variant_record(c, "grpo_reward_model", 0, {"base": "b", "cache": "c", "manifold": "m",
                                                                       "dataset": "d", "vae": "v",
                                                                       "text_encoder": "t", "classifier": "k"})
    assert "videoalign reward_model" in rec["inputs"]


@pytest.mark.parametrize("option,key", [("grpo.mode=ppo", "grpo.mode"), ("grpo.best_of_n=3", "grpo.best_of_n")])
def test_a_bad_row_names_its_entry_and_key(option, key):
    c = quick_with_rows()
    c.variants.grpo_shell.options = option
    with pytest.raises(ConfigError, match=rf"config.variants.grpo_shell .*{key}"):
        embedded_pipeline.check_config(c)
    c = quick_with_rows()
    c.variants.grpo_shell.reward = "shell_band"
    with pytest.raises(ConfigError, match="config.variants.grpo_shell.reward"):
        embedded_pipeline.check_config(c)


def test_a_row_config_runs_on_a_tiny_base_with_validation(tmp_path):
    """grpo_shell's config (quick-sized model, random manifold) for two steps with the validation hook."""
    c = quick_with_rows()
    row = embedded_pipeline.variant_config(c, "grpo_shell", None, 0)
    base = str(tmp_path / "base")
    saving.save_model(base, WanTransformer(dit_setup.transformer_config(row.model), rngs=nnx.Rngs(0)))
    row.model.init_from = base
    row.data.cache_dir = write_tiny_latent_cache(str(tmp_path / "cache"), n=8, size=32)
    row.reward.manifold = "random"
    row.train.steps, row.train.eval_every, row.train.log_every = 2, 1, 1
    row.train.async_checkpoints, row.mesh.devices = False, 4
    seen = []
    out = str(tmp_path / "run")
    os.makedirs(out)
    grpo.run(row, out, on_eval=lambda step, model: seen.append(step))
    assert seen == [1, 2]
    logged = [json.loads(x) for x in open(os.path.join(out, "metrics.jsonl")) if '"loss"' in x]
    assert logged[0]["kl"] == 0.0 and logged[-1]["samples_drawn"] == 8.0
    assert os.path.isdir(os.path.join(out, "model"))


def test_costs_count_samples_and_time(tmp_path):
    c = quick_with_rows()
    paths = fake_paths(tmp_path)
    for seed, (pick, run_s) in enumerate(((2, 10.0), (4, 20.0))):
        d = paths.variant("grpo_shell", seed)
        os.makedirs(d)
        with open(os.path.join(d, embedded_validation.PICK_JSON), "w") as f:
            json.dump({"step": pick}, f)
        with open(os.path.join(d, va.TIMING_JSON), "w") as f:
            json.dump({"run_s": run_s, "train_seconds_per_step": 0.5}, f)
    got = embedded_grpo.costs(c, paths, "grpo_shell", (0, 1))
    assert got == {"samples_per_step": 4, "samples_drawn": 4 * c.reward.train.steps, "samples_at_pick": 12.0,
                   "run_s": 15.0}
    row = ev.costs(c, paths, ["grpo_shell"], (0, 1))["grpo_shell"]
    assert row["method"] == "grpo" and row["samples_drawn"] == 4 * c.reward.train.steps and row["labels"] == 0
    assert "samples drawn" in ev.cost_table({"grpo_shell": row})
