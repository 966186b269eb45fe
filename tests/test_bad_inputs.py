"""Bad inputs, as a careful user would try them, through ``python -m experiments.main``: each ends with exit
code 2 and one line ``error: ...`` naming the key, file or shape to change, and writes nothing a later run
would trust (no manifold, no checkpoint, no workdir at all when the config is refused before starting).

The command line runs in this process (``experiments.main``'s own flag parser and ``main``) so the table
costs milliseconds a row; ``test_the_real_command_line`` runs it as a subprocess once per kind of failure.
"""

import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
from absl import flags

from experiments import main as cli_main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICK = "--config=configs/synthetic_manifold.py:quick"
# a fit small enough to run in seconds: 8 + 4 steps, a checkpoint every 4
SMALL = [QUICK, "--config.stage1.steps=8", "--config.stage2.steps=4", "--config.checkpoint_every=4",
         "--config.log_every=4", "--config.stage1.batch_size=64", "--config.stage2.batch_size=64"]


def _reset_flags() -> None:
    flags.FLAGS.unparse_flags()
    # config_flags defines a flag per --config.<key> override it parses; a second parse would define it again
    for name in [n for n in flags.FLAGS if n.startswith("config.")]:
        delattr(flags.FLAGS, name)


def run_cli(argv: list[str], monkeypatch) -> int:
    """``python -m experiments.main ARGV`` in this process; its exit code."""
    monkeypatch.chdir(REPO)
    monkeypatch.setattr(sys, "argv", ["main", *argv])   # config_flags reads its overrides from sys.argv
    _reset_flags()
    try:
        cli_main.main(cli_main.parse_flags(["main", *argv]))
    except SystemExit as e:
        return e.code
    finally:
        _reset_flags()
    return 0


def assert_one_line_error(capsys, *names: str) -> str:
    err = capsys.readouterr().err.strip()
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for name in names:
        assert name in lines[0], (name, lines[0])
    return lines[0]


def assert_nothing_trusted(workdir) -> None:
    for name in ("manifold", "distances.json"):
        assert not os.path.exists(os.path.join(workdir, name)), name


# ------------------------------------------------------------------------------------------------ flags
# (case, argv after the workdir, what the line must name)
FLAG_ERRORS = [
    ("unknown config arg", ["--config=configs/synthetic_manifold.py:quik"], "'quik'"),
    ("missing config file", ["--config=configs/no_such_config.py"], "configs/no_such_config.py"),
    ("misspelt key", [QUICK, "--config.stage1.stepz=3"], "--config.stage1.stepz"),
    ("misspelt section", [QUICK, "--config.stage3.steps=3"], "stage3"),
    ("not a number", [QUICK, "--config.stage1.steps=abc"], "--config.stage1.steps=abc"),
    ("float for an int", [QUICK, "--config.log_every=2.5"], "--config.log_every=2.5"),
    ("unknown distributed mode", [QUICK, "--distributed=maybe"], "--distributed"),
]


@pytest.mark.parametrize("case,argv,name", FLAG_ERRORS, ids=[c[0] for c in FLAG_ERRORS])
def test_flag_errors(case, argv, name, tmp_path, monkeypatch, capsys):
    workdir = tmp_path / "w"
    assert run_cli([*argv, f"--workdir={workdir}"], monkeypatch) == 2
    assert_one_line_error(capsys, name)
    assert not workdir.exists()


def test_the_real_command_line(tmp_path):
    """As a subprocess: an experiment's own check gives exit 2 and one stderr line; SHELLLCC_DEBUG=1 shows
    the traceback above that line."""
    def run(*argv, env=None):
        return subprocess.run([sys.executable, "-m", "experiments.main", *argv, f"--workdir={tmp_path / 'w'}"],
                              cwd=REPO, capture_output=True, text=True, timeout=300, env=env)

    proc = run(QUICK, "--config.data.source=cache")
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "error: data.source='cache' needs --config.data.cache.dir=/path/to/latent/cache"], proc.stderr
    proc = run(QUICK, "--config.stage1.steps=abc", env=dict(os.environ, SHELLLCC_DEBUG="1"))
    assert proc.returncode == 2 and "Traceback" in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: flag --config.stage1.steps=abc")
    assert not (tmp_path / "w" / "manifold").exists()


def test_debug_flag_shows_the_traceback(tmp_path, monkeypatch, capsys):
    assert run_cli([QUICK, "--config.data.source=npy", "--debug", f"--workdir={tmp_path / 'w'}"], monkeypatch) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().splitlines()[-1].startswith("error: data.source='npy' needs")


# ------------------------------------------------------------------------------------------ config values
# (case, overrides, what the line must name); refused before the workdir is created
CONFIG_VALUES = [
    ("negative stage-1 steps", ["--config.stage1.steps=-5"], "stage1.steps=-5"),
    ("negative stage-2 steps", ["--config.stage2.steps=-100"], "stage2.steps=-100"),
    ("zero stage-1 steps", ["--config.stage1.steps=0"], "stage1.steps=0"),
    ("zero batch", ["--config.stage2.batch_size=0"], "stage2.batch_size=0"),
    ("test fraction above 1", ["--config.data.test_fraction=2.0"], "data.test_fraction=2.0"),
    ("test fraction 0", ["--config.data.test_fraction=0.0"], "data.test_fraction=0.0"),
    ("test fraction 1", ["--config.data.test_fraction=1.0"], "data.test_fraction=1.0"),
    ("log_every 0", ["--config.log_every=0"], "log_every=0"),
    ("checkpoint_every 0", ["--config.checkpoint_every=0"], "checkpoint_every=0"),
    ("keep_checkpoints 0", ["--config.keep_checkpoints=0"], "keep_checkpoints=0"),
    ("unknown dtype", ["--config.compute_dtype=float17"], "compute_dtype='float17'"),
    ("2-element patch", ["--config.manifold.patch_size=(1, 2)"], "manifold.patch_size=(1, 2)"),
    ("zero patch", ["--config.manifold.patch_size=(1, 0, 1)"], "manifold.patch_size=(1, 0, 1)"),
    ("negative learning rate", ["--config.stage1.learning_rate=-0.001"], "stage1.learning_rate=-0.001"),
    ("nan learning rate", ["--config.stage2.learning_rate=nan"], "stage2.learning_rate=nan"),
    ("negative warmup", ["--config.stage1.warmup_steps=-1"], "stage1.warmup_steps=-1"),
    ("negative grad clip", ["--config.stage1.grad_clip=-1.0"], "stage1.grad_clip=-1.0"),
    ("zero anchors", ["--config.manifold.num_anchors=0"], "manifold.num_anchors=0"),
    ("negative kmeans iterations", ["--config.manifold.kmeans_iters=-1"], "manifold.kmeans_iters=-1"),
    ("negative patch bound", ["--config.data.max_train_patches=-1"], "data.max_train_patches=-1"),
    ("zero eval chunk", ["--config.eval.chunk_size=0"], "eval.chunk_size=0"),
]


@pytest.mark.parametrize("case,argv,name", CONFIG_VALUES, ids=[c[0] for c in CONFIG_VALUES])
def test_config_values(case, argv, name, tmp_path, monkeypatch, capsys):
    workdir = tmp_path / "w"
    assert run_cli([QUICK, *argv, f"--workdir={workdir}"], monkeypatch) == 2
    assert_one_line_error(capsys, name)
    assert not workdir.exists()


def test_ablation_variant_with_a_bad_value_is_refused_before_any_variant_runs(tmp_path, monkeypatch, capsys):
    """The last variant's bad value stops the ablation before the first variant's hours are spent."""
    config = tmp_path / "abl.py"
    config.write_text("import ml_collections\nfrom configs import synthetic_manifold\n\n\n"
                      "def get_config(arg=None):\n"
                      "    c = ml_collections.ConfigDict()\n"
                      "    c.ablation = dict(base=synthetic_manifold.get_config('quick'),\n"
                      "                      variants=(('a', {}), ('b', {'log_every': 0})))\n"
                      "    return c\n")
    workdir = tmp_path / "w"
    assert run_cli([f"--config={config}", f"--workdir={workdir}"], monkeypatch) == 2
    assert_one_line_error(capsys, "variant 'b'", "log_every=0")
    assert not workdir.exists()


def test_every_shipped_config_passes_the_checks():
    import importlib

    from configs import demo, wan21_pipeline
    from experiments import embedded_pipeline
    from experiments.config_checks import check_config
    args = {"ablation": [None, "kinds"], "demo": [None, *demo.ARGS],
            "synthetic_manifold": [None, "quick"], "wan21_manifold": [None],
            "wan21_reward": ["1.3b-lora", "1.3b-full", "14b-lora", "14b-full"],
            "embedded": list(embedded_pipeline.DIT_STAGES), "wan21_pipeline": list(wan21_pipeline.STAGES)}
    for name, arg_list in args.items():
        for arg in arg_list:
            for vname, variant in cli_main.expand_variants(importlib.import_module(f"configs.{name}").get_config(arg)):
                check_config(variant, f"configs/{name}.py:{arg} {vname}")
    for name in cli_main.EXPERIMENTS:
        check_config(importlib.import_module(f"experiments.{name}").default_config(), name)
    for arg in (None, *demo.ARGS):      # the pipeline's own checks of its rows and their prerequisites
        embedded_pipeline.check_config(demo.get_config(arg))


# ------------------------------------------------------------------------------------------ resumes
@pytest.fixture(scope="module")
def finished_fit(tmp_path_factory):
    """A finished SMALL fit: checkpoints at 4, 8 (the stage boundary, stage 1) and 12 (stage 2)."""
    workdir = tmp_path_factory.mktemp("fit") / "w"
    with pytest.MonkeyPatch.context() as mp:
        assert run_cli([*SMALL, "--config.keep_checkpoints=5", f"--workdir={workdir}"], mp) == 0
    assert (workdir / "manifold").exists()
    return workdir


@pytest.mark.parametrize("case", ["stage-2 checkpoint past the new end", "stage-1 checkpoint past the new stage 1"])
def test_resume_with_fewer_steps_than_the_checkpoint_is_refused(case, finished_fit, tmp_path, monkeypatch, capsys):
    """``stage1.steps`` lowered below the checkpoint's step: refused (it skipped stage 2's calibration)."""
    workdir = tmp_path / "w"
    shutil.copytree(finished_fit / "checkpoints", workdir / "checkpoints")
    if case.startswith("stage-1"):
        shutil.rmtree(workdir / "checkpoints" / "orbax" / "12")
    steps = sorted(os.listdir(workdir / "checkpoints" / "orbax"))
    assert run_cli([*SMALL, "--config.stage1.steps=4", f"--workdir={workdir}"], monkeypatch) == 2
    assert_one_line_error(capsys, "stage1.steps=4", "at step " + ("12" if case.startswith("stage-2") else "8"))
    assert_nothing_trusted(workdir)
    assert sorted(os.listdir(workdir / "checkpoints" / "orbax")) == steps


# ------------------------------------------------------------------------------------------ input data
def test_data_source_errors(tmp_path, monkeypatch, capsys):
    cases = [
        (["--config.data.source=videos"], "data.source"),
        (["--config.data.source=npy"], "data.npy.pattern"),
        (["--config.data.source=cache"], "data.cache.dir"),
        (["--config.data.source=npy", f"--config.data.npy.pattern={tmp_path}/none/*.npy"], f"{tmp_path}/none/*.npy"),
        (["--config.data.source=cache", f"--config.data.cache.dir={tmp_path}/none"], f"{tmp_path}/none"),
    ]
    for i, (argv, name) in enumerate(cases):
        workdir = tmp_path / f"w{i}"
        assert run_cli([QUICK, *argv, f"--workdir={workdir}"], monkeypatch) == 2, argv
        assert_one_line_error(capsys, name)
        assert_nothing_trusted(workdir)


# ------------------------------------------------------------------------------------------ input files
def _npy_folder(tmp_path, kind: str):
    """A folder of .npy latents every one of which is bad in the same way."""
    folder = tmp_path / kind
    folder.mkdir()
    good = np.random.default_rng(0).standard_normal((1, 2, 8, 8, 16)).astype(np.float32)
    for i in range(3):
        path = folder / f"v{i}.npy"
        if kind == "truncated":
            np.save(path, good)
            path.write_bytes(path.read_bytes()[:200])
        elif kind == "empty":
            path.write_bytes(b"")
        elif kind == "nan":
            bad = good.copy()
            bad[0, 0, 0, 0, i] = np.nan
            np.save(path, bad)
        elif kind == "wrong_rank":
            np.save(path, good[0, 0])
    return folder


@pytest.mark.parametrize("kind", ["truncated", "empty", "nan", "wrong_rank"])
def test_npy_files_none_usable(kind, tmp_path, monkeypatch, capsys):
    folder = _npy_folder(tmp_path, kind)
    workdir = tmp_path / "w"
    assert run_cli([QUICK, "--config.data.source=npy", f"--config.data.npy.pattern={folder}/*.npy",
                    f"--workdir={workdir}"], monkeypatch) == 2
    assert_one_line_error(capsys, f"{folder}/v0.npy", f"{folder}/v2.npy")
    assert_nothing_trusted(workdir)


@pytest.fixture(scope="module")
def tiny_cache(tmp_path_factory):
    from tests.helpers import write_tiny_latent_cache
    return write_tiny_latent_cache(str(tmp_path_factory.mktemp("cache") / "c"), n=8, size=32)


def _damaged_cache(src: str, tmp_path, kind: str) -> str:
    out = str(tmp_path / f"cache_{kind}")
    shutil.copytree(src, out)
    shard = os.path.join(out, "cache-00000-of-00001.array_record")
    json_path = os.path.join(out, "cache.json")
    if kind == "truncated cache.json":
        text = open(json_path).read()
        open(json_path, "w").write(text[: len(text) // 2])
    elif kind == "corrupted shard":            # same size: only reading it finds the damage
        data = bytearray(open(shard, "rb").read())
        data[2000:2400] = bytes(b ^ 0xFF for b in data[2000:2400])
        open(shard, "wb").write(bytes(data))
    elif kind == "truncated shard":
        data = open(shard, "rb").read()
        open(shard, "wb").write(data[: len(data) // 2])
    elif kind == "missing shard":
        os.remove(shard)
    return out


CACHE_DAMAGE = [("truncated cache.json", "cache.json"), ("corrupted shard", "cache-00000-of-00001.array_record"),
                ("truncated shard", "cache-00000-of-00001.array_record"),
                ("missing shard", "cache-00000-of-00001.array_record")]


@pytest.mark.parametrize("kind,name", CACHE_DAMAGE, ids=[c[0] for c in CACHE_DAMAGE])
def test_damaged_latent_cache(kind, name, tiny_cache, tmp_path, monkeypatch, capsys):
    cache = _damaged_cache(tiny_cache, tmp_path, kind)
    workdir = tmp_path / "w"
    assert run_cli([QUICK, "--config.data.source=cache", f"--config.data.cache.dir={cache}", f"--workdir={workdir}"],
                   monkeypatch) == 2
    assert_one_line_error(capsys, cache, name)
    assert_nothing_trusted(workdir)


def _saved_manifold(tmp_path):
    from shelllcc.manifold import io
    from tests.helpers import random_manifold
    params, cfg = random_manifold(0, dim=16, num_anchors=8, hidden_dim=8)
    return io.save_manifold(str(tmp_path / "m"), params, cfg)


@pytest.mark.parametrize("kind", ["truncated manifold.json", "empty manifold.json", "anchors changed in manifold.json",
                                  "params deleted"])
def test_damaged_manifold(kind, tmp_path):
    """What ``reward.manifold=DIR`` loads: an InputFileError (exit 2 from main) naming the file."""
    from shelllcc.errors import InputFileError
    from shelllcc.manifold import io
    directory = _saved_manifold(tmp_path)
    json_path = os.path.join(directory, "manifold.json")
    text = open(json_path).read()
    if kind == "truncated manifold.json":
        open(json_path, "w").write(text[: len(text) // 2])
    elif kind == "empty manifold.json":
        open(json_path, "w").write("")
    elif kind == "anchors changed in manifold.json":
        open(json_path, "w").write(text.replace('"num_anchors": 8', '"num_anchors": 9'))
    else:
        shutil.rmtree(os.path.join(directory, "params"))
    with pytest.raises(InputFileError) as e:
        io.load_manifold(directory)
    assert (os.path.join(directory, "params") if kind in ("anchors changed in manifold.json", "params deleted")
            else json_path) in str(e.value)


@pytest.mark.parametrize("kind", ["truncated", "empty", "not a checkpoint"])
def test_damaged_reference_checkpoint(kind, tmp_path):
    pytest.importorskip("torch")
    from shelllcc.errors import InputFileError
    from tests.helpers import random_manifold
    from third_party import shell_lcc_reference
    path = str(tmp_path / "ref.pt")
    params, cfg = random_manifold(0, dim=16, num_anchors=8, hidden_dim=8)
    shell_lcc_reference.save_manifold(params, cfg, path)
    data = open(path, "rb").read()
    open(path, "wb").write({"truncated": data[: len(data) // 2], "empty": b"", "not a checkpoint": b"hello"}[kind])
    with pytest.raises(InputFileError, match=str(tmp_path / "ref.pt")):
        shell_lcc_reference.load_manifold(path)


# ------------------------------------------------------------------------------------------ workdir records
def test_a_refused_run_leaves_config_json_to_the_run_before(tmp_path, monkeypatch, capsys):
    """config.json belongs to the run that made the workdir's outputs; the refused run is in the history."""
    workdir = tmp_path / "w"
    workdir.mkdir()
    (workdir / "config.json").write_text('{"earlier": "run"}')
    assert run_cli([QUICK, "--config.data.source=npy", f"--workdir={workdir}"], monkeypatch) == 2
    assert_one_line_error(capsys, "data.npy.pattern")
    assert (workdir / "config.json").read_text() == '{"earlier": "run"}'
    assert not (workdir / ".lock").exists()             # released for the next run
    (entry,) = [json.load(open(workdir / "config_history" / n)) for n in os.listdir(workdir / "config_history")]
    assert entry["outcome"].startswith("refused: data.source='npy' needs") and entry["config"]["data"]["source"] == "npy"


# ------------------------------------------------------------------------------------------ resumes with changes
# the DiT's resume refusals end to end; slow (a DiT's compile), test_resume_settings_name_what_changed is
# their fast counterpart
@pytest.fixture(scope="module")
def finished_reward_run(tmp_path_factory):
    """A 2-step reward fine-tuning of a randomly initialised tiny DiT against a saved manifold: a checkpoint at
    step 2; the config file takes the workdir-independent settings, the tests their changes as flags."""
    from shelllcc.manifold import io
    from tests.helpers import random_manifold, write_tiny_latent_cache
    root = tmp_path_factory.mktemp("reward")
    cache = write_tiny_latent_cache(str(root / "cache"), n=16, size=32)
    params, cfg = random_manifold(0, dim=16, num_anchors=8, hidden_dim=8)
    manifold = io.save_manifold(str(root / "manifold"), params, cfg)
    config = root / "reward.py"
    config.write_text("from experiments import reward_finetune\n\n\n"
                      "def get_config(arg=None):\n"
                      "    c = reward_finetune.default_config()\n"
                      f"    c.data.cache_dir, c.reward.manifold = {cache!r}, {manifold!r}\n"
                      "    c.data.batch_size, c.train.steps, c.train.log_every, c.train.checkpoint_every = 8, 2, 1, 2\n"
                      "    c.model.num_heads, c.mesh.devices = 2, 1\n"
                      "    return c\n")
    workdir = root / "w"
    with pytest.MonkeyPatch.context() as mp:
        assert run_cli([f"--config={config}", f"--workdir={workdir}"], mp) == 0
    return config, workdir, manifold


def test_resume_settings_name_what_changed():
    """The settings a DiT checkpoint records, without a run: each change is refused naming its key."""
    from experiments import dit_setup, reward_finetune
    from shelllcc.errors import UserError
    from shelllcc.models.wan_transformer import get_config as wan_config
    from shelllcc.training.checkpoints import check_resume_settings
    from tests.helpers import random_manifold

    def settings(edit=lambda c: None, seed=0):
        c = reward_finetune.default_config()
        c.data.source = "random"
        edit(c)
        heads = c.model.num_heads or 2
        return dit_setup.resume_settings(c, wan_config("tiny", num_heads=heads),
                                         {"manifold": random_manifold(seed, dim=16, num_anchors=8, hidden_dim=8)[0]})

    saved = json.loads(json.dumps(settings()))       # as the checkpoint's meta holds them
    check_resume_settings(saved, settings(), "ckpt")
    for edit, name in [(lambda c: setattr(c.model, "num_heads", 4), "model.num_heads: checkpoint 2, now 4"),
                       (lambda c: setattr(c.data, "batch_size", 4), "data.batch_size: checkpoint 8, now 4"),
                       (lambda c: setattr(c.reward, "kind", "lcc"), "reward.kind: checkpoint 'shell', now 'lcc'")]:
        with pytest.raises(UserError, match=re.escape(name)):
            check_resume_settings(saved, settings(edit), "ckpt")
    with pytest.raises(UserError, match=re.escape("reward.manifold (its content)")):
        check_resume_settings(saved, settings(seed=1), "ckpt")


RESUME_CHANGES = [
    ("num_heads (same shapes, another function)", ["--config.model.num_heads=4"], "model.num_heads: checkpoint 2, now 4"),
    ("batch size (the data state counts batches)", ["--config.data.batch_size=4"], "data.batch_size: checkpoint 8, now 4"),
    ("data source", ["--config.data.source=random", "--config.data.random_latent_shape=(1, 4, 4, 16)"],
     "data.source: checkpoint 'cache', now 'random'"),
    ("reward kind", ["--config.reward.kind=lcc"], "reward.kind: checkpoint 'shell', now 'lcc'"),
    ("objective", ["--config.objective.name=noised_data"], "objective.name: checkpoint 'one_step', now 'noised_data'"),
    ("another manifold at the same path", [], "reward.manifold (its content)"),
]


@pytest.mark.slow
@pytest.mark.parametrize("case,argv,name", RESUME_CHANGES, ids=[c[0] for c in RESUME_CHANGES])
def test_resume_with_a_changed_setting_is_refused(case, argv, name, finished_reward_run, tmp_path, monkeypatch,
                                                  capsys):
    config, finished, manifold = finished_reward_run
    workdir = tmp_path / "w"
    shutil.copytree(finished / "checkpoints", workdir / "checkpoints")
    if case.startswith("another manifold"):
        # replaced where the checkpoint's run read it (put back afterwards: the fixture is shared)
        from shelllcc.manifold import io
        from tests.helpers import random_manifold
        shutil.copytree(manifold, tmp_path / "backup")
        shutil.rmtree(manifold)
        io.save_manifold(manifold, *random_manifold(1, dim=16, num_anchors=8, hidden_dim=8))
    try:
        code = run_cli([f"--config={config}", "--config.train.steps=4", *argv, f"--workdir={workdir}"], monkeypatch)
    finally:
        if (tmp_path / "backup").exists():
            shutil.rmtree(manifold)
            shutil.copytree(tmp_path / "backup", manifold)
    assert code == 2
    assert_one_line_error(capsys, name, str(workdir / "checkpoints"))
    assert sorted(os.listdir(workdir / "checkpoints" / "orbax")) == ["2"] and not (workdir / "model").exists()


@pytest.mark.slow
def test_resume_with_the_manifold_moved_but_unchanged_is_accepted(finished_reward_run, tmp_path, monkeypatch):
    """Content, not the path: the same manifold copied elsewhere resumes."""
    config, finished, manifold = finished_reward_run
    workdir = tmp_path / "w"
    shutil.copytree(finished / "checkpoints", workdir / "checkpoints")
    moved = shutil.copytree(manifold, tmp_path / "moved")
    assert run_cli([f"--config={config}", f"--config.reward.manifold={moved}", "--config.train.steps=3",
                    f"--workdir={workdir}"], monkeypatch) == 0
    assert (workdir / "model").exists()


@pytest.mark.parametrize("case,argv,name", [
    ("other data", ["--config.data.synthetic.sigma=0.4"], "data (the training patches)"),
    ("other anchor count", ["--config.manifold.num_anchors=8"], "manifold.num_anchors: checkpoint 16, now 8")])
def test_fit_resume_on_other_data_is_refused(case, argv, name, finished_fit, tmp_path, monkeypatch, capsys):
    workdir = tmp_path / "w"
    shutil.copytree(finished_fit / "checkpoints", workdir / "checkpoints")
    steps = sorted(os.listdir(workdir / "checkpoints" / "orbax"))
    assert run_cli([*SMALL, *argv, f"--workdir={workdir}"], monkeypatch) == 2
    assert_one_line_error(capsys, name, str(workdir / "checkpoints"))
    assert_nothing_trusted(workdir)
    assert sorted(os.listdir(workdir / "checkpoints" / "orbax")) == steps


# ------------------------------------------------------------------------------------------ one run per workdir
@pytest.fixture
def live_process():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    yield proc.pid
    proc.kill()
    proc.wait()


def _lock_held_by(directory, pid, host=None):
    import socket

    from shelllcc import locks
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, locks.LOCK_FILE), "w") as f:
        json.dump({"host": host or socket.gethostname(), "pid": pid, "started": locks._start_time(pid),
                   "since": "earlier", "command": "python -m experiments.main ..."}, f)


def test_a_second_run_in_a_workdir_is_refused(live_process, tmp_path, monkeypatch, capsys):
    workdir = tmp_path / "w"
    _lock_held_by(workdir, live_process)
    assert run_cli([QUICK, f"--workdir={workdir}"], monkeypatch) == 2
    assert_one_line_error(capsys, f"workdir {workdir} is in use by pid {live_process}")
    assert sorted(os.listdir(workdir)) == [".lock"]        # no config.json, no checkpoint


def test_a_lock_of_another_host_is_not_taken_over(tmp_path):
    from shelllcc import locks
    _lock_held_by(tmp_path, 1, host="elsewhere")
    with pytest.raises(locks.DirectoryLocked, match="pid 1 on host elsewhere.*remove the lock file"):
        locks.DirectoryLock(str(tmp_path)).acquire()


def test_a_stale_lock_is_taken_over_with_a_note(tmp_path, capsys):
    from shelllcc import locks
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    _lock_held_by(tmp_path, dead.pid)
    with locks.DirectoryLock(str(tmp_path)) as lock:
        assert json.load(open(lock.path))["pid"] == os.getpid()
        assert f"took over the stale lock {lock.path} of pid {dead.pid}" in capsys.readouterr().err
    assert not os.path.exists(lock.path)
    # a pid reused by another process (a start time other than the lock's) is stale too
    _lock_held_by(tmp_path, os.getpid())
    data = json.load(open(tmp_path / locks.LOCK_FILE))
    json.dump(dict(data, started="1"), open(tmp_path / locks.LOCK_FILE, "w"))
    with locks.DirectoryLock(str(tmp_path)):
        assert "took over the stale lock" in capsys.readouterr().err


def test_two_cache_encoders_on_one_directory(live_process, tmp_path):
    """The second encoder is refused before it writes; the first one's cache stays as it was."""
    from shelllcc import locks
    from tests.helpers import write_tiny_latent_cache
    out = tmp_path / "cache"
    _lock_held_by(out, live_process)
    with pytest.raises(locks.DirectoryLocked, match=f"latent cache {out} is in use by pid {live_process}"):
        write_tiny_latent_cache(str(out), n=8, size=32)
    assert sorted(os.listdir(out)) == [".lock"]


def test_an_ablation_variant_finished_with_another_config_is_refused(tmp_path, monkeypatch, capsys):
    """Its DONE records the config it finished with; 'already done, skipped' would report the old run."""
    from configs import synthetic_manifold
    from experiments import stage_markers
    config = tmp_path / "abl.py"
    config.write_text("import ml_collections\nfrom configs import synthetic_manifold\n\n\n"
                      "def get_config(arg=None):\n"
                      "    return ml_collections.ConfigDict({'ablation': dict(\n"
                      "        base=synthetic_manifold.get_config('quick'), variants=(('a', {}),))})\n")
    earlier = synthetic_manifold.get_config("quick")
    earlier.log_every = 5
    stage_markers.write(str(tmp_path / "w" / "a" / "DONE"), stage_markers.record({"config": earlier}, {}))
    assert run_cli([f"--config={config}", f"--workdir={tmp_path / 'w'}"], monkeypatch) == 2
    assert_one_line_error(capsys, "variant 'a'", "config.log_every: 5 -> 10", "remove")
    assert sorted(os.listdir(tmp_path / "w" / "a")) == ["DONE"]


# ------------------------------------------------------------------------------------ shipped models
def _damaged_pretrained(tmp_path, kind: str):
    src = os.path.join(REPO, "configs", "pretrained", "demo")
    dst = tmp_path / "pretrained"
    shutil.copytree(src, dst)
    vae = dst / "vae.npz"
    if kind == "flipped byte":
        data = bytearray(vae.read_bytes())
        data[len(data) // 2] ^= 0xFF
        vae.write_bytes(bytes(data))
    elif kind == "truncated file":
        vae.write_bytes(vae.read_bytes()[:1000])
    elif kind == "missing file":
        vae.unlink()
    elif kind == "no manifest":
        (dst / "MANIFEST.json").unlink()
    elif kind == "truncated manifest":
        (dst / "MANIFEST.json").write_text((dst / "MANIFEST.json").read_text()[:300])
    return dst


@pytest.mark.parametrize("kind,name", [("flipped byte", "vae.npz"), ("truncated file", "vae.npz"),
                                       ("missing file", "vae.npz"), ("no manifest", "MANIFEST.json"),
                                       ("truncated manifest", "MANIFEST.json")])
def test_damaged_shipped_models_are_refused(kind, name, tmp_path, monkeypatch, capsys):
    """The demo's shipped VAE, text encoder and base are checked against their manifest before use."""
    pretrained = _damaged_pretrained(tmp_path, kind)
    workdir = tmp_path / "w"
    argv = ["--config=configs/demo.py", f"--workdir={workdir}", f"--config.pretrained.dir={pretrained}",
            "--config.benchmark.train_size=8", "--config.benchmark.validation_size=24",
            "--config.benchmark.test_size=64", "--config.stop_after=vae"]
    assert run_cli(argv, monkeypatch) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("error: ") and name in line, line
    assert not (workdir / "vae" / "model").exists() and not (workdir / "stages" / "vae.DONE").exists()


# ------------------------------------------------------------------- the DiT experiments and the demo
# (case, argv, what the line must name); each is refused before any model is built or trained
EXPERIMENT_INPUTS = [
    ("prompts file missing", ["--config=configs/embedded.py:sample", "--config.prompts.source=file",
                              "--config.prompts.file=/nonexistent/prompts.txt"], "/nonexistent/prompts.txt"),
    ("prompts cache not given", ["--config=configs/embedded.py:sample"], "prompts.cache_dir"),
    ("no manifold for the reward", ["--config=configs/embedded.py:reward"], "reward.manifold"),
    ("unknown reward kind", ["--config=configs/embedded.py:reward", "--config.reward.kind=shel"], "reward.kind"),
    ("unknown objective", ["--config=configs/embedded.py:reward", "--config.objective.name=two_step"], "objective.name"),
    ("unknown noise distribution", ["--config=configs/embedded.py:sft", "--config.data.source=random",
                                    "--config.flow.sigma_distribution=gaussian"], "flow.sigma_distribution"),
    ("text dropout above 1", ["--config=configs/embedded.py:sft", "--config.data.source=random",
                              "--config.flow.text_dropout=1.5"], "flow.text_dropout"),
    ("negative region weight", ["--config=configs/embedded.py:sft", "--config.data.source=random",
                                "--config.flow.region_weight=-1"], "flow.region_weight"),
    ("region weight without a field", ["--config=configs/embedded.py:sft", "--config.data.source=random",
                                       "--config.flow.region_weight=2"], "data.weight_field"),
    ("weight field on random latents", ["--config=configs/embedded.py:sft", "--config.data.source=random",
                                        "--config.data.weight_field=object_mask"], "data.weight_field"),
    ("unknown demo variant", ["--config=configs/demo.py", "--config.run_variants=('control','nope')"], "nope"),
    ("unknown stage to stop after", ["--config=configs/demo.py", "--config.stop_after=nowhere"], "stop_after"),
    ("more validation prompts than clips", ["--config=configs/demo.py", "--config.benchmark.validation_size=8"],
     "validation.prompts"),
]


@pytest.mark.parametrize("case,argv,name", EXPERIMENT_INPUTS, ids=[c[0] for c in EXPERIMENT_INPUTS])
def test_experiment_inputs(case, argv, name, tmp_path, monkeypatch, capsys):
    workdir = tmp_path / "w"
    assert run_cli([*argv, f"--workdir={workdir}"], monkeypatch) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("error: ") and name in line, line
    assert not (workdir / "model").exists() and not (workdir / "checkpoints").exists()
