"""Runs that are stopped or go wrong end cleanly and keep their work: Ctrl-C, `kill` and a closed terminal at any
point, a loss that diverges, a model too large for memory, an unwritable folder or a full disk, and files
written atomically. Each test asserts the exit code, the single line on stderr and what is left on disk.

The last section covers resnet_transfer.py's folders, weights files and feature cache; those tests belong in
test_transfer.py, and stay here until that file is free to edit.

Bad settings are in test_settings.py, bad data files and folders in test_data.py, bad run folders and images
given to predict.py in test_predict.py.
"""

import json
import os
import pickle
import signal
import subprocess
import sys
import time

import pytest
import torch
import torchvision

import ann
import cnn
import common
import plumbing
import resnet_transfer as rt
from conftest import ROOT, SMALL, one_line, run_cli

# ----------------------------------------------------------------------------------------------
# Stopping keeps the work


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


@pytest.mark.parametrize("where", ["plot_confusion", "plot_misclassified", "save_tensors"])
def test_ctrl_c_during_the_final_report_ends_as_interrupted(where, real_data_dir, tmp_path, capsys, monkeypatch):
    original, calls = getattr(common, where), []

    def ctrl_c_once(*args, **kwargs):  # the Ctrl-C lands here once; later calls (saving the record) go through
        calls.append(1)
        if len(calls) == 1:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(common, where, ctrl_c_once)
    code, err = run_cli(ann, SMALL + ["--out-dir", str(tmp_path)], capsys)
    assert code == 130 and err[-1].endswith("interrupted") and "Traceback" not in "\n".join(err)
    (metrics,) = tmp_path.glob("*/metrics.json")
    assert json.loads(metrics.read_text())["status"] == "interrupted"


def test_ctrl_c_during_the_plotting_import_ends_as_interrupted(real_data_dir, tmp_path, capsys, monkeypatch):
    """The first Ctrl-C lands in matplotlib's import; the half-imported module then fails the second plot."""
    calls = []

    def broken_plot(*args, **kwargs):
        calls.append(1)
        raise KeyboardInterrupt if len(calls) == 1 else ImportError("partially initialized module 'matplotlib'")

    monkeypatch.setattr(common, "plot_curves", broken_plot)
    code, err = run_cli(ann, SMALL + ["--out-dir", str(tmp_path)], capsys)
    assert code == 130 and "Traceback" not in "\n".join(err) and "curves.png not drawn" in err[0]
    (metrics,) = tmp_path.glob("*/metrics.json")
    assert json.loads(metrics.read_text())["status"] == "interrupted"


def test_ctrl_c_while_the_plots_are_shown_keeps_the_run_completed(real_data_dir, tmp_path, capsys, monkeypatch):
    def ctrl_c(paths):
        raise KeyboardInterrupt

    monkeypatch.setattr(common, "show_plots", ctrl_c)
    code, err = run_cli(ann, SMALL + ["--show", "--out-dir", str(tmp_path)], capsys)
    assert code == 130 and "Traceback" not in "\n".join(err)
    (metrics,) = tmp_path.glob("*/metrics.json")
    record = json.loads(metrics.read_text())
    assert record["status"] == "completed" and record["model_pt"] == "final weights, as evaluated"


# ----------------------------------------------------------------------------------------------
# Training that goes wrong


def test_divergence_stops_with_status_diverged(real_data_dir, out_dir, capsys):
    code, err = run_cli(cnn, SMALL + ["--epochs", "3", "--lr", "1e12", "--out-dir", str(out_dir)], capsys)
    assert code == 1 and "smaller --lr" in err[-1]
    (run_dir,) = out_dir.iterdir()
    record = json.loads((run_dir / "metrics.json").read_text())
    assert record["status"] == "diverged" and record["final"] is None


def test_a_model_too_large_for_memory_is_one_line_and_leaves_no_folder(real_data_dir, tmp_path, capsys):
    code, err = run_cli(cnn, SMALL + ["--fc-width", "1000000000", "--out-dir", str(tmp_path)], capsys)
    assert code == 2
    one_line(err, "out of memory")
    assert not any(tmp_path.iterdir())


# ----------------------------------------------------------------------------------------------
# Folders and files: unwritable, full, written by two runs at once, cut short


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


def test_writers_of_the_same_file_use_their_own_temporary_files(tmp_path, monkeypatch):
    sources, replace = [], os.replace
    monkeypatch.setattr(plumbing.os, "replace", lambda src, dst: sources.append(src) or replace(src, dst))
    for text in (b"first", b"second"):
        plumbing.atomic_write(tmp_path / "metrics.json", text)
    assert len(set(sources)) == 2 and all(os.path.dirname(s) == str(tmp_path) for s in sources)
    assert (tmp_path / "metrics.json").read_bytes() == b"second" and len(list(tmp_path.iterdir())) == 1


def test_a_write_cut_short_by_ctrl_c_leaves_no_temporary_file(tmp_path, monkeypatch):
    def ctrl_c(fd):
        raise KeyboardInterrupt

    monkeypatch.setattr(plumbing.os, "fsync", ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        plumbing.atomic_write(tmp_path / "features.pt", b"x" * 1000)
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------------------------
# resnet_transfer.py: folders, weights files and caches checked before the long work (belong in test_transfer.py)

TINY_RT = ["--backbone", "resnet18", "--weights", "none", "--image-size", "32", "--subset", "600", "--val-size", "100"]
TINY_RT += ["--batch-size", "100", "--epochs", "1"]


def never_extract(*args):
    pytest.fail("the backbone was loaded although the cache folder is unusable")


def test_a_cache_dir_that_is_a_file_is_refused_before_extraction(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(rt, "load_backbone", never_extract)
    blocker = tmp_path / "cache"
    blocker.write_text("a file")
    code, err = run_cli(rt, TINY_RT + ["--cache-dir", str(blocker), "--out-dir", str(tmp_path / "runs")], capsys)
    assert code == 2
    one_line(err, "--cache-dir", "is a file")
    assert not (tmp_path / "runs").exists()


def test_a_read_only_cache_dir_is_refused_before_extraction(tmp_path, capsys, monkeypatch):
    def read_only(*args, **kwargs):  # as root, chmod cannot make a folder read-only: the file system says so
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(rt, "load_backbone", never_extract)
    monkeypatch.setattr(plumbing.tempfile, "TemporaryFile", read_only)
    code, err = run_cli(rt, TINY_RT + ["--cache-dir", str(tmp_path / "c"), "--out-dir", str(tmp_path / "r")], capsys)
    assert code == 2
    one_line(err, "--cache-dir", "not writable", "Read-only file system")


class RunsCode:
    """A pickle that would create a file if it were ever unpickled."""

    marker = None

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def bad_weight_files(tmp_path):
    torch.manual_seed(0)
    resnet18, resnet34 = torchvision.models.resnet18(), torchvision.models.resnet34()
    ten_classes = resnet18.state_dict()
    ten_classes["fc.weight"], ten_classes["fc.bias"] = torch.zeros(10, 512), torch.zeros(10)
    RunsCode.marker = tmp_path / "code-ran"
    files = {
        "whole-model.pt": (lambda p: torch.save(resnet18, p), "pickled Python objects"),
        "code.pkl": (lambda p: p.write_bytes(pickle.dumps(RunsCode())), "pickled Python objects"),
        "code-in-torch-format.pt": (lambda p: torch.save({"x": RunsCode()}, p), "pickled Python objects"),
        "empty.pt": (lambda p: p.write_bytes(b""), "the file is empty"),
        "notes.txt": (lambda p: p.write_text("these are not weights\n"), "not a file written by torch.save"),
        "resnet34.pt": (lambda p: torch.save(resnet34.state_dict(), p), "not a resnet18 state dict"),
        "ten-classes.pt": (lambda p: torch.save(ten_classes, p), "fc.weight has shape (10, 512)"),
        "a-list.pt": (lambda p: torch.save([torch.zeros(1)], p), "holds no state dict"),
    }
    for name, (write, _) in files.items():
        write(tmp_path / name)
    return {name: reason for name, (_, reason) in files.items()}


def test_every_bad_weights_file_is_one_line_and_no_code_runs(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(rt, "cached_features", lambda *a: pytest.fail("went on past bad weights"))
    for name, reason in bad_weight_files(tmp_path).items():
        out = tmp_path / "runs" / name
        argv = ["--weights", str(tmp_path / name), "--out-dir", str(out), "--cache-dir", str(tmp_path / "cache")]
        code, err = run_cli(rt, TINY_RT + argv, capsys)
        assert code == 2, name
        one_line(err, "--weights", name, reason)
        assert "weights_only" not in err[0]
        assert not any(out.iterdir())  # failed before the first epoch: no run folder left behind
    assert not RunsCode.marker.exists()


def test_a_state_dict_wrapped_as_training_frameworks_save_it_is_accepted(tmp_path):
    torch.manual_seed(1)
    reference = torchvision.models.resnet18()
    torch.save({"state_dict": reference.state_dict(), "epoch": 3}, tmp_path / "wrapped.pt")
    backbone, _, _, _ = rt.load_backbone("resnet18", str(tmp_path / "wrapped.pt"), seed=0)
    assert torch.equal(backbone.conv1.weight, reference.conv1.weight)


def test_a_corrupt_file_in_the_torch_hub_cache_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    checkpoints = tmp_path / "torch" / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    (checkpoints / "resnet18-f37072fd.pth").write_bytes(b"PK\x03\x04 half a download")
    argv = ["--backbone", "resnet18", "--out-dir", str(tmp_path / "runs"), "--cache-dir", str(tmp_path / "c")]
    code, err = run_cli(rt, argv, capsys)
    assert code == 2
    one_line(err, "cached ImageNet weights", "resnet18-f37072fd.pth", "delete the file")


def test_a_feature_cache_with_the_right_key_but_the_wrong_shape_is_rebuilt(real_data_dir, tmp_path, capsys):
    args = TINY_RT + ["--out-dir", str(tmp_path / "runs"), "--cache-dir", str(tmp_path / "cache")]
    rt.main(args)
    (cache,) = (tmp_path / "cache").iterdir()
    saved = torch.load(cache, weights_only=True)
    torch.save({**saved, "train": saved["train"][:10]}, cache)
    capsys.readouterr()
    rt.main(args)
    assert "wrong shape" in capsys.readouterr().out
    assert torch.load(cache, weights_only=True)["train"].shape == (600, 512)
