"""A run from start to finish: what it prints, and what it leaves in its folder (metrics.json, the plots,
model.pt), each run in a folder of its own, and the plots opened with --show.

Runs that are stopped or go wrong are in test_robustness.py; compare.py, which reads the folders, in
test_compare.py.
"""

import common
from plumbing import figures, files, runs

import json
import re
import sys

import pytest
import torch
import torch.nn as nn

import ann
import cnn
from conftest import SMALL, TRAIN, png_size, settings


@pytest.mark.parametrize("script, extra", [(ann, []), (cnn, ["--lr", "0.02"])])  # 10 steps need a gentler peak
def test_main_runs_end_to_end_and_writes_the_run_folder(script, extra, real_data_dir, out_dir, capsys):
    final = script.main(SMALL + extra + ["--out-dir", str(out_dir)])
    (run_dir,) = out_dir.iterdir()
    record = json.loads((run_dir / "metrics.json").read_text())
    assert record["status"] == "completed" and record["script"] == script.__name__
    assert len(record["history"]) == 1 and record["final"] == final
    assert set(record["history"][0]) == {
        "epoch",
        "train_batch_loss",
        "train_batch_acc",
        "val_loss",
        "val_acc",
        "lr",
        "seconds",
        "weights",  # the fingerprint of the weights saved after the epoch
    }
    assert set(final) == {"train_acc", "val_acc", "test_acc", "test_loss", "seconds"}
    assert 0.3 < final["test_acc"] <= 1  # one epoch on 1000 images is far above chance (0.1)
    lines = capsys.readouterr().out.strip().splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("epoch train_loss"))
    assert "(train: the batches as trained; val: each image once" in lines[header + 1]
    assert lines[header - 1].startswith(f"  {record['trainable_params']:,} trainable parameters; 1,000 training")
    views = 10 if script is cnn else 2  # each image and its mirror; the CNN's, each shifted four ways too
    assert re.fullmatch(rf"{script.__name__}: train_acc=.* test_acc=.* \({views} view\(s\) of each image\)", lines[-1])


def test_a_one_epoch_run_is_plotted_at_epoch_1_and_the_legend_covers_no_point():
    history = [{"epoch": 1, "train_batch_loss": 0.5, "train_batch_acc": 0.8, "val_loss": 0.4, "val_acc": 0.85}]
    fig = figures.plot_curves(history, ("training batches", "validation"), "a run")
    for ax in fig.axes:
        assert ax.get_xlim() == (0.5, 1.5) and [t for t in ax.get_xticks() if 0.5 <= t <= 1.5] == [1]
        assert ax.get_legend() is None  # one legend, below both plots
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["training batches", "validation"]


def test_the_estimate_after_the_second_epoch_counts_the_epochs_left_and_the_final_evaluation(
    tmp_path, monkeypatch, capsys
):
    """The first epoch pays one-off costs, so the second one sets the pace; the final evaluation costs what its
    test-time views cost. Each reading of the clock (which only the run reads) is a minute after the last: an epoch
    takes a minute, from its start to its end."""
    estimates = []
    for epochs, views in ((3, 1), (13, 1), (13, 10)):
        clock = iter(range(0, 10**6, 60))
        monkeypatch.setattr(runs.time, "perf_counter", lambda clock=clock: next(clock))
        run = common.Run("ann", settings(out_dir=str(tmp_path)), torch.device("cpu"), "fp32")
        data = common.Splits(*[(torch.zeros(n, 1), None) for n in (1000, 200, 1000)])
        run.start_training(data, nn.Linear(1, 1), nn.Linear(1, 1), epochs, views, {})
        capsys.readouterr()
        for epoch in (1, 2, 3):
            run.log_epoch(epoch, 1.0, 0.5, 1.0, 0.5, 0.1)
        lines = capsys.readouterr().out.splitlines()
        assert lines[0].split()[0] == "1" and lines[1].split()[0] == "2" and lines[3].split()[0] == "3"
        assert re.fullmatch(r" +\(about \d+\.\d min in all at this pace, the final evaluation included\)", lines[2])
        estimates.append(float(lines[2].split()[1]))
    # Ten more epochs add ten minutes; ten views instead of one add nine evaluations of 2,200 images (a training
    # image costs three forward passes, so an epoch is 3,200 image passes): 9 * 2200 / 3200 epochs.
    assert estimates[1] - estimates[0] == pytest.approx(10, abs=0.06)
    assert estimates[2] - estimates[1] == pytest.approx(9 * 2200 / 3200, abs=0.06)


def test_the_curves_legend_says_what_the_run_did(real_data_dir, tmp_path, monkeypatch):
    drawn = []
    monkeypatch.setattr(common.Run, "draw", lambda self, plot, name, *args: name == "curves.png" and drawn.append(args))
    ann.main(SMALL + ["--label-smoothing", "0", "--no-flip", "--out-dir", str(tmp_path)])
    cnn.main(SMALL + ["--ema-decay", "0", "--out-dir", str(tmp_path)])
    (_, (ann_batches, ann_validation), _), (_, (cnn_batches, cnn_validation), _) = drawn  # history, legend, title
    assert ann_batches == "training batches (dropout on)" and ann_validation == "validation (evaluated, weight average)"
    assert cnn_batches == "training batches (augmented, dropout on, label smoothing in the loss)"
    assert cnn_validation == "validation (evaluated)"


@pytest.mark.figures
def test_every_plot_is_a_drawn_png(runs):
    from matplotlib.image import imread

    for run_dir in runs.values():
        for name in ("curves.png", "confusion.png", "misclassified.png"):
            png_size(run_dir / name)  # a real PNG
            pixels = imread(run_dir / name)
            assert pixels.std() > 0.05, name  # something drawn on it, not a blank canvas


def test_confusion_matrix_agrees_with_the_test_accuracy(runs, real_data_dir):
    """Rows are the true classes of the 10,000 test images the run used, the diagonal its correct answers."""
    record = json.loads((runs["ann"] / "metrics.json").read_text())
    confusion = torch.tensor(record["test_confusion"], dtype=torch.float64)
    test_labels = common.load_fashion_mnist(real_data_dir)[3]
    assert torch.equal(confusion.sum(1), torch.bincount(test_labels, minlength=10).double())
    assert confusion.trace() / confusion.sum() == pytest.approx(record["final"]["test_acc"])
    per_class = record["per_class_test_acc"]
    assert list(per_class) == list(common.CLASSES)
    assert [per_class[c] for c in common.CLASSES] == pytest.approx((confusion.diag() / confusion.sum(1)).tolist())


def test_record_names_the_environment_and_the_trained_weights(runs):
    run_dir = runs["ann"]
    record = json.loads((run_dir / "metrics.json").read_text())
    assert record["torch_version"] == torch.__version__ and record["device_name"]
    state = torch.load(run_dir / "model.pt", weights_only=True)  # the weights the record's run trained
    model = ann.ANN(dropout=0.1)
    model.load_state_dict(state)
    assert record["trainable_params"] == sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_model_pt_reproduces_the_saved_test_accuracy(runs):
    run_dir = runs["ann"]
    record = json.loads((run_dir / "metrics.json").read_text())
    hp = common.parse_hparams(vars(ann), TRAIN)
    model = ann.ANN(hp.dropout)
    model.load_state_dict(torch.load(run_dir / "model.pt", weights_only=True))
    splits = common.load_splits(common.find_fashion_mnist(hp.data_dir), hp.subset, hp.val_size, hp.seed)
    data, _ = common.to_device_normalized(splits, torch.device("cpu"))
    amp = common.autocast(torch.device("cpu"), record["precision"])
    _, test_acc = common.evaluate(model, *data.test, amp, tta_flip=hp.tta_flip)
    assert test_acc == pytest.approx(record["final"]["test_acc"])


def test_runs_started_in_the_same_second_get_their_own_folders(tmp_path):
    folders = {common.Run("same", settings(out_dir=str(tmp_path)), torch.device("cpu"), "fp32").dir for _ in range(5)}
    assert len(folders) == 5


@pytest.mark.figures
def test_show_opens_the_plots_only_where_asked_and_a_display_exists(real_data_dir, tmp_path, monkeypatch, capsys):
    import matplotlib.pyplot as plt

    plt.switch_backend("Agg")  # windows are counted, never drawn
    shown = []
    monkeypatch.setattr(plt, "show", lambda: shown.append(len(plt.get_fignums())))
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    monkeypatch.setenv("DISPLAY", ":0")
    ann.main(SMALL + ["--epochs", "1", "--out-dir", str(tmp_path / "quiet")])
    assert shown == []  # not asked
    ann.main(SMALL + ["--epochs", "1", "--show", "--out-dir", str(tmp_path / "shown")])
    assert shown == [3]  # curves, confusion matrix, mistakes
    plt.close("all")
    monkeypatch.delenv("DISPLAY")
    capsys.readouterr()
    ann.main(SMALL + ["--epochs", "1", "--show", "--out-dir", str(tmp_path / "headless")])
    assert shown == [3] and "no display here" in capsys.readouterr().err


def test_the_curves_of_a_run_that_did_not_complete_say_how_it_ended(tmp_path, monkeypatch):
    """Ctrl-C after epoch 1 of 3: curves.png's title says so (a completed run's title is its folder alone)."""
    titles = []
    draw = figures.plot_curves
    monkeypatch.setattr(figures, "plot_curves", lambda *args: titles.append(draw(*args).get_suptitle()))
    monkeypatch.setattr(files, "write_figure", lambda plot, path, *args: plot(*args))
    run = common.Run("ann", settings(out_dir=str(tmp_path)), torch.device("cpu"), "fp32")
    data = common.Splits(*[(torch.zeros(n, 1), None) for n in (1000, 200, 1000)])
    run.start_training(data, nn.Linear(1, 1), nn.Linear(1, 1), 3, 1, {})
    run.log_epoch(1, 1.0, 0.5, 1.0, 0.5, 0.1)
    with pytest.raises(KeyboardInterrupt), run:
        raise KeyboardInterrupt
    assert titles == [f"{run.dir.name}\ninterrupted after epoch 1 of 3"]


def test_the_mistakes_grid_says_how_many_mistakes_among_how_many_test_images():
    logits = torch.zeros(10_000, 10)
    logits[:594, 1] = 5  # 594 labelled 0 and called 1
    fig = figures.plot_misclassified(torch.zeros(10_000, 1, 28, 28), torch.zeros(10_000, dtype=torch.long), logits)
    assert fig.get_suptitle() == "the 24 most confident of 594 mistakes among the 10,000 test images"
