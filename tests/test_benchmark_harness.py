"""benchmarks/harness.py (workers, records) and step_bench's rewriting of its earlier command line."""

import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

import harness  # noqa: E402
import step_bench  # noqa: E402


def test_worker_result_log_and_timeout(tmp_path):
    log = tmp_path / "w.log"
    done = harness.run([sys.executable, "-c", "import os; print('hi'); print('@@RESULT ' + os.environ['X'])"],
                       timeout=60, env={"X": '{"a": 1}'}, log=str(log))
    assert done.error is None and done.result == {"a": 1} and "hi" in done.output
    assert log.read_text().startswith("$ X=") and "hi\n" in log.read_text()

    slow = harness.run([sys.executable, "-c", "import time; time.sleep(60)"], timeout=1, expects_result=False)
    assert slow.rc is None and slow.error == "timed out" and "killed" in slow.output
    failed = harness.run([sys.executable, "-c", "raise SystemExit(3)"])
    assert failed.error == "rc 3" and failed.result is None


def test_records_go_where_asked(tmp_path):
    out = tmp_path / "r.jsonl"
    bench = harness.Bench("demo_bench", str(out), str(tmp_path / "dir"), argv=["--x", "1"])
    bench.record(device="cpu", value=2)
    rec = json.loads(out.read_text())
    assert rec["bench"] == "demo_bench" and rec["command"].endswith("--x 1") and rec["value"] == 2 and rec["date"]
    assert (tmp_path / "dir" / "demo_bench.jsonl").read_text() == out.read_text()


def test_step_bench_earlier_flags():
    got = step_bench.modern_argv("--parts scale --devices 1 4 --mesh data,fsdp --config 1.3b-full --steps 5 "
                                 "--override model.preset=tiny model.attention_impl= --chunk-size 0".split())
    assert got == [f"--config={step_bench.THIS}:1.3b-full", "--config.bench.parts=scale",
                   "--config.bench.devices=(1,4,)", "--config.bench.mesh=data,fsdp", "--config.bench.steps=5",
                   "--config.model.preset=tiny", "--config.model.attention_impl="]
    assert step_bench.modern_argv(["--config.bench.steps=3", "--grid", "3", "8", "8"]) == [
        "--config.bench.steps=3", "--config.bench.grid=(3,8,8,)"]
