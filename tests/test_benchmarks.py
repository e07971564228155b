"""Smoke tests of the benchmarks' --quick modes: they run end to end and write well-formed results.

They check the shape of the outputs, never a speed or an accuracy: those are measured, not asserted.
"""

import common

import importlib
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT, one_line, run_cli

sys.path.insert(0, str(ROOT / "benchmarks"))
DEVICE_CHECKED = ("footwear", "gpu_check", "speed", "transfer")  # the benchmarks with a --device


def run_benchmark(name, tmp_path, capsys, *args):
    """benchmarks/NAME.py --quick, run in this process as the command line runs it: (results, table)."""
    code, err = run_cli(importlib.import_module(name), ["--quick", "--results", str(tmp_path), *args], capsys)
    assert code == 0, err
    return json.loads((tmp_path / f"{name}-quick.json").read_text()), (tmp_path / f"{name}-quick.md").read_text()


def test_accuracy_benchmark_quick(real_data_dir, tmp_path, capsys):
    argv = ["--seeds", "1", "2", "--scripts", "ann", "--ablation", "--runs", str(tmp_path / "runs")]
    results, table = run_benchmark("accuracy", tmp_path, capsys, *argv, "--label-smoothing", "0.05")
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


def test_speed_benchmark_quick(real_data_dir, tmp_path, capsys):
    results, table = run_benchmark("speed", tmp_path, capsys, "--repeats", "1")
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


def test_footwear_benchmark_on_the_default_cnn(runs, tmp_path, capsys):
    argv = ["--runs", str(runs["cnn"].parent), "--images", "100", "--results", str(tmp_path)]
    code, err = run_cli(importlib.import_module("footwear"), argv, capsys)
    assert code == 0, err
    (group,) = json.loads((tmp_path / "footwear.json").read_text())["groups"]
    assert len(group["runs"]) == 1 and group["name"] == "cnn"
    # The default CNN averages each image with its mirror: footwear gets the same answer either way.
    assert group["mean"]["footwear"] == group["mean"]["footwear mirrored"]
    assert all(0 <= value <= 100 for value in group["mean"].values())
    assert "| cnn | 1 |" in (tmp_path / "footwear.md").read_text()


def test_cnn_step_benchmark_smoke(capsys):
    assert common.run_main(importlib.import_module("cnn_step").main, ["--steps", "1", "--repeats", "1"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert "matmul" in lines[0] and len(lines) == 9
    assert all(re.search(r"[\d,]+ img/s, \d+ GFLOP/s, \d+% of the matmul$", line) for line in lines[1:7])
    assert all(re.fullmatch(r"evaluation in chunks of \d+: [\d,]+ img/s", line) for line in lines[7:])


def test_gpu_check_smoke_runs_every_step_on_the_cpu(real_data_dir, tmp_path, capsys):
    """The GPU check's --smoke form: every step runs and is recorded (the device tests are the suite's own)."""
    argv = ["--smoke", "--device", "cpu", "--results", str(tmp_path)]
    code, err = run_cli(importlib.import_module("gpu_check"), argv, capsys)
    assert code == 0, err
    rows = {row["step"]: row for row in json.loads((tmp_path / "gpu_check.json").read_text())["rows"]}
    assert len(rows) == 10 and rows["determinism: cnn.py short, same seed twice"]["identical"] is True
    assert rows["cnn.py short, --precision fp16"]["precision"] == "fp16"
    assert all(0 <= row["test_acc"] <= 1 and row["epochs"] == 1 for row in rows.values() if "test_acc" in row)
    assert "| python" not in (tmp_path / "gpu_check.md").read_text()  # smoke rows are named as such


def worktrees():
    return subprocess.run(["git", "-C", str(ROOT), "worktree", "list"], capture_output=True, text=True).stdout


def test_defaults_benchmark_times_a_commit_and_this_tree_alternately(real_data_dir, tmp_path, capsys):
    before = worktrees()
    results, table = run_benchmark("defaults", tmp_path, capsys, "--baseline", "HEAD")
    assert [row["seed"] for row in results["rows"]] == [1]
    for row in results["rows"]:
        assert row["baseline"]["epochs"] == row["current"]["epochs"] == 1  # the quick runs' one epoch, both trees
        assert row["ratio"] == pytest.approx(row["current"]["wall"] / row["baseline"]["wall"])
    assert "| median |" in table and "baseline: commit HEAD" in table
    assert worktrees() == before  # the baseline's checkout is removed


@pytest.mark.parametrize(
    "benchmark, argv, words",
    [
        ("cnn_step", ["--repeats", "0"], "--steps and --repeats take a count of at least 1"),
        ("accuracy", ["--quick", "--lr", "nan"], "--lr (LR) = nan is not allowed"),
        ("speed", ["--quick", "--results", "README.md"], "--results README.md is a file, not a folder"),
        ("footwear", ["--images", "0"], "--images 0: use a number from 1 to 10000"),
        ("footwear", ["--runs", "README.md"], "--runs README.md: not a folder"),
        ("defaults", ["--quick", "--baseline", "no-such-commit", "--results", "{tmp}"], "--baseline no-such-commit"),
        *[(name, ["--device", "gpu", "--results", "{tmp}"], "--device gpu") for name in DEVICE_CHECKED],
    ],
)
def test_a_bad_benchmark_setting_is_one_line_and_exit_code_2(benchmark, argv, words, tmp_path, monkeypatch, capsys):
    """Checked before any measurement: a bad --results no longer loses the results after the work."""
    monkeypatch.chdir(ROOT)
    module = importlib.import_module(benchmark)
    code, err = run_cli(module, [arg.replace("{tmp}", str(tmp_path)) for arg in argv], capsys)
    assert code == 2
    one_line(err, words)


def test_a_stopped_speed_benchmark_leaves_no_copy_of_the_dataset(real_data_dir, tmp_path):
    """SIGTERM while speed.py trains on its torchvision-layout copy of the data: the copy goes with it."""
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    process = subprocess.Popen(
        [sys.executable, "benchmarks/speed.py", "--quick", "--results", str(tmp_path / "results")],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob("*/tv/FashionMNIST/raw/t10k-labels-idx1-ubyte")) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert list(tmp_path.glob("*/tv/FashionMNIST/raw/*")), "the benchmark never made its copy of the data"
    time.sleep(0.5)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 143, err[-1000:]
    assert err.strip().splitlines()[-1] == "speed.py: stopped by SIGTERM"
    assert not list(tmp_path.rglob("*-ubyte*"))  # torch's own caches in TMPDIR may stay; the data copy may not
