"""Run an experiment from a config file.

    python -m experiments.main --config=configs/demo.py --workdir=/tmp/demo
    python -m experiments.main --config=configs/demo.py:quick --config.reward.train.steps=8 --workdir=/tmp/d
    python -m experiments.main --config=configs/wan21_reward.py:1.3b-lora --config.data.cache_dir=... \
        --config.reward.manifold=... --workdir=...

``config.experiment`` names the module in ``experiments/`` that runs it. Configs are locked: a
misspelt ``--config.*`` key is an error, not a silently ignored setting. A run that starts writes its
config to ``WORKDIR/config.json`` and to ``WORKDIR/config_history/`` (one file per run, with how it ended);
a run refused for a user error leaves ``config.json`` as it was.

Ablations: a config with an ``ablation`` section (``ablation.base``, a config of any experiment, and
``ablation.variants``, a tuple of ``(name, {dotted.key: value})``) runs every variant one after another
in ``WORKDIR/<name>``, skipping variants that already finished (``WORKDIR/<name>/DONE``, which records a
hash of the variant's config: one that finished with another config is refused, naming the change).
SIGTERM stops the whole ablation after the running variant saved its checkpoint (exit code 143).

One run at a time in a workdir: a run holds ``WORKDIR/.lock`` (host, pid); a second one is refused with
exit code 2, and a lock left by a run that died (same host, pid gone) is taken over with a note.

Exit codes: 0 done; 2 a user error (a config value or flag, an input file, a refused resume), printed as
one line ``error: ...`` naming the key, file or shape; 3 a run that failed without saving its result
(diverged, most steps non-finite); 143 preempted (SIGTERM, checkpoint saved); 1 anything else (a bug:
traceback). ``--debug`` or ``SHELLLCC_DEBUG=1`` shows the traceback of user errors too.
"""

from __future__ import annotations

import copy
import importlib
import os
import re
import sys
import traceback

from absl import app, flags, logging
from ml_collections import config_flags

from experiments.config_checks import check_config
from experiments.overrides import apply_overrides
from shelllcc.errors import UserError

EXPERIMENTS = ("fit_manifold", "train_vae", "encode_cache", "sft", "reward_finetune", "sample", "embedded_pipeline",
               "score_samples", "flow_dpo", "flow_rwr", "train_reward_model", "train_energy_judge",
               "train_patch_reward", "train_embeddings", "grpo", "train_ot_map")
DONE_FILE = "DONE"

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file, e.g. configs/demo.py[:arg].",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and outputs.")
_DISTRIBUTED = flags.DEFINE_enum("distributed", "auto", ["auto", "on", "off"],
                                 "jax.distributed.initialize(): auto = when the environment describes several "
                                 "processes (JAX_COORDINATOR_ADDRESS, Slurm, Open MPI, multi-host TPU).")
_DEBUG = flags.DEFINE_bool("debug", False, "Show the Python traceback of user errors (also: SHELLLCC_DEBUG=1).")
flags.mark_flags_as_required(["config", "workdir"])

USER_ERROR_EXIT = 2

# JAX and the library are imported inside the functions below, not here: fast_cpu_compile must set
# XLA_FLAGS before JAX starts a backend, and a refused command line exits without paying for the imports.


def _debug(argv=None) -> bool:
    if os.environ.get("SHELLLCC_DEBUG", "") not in ("", "0"):
        return True
    if argv is not None:        # before the flags are parsed
        return any(a in ("--debug", "-debug", "--debug=true", "--debug=1") for a in argv)
    return flags.FLAGS.is_parsed() and _DEBUG.value


def _fail(message: str, exit_code: int, argv=None):
    """Print ``error: <message>`` as one line (the traceback first with --debug) and exit."""
    if _debug(argv):
        traceback.print_exc()
    print("error: " + " ".join(message.split()), file=sys.stderr, flush=True)
    sys.exit(exit_code)


def _one_line_flag_error(e: Exception) -> str:
    # a config file that raised comes back as a flag error whose text holds the whole traceback; its
    # last line (the exception) is what the user acts on
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    if any(ln.startswith("Traceback") for ln in lines):
        return f"{lines[0]} {lines[-1]}"
    return " ".join(lines)


def parse_flags(argv):
    """absl's flag parsing with its errors (bad value, unknown or misspelt ``--config.*`` key, a config file
    that raised) as one ``error:`` line and exit code 2, instead of a traceback or ``FATAL`` and exit 1."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        _fail(_one_line_flag_error(e), USER_ERROR_EXIT, argv)
    except (AttributeError, KeyError) as e:
        # ml_collections' answer to --config.<key that does not exist>: the key and a did-you-mean
        text = str(e).replace("\\", "")
        found = re.search(r"'(\w+)", text)
        key = found.group(1) if found else text
        named = [a.split("=")[0] for a in argv if a.startswith("--config.") and key in a.split("=")[0].split(".")]
        suggestion = re.search(r'Did you mean "\w+" instead of "\w+"\?', text)
        hint = suggestion.group(0) if suggestion else ""
        _fail(f"{named[0] if named else key}: no such config key. {hint}".strip(), USER_ERROR_EXIT, argv)


def expand_variants(config) -> list[tuple[str, object]]:
    """``[(name, config)]``: the ablation's variants, each the base config with its overrides applied
    (every key must exist: a misspelt one is an error naming the variant), or ``[("", config)]``."""
    if "ablation" not in config:
        return [("", config)]
    out, seen = [], set()
    for name, overrides in config.ablation.variants:
        if not name or "/" in name or name in seen:
            raise ValueError(f"ablation variant names must be unique, non-empty and without '/': {name!r}")
        seen.add(name)
        variant = copy.deepcopy(config.ablation.base)
        apply_overrides(variant, dict(overrides), f"ablation variant {name!r}")
        out.append((name, variant))
    return out


# XLA:CPU spends most of a small model's compile in LLVM's optimisation passes; these two flags halve the
# compile time of the embedded benchmark's training steps at the same step time (measured on 2 cores)
FAST_CPU_COMPILE = "--xla_backend_optimization_level=1 --xla_llvm_disable_expensive_passes=true"


def apply_cpu_compile_flags(config) -> None:
    """With ``config.fast_cpu_compile`` (where the config has it), add :data:`FAST_CPU_COMPILE` to
    ``XLA_FLAGS``; it must happen before JAX starts its CPU backend, which is why it lives here."""
    if not config.get("fast_cpu_compile", False):
        return
    import importlib.util
    cpu_only = os.environ.get("JAX_PLATFORMS", "").strip().lower() == "cpu"
    if not cpu_only and any(importlib.util.find_spec(m) is not None for m in (
            "jax_plugins", "jax_cuda12_plugin", "jax_cuda13_plugin", "libtpu")):
        return          # an accelerator's plugin is installed: its compiler keeps its defaults
    if "xla_backend_optimization_level" in os.environ.get("XLA_FLAGS", ""):
        return          # compile flags chosen by the caller (e.g. the test suite's) stay
    from jax._src import xla_bridge
    if xla_bridge.backends_are_initialized():
        print("note: fast_cpu_compile is set but JAX's backends are already running; XLA_FLAGS unchanged", flush=True)
        return
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + FAST_CPU_COMPILE).strip()


CONFIG_JSON = "config.json"
CONFIG_HISTORY = "config_history"


class ConfigRecord:
    """``config.json`` (the config of the workdir's latest run) and ``config_history/<UTC time>-<pid>.json``
    (every run's config and how it ended). A run refused as a user error made nothing under this config,
    so ``config.json`` goes back to what it was; its history entry stays, marked refused."""

    def __init__(self, config, workdir: str):
        import datetime
        import json
        self._json = json
        self.path = os.path.join(workdir, CONFIG_JSON)
        self.previous = open(self.path).read() if os.path.exists(self.path) else None
        now = datetime.datetime.now(datetime.timezone.utc)
        os.makedirs(os.path.join(workdir, CONFIG_HISTORY), exist_ok=True)
        self.history = os.path.join(workdir, CONFIG_HISTORY, f"{now.strftime('%Y%m%dT%H%M%S.%fZ')}-{os.getpid()}.json")
        self.entry = {"started": now.isoformat(timespec="seconds"), "command": " ".join(sys.argv),
                      "outcome": "running", "config": json.loads(config.to_json_best_effort())}
        self._write(self.history, json.dumps(self.entry, indent=1))
        self._write(self.path, config.to_json_best_effort(indent=2))

    @staticmethod
    def _write(path: str, text: str) -> None:
        with open(path + ".tmp", "w") as f:
            f.write(text)
        os.replace(path + ".tmp", path)

    def finish(self, outcome: str, refused: bool = False) -> None:
        self.entry["outcome"] = outcome
        self._write(self.history, self._json.dumps(self.entry, indent=1))
        if refused:
            if self.previous is None:
                os.remove(self.path)
            else:
                self._write(self.path, self.previous)


def run_one(config, workdir: str) -> None:
    if config.experiment not in EXPERIMENTS:
        raise app.UsageError(f"config.experiment={config.experiment!r} is not one of {EXPERIMENTS}")
    module = importlib.import_module(f"experiments.{config.experiment}")
    if hasattr(module, "check_config"):      # the experiment's own checks: a refused config records nothing
        module.check_config(config)
    os.makedirs(workdir, exist_ok=True)
    import jax

    from shelllcc.errors import UserError
    from shelllcc.training.checkpoints import Preempted
    record = ConfigRecord(config, workdir) if jax.process_index() == 0 else None
    try:
        module.run(config, workdir)
    except (UserError, ValueError, FileNotFoundError) as e:
        if record:
            record.finish("refused: " + " ".join(str(e).split()), refused=True)
        raise
    except Preempted:
        if record:
            record.finish("preempted")
        raise
    except BaseException as e:
        if record:
            record.finish(f"failed: {type(e).__name__}")
        raise
    if record:
        record.finish("finished")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # orbax logs every file it writes at INFO
    config = _CONFIG.value
    try:
        config.get("experiment")
    except OSError as e:
        # config_flags defers a missing or unreadable config file to the first use of the config
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        _fail(f"--config: {lines[-1]}", USER_ERROR_EXIT)
    apply_cpu_compile_flags(config)
    from shelllcc.training import distributed
    distributed.maybe_initialize(_DISTRIBUTED.value)
    from shelllcc.errors import TrainingFailed, UserError
    from shelllcc.training.checkpoints import Preempted

    try:
        run_variants(config, os.path.abspath(_WORKDIR.value))
    except Preempted as e:
        print(f"preempted: {e}", flush=True)
        sys.exit(Preempted.exit_code)
    except TrainingFailed as e:
        _fail(str(e), TrainingFailed.exit_code)
    # ValueError / FileNotFoundError: what the experiments' own checks of config values and input files
    # raise (their messages name the key or file); anything else is a bug and keeps its traceback
    except (UserError, ValueError, FileNotFoundError) as e:
        _fail(str(e), USER_ERROR_EXIT)


def run_variants(config, workdir: str) -> None:
    """Run the config, or each variant of an ablation in ``workdir/<name>`` (finished ones skipped)."""
    variants = expand_variants(config)
    # every variant before the first runs: a bad value in the last one must not cost the others' hours
    for name, variant in variants:
        check_config(variant, f"config (variant {name!r})" if name else "config")
    import jax

    from shelllcc.locks import DirectoryLock
    # one run at a time in a workdir (process 0 holds it for a multi-process run)
    lock = DirectoryLock(workdir, what="workdir") if jax.process_index() == 0 else None
    if lock:
        lock.acquire()
    try:
        _run_all(variants, workdir)
    finally:
        if lock:
            lock.release()


def _run_all(variants, workdir: str) -> None:
    from experiments import stage_markers
    for i, (name, variant) in enumerate(variants):
        vdir = os.path.join(workdir, name) if name else workdir
        done = os.path.join(vdir, DONE_FILE)
        rec = stage_markers.record({"config": variant}, {}) if name else None
        if name:
            old = stage_markers.read(done)
            if old is not None and old.get("hash") == rec["hash"]:
                print(f"=== variant {i + 1}/{len(variants)} {name}: already done, skipped", flush=True)
                continue
            if old is not None:
                # its folder holds a finished run of another config: resuming it would only re-export that run
                raise UserError(f"ablation variant {name!r} in {vdir} finished with another config "
                                f"({stage_markers.what_changed(old, rec)}); remove {vdir} to run it again")
            print(f"=== variant {i + 1}/{len(variants)} {name} -> {vdir}", flush=True)
        run_one(variant, vdir)
        if name:
            stage_markers.write(done, rec)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
