"""Runs that are stopped or go wrong end cleanly and keep their work: Ctrl-C, `kill` and a closed terminal at any
point, a loss that diverges, a model too large for memory, an unwritable folder or a full disk, and files
written atomically. Each test asserts the exit code, the single line on stderr and what is left on disk.

Bad settings are in test_settings.py, bad data files and folders in test_data.py, bad run folders and images
given to predict.py in test_predict.py.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time
import types

import pytest
import torch

import ann
import cnn
import common
import compare
import plumbing
import predict
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


SCRIPTS = ["ann.py", "cnn.py", "resnet_transfer.py", "predict.py", "compare.py"] + [
    f"benchmarks/{name}.py" for name in ("accuracy", "speed", "cnn_step", "transfer", "gpu_check", "footwear")
]


@pytest.mark.parametrize("script", SCRIPTS)
def test_ctrl_c_while_torch_loads_is_one_line(script, tmp_path):
    # A stand-in `torch` earlier on the path presses Ctrl-C in the middle of the import, every time.
    (tmp_path / "torch").mkdir()
    (tmp_path / "torch" / "__init__.py").write_text(
        "import os, signal, time\nos.kill(os.getpid(), signal.SIGINT)\ntime.sleep(30)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    done = subprocess.run([sys.executable, script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 130, done.stderr
    one_line(done.stderr.splitlines(), f"{script.split('/')[-1]}: interrupted")


@pytest.mark.parametrize("then_sleep", [5, 0])  # main goes on for a while, or returns at once
def test_a_stop_that_lands_in_a_finalizer_still_stops_the_program(then_sleep, tmp_path):
    # Python runs a signal handler wherever the program is; inside a __del__ its exception can only be printed
    # ("Exception ignored") and dropped, and the program carried on to exit 0.
    program = tmp_path / "finalizer.py"
    program.write_text(
        f"import os, signal, sys, time\nsys.path.insert(0, {str(ROOT)!r})\nimport plumbing\n\n"
        "class Finalized:\n"
        "    def __del__(self):\n"
        "        os.kill(os.getpid(), signal.SIGHUP)\n"
        "        sum(range(100000))  # the handler runs here, inside the finalizer\n\n"
        f"def main(argv):\n    Finalized()\n    time.sleep({then_sleep})\n    print('finished')\n\n"
        "sys.exit(plumbing.run_main(main))\n"
    )
    done = subprocess.run([sys.executable, str(program)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 129, (done.returncode, done.stderr)
    one_line(done.stderr.splitlines(), "stopped by SIGHUP")
    if then_sleep:
        assert "finished" not in done.stdout  # stopped when the signal came, not at the end


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
        plumbing.atomic_write(tmp_path / "a.json", b"{}")
    finally:
        os.umask(old)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o640


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
# An output that goes away, a figure that cannot be drawn


def test_a_reader_that_stops_early_stops_the_run_and_keeps_its_weights(real_data_dir, tmp_path):
    """`python ann.py | head -6`: the run stops at its next line of output, quietly (exit 141, as `cat` ends),
    keeping its record and the weights of its last finished epoch."""
    argv = SMALL + ["--epochs", "20", "--out-dir", str(tmp_path)]
    process = subprocess.Popen(
        [sys.executable, "ann.py", *argv], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    lines = [process.stdout.readline() for _ in range(6)]  # the header, the data folder, the table, epoch 1
    process.stdout.close()
    err = process.communicate(timeout=120)[1].decode()
    assert lines[-1].split()[0] == b"1" and process.returncode == 141 and "Traceback" not in err
    (metrics,) = tmp_path.glob("*/metrics.json")
    record = json.loads(metrics.read_text())
    assert record["status"] == "interrupted" and record["model_pt"].startswith("weights when interrupted")
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
    assert record["model_pt"] == "weights when failed, after epoch 1" and (metrics.parent / "model.pt").exists()


@pytest.mark.parametrize("plot", ["plot_confusion", "plot_misclassified", "plot_curves"])
def test_a_figure_that_cannot_be_drawn_leaves_the_run_completed(plot, real_data_dir, tmp_path, monkeypatch, capsys):
    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(common, plot, disk_full)
    code, err = run_cli(ann, SMALL + ["--out-dir", str(tmp_path)], capsys)
    assert code == 0
    one_line(err, "not drawn", "No space left on device")
    (metrics,) = tmp_path.glob("*/metrics.json")
    record = json.loads(metrics.read_text())
    assert record["status"] == "completed" and record["model_pt"] == "final weights, as evaluated"
