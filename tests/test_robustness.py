"""Every failure a user can cause ends in one clear line and exit code 2, and nothing is lost or left behind.

Each test names the behaviour; each asserts the exit code, the single line and what is on disk.
"""

import gzip
import json
import os
import pickle
import time

import pytest
import torch
import torchvision

import ann
import cnn
import common
import compare
import plumbing
import resnet_transfer as rt
from conftest import SMALL, run_cli

TINY_RT = ["--backbone", "resnet18", "--weights", "none", "--image-size", "32", "--subset", "600", "--val-size", "100"]
TINY_RT += ["--batch-size", "100", "--epochs", "1"]


def one_line(err, *words):
    assert len(err) == 1 and "Traceback" not in err[0], err
    for word in words:
        assert word in err[0], err[0]


# ----------------------------------------------------------------------------------------------
# Training works for every accepted setting


@pytest.mark.parametrize(
    "argv",
    [
        ["--subset", "1201", "--val-size", "200", "--batch-size", "100"],  # 1,001 images: a last batch of one
        ["--subset", "1200", "--val-size", "191", "--batch-size", "9"],  # 1,009 = 112 * 9 + 1
        ["--val-size", "95", "--batch-size", "512"],  # the whole training set: 59,905 = 117 * 512 + 1
    ],
)
def test_a_last_batch_of_one_image_trains_the_batchnorm_model(argv, real_data_dir, tmp_path, capsys):
    code, err = run_cli(ann, argv + ["--epochs", "1", "--out-dir", str(tmp_path)], capsys)
    assert code == 0, err
    (run_dir,) = tmp_path.iterdir()
    assert json.loads((run_dir / "metrics.json").read_text())["status"] == "completed"


def test_a_model_too_large_for_memory_is_one_line_and_leaves_no_folder(real_data_dir, tmp_path, capsys):
    code, err = run_cli(cnn, SMALL + ["--fc-width", "1000000000", "--out-dir", str(tmp_path)], capsys)
    assert code == 2
    one_line(err, "out of memory")
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("argv", [["--seed", str(2**64)], ["--seed", str(2**70)], ["--batch-size", "1"]])
def test_values_the_machine_cannot_use_are_refused_before_any_work(argv, tmp_path, capsys):
    code, err = run_cli(ann, argv + ["--out-dir", str(tmp_path)], capsys)
    assert code == 2
    one_line(err, argv[0])
    assert not any(tmp_path.iterdir())


def test_the_largest_seed_trains(real_data_dir, tmp_path, capsys):
    code, err = run_cli(ann, SMALL + ["--seed", str(2**64 - 1), "--out-dir", str(tmp_path)], capsys)
    assert code == 0, err


# ----------------------------------------------------------------------------------------------
# Everything is checked before the long work


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


def test_folder_flags_expand_the_tilde_like_a_shell(real_data_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    code, err = run_cli(ann, SMALL + ["--out-dir=~/runs"], capsys)
    assert code == 0, err
    assert not (tmp_path / "~").exists()
    assert len(list((tmp_path / "home" / "runs").iterdir())) == 1


def test_the_data_folder_used_is_printed_and_recorded(real_data_dir, tmp_path, capsys):
    ann.main(SMALL + ["--out-dir", str(tmp_path)])
    assert f"data: {real_data_dir}" in capsys.readouterr().out
    (metrics,) = tmp_path.glob("*/metrics.json")
    assert json.loads(metrics.read_text())["data_dir"] == str(real_data_dir)


@pytest.mark.parametrize("from_env", [False, True])
def test_a_named_data_folder_without_the_files_is_used_not_passed_over(from_env, tmp_path, monkeypatch, capsys):
    from torchvision.datasets import FashionMNIST

    monkeypatch.setattr(FashionMNIST, "mirrors", ["http://127.0.0.1:9/"])  # offline: nothing listens there
    empty = tmp_path / "empty"
    empty.mkdir()
    argv = ["--out-dir", str(tmp_path / "runs")]
    if from_env:
        monkeypatch.setenv("FASHION_MNIST_DIR", str(empty))
    else:
        argv += ["--data-dir", str(empty)]
    code, err = run_cli(ann, argv, capsys)
    assert code == 2
    one_line(err, f"could not download Fashion-MNIST into {empty}")
    assert not any((tmp_path / "runs").iterdir())


@pytest.mark.parametrize("from_env", [False, True])
def test_a_data_folder_that_is_a_file_or_a_symlink_loop_is_named_as_such(from_env, tmp_path, monkeypatch, capsys):
    a_file, loop = tmp_path / "a-file", tmp_path / "loop"
    a_file.write_text("not a folder")
    loop.symlink_to(loop)
    flag = "$FASHION_MNIST_DIR" if from_env else "--data-dir"
    for folder, words in ((a_file, "is a file"), (loop, "symlink loop")):
        argv = ["--out-dir", str(tmp_path / "runs")]
        if from_env:
            monkeypatch.setenv("FASHION_MNIST_DIR", str(folder))
        else:
            argv += ["--data-dir", str(folder)]
        code, err = run_cli(ann, argv, capsys)
        assert code == 2
        one_line(err, flag, str(folder), words)


def copy_data(real_data_dir, folder):
    folder.mkdir()
    for name in common.FILES:
        source = common.find_file(real_data_dir, name)
        data = source.read_bytes()
        (folder / (name + ".gz")).write_bytes(data if source.suffix == ".gz" else gzip.compress(data))


def test_a_huge_data_file_is_refused_without_reading_it(real_data_dir, tmp_path):
    copy_data(real_data_dir, tmp_path / "data")
    (tmp_path / "data" / "t10k-images-idx3-ubyte.gz").unlink()
    huge = tmp_path / "data" / "t10k-images-idx3-ubyte"
    with open(huge, "wb") as f:
        f.truncate(4 * 2**30)  # 4 GiB, sparse: costs no disk, and reading it whole would cost 4 GiB of memory
    started = time.perf_counter()
    with pytest.raises(common.UserError, match=r"t10k-images-idx3-ubyte: 4,294,967,296 bytes, but the official"):
        common.load_fashion_mnist(tmp_path / "data")
    assert time.perf_counter() - started < 10


def test_a_gzip_bomb_is_refused_after_inflating_no_more_than_the_real_file(real_data_dir, tmp_path, monkeypatch):
    copy_data(real_data_dir, tmp_path / "data")
    bomb = gzip.compress(bytes(200 * 2**20), compresslevel=9)  # 200 MiB of zeros in about 200 KB
    (tmp_path / "data" / "train-images-idx3-ubyte.gz").write_bytes(bomb)
    reads = []
    real_open = gzip.open

    def counting_open(*args, **kwargs):
        f = real_open(*args, **kwargs)
        read = f.read
        f.read = lambda size=-1: reads.append(size) or read(size)
        return f

    monkeypatch.setattr(plumbing.gzip, "open", counting_open)
    with pytest.raises(common.UserError, match=r"train-images-idx3-ubyte\.gz: holds more than the 47,040,016 bytes"):
        common.load_fashion_mnist(tmp_path / "data")
    assert reads == [47_040_017]  # one read, capped at one byte past the official size: never the 200 MiB


def test_a_small_file_claiming_a_huge_gzip_is_refused_by_its_size(real_data_dir, tmp_path):
    copy_data(real_data_dir, tmp_path / "data")
    (tmp_path / "data" / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(bytes(50 * 2**20)))
    with pytest.raises(common.UserError, match=r"t10k-labels-idx1-ubyte\.gz: [\d,]+ bytes, but the official"):
        common.load_fashion_mnist(tmp_path / "data")


# ----------------------------------------------------------------------------------------------
# Weights and caches never give tracebacks


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


def test_writers_of_the_same_file_use_their_own_temporary_files(tmp_path, monkeypatch):
    sources, replace = [], os.replace
    monkeypatch.setattr(plumbing.os, "replace", lambda src, dst: sources.append(src) or replace(src, dst))
    for text in (b"first", b"second"):
        plumbing.atomic_write(tmp_path / "metrics.json", text)
    assert len(set(sources)) == 2 and all(os.path.dirname(s) == str(tmp_path) for s in sources)
    assert (tmp_path / "metrics.json").read_bytes() == b"second" and len(list(tmp_path.iterdir())) == 1


# ----------------------------------------------------------------------------------------------
# Stopping keeps the work


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


def test_bad_data_leaves_no_run_folder(tmp_path, capsys):
    for name in common.FILES:
        (tmp_path / (name + ".gz")).write_bytes(b"\x1f\x8b not really gzip")
    code, err = run_cli(ann, ["--data-dir", str(tmp_path), "--out-dir", str(tmp_path / "runs")], capsys)
    assert code == 2
    one_line(err, "train-images-idx3-ubyte.gz")
    assert not any((tmp_path / "runs").iterdir())


# ----------------------------------------------------------------------------------------------
# compare.py never dies on one bad folder


def test_compare_skips_malformed_records_and_still_prints_the_table(tmp_path, capsys):
    good = {
        "script": "ann",
        "status": "completed",
        "started": "2026-01-01T00:00:00",
        "hparams": {"LR": 0.1, "SEED": 1},
        "history": [{"epoch": 1, "val_acc": 0.9}],
        "final": {"test_acc": 0.9, "val_acc": 0.9, "seconds": 10.0},
    }
    records = {
        "ann-good": good,
        "ann-history-null": {**good, "history": None},
        "ann-history-strings": {**good, "history": ["epoch 1"]},
        "ann-val-text": {**good, "history": [{"epoch": 1, "val_acc": "90%"}]},
        "ann-final-text": {**good, "final": {"test_acc": "0.9"}},
        "ann-started-number": {**good, "started": 20260101},
        "ann-no-test-acc": {**good, "final": {"val_acc": 0.9}},
    }
    for name, record in records.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.json").write_text(json.dumps(record))
    code, err = run_cli(compare, ["--out-dir", str(tmp_path)], capsys)
    assert code == 0
    assert len(err) == 6 and all(line.startswith("warning: skipping ann-") for line in err)
    assert (tmp_path / "compare.png").exists()


def test_compare_prints_the_table_when_the_figure_cannot_be_saved(tmp_path, capsys, monkeypatch):
    record = {"script": "ann", "status": "completed", "hparams": {}, "history": [{"epoch": 1, "val_acc": 0.5}]}
    record["final"] = {"test_acc": 0.5, "val_acc": 0.5, "seconds": 1.0}
    (tmp_path / "ann-1").mkdir()
    (tmp_path / "ann-1" / "metrics.json").write_text(json.dumps(record))

    def read_only(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(compare, "plot", read_only)
    code = common.run_main(compare.main, ["--out-dir", str(tmp_path)])
    out, err = capsys.readouterr()
    assert code == 0 and out.splitlines()[1].split()[:3] == ["A", "ann", "1"]
    one_line(err.strip().splitlines(), "compare.png not saved", "Permission denied")


def test_ctrl_c_while_the_plots_are_shown_keeps_the_run_completed(real_data_dir, tmp_path, capsys, monkeypatch):
    def ctrl_c(paths):
        raise KeyboardInterrupt

    monkeypatch.setattr(common, "show_plots", ctrl_c)
    code, err = run_cli(ann, SMALL + ["--show", "--out-dir", str(tmp_path)], capsys)
    assert code == 130 and "Traceback" not in "\n".join(err)
    (metrics,) = tmp_path.glob("*/metrics.json")
    record = json.loads(metrics.read_text())
    assert record["status"] == "completed" and record["model_pt"] == "final weights, as evaluated"


def test_a_write_cut_short_by_ctrl_c_leaves_no_temporary_file(tmp_path, monkeypatch):
    def ctrl_c(fd):
        raise KeyboardInterrupt

    monkeypatch.setattr(plumbing.os, "fsync", ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        plumbing.atomic_write(tmp_path / "features.pt", b"x" * 1000)
    assert list(tmp_path.iterdir()) == []
