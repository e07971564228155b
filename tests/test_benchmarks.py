"""Smoke tests of the benchmarks' --quick modes: they run end to end and write well-formed results.

They check the shape of the outputs, never a speed or an accuracy: those are measured, not asserted.
"""

import json
import re
import subprocess
import sys

from conftest import ROOT


def run_benchmark(name, tmp_path, *args):
    result = subprocess.run(
        [sys.executable, f"benchmarks/{name}.py", "--quick", "--results", str(tmp_path), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads((tmp_path / f"{name}-quick.json").read_text()), (tmp_path / f"{name}-quick.md").read_text()


def test_accuracy_benchmark_quick(real_data_dir, tmp_path):
    argv = ["--seeds", "1", "2", "--scripts", "ann", "--ablation", "--runs", str(tmp_path / "runs")]
    results, table = run_benchmark("accuracy", tmp_path, *argv, "--label-smoothing", "0.05")
    assert results["quick"] and results["machine"]["torch"] and results["flags"] == "--label-smoothing 0.05"
    records = [json.loads(p.read_text()) for p in (tmp_path / "runs").glob("ann-*/metrics.json")]
    assert len(records) == 2 + len(results["ablation"]["ann"]) - 1  # the seeds, then one run per ablation row
    assert {r["hparams"]["LABEL_SMOOTHING"] for r in records} == {0.05, 0.0}  # passed on; the ablation's own 0
    ann = results["scripts"]["ann"]
    assert [r["seed"] for r in ann["runs"]] == [1, 2]
    assert 0 < ann["test_acc_mean"] <= 1 and ann["test_acc_std"] >= 0 and ann["seconds_mean"] > 0
    ablation = results["ablation"]["ann"]
    assert "default recipe" in ablation and "no label smoothing" in ablation
    assert all(0 < row["val_acc"] <= 1 for row in ablation.values())
    assert "| ann.py |" in table and "| no label smoothing | `--label-smoothing 0` |" in table


def test_speed_benchmark_quick(real_data_dir, tmp_path):
    results, table = run_benchmark("speed", tmp_path, "--repeats", "1")
    for name in ("ann", "cnn"):
        throughput = results["throughput"][name]
        assert throughput["ours_images_per_s"] > 0 and throughput["reference_images_per_s"] > 0
        assert throughput["ratio"] > 0 and throughput["precision"] in ("bf16", "fp32")
        to_accuracy = results["time_to_accuracy"][name]
        assert set(to_accuracy) == {"target", "ours", "reference"}
        assert to_accuracy["reference"]["epochs"] >= 1
    assert results["transfer"]["ratio"] > 0 and results["transfer"]["cached_epoch_seconds"] > 0
    assert 0 < results["profile"]["fraction_of_matmul"] and results["profile"]["top_ops"]
    assert "| ann |" in table and "Transfer (resnet18" in table and "CNN profile" in table


def test_cnn_step_benchmark_smoke():
    result = subprocess.run(
        [sys.executable, "benchmarks/cnn_step.py", "--steps", "1", "--repeats", "1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.strip().splitlines()
    assert "matmul" in lines[0] and len(lines) == 6
    assert all(re.search(r"[\d,]+ img/s, \d+ GFLOP/s, \d+% of the matmul$", line) for line in lines[1:])


def test_gpu_check_smoke_runs_every_step_on_the_cpu(real_data_dir, tmp_path):
    """The GPU check's --smoke form: every step runs and is recorded (the device tests are the suite's own)."""
    result = subprocess.run(
        [sys.executable, "benchmarks/gpu_check.py", "--smoke", "--device", "cpu", "--results", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    rows = {row["step"]: row for row in json.loads((tmp_path / "gpu_check.json").read_text())["rows"]}
    assert len(rows) == 10 and rows["determinism: cnn.py short, same seed twice"]["identical"] is True
    assert rows["cnn.py short, --precision fp16"]["precision"] == "fp16"
    assert all(0 <= row["test_acc"] <= 1 and row["epochs"] == 1 for row in rows.values() if "test_acc" in row)
    assert "| python" not in (tmp_path / "gpu_check.md").read_text()  # smoke rows are named as such
