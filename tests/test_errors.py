"""Bad settings, bad data and runs that go wrong: exit code, one clear line, and what is left on disk."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import ann
import cnn
import common
import plumbing
from conftest import ROOT, SMALL, run_cli


@pytest.mark.parametrize(
    "argv, names",
    [
        (["--epochs", "0"], "--epochs"),
        (["--epochs", "two"], "--epochs"),
        (["--batch-size", "0"], "--batch-size"),
        (["--batch-size", "55001"], "--batch-size"),
        (["--lr", "0"], "--lr"),
        (["--lr", "-0.1"], "--lr"),
        (["--lr", "nan"], "--lr"),
        (["--lr", "fast"], "--lr"),
        (["--weight-decay", "-1e-4"], "--weight-decay"),
        (["--dropout", "1"], "--dropout"),
        (["--dropout", "-0.1"], "--dropout"),
        (["--val-size", "-1"], "--val-size"),
        (["--val-size", "60000"], "--val-size"),
        (["--device", "tpu"], "--device"),
        (["--precision", "fp8"], "--precision"),
        (["--fc-width", "0"], "--fc-width"),
        (["--tta-shift", "-1"], "--tta-shift"),
        (["--tta-shift", "5"], "--tta-shift"),
        (["--tta-shift", "0.5"], "--tta-shift"),
        (["--subset", "1000", "--val-size", "1000"], "--val-size"),
        (["--no-such-flag", "1"], "--no-such-flag"),
    ],
)
def test_bad_settings_are_refused_before_any_work(argv, names, capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(common, "load_fashion_mnist", lambda *a: pytest.fail("data loaded despite a bad setting"))
    code, err = run_cli(cnn, argv + ["--out-dir", str(tmp_path)], capsys)
    assert code == 2
    assert len(err) == 1 and names in err[0] and "Traceback" not in err[0]
    assert not any(tmp_path.iterdir())  # no run folder either


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_missing_cuda_device_is_refused(capsys, tmp_path):
    code, err = run_cli(ann, ["--device", "cuda", "--out-dir", str(tmp_path)], capsys)
    assert code == 2 and len(err) == 1 and "no CUDA GPU" in err[0]


def test_bad_data_file_exits_2_with_one_line_naming_it(tmp_path):
    for name in common.FILES:
        (tmp_path / (name + ".gz")).write_bytes(b"\x1f\x8b not really gzip")
    result = subprocess.run(
        [sys.executable, "ann.py", "--data-dir", str(tmp_path), "--out-dir", str(tmp_path / "runs")],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    err = result.stderr.strip().splitlines()
    assert len(err) == 1 and "train-images-idx3-ubyte.gz" in err[0] and "Traceback" not in result.stderr


def test_unreadable_data_folder_is_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(os, "access", lambda *a: False)  # tests run as root, where chmod does not stop reads
    code, err = run_cli(ann, ["--data-dir", str(tmp_path), "--out-dir", str(tmp_path / "runs")], capsys)
    assert code == 2 and len(err) == 1 and "not readable" in err[0]


def test_failed_download_says_where_data_can_come_from(tmp_path, monkeypatch, capsys):
    from torchvision.datasets import FashionMNIST

    monkeypatch.setattr(plumbing, "HERE", tmp_path)
    monkeypatch.setattr(plumbing, "DEBIAN_DIR", tmp_path / "no-debian-package")
    monkeypatch.delenv("FASHION_MNIST_DIR", raising=False)
    monkeypatch.setattr(FashionMNIST, "mirrors", ["http://127.0.0.1:9/"])  # nothing listens there
    code, err = run_cli(ann, ["--out-dir", str(tmp_path / "runs")], capsys)
    assert code == 2 and len(err) == 1
    assert plumbing.DOWNLOAD_URL in err[0] and "dataset-fashion-mnist" in err[0] and "--data-dir" in err[0]


def test_unwritable_output_folder_is_refused(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    code, err = run_cli(ann, ["--out-dir", str(blocker / "runs")], capsys)
    assert code == 2 and len(err) == 1 and "run folder" in err[0]


def test_full_disk_leaves_no_half_written_json(real_data_dir, out_dir, monkeypatch, capsys):
    def no_space(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_space)
    code, err = run_cli(ann, SMALL + ["--out-dir", str(out_dir)], capsys)
    assert code == 2 and len(err) == 1 and "No space left on device" in err[0]
    (run_dir,) = out_dir.iterdir()
    assert [p.name for p in run_dir.iterdir() if p.suffix in (".json", ".tmp")] == []


def test_divergence_stops_with_status_diverged(real_data_dir, out_dir, capsys):
    code, err = run_cli(cnn, SMALL + ["--epochs", "3", "--lr", "1e12", "--out-dir", str(out_dir)], capsys)
    assert code == 1 and "smaller --lr" in err[-1]
    (run_dir,) = out_dir.iterdir()
    record = json.loads((run_dir / "metrics.json").read_text())
    assert record["status"] == "diverged" and record["final"] is None


@pytest.mark.parametrize(
    "stop, exit_code",
    [(signal.SIGINT, 130), (signal.SIGTERM, 143), (signal.SIGHUP, 129)],  # Ctrl-C, `kill`, a closed terminal
)
def test_ctrl_c_kill_or_hangup_keeps_completed_epochs_and_the_latest_weights(stop, exit_code, real_data_dir, tmp_path):
    out = tmp_path / "runs"
    process = subprocess.Popen(
        [sys.executable, "ann.py", "--subset", "3000", "--val-size", "500", "--epochs", "1000", "--out-dir", str(out)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    record = {}
    while time.monotonic() < deadline and len(record.get("history", [])) < 2:
        time.sleep(0.2)
        metrics = list(out.glob("*/metrics.json"))
        if metrics:
            record = json.loads(metrics[0].read_text())
    process.send_signal(stop)
    stopped = time.monotonic()
    _, stderr = process.communicate(timeout=60)
    assert time.monotonic() - stopped < 5
    assert process.returncode == exit_code and "Traceback" not in stderr
    record = json.loads(metrics[0].read_text())
    assert record["status"] == "interrupted" and len(record["history"]) >= 2
    assert (metrics[0].parent / "curves.png").stat().st_size > 0
    assert record["model_pt"].startswith("weights when interrupted")
    ann.ANN(dropout=0.1).load_state_dict(torch.load(metrics[0].parent / "model.pt", weights_only=True))


def test_a_float_setting_keeps_a_float_flag_whatever_its_default_is_written_as():
    hp = common.parse_hparams({"DROPOUT": 0, "LR": 1, "EPOCHS": 3}, ["--dropout", "0.3", "--lr", "0.05"])
    assert (hp.dropout, hp.lr, hp.epochs) == (0.3, 0.05, 3) and type(hp.epochs) is int
    assert type(common.parse_hparams({"DROPOUT": 0}, []).dropout) is float


@pytest.mark.parametrize(
    "constants, name",
    [({"EPOCHS": 1e1}, "EPOCHS"), ({"FLIP": 1}, "FLIP"), ({"SEED": True}, "SEED"), ({"LR": "0.1"}, "LR")],
)
def test_a_constant_edited_to_the_wrong_type_is_refused_naming_it(constants, name):
    with pytest.raises(common.UserError, match=rf"^{name} = .* is not allowed: make it"):
        common.parse_hparams(constants, [])


def test_tta_flip_without_flip_is_recorded_as_off(capsys):
    hp = common.parse_hparams(vars(cnn), ["--tta-flip"])
    assert hp.tta_flip is False and "--tta-flip is off because --flip is off" in capsys.readouterr().out
    assert common.parse_hparams(vars(cnn), ["--tta-flip", "--flip"]).tta_flip is True


def test_the_expected_duration_is_printed_after_the_first_epoch(real_data_dir, tmp_path, capsys):
    ann.main(SMALL + ["--epochs", "3", "--out-dir", str(tmp_path)])
    lines = capsys.readouterr().out.splitlines()
    first = next(i for i, line in enumerate(lines) if line.split()[:1] == ["1"])
    assert "min for all 3 epochs" in lines[first + 1] and lines[first + 2].split()[0] == "2"
