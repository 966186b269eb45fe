"""Bad inputs, as a careful user would try them, through ``python -m experiments.main``: each ends with exit
code 2 and one line ``error: ...`` naming the key, file or shape to change, and writes nothing a later run
would trust (no manifold, no checkpoint, no workdir at all when the config is refused before starting).

The command line runs in this process (``experiments.main``'s own flag parser and ``main``) so the table
costs milliseconds a row; ``test_the_real_command_line`` runs it as a subprocess once per kind of failure.
"""

import os
import subprocess
import sys

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
    """As a subprocess: a flag error and an experiment's own check each give exit 2 and one stderr line;
    --debug and SHELLLCC_DEBUG=1 show the traceback above that line."""
    def run(*argv, env=None):
        return subprocess.run([sys.executable, "-m", "experiments.main", *argv, f"--workdir={tmp_path / 'w'}"],
                              cwd=REPO, capture_output=True, text=True, timeout=300, env=env)

    for argv in ([QUICK, "--config.stage1.stepz=3"], [QUICK, "--config.data.source=cache"]):
        proc = run(*argv)
        assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr
    proc = run(QUICK, "--config.data.source=npy", "--debug")
    assert proc.returncode == 2 and "Traceback" in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: data.source='npy' needs")
    proc = run(QUICK, "--config.stage1.steps=abc", env=dict(os.environ, SHELLLCC_DEBUG="1"))
    assert proc.returncode == 2 and "Traceback" in proc.stderr
    assert not (tmp_path / "w" / "manifold").exists()


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
