"""Runs that are stopped or go wrong end cleanly and keep their work: Ctrl-C, `kill` and a closed terminal at any
point, a loss that diverges, a model too large for memory, an unwritable folder or a full disk, and files
written atomically. Each test asserts the exit code, the single line on stderr and what is left on disk.

Bad settings are in test_settings.py, bad data files and folders in test_data.py, bad run folders and images
given to predict.py in test_predict.py.
"""

import common
from plumbing import figures, files, runs

import contextlib
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import torch
from PIL import Image

import ann
import cnn
import compare
import predict
import resnet_transfer as rt
from conftest import ROOT, SMALL, TINY_RT, as_nobody, one_line, run_cli


def held(folder):
    """The words naming the weights model.pt holds, as the record on disk names them (by their fingerprint)."""
    state = torch.load(folder / "model.pt", weights_only=True)
    return runs.weights_held(json.loads((folder / "metrics.json").read_text()), state)[0]


def first_epoch_recorded(out, timeout=120):
    """Wait until a run writing into `out` has recorded its first epoch (its weights are then on disk too)."""
    deadline, record = time.monotonic() + timeout, {}
    while time.monotonic() < deadline and not record.get("history"):
        time.sleep(0.01)
        with contextlib.suppress(OSError, ValueError, StopIteration):
            record = json.loads(next(out.glob("*/metrics.json")).read_text())
    return record


def ann_with_replace(definition):
    """A program (for python -c) that runs ann.py with os.replace swapped for the one function `definition` defines,
    which may call the real one as `replace` and count its calls in `calls`: a slow or dying disk, for real."""
    name = definition.split("(")[0].removeprefix("def ")
    return (
        "import os, runpy, signal, sys, time\n"
        "replace, calls = os.replace, []\n"
        f"{definition}"
        f"os.replace = {name}\n"
        "sys.argv = sys.argv[1:]\n"
        "runpy.run_path('ann.py', run_name='__main__')\n"
    )


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
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == exit_code and "Traceback" not in stderr
    record = json.loads(metrics[0].read_text())
    assert record["status"] == "interrupted" and len(record["history"]) >= 2
    assert (metrics[0].parent / "curves.png").stat().st_size > 0
    assert held(metrics[0].parent) == f"weights after epoch {len(record['history'])}"
    ann.ANN(dropout=0.1).load_state_dict(torch.load(metrics[0].parent / "model.pt", weights_only=True))


@pytest.mark.figures
@pytest.mark.parametrize(
    "where, status",
    [("tensor_bytes", "interrupted"), ("plot_curves", "completed"), ("plot_misclassified", "completed")],
)
def test_ctrl_c_at_the_end_keeps_what_was_recorded(where, status, real_data_dir, tmp_path, capsys, monkeypatch):
    """Weights are saved as an epoch ends: a Ctrl-C there interrupts the run. The final accuracies are recorded
    before the figures are drawn: a Ctrl-C while they are drawn leaves the run completed, its figures undrawn."""
    module = files if where == "tensor_bytes" else figures
    original, calls = getattr(module, where), []

    def ctrl_c_once(*args, **kwargs):  # the Ctrl-C lands here once; later calls go through
        calls.append(1)
        if len(calls) == 1:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(module, where, ctrl_c_once)
    code, err = run_cli(ann, SMALL + ["--out-dir", str(tmp_path)], capsys)
    assert code == 130 and err[-1].endswith("interrupted") and "Traceback" not in "\n".join(err)
    (metrics,) = tmp_path.glob("*/metrics.json")
    record = json.loads(metrics.read_text())
    assert record["status"] == status and (record["final"] is not None) == (status == "completed")


def test_ctrl_c_while_the_plots_are_shown_keeps_the_run_completed(real_data_dir, tmp_path, capsys, monkeypatch):
    def ctrl_c(paths):
        raise KeyboardInterrupt

    monkeypatch.setattr(common, "show_plots", ctrl_c)
    code, err = run_cli(ann, SMALL + ["--show", "--out-dir", str(tmp_path)], capsys)
    assert code == 130 and "Traceback" not in "\n".join(err)
    (metrics,) = tmp_path.glob("*/metrics.json")
    record = json.loads(metrics.read_text())
    assert record["status"] == "completed" and held(metrics.parent).startswith("final weights, as evaluated")


# ----------------------------------------------------------------------------------------------
# Training that goes wrong


def test_divergence_stops_with_status_diverged(real_data_dir, out_dir, capsys):
    code, err = run_cli(cnn, SMALL + ["--epochs", "3", "--lr", "1e12", "--out-dir", str(out_dir)], capsys)
    assert code == 1 and "smaller --lr" in err[-1]
    (run_dir,) = out_dir.iterdir()
    record = json.loads((run_dir / "metrics.json").read_text())
    assert record["status"] == "diverged" and record["final"] is None


def test_a_model_too_large_for_memory_is_one_line_and_leaves_no_folder(real_data_dir, tmp_path):
    """The widest layer FC_WIDTH allows (820 MB of weights), where the process may take 1.5 GB (a real limit)."""
    done = subprocess.run(
        [sys.executable, "cnn.py", *SMALL, "--fc-width", "65536", "--out-dir", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_DATA, (1_500_000_000, 1_500_000_000)),
    )
    assert done.returncode == 2
    one_line(done.stderr.strip().splitlines(), "out of memory", "--fc-width")
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("argv", [["--fc-width", "1000000000000000"], ["--fc-width", "1000000000"]])
def test_a_width_no_memory_holds_is_refused_as_a_setting(argv, capsys):
    """Once a storage-size overflow deep in torch (exit 1), and a MemoryError for a 1.7 MB model.pt in predict.py."""
    code, err = run_cli(cnn, argv, capsys)
    assert code == 2
    one_line(err, "--fc-width", "is not allowed", "65536")


def test_a_file_is_read_to_its_size_whatever_the_limit(tmp_path):
    """A 10-byte file under a limit of 10**13 bytes: reading it once allocated the whole limit (MemoryError)."""
    (tmp_path / "small").write_bytes(b"0123456789")
    assert files.read_file(tmp_path / "small", "file", 10**13) == b"0123456789"


@pytest.mark.parametrize("script", [ann, cnn, rt, predict, compare])
def test_out_of_memory_advice_names_only_flags_the_script_has(script, capsys):
    error = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 34.00 GiB")

    def main(argv):
        raise error

    in_script = types.FunctionType(main.__code__, vars(script), closure=main.__closure__)  # sees its settings
    code, err = run_cli(types.SimpleNamespace(main=in_script), [], capsys)
    assert code == 2
    one_line(err, "out of memory", "34.00 GiB")
    with pytest.raises(SystemExit):
        script.main(["--help"])
    flags = set(re.findall(r"--[a-z-]+", capsys.readouterr().out))
    assert set(re.findall(r"--[a-z-]+", err[0])) <= flags


def test_fine_tuned_evaluation_runs_the_backbone_batch_size_images_at_a_time(real_data_dir, tmp_path, monkeypatch):
    # With --finetune the backbone runs on every image evaluated, at IMAGE_SIZE: chunks of 2,048 images asked for
    # 100 GB at 512 px. Chunks of BATCH_SIZE take no more memory than a training step.
    batches = []
    forward = rt.FineTuned.forward
    monkeypatch.setattr(
        rt.FineTuned, "forward", lambda self, x: batches.append((self.training, len(x))) or forward(self, x)
    )
    tiny = ["--backbone", "resnet18", "--weights", "none", "--image-size", "32", "--subset", "600", "--val-size", "100"]
    rt.main(tiny + ["--finetune", "--epochs", "1", "--batch-size", "50", "--out-dir", str(tmp_path)])
    assert max(size for training, size in batches if training) == 50
    assert max(size for training, size in batches if not training) == 50
    batches.clear()
    (run,) = tmp_path.iterdir()
    predict.main([str(run), "--test"])
    assert max(size for _, size in batches) == 50


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


def test_written_files_get_the_mode_the_umask_gives_like_the_plots(tmp_path):
    """metrics.json, model.pt and the caches are written through a private temporary file; the result is not."""
    old = os.umask(0o027)
    try:
        files.atomic_write(tmp_path / "a.json", b"{}")
    finally:
        os.umask(old)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o640


def test_writers_of_the_same_file_use_their_own_temporary_files(tmp_path, monkeypatch):
    sources, replace = [], os.replace
    monkeypatch.setattr(files.os, "replace", lambda src, dst: sources.append(src) or replace(src, dst))
    for text in (b"first", b"second"):
        files.atomic_write(tmp_path / "metrics.json", text)
    assert len(set(sources)) == 2 and all(os.path.dirname(s) == str(tmp_path) for s in sources)
    assert (tmp_path / "metrics.json").read_bytes() == b"second" and len(list(tmp_path.iterdir())) == 1


def test_a_write_cut_short_by_ctrl_c_leaves_no_temporary_file(tmp_path, monkeypatch):
    def ctrl_c(fd):
        raise KeyboardInterrupt

    monkeypatch.setattr(files.os, "fsync", ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        files.atomic_write(tmp_path / "features.pt", b"x" * 1000)
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------------------------
# An output that goes away, a figure that cannot be drawn


def test_a_reader_that_stops_early_stops_the_run_and_keeps_its_weights(real_data_dir, tmp_path):
    """`python ann.py | head -7`: the run stops at its next line of output, quietly (exit 141, as `cat` ends),
    keeping its record and the weights of its last finished epoch."""
    argv = SMALL + ["--epochs", "20", "--out-dir", str(tmp_path)]
    process = subprocess.Popen(
        [sys.executable, "ann.py", *argv], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    lines = [process.stdout.readline() for _ in range(8)]  # the header, the data, its sizes, the table's two, epoch 1
    process.stdout.close()
    err = process.communicate(timeout=120)[1].decode()
    assert lines[-1].split()[0] == b"1" and process.returncode == 141 and "Traceback" not in err
    (metrics,) = tmp_path.glob("*/metrics.json")
    record = json.loads(metrics.read_text())
    assert record["status"] == "interrupted" and held(metrics.parent) == f"weights after epoch {len(record['history'])}"
    ann.ANN(dropout=0.1).load_state_dict(torch.load(metrics.parent / "model.pt", weights_only=True))


def test_output_to_a_full_disk_is_one_line_and_leaves_no_empty_folder(real_data_dir, tmp_path):
    with open("/dev/full", "w") as full:
        result = subprocess.run(
            [sys.executable, "ann.py", *SMALL, "--out-dir", str(tmp_path / "runs")],
            cwd=ROOT,
            stdout=full,
            stderr=subprocess.PIPE,
            text=True,
        )
    assert result.returncode == 2
    one_line(result.stderr.strip().splitlines(), "cannot write its output", "No space left on device")
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_an_error_after_the_first_epoch_keeps_the_weights_and_says_why(real_data_dir, tmp_path, monkeypatch):
    calls = []

    def fails_in_epoch_2(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("something broke")
        return original(*args, **kwargs)

    original = ann.train_one_epoch
    monkeypatch.setattr(ann, "train_one_epoch", fails_in_epoch_2)
    with pytest.raises(RuntimeError, match="something broke"):  # a bug of ours still raises
        ann.main(SMALL + ["--epochs", "3", "--out-dir", str(tmp_path)])
    (metrics,) = tmp_path.glob("*/metrics.json")
    record = json.loads(metrics.read_text())
    assert record["status"] == "failed" and record["error"] == "something broke"
    assert held(metrics.parent) == "weights after epoch 1"


@pytest.mark.figures
@pytest.mark.parametrize("plot", ["plot_confusion", "plot_misclassified", "plot_curves"])
def test_a_figure_that_cannot_be_drawn_leaves_the_run_completed(plot, real_data_dir, tmp_path, monkeypatch, capsys):
    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(figures, plot, disk_full)
    code, err = run_cli(ann, SMALL + ["--out-dir", str(tmp_path)], capsys)
    assert code == 0
    one_line(err, "not drawn", "No space left on device")
    (metrics,) = tmp_path.glob("*/metrics.json")
    record = json.loads(metrics.read_text())
    assert record["status"] == "completed" and held(metrics.parent).startswith("final weights, as evaluated")


# ----------------------------------------------------------------------------------------------
# Nothing trained is lost, even to SIGKILL or a full disk


def test_sigkill_leaves_the_weights_and_record_of_the_last_finished_epoch(real_data_dir, tmp_path):
    out = tmp_path / "runs"
    argv = ["--subset", "3000", "--val-size", "500", "--epochs", "1000", "--out-dir", str(out)]
    process = subprocess.Popen([sys.executable, "ann.py", *argv], cwd=ROOT, stdout=subprocess.DEVNULL)
    deadline, record = time.monotonic() + 120, {}
    while time.monotonic() < deadline and len(record.get("history", [])) < 2:
        time.sleep(0.2)
        metrics = list(out.glob("*/metrics.json"))
        if metrics:
            record = json.loads(metrics[0].read_text())
    process.kill()  # SIGKILL, as the out-of-memory killer sends: nothing runs after it
    process.wait(timeout=60)
    record = json.loads(metrics[0].read_text())
    epochs = len(record["history"])
    assert record["status"] == "running" and epochs >= 2 and held(metrics[0].parent) == f"weights after epoch {epochs}"
    ann.ANN(dropout=0.1).load_state_dict(torch.load(metrics[0].parent / "model.pt", weights_only=True))


def test_weights_that_cannot_be_written_still_leave_the_final_accuracies(real_data_dir, tmp_path, capsys, monkeypatch):
    staged = files.staged

    def disk_full(path, data):  # the weights alone: the record still fits
        if path.name == "model.pt":
            raise common.UserError(f"cannot write {path}: No space left on device; free some space or choose another")
        return staged(path, data)

    monkeypatch.setattr(files, "staged", disk_full)
    code, err = run_cli(ann, SMALL + ["--epochs", "2", "--out-dir", str(tmp_path)], capsys)
    assert code == 2 and "No space left" in err[-1] and "accuracies are recorded" in err[-1]
    (metrics,) = tmp_path.glob("*/metrics.json")
    record = json.loads(metrics.read_text())
    assert record["status"] == "completed" and 0 < record["final"]["test_acc"] <= 1
    assert "No space left" in record["not_written"]  # the record says what it could not write


def test_the_record_holds_the_split_sizes_actually_used(real_data_dir, tmp_path):
    ann.main(
        ["--subset", "2000", "--val-size", "1990", "--batch-size", "8", "--epochs", "1", "--out-dir", str(tmp_path)]
    )
    (metrics,) = tmp_path.glob("*/metrics.json")
    _, y, _, _ = common.take_subset(2000, *common.load_fashion_mnist(real_data_dir))
    train, val = common.stratified_split(y, 1990, 0)
    assert len(val) < 1990  # the first 2,000 images lack some classes' share
    assert json.loads(metrics.read_text())["split_sizes"] == {"train": len(train), "val": len(val), "test": 2000}


def test_features_that_cannot_be_cached_still_train_the_head(real_data_dir, tmp_path, capsys, monkeypatch):
    save = files.save_tensors

    def cache_disk_full(path, tensors):
        if path.parent == tmp_path / "cache":
            raise common.UserError(f"cannot write {path}: No space left on device; free some space")
        return save(path, tensors)

    monkeypatch.setattr(files, "save_tensors", cache_disk_full)
    tiny = ["--backbone", "resnet18", "--weights", "none", "--image-size", "32", "--subset", "600", "--val-size", "100"]
    argv = tiny + ["--epochs", "1", "--cache-dir", str(tmp_path / "cache"), "--out-dir", str(tmp_path / "runs")]
    code, err = run_cli(rt, argv, capsys)
    assert code == 0, err
    assert json.loads(next((tmp_path / "runs").glob("*/metrics.json")).read_text())["status"] == "completed"


# ----------------------------------------------------------------------------------------------
# Files: reads are bounded and never hang, writes never follow a planted link


@pytest.fixture
def short_cnn_run(run_copy):
    return run_copy("cnn")


@pytest.mark.figures
def test_outputs_replace_a_planted_symlink_instead_of_writing_through_it(short_cnn_run, tmp_path, capsys):
    weights = (short_cnn_run / "model.pt").read_bytes()
    (short_cnn_run / "predictions.png").symlink_to(short_cnn_run / "model.pt")
    image = tmp_path / "shirt.png"
    from PIL import Image

    Image.new("L", (40, 40), 255).save(image)
    code, err = run_cli(predict, [str(short_cnn_run), str(image)], capsys)
    assert code == 0, err
    assert (short_cnn_run / "model.pt").read_bytes() == weights  # the link is passed over: a figure of its own
    assert (short_cnn_run / "predictions-2.png").read_bytes()[:4] == b"\x89PNG"
    (short_cnn_run.parent / "compare.png").symlink_to(short_cnn_run / "model.pt")
    assert run_cli(compare, ["--out-dir", str(short_cnn_run.parent)], capsys)[0] == 0
    assert (short_cnn_run / "model.pt").read_bytes() == weights


@pytest.mark.parametrize("kind", ["fifo", "dev_zero", "folder"])
def test_a_record_that_is_no_regular_file_is_named_not_read(kind, short_cnn_run, capsys):
    record = short_cnn_run / "metrics.json"
    record.unlink()
    {"fifo": os.mkfifo, "dev_zero": lambda p: p.symlink_to("/dev/zero"), "folder": os.mkdir}[kind](record)
    code, err = run_cli(predict, [str(short_cnn_run), "--test"], capsys)
    assert code == 2
    one_line(err, "metrics.json")
    code, err = run_cli(compare, ["--out-dir", str(short_cnn_run.parent)], capsys)
    assert code == 0 and any(short_cnn_run.name in line for line in err)


def test_weights_that_would_inflate_past_the_models_size_are_refused_before_inflating(short_cnn_run, capsys):
    import io
    import zipfile

    buffer = io.BytesIO()
    torch.save({"weight": torch.zeros(50_000_000)}, buffer)  # 200 MB of zeros, deflated to a small file
    with zipfile.ZipFile(buffer) as plain, zipfile.ZipFile(short_cnn_run / "model.pt", "w", zipfile.ZIP_DEFLATED) as z:
        for entry in plain.infolist():
            z.writestr(entry.filename, plain.read(entry))
    assert (short_cnn_run / "model.pt").stat().st_size < 2_000_000
    code, err = run_cli(predict, [str(short_cnn_run), "--test"], capsys)
    assert code == 2
    one_line(err, "model.pt", "more than expected")


@pytest.mark.parametrize("damage", ["negative_variance", "tiny_std"])
def test_a_model_that_answers_nan_is_refused_naming_the_cause(damage, short_cnn_run, capsys):
    if damage == "negative_variance":
        state = torch.load(short_cnn_run / "model.pt", weights_only=True)
        state["features.2.running_var"] = -state["features.2.running_var"]
        torch.save(state, short_cnn_run / "model.pt")
    else:
        record = json.loads((short_cnn_run / "metrics.json").read_text())
        record["normalization"]["std"] = 1e-300
        (short_cnn_run / "metrics.json").write_text(json.dumps(record))
    code, err = run_cli(predict, [str(short_cnn_run), "--test"], capsys)
    assert code == 2
    one_line(err, "damaged")


@pytest.mark.parametrize("damage", ["float64", "nan", "meta", "fifo", "folder"])
def test_a_damaged_feature_cache_is_extracted_again(damage, runs, tmp_path, capsys):
    """The shared transfer run's cache, damaged: the features are extracted again, and train the same head."""
    shared = json.loads((runs["rt"] / "metrics.json").read_text())
    saved = torch.load(shared["feature_cache"], weights_only=True)
    cache = tmp_path / "cache" / Path(shared["feature_cache"]).name
    cache.parent.mkdir()
    if damage in ("float64", "nan", "meta"):  # meta: the right shape and type, and no values
        changes = {"float64": lambda t: t.double(), "nan": lambda t: torch.full_like(t, float("nan"))}
        change = changes.get(damage, lambda t: t.to("meta"))
        torch.save({k: change(v) if torch.is_tensor(v) else v for k, v in saved.items()}, cache)
    else:
        os.mkfifo(cache) if damage == "fifo" else cache.mkdir()
    argv = TINY_RT + ["--epochs", "2", "--cache-dir", str(cache.parent), "--out-dir", str(tmp_path / "runs")]
    code, err = run_cli(rt, argv, capsys)
    assert code == 0, err
    (record,) = [json.loads(path.read_text()) for path in tmp_path.glob("runs/*/metrics.json")]
    assert record["final"]["test_acc"] == shared["final"]["test_acc"]


def test_a_photo_between_pillows_warning_and_error_limits_is_refused_in_one_line(short_cnn_run, tmp_path, capsys):
    from PIL import Image

    big = tmp_path / "huge.png"
    Image.new("L", (9500, 9500), 255).save(big)  # 90 megapixels in a small file
    code, err = run_cli(predict, [str(short_cnn_run), str(big)], capsys)
    assert code == 2 and "Warning" not in "\n".join(err)
    assert any("huge.png" in line and "pixels" in line for line in err)


def test_an_empty_memory_error_is_still_one_line(capsys):
    def main(argv):
        raise MemoryError

    code, err = run_cli(types.SimpleNamespace(main=main), [], capsys)
    assert code == 2
    one_line(err, "out of memory (MemoryError)")


# ----------------------------------------------------------------------------------------------
# Stops while the program loads, and after its work is done


SCRIPTS = ["ann.py", "cnn.py", "resnet_transfer.py", "predict.py", "compare.py", "benchmarks/speed.py"]


@pytest.mark.parametrize(
    "script, stop",
    [*[(script, signal.SIGINT) for script in SCRIPTS], ("cnn.py", signal.SIGTERM), ("predict.py", signal.SIGHUP)],
)
def test_a_stop_while_torch_loads_is_one_line(script, stop, tmp_path):
    """A stand-in torch package receives the signal as it is imported, as a Ctrl-C in the first seconds does: one
    line and the signal's exit code, no KeyboardInterrupt traceback (nor a C++ abort from inside torch)."""
    (tmp_path / "torch").mkdir()
    (tmp_path / "torch" / "__init__.py").write_text(
        f"import os, time\nos.kill(os.getpid(), {int(stop)})\ntime.sleep(30)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    done = subprocess.run([sys.executable, script, "--help"], cwd=ROOT, env=env, capture_output=True, text=True)
    name = Path(script).name
    words = "interrupted" if stop == signal.SIGINT else f"stopped by {signal.Signals(stop).name}"
    assert done.returncode == 128 + stop and done.stderr == f"{name}: {words}\n"


def test_a_stop_after_the_last_line_is_one_line_not_an_ignored_exception(tmp_path):
    """Ctrl-C as the program shuts down, after its output (here from an atexit hook, as the last thing to run):
    Python printed 'Exception ignored in atexit callback ... KeyboardInterrupt' and exited 0."""
    hook = "atexit.register(lambda: (os.kill(os.getpid(), signal.SIGINT), time.sleep(30)))"
    (tmp_path / "sitecustomize.py").write_text(f"import atexit, os, signal, time\n{hook}\n")
    (tmp_path / "runs").mkdir()
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    argv = [sys.executable, "compare.py", "--out-dir", str(tmp_path / "runs")]
    done = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.stdout.startswith("no completed runs")
    assert done.returncode == 130 and done.stderr == "compare.py: interrupted\n"


@pytest.mark.parametrize("script", ["compare.py", "cnn.py"])
def test_a_host_that_runs_a_script_gets_its_own_signal_handlers_back(script, real_data_dir, tmp_path):
    """IPython's %run, Spyder's runfile, pdb and runpy run a script in a process that goes on: after it, the host's
    handlers are back, and a real Ctrl-C is the host's KeyboardInterrupt, not the script's exit at once."""
    host = (
        "import os, runpy, signal, sys, time\n"
        "handlers = lambda: [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)]\n"
        "before = handlers()\n"
        "sys.argv = sys.argv[1:]\n"
        "try:\n"
        "    runpy.run_path(sys.argv[0], run_name='__main__')\n"
        "except SystemExit as end:\n"
        "    print('exit', end.code)\n"
        "print('same handlers', before == handlers())\n"
        "try:\n"
        "    os.kill(os.getpid(), signal.SIGINT)\n"
        "    time.sleep(5)\n"
        "except KeyboardInterrupt:\n"
        "    print('host interrupted')\n"
    )
    (tmp_path / "runs").mkdir()
    flags = SMALL + ["--data-dir", str(real_data_dir)] if script == "cnn.py" else []
    argv = [sys.executable, "-c", host, script, *flags, "--out-dir", str(tmp_path / "runs")]
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-3:] == ["exit 0", "same handlers True", "host interrupted"]


LOCKED = "{public}/locked/inside"  # in a folder that is root's alone: the user nobody may not look into it


@pytest.mark.parametrize(
    "argv, words",
    [
        (["compare.py", "--out-dir", LOCKED], ["--out-dir", "cannot look at it (Permission denied)"]),
        (
            ["ann.py", "--data-dir", LOCKED, "--out-dir", "{public}/runs"],
            ["--data-dir", "cannot look at it (Permission denied)"],
        ),
        (["resnet_transfer.py", "--weights", LOCKED + ".pt"], ["--weights", "cannot look at it (Permission denied)"]),
        (["resnet_transfer.py", *TINY_RT, "--cache-dir", LOCKED], ["--cache-dir", "cannot look at it"]),
        (["predict.py", "{public}/run", "{public}/photos"], ["1 of 1 images could not be used"]),
    ],
)
def test_a_path_in_a_folder_we_may_not_look_into_is_named_as_such(argv, words, public_dir, runs):
    """Each was a PermissionError traceback, or (--data-dir) "does not exist": the wrong reason. photos/ here can be
    listed but not searched (chmod 644) and holds a photo and a file that is none."""
    (public_dir / "locked").mkdir(mode=0o700)
    shutil.copytree(runs["ann"], public_dir / "run")
    photos = public_dir / "photos"
    photos.mkdir()
    Image.new("L", (28, 28), 128).save(photos / "shirt.png")
    (photos / "notes.txt").write_text("not a photo")
    photos.chmod(0o644)
    done = as_nobody([sys.executable, *(arg.replace("{public}", str(public_dir)) for arg in argv)], public_dir)
    err = done.stderr.strip().splitlines()
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert all(word in err[-1] for word in words), err
    photos.chmod(0o755)


def test_two_runs_in_worker_threads_at_once_train_and_record_as_any_run(real_data_dir, tmp_path, capsys):
    """Streamlit, Gradio or a GUI call main() from worker threads, where Python installs no signal handler: the run
    left an empty folder after its first epoch; two visitors' runs at once ended failed, the stop deferral's depth
    shared between the threads (AttributeError)."""
    import threading

    argv = SMALL + ["--epochs", "3", "--data-dir", str(real_data_dir), "--out-dir", str(tmp_path / "runs")]
    done, errors = [], []

    def work(seed):
        try:
            ann.main(argv + ["--seed", str(seed)])
            done.append(seed)
        except BaseException as error:
            errors.append(error)

    workers = [threading.Thread(target=work, args=(seed,)) for seed in (1, 2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=240)
    assert sorted(done) == [1, 2] and not errors, errors
    records = [json.loads(path.read_text()) for path in (tmp_path / "runs").glob("*/metrics.json")]
    assert [(r["status"], len(r["history"])) for r in records] == [("completed", 3)] * 2
    assert capsys.readouterr().err.count("outside the main thread") == 1


def test_a_stop_while_the_weights_are_renamed_keeps_the_record_true_to_them(real_data_dir, tmp_path):
    """A slow disk, stood in for by a rename of model.pt that takes 3 s to come back: SIGTERM then. The record was
    written after the weights, so it named no weights while model.pt held epoch 1's."""
    slow = ann_with_replace(
        "def replace_then_wait(a, b):\n    replace(a, b)\n    if str(b).endswith('model.pt'):\n        time.sleep(3)\n"
    )
    out = tmp_path / "runs"
    argv = [sys.executable, "-c", slow, "ann.py", *SMALL, "--epochs", "3", "--out-dir", str(out)]
    process = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not list(out.glob("*/model.pt")) and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)  # model.pt is in place; the record is not written yet
    _, err = process.communicate(timeout=120)
    assert process.returncode == 143 and "Traceback" not in err
    (metrics,) = out.glob("*/metrics.json")
    record = json.loads(metrics.read_text())
    assert record["status"] == "interrupted" and len(record["history"]) == 1
    assert held(metrics.parent) == "weights after epoch 1"


# ----------------------------------------------------------------------------------------------
# A completed run whose final weights could not be written, a run that diverges in evaluation


def test_final_weights_the_disk_refused_are_said_wherever_the_run_is_used(real_data_dir, tmp_path):
    """The file-size limit is lowered (prlimit, as an administrator or a full disk would) once epoch 1's weights are
    written: the run completes with epoch 1's weights, and predict.py says so instead of silently using them."""
    out = tmp_path / "runs"
    argv = [sys.executable, "cnn.py", "--subset", "6000", "--val-size", "1000", "--epochs", "4", "--tta-shift", "0"]
    process = subprocess.Popen(
        argv + ["--out-dir", str(out)], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    first_epoch_recorded(out)
    resource.prlimit(process.pid, resource.RLIMIT_FSIZE, (200_000, 200_000))  # model.pt takes 1.7 MB
    _, err = process.communicate(timeout=300)
    record = json.loads(next(out.glob("*/metrics.json")).read_text())
    epoch = int(held(next(out.glob("cnn-*"))).split()[-1])
    assert process.returncode == 2 and "File too large" in err and "accuracies are recorded" in err
    assert record["status"] == "completed" and epoch < len(record["history"]) == 4
    run = next(out.glob("cnn-*"))
    done = subprocess.run([sys.executable, "predict.py", str(run), "--test"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0
    one_line(done.stderr.strip().splitlines(), "final weights could not be saved", f"weights after epoch {epoch}")
    assert "with its final weights, which were not saved" in done.stdout


def test_a_run_that_diverges_in_evaluation_ends_diverged_and_its_record_is_json(real_data_dir, tmp_path, capsys):
    """Weights near 1e18 and a training loss of 8e21 are finite; the evaluation's outputs overflow to NaN."""
    argv = ["--lr", "1000", "--subset", "1024", "--val-size", "512", "--batch-size", "512", "--epochs", "3"]
    code, err = run_cli(cnn, argv + ["--out-dir", str(tmp_path)], capsys)
    assert code == 1 and "NaN or infinite" in err[-1]
    (metrics,) = tmp_path.glob("*/metrics.json")

    def not_json(constant):
        raise ValueError(f"{constant} is not JSON")

    record = json.loads(metrics.read_text(), parse_constant=not_json)  # NaN, Infinity: not JSON for other tools
    assert record["status"] == "diverged" and record["final"] is None
    capsys.readouterr()
    assert common.run_main(compare.main, ["--out-dir", str(tmp_path)]) == 0
    assert "no completed runs" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------
# A matplotlibrc that asks for TeX


@pytest.mark.figures
def test_figures_are_drawn_whatever_a_matplotlibrc_asks(run_copy, tmp_path, monkeypatch, capsys):
    """text.usetex: True, as a matplotlibrc (from $MATPLOTLIBRC, ./matplotlibrc or ~/.config/matplotlib) sets it:
    it needs LaTeX, which few machines have. predict.py printed its answers, then a traceback."""
    import matplotlib

    monkeypatch.setitem(matplotlib.rcParams, "text.usetex", True)
    run = run_copy("ann")
    from PIL import Image

    Image.new("L", (28, 28), 0).save(tmp_path / "black.png")
    assert run_cli(predict, [str(run), str(tmp_path / "black.png"), "--raw"], capsys) == (0, [])
    assert run_cli(compare, ["--out-dir", str(run.parent)], capsys) == (0, [])
    assert run_cli(ann, SMALL + ["--out-dir", str(tmp_path / "new")], capsys) == (0, [])
    for figure in (run / "predictions.png", run.parent / "compare.png", *(tmp_path / "new").glob("*/curves.png")):
        assert figure.read_bytes()[:4] == b"\x89PNG", figure


@pytest.mark.figures
@pytest.mark.parametrize("family", [None, ["DejaVu Serif"], ["Helvetica"]])
def test_names_no_font_of_the_default_draws_are_drawn_quietly_in_the_users_font(
    family, tmp_path, monkeypatch, capfd, caplog
):
    """Chinese, Japanese and emoji file names in predictions.png: about 20 lines of matplotlib's warnings about
    missing glyphs, and a font.family a matplotlibrc set (for its CJK font) overridden by the default style. A font
    the machine lacks (Helvetica, from a Mac user's matplotlibrc): about 180 lines "findfont: ... not found"."""
    import matplotlib
    from matplotlib import font_manager

    if family:
        monkeypatch.setitem(matplotlib.rcParams, "font.family", family)
    made = []

    def plot(*args):
        made.append(predict.plot_predictions(*args))
        return made[-1]

    names = ["衬衫.png", "シャツ.jpg", "👕 t-shirt.png"]
    images, probabilities = torch.zeros(3, 1, 28, 28, dtype=torch.uint8), torch.full((3, 10), 0.1)
    with warnings_recorded() as caught:
        files.write_figure(plot, tmp_path / "p.png", names, images, probabilities, [None, None, 0], [None] * 3)
    assert not caught and capfd.readouterr().err == "" and not caplog.records  # matplotlib's warnings are logged
    title = made[0].axes[0].title
    assert title.get_fontfamily()[0] == (family or ["sans-serif"])[0]  # the user's font comes first
    fonts = font_manager.fontManager.ttflist
    cjk = [f.name for f in fonts if not f.name.startswith("Last Resort") and ord("衬") in files.glyphs(f.fname)]
    if cjk:  # a machine with a CJK font draws the name in it
        assert set(cjk) & set(title.get_fontfamily())


@contextlib.contextmanager
def warnings_recorded():
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield caught


# ----------------------------------------------------------------------------------------------
# Round six: a disposition the user chose, a stop while the final record is written, a full disk between the
# weights and the record, a stop in the first moments


def test_nohup_keeps_a_run_going_through_a_hangup(real_data_dir, tmp_path):
    """`nohup python ann.py`: nohup ignores SIGHUP, and the scripts' handlers leave it ignored (a logout used to end
    the run with exit 129)."""
    out = tmp_path / "runs"
    argv = ["nohup", sys.executable, "ann.py", *SMALL, "--epochs", "30", "--out-dir", str(out)]
    process = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first_epoch_recorded(out)
    process.send_signal(signal.SIGHUP)  # as a logout sends it
    assert process.wait(timeout=120) == 0
    assert json.loads(next(out.glob("*/metrics.json")).read_text())["status"] == "completed"


def test_a_stop_while_the_final_record_is_written_leaves_it_completed(real_data_dir, tmp_path):
    """The completed record's write slowed by 3 s before its rename (a slow disk): SIGTERM then waits for it."""
    slow = ann_with_replace(
        "def wait_then_replace(a, b):\n"
        "    if str(b).endswith('metrics.json'):\n"
        "        calls.append(b)\n"
        "        if len(calls) == 2:\n"
        "            open(os.environ['FINISHING'], 'w').close()\n"
        "            time.sleep(3)\n"
        "    return replace(a, b)\n"
    )
    out, finishing = tmp_path / "runs", tmp_path / "finishing"
    argv = [sys.executable, "-c", slow, "ann.py", *SMALL, "--out-dir", str(out)]
    env = {**os.environ, "FINISHING": str(finishing)}
    process = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not finishing.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGTERM)  # the completed record is being written
    _, err = process.communicate(timeout=120)
    assert process.returncode == 143 and "Traceback" not in err
    record = json.loads(next(out.glob("*/metrics.json")).read_text())
    assert record["status"] == "completed" and record["final"]["test_acc"] > 0


@pytest.fixture
def small_disk(tmp_path):
    """A real filesystem of 8 MB (tmpfs), where a test can fill the disk; skipped where mounting is not allowed."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("mounting a tmpfs needs root")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=False)


def test_a_full_disk_between_the_weights_and_the_record_keeps_them_agreeing(real_data_dir, small_disk, tmp_path):
    """After epoch 1 the disk is filled but for room for the new weights: epoch 2's weights are written aside, its
    record is not. model.pt must still hold epoch 1's weights, which the record names."""
    out = small_disk / "runs"
    argv = [sys.executable, "cnn.py", "--subset", "6000", "--val-size", "1000", "--epochs", "4", "--out-dir", str(out)]
    process = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    first_epoch_recorded(out)
    process.send_signal(signal.SIGSTOP)
    weights = next(out.glob("*/model.pt"))
    epoch_1 = weights.read_bytes()
    room = os.statvfs(small_disk)
    pages = -(-len(epoch_1) // 4096) * 4096  # the new weights fit; nothing more does
    (small_disk / "filler").write_bytes(b"\0" * (room.f_bavail * room.f_frsize - pages))
    process.send_signal(signal.SIGCONT)
    _, err = process.communicate(timeout=300)
    assert process.returncode == 2 and "No space left" in err and "Traceback" not in err
    assert held(weights.parent) == "weights after epoch 1" and weights.read_bytes() == epoch_1


def test_a_full_disk_at_the_very_end_still_prints_the_final_accuracies(real_data_dir, small_disk, tmp_path):
    """The disk fills while the final evaluation runs: the final record cannot be written. The accuracies were
    computed: they are printed before the record is saved, and the one line says where they are."""
    out = small_disk / "runs"
    argv = [sys.executable, "cnn.py", "--subset", "6000", "--val-size", "1000", "--epochs", "1", "--out-dir", str(out)]
    process = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first_epoch_recorded(out)
    process.send_signal(signal.SIGSTOP)  # in the final evaluation: 6,000 test images in 10 views each
    room = os.statvfs(small_disk)
    (small_disk / "filler").write_bytes(b"\0" * (room.f_bavail * room.f_frsize))
    process.send_signal(signal.SIGCONT)
    out_text, err = process.communicate(timeout=300)
    assert process.returncode == 2 and "Traceback" not in err
    one_line(err.strip().splitlines(), "No space left", "metrics.json", "final accuracies are printed above")
    assert re.search(r"^cnn: train_acc=[\d.]+% val_acc=[\d.]+% test_acc=[\d.]+%", out_text, re.MULTILINE)


def test_a_sigkill_between_the_record_and_the_weights_leaves_a_record_naming_the_weights(real_data_dir, tmp_path):
    """SIGKILL at the one instant where the record of epoch 2 is in place and its weights are not yet: model.pt holds
    epoch 1's, and the record on disk must name them (it said epoch 2's, and predict.py said so too)."""
    kill = ann_with_replace(
        "def replace_or_die(a, b):\n"
        "    if str(b).endswith('model.pt'):\n"
        "        calls.append(b)\n"
        "        if len(calls) == 2:\n"
        "            os.kill(os.getpid(), signal.SIGKILL)\n"
        "    return replace(a, b)\n"
    )
    out = tmp_path / "runs"
    argv = [sys.executable, "-c", kill, "ann.py", *SMALL, "--epochs", "3", "--out-dir", str(out)]
    process = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert process.returncode == -signal.SIGKILL
    (metrics,) = out.glob("*/metrics.json")
    record = json.loads(metrics.read_text())
    assert record["status"] == "running" and len(record["history"]) == 2
    assert held(metrics.parent) == "weights after epoch 1"
    argv = [sys.executable, "predict.py", str(metrics.parent), "--test"]
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0 and "using its weights after epoch 1" in done.stderr


def test_weights_no_epoch_of_the_record_names_are_refused_in_one_line(run_copy, capsys):
    """A model.pt swapped for another run's of the same model: it fits, but its record never held it."""
    run = run_copy("ann")
    state = torch.load(run / "model.pt", weights_only=True)
    other = {name: tensor + 1 if tensor.is_floating_point() else tensor for name, tensor in state.items()}
    files.save_tensors(run / "model.pt", other)
    code, err = run_cli(predict, [str(run), "--test"], capsys)
    assert code == 2
    one_line(err, "model.pt", "names for no epoch")


@pytest.mark.parametrize("delay", [0.06, 0.09, 0.12, 0.2])
def test_a_ctrl_c_in_the_first_moments_is_never_a_traceback(delay, tmp_path):
    """SIGINT and SIGTERM in the first tenths of a second, as the script's imports begin: the guard was installed
    only after plumbing's own imports (60-110 ms into start-up), and a Ctrl-C before it printed a traceback. What
    remains is Python compiling the script itself, before its first line runs."""
    for stop in (signal.SIGINT, signal.SIGTERM):
        process = subprocess.Popen(
            [sys.executable, "compare.py", "--out-dir", str(tmp_path)], cwd=ROOT, stderr=subprocess.PIPE, text=True
        )
        time.sleep(delay)
        process.send_signal(stop)
        _, err = process.communicate(timeout=60)
        assert "Traceback" not in err and len(err.strip().splitlines()) <= 1, err
