"""Validation during reward fine-tuning on the embedded benchmark: the trajectory and the picked checkpoint.

Every ``validation.every`` steps of a variant's run (the hook of ``dit_setup.run_training``), the model
samples a fixed set of validation prompts (the first ``validation.prompts`` clips of the benchmark's
``validation`` split: no clip of the train or test split) from fixed noise, the clips are decoded and
scored like the test clips (:func:`experiments.embedded_evaluation.score_clips`), and one row goes into
the run's ``trajectory.jsonl``::

    {"step", "laplacian_ratio", "hf_ratio", "spectrum_distance", "attribute_accuracy", "acc_<attribute>",
     "lcc", "shell_norm", "shell", "seconds"}

Ratios are against the base model on the same validation prompts and noise (its row is step 0). After
the run, :func:`shelllcc.evaluation.checkpoint_rule.pick_checkpoint` picks one evaluated step from the
rows alone, and its weights are exported to ``picked/`` (``pick.json`` says which and why). The weights
of every evaluated step stay in host memory until then (a few MB each at this scale), so the rule may
look back at any of them. An interrupted run restarts from its first step (its runs take a minute).

Timing (the rows' cost, :meth:`Trajectory.timing`): the wall time between the end of one validation and the
start of the next, over the training steps in between: the seconds per training step without the
compilation (before the first validation) and without the validations themselves. A guidance row (no
training) has one validation row of the base sampled with its guidance (:meth:`Trajectory.export_fixed`)
and :meth:`Evaluator.timed_sampling` of its sampler and of the base's.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import nnx

from experiments import embedded_evaluation as ev
from experiments import embedded_workdir as workdir
from experiments import sample as sample_lib
from shelllcc.evaluation import checkpoint_rule
from shelllcc.models import saving
from shelllcc.training import lora as lora_lib

TRAJECTORY, PICK_JSON, PICKED_DIR = workdir.TRAJECTORY, workdir.PICK_JSON, workdir.PICKED_DIR
read_trajectory = workdir.read_trajectory


def default_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        prompts=24,                  # validation prompts sampled at every evaluation
        every=10,                    # fine-tuning steps between evaluations
        # the checkpoint rule, fixed before any run (shelllcc.evaluation.checkpoint_rule)
        rule="peak",                 # peak | last | final
        score="laplacian_ratio",     # what 'peak' maximises within the window
        max_accuracy_drop=0.05,      # collapse: validation accuracy this far below the base's ...
        patience=2,                  # ... at this many consecutive evaluations
    ))


def check_config(v: ml_collections.ConfigDict) -> None:
    if v.rule not in checkpoint_rule.RULES:
        raise ValueError(f"validation.rule={v.rule!r}; expected one of {checkpoint_rule.RULES}")
    if v.prompts < 2 or v.every < 1 or v.patience < 1:
        raise ValueError(f"validation needs prompts >= 2, every >= 1, patience >= 1; got prompts={v.prompts}, "
                         f"every={v.every}, patience={v.patience}")
    if not 0 <= v.max_accuracy_drop < 1:
        raise ValueError(f"validation.max_accuracy_drop must be in [0, 1), got {v.max_accuracy_drop}")


class Evaluator:
    """Samples ``prompts`` with fixed noise from a model and scores the clips: ``evaluate(model) -> row``.

    Built once per pipeline run and seed; the sampler's compiled program is shared by every variant (the
    weights are an argument of it). ``reference``: the base model's scores, set by :meth:`set_reference`.
    """

    def __init__(self, *, base_model: nnx.Module, mesh, contexts: np.ndarray, labels: dict[str, np.ndarray],
                 real_videos: np.ndarray, latent_shape, sampler_cfg, seed: int, decoder, classifier, manifold,
                 reward_guidance=None):
        self.contexts = np.asarray(contexts, np.float32)
        self.labels = labels
        self.n = len(self.contexts)
        self.sampler = sample_lib.LatentSampler(
            base_model, mesh, latent_shape=latent_shape, solver=sampler_cfg.solver, steps=sampler_cfg.steps,
            shift=sampler_cfg.shift, guidance_scale=sampler_cfg.guidance_scale, batch_size=self.n, seed=seed,
            reward_guidance=reward_guidance, guidance_interval=sampler_cfg.get("guidance_interval", ()))
        self.negative = np.zeros(self.contexts.shape[1:], np.float32)
        self.decoder, self.classifier, self.manifold = decoder, classifier, manifold
        self.real_spectrum = ev.mean_spectrum(real_videos)
        self.reference: dict[str, Any] | None = None

    def sample(self, model: nnx.Module) -> tuple[np.ndarray, np.ndarray]:
        """``(latents [n, ...] float32, videos uint8 [n, T, H, W, 3])`` of ``model`` on the prompts."""
        _, state = nnx.split(_plain(model))
        self.sampler.state = state
        lat = self.sampler.sample(list(range(self.n)), self.contexts, self.negative)
        videos, _ = self.decoder.decode(lat)
        return sample_lib._to_host(lat)[: self.n].astype(np.float32), videos[: self.n]

    def timed_sampling(self, model: nnx.Module) -> float:
        """Seconds per clip of sampling the prompts (latents only, on the host), once more after a first call
        has compiled the program: the sampler's steady cost."""
        _, state = nnx.split(model)
        self.sampler.state = state
        jax.block_until_ready(self.sampler.sample(list(range(self.n)), self.contexts, self.negative))
        t0 = time.perf_counter()
        jax.block_until_ready(self.sampler.sample(list(range(self.n)), self.contexts, self.negative))
        return (time.perf_counter() - t0) / self.n

    def scores(self, model: nnx.Module) -> dict[str, Any]:
        lat, videos = self.sample(model)
        s = ev.score_clips(videos, self.labels, self.classifier)
        s["latents"] = lat
        return s

    def set_reference(self, base_model: nnx.Module) -> dict[str, Any]:
        t0 = time.time()
        self.reference = self.scores(base_model)
        row = self.row(0, self.reference, time.time() - t0)
        return row

    def row(self, step: int, s: dict[str, Any], seconds: float) -> dict[str, Any]:
        ref = self.reference
        row = {"step": int(step),
               "laplacian_ratio": float(np.mean(s["laplacian_variance"]) / np.mean(ref["laplacian_variance"])),
               "hf_ratio": float(np.mean(s["hf_energy"]) / np.mean(ref["hf_energy"])),
               "spectrum_distance": ev.spectrum_distance_of(s["spectra"], self.real_spectrum),
               "attribute_accuracy": float(np.mean([np.mean(c) for c in s["correct"].values()]))}
        row.update({f"acc_{a}": float(np.mean(c)) for a, c in s["correct"].items()})
        if self.manifold is not None:
            params, mcfg, target = self.manifold
            d = ev.manifold_distances(params, mcfg, s["latents"], ("lcc", "shell_norm", "shell"), target)
            row.update({k: float(np.mean(v)) for k, v in d.items()})
        row["seconds"] = round(seconds, 2)
        return row

    def evaluate(self, step: int, model: nnx.Module) -> dict[str, Any]:
        if self.reference is None:
            raise RuntimeError("Evaluator.set_reference(base model) must run before evaluate")
        t0 = time.time()
        return self.row(step, self.scores(model), time.time() - t0)


class Trajectory:
    """The validation rows of one run and the weights of every evaluated step, until the pick."""

    def __init__(self, run_dir: str, evaluator: Evaluator, base_row: dict, v: ml_collections.ConfigDict):
        self.run_dir, self.evaluator, self.v = run_dir, evaluator, v
        self.rows: list[dict] = [dict(base_row)]
        self.weights: dict[int, Any] = {}
        self._mark: tuple[int, float] | None = None      # (step, end time) of the last validation
        self._train_s, self._train_steps = 0.0, 0
        self._write()

    def _write(self) -> None:
        with open(os.path.join(self.run_dir, TRAJECTORY), "w") as f:
            for r in self.rows:
                f.write(json.dumps(r) + "\n")

    def __call__(self, step: int, model: nnx.Module) -> None:
        now = time.perf_counter()
        if self._mark is not None and step > self._mark[0]:
            self._train_s += now - self._mark[1]
            self._train_steps += step - self._mark[0]
        model = _plain(model)
        row = self.evaluator.evaluate(step, model)
        self.rows.append(row)
        self.weights[step] = jax.tree.map(np.asarray, nnx.state(model, nnx.Param).to_pure_dict())
        self._write()
        self._mark = (step, time.perf_counter())
        print(f"  validation at step {step}: Laplacian ratio {row['laplacian_ratio']:.3f}, hf ratio "
              f"{row['hf_ratio']:.3f}, spectrum distance {row['spectrum_distance']:.3f}, attribute accuracy "
              f"{row['attribute_accuracy']:.3f} (base {self.rows[0]['attribute_accuracy']:.3f}) [{row['seconds']:.1f}s]",
              flush=True)

    def timing(self) -> dict[str, Any]:
        """Seconds per training step between validations (module doc; absent with fewer than two validations),
        the steps so timed and the validations' seconds."""
        out = {"steps_timed": self._train_steps,
               "validation_s": round(float(sum(r.get("seconds", 0.0) for r in self.rows[1:])), 2)}
        if self._train_steps:
            out["train_seconds_per_step"] = self._train_s / self._train_steps
        return out

    def export_fixed(self, step: int, reason: str) -> dict[str, Any]:
        """``pick.json`` naming ``step`` without a rule (a row with nothing to pick: guidance); no weights."""
        row = next(r for r in self.rows[1:] if r["step"] == step)
        choice = {"step": int(step), "collapse_step": None, "rule": "none", "reason": reason, "validation": row}
        with open(os.path.join(self.run_dir, PICK_JSON), "w") as f:
            json.dump(choice, f, indent=1)
        return choice

    def pick(self) -> dict[str, Any]:
        v = self.v
        return checkpoint_rule.pick_checkpoint(self.rows[1:], rule=v.rule, base_accuracy=self.rows[0]["attribute_accuracy"],
                                               max_accuracy_drop=v.max_accuracy_drop, patience=v.patience,
                                               score=v.score)

    def export(self, model: nnx.Module) -> dict[str, Any]:
        """Write the picked step's weights (into ``model``'s structure) to ``picked/`` and ``pick.json``."""
        choice = self.pick()
        nnx.update(model, _as_state(model, self.weights[choice["step"]]))
        saving.save_model(os.path.join(self.run_dir, PICKED_DIR), model, extra={"picked": choice})
        row = next(r for r in self.rows if r["step"] == choice["step"])
        choice = {**choice, "validation": row}
        with open(os.path.join(self.run_dir, PICK_JSON), "w") as f:
            json.dump(choice, f, indent=1)
        return choice


def _plain(model: nnx.Module) -> nnx.Module:
    """``model`` in the base's structure: a LoRA row's adapters folded into a copy's kernels (the validation
    sampler runs the base's graph, and the picked weights are exported as a plain model)."""
    if any(isinstance(v, lora_lib.LoRAParam) for _, v in nnx.iter_graph(model)):
        return lora_lib.merge_lora(nnx.clone(model))
    return model


def _as_state(model: nnx.Module, pure: dict) -> nnx.State:
    state = nnx.state(model, nnx.Param)
    state.replace_by_pure_dict(jax.tree.map(jax.numpy.asarray, pure))
    return state


__all__ = ["default_config", "check_config", "Evaluator", "Trajectory", "read_trajectory", "TRAJECTORY", "PICK_JSON",
           "PICKED_DIR"]
