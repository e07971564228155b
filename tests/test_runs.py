"""What a run leaves behind (plots, model.pt, the record) and compare.py over a folder of runs."""

import json
import struct
import sys

import pytest
import torch

import ann
import common
import compare
from conftest import SMALL, settings


def png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
    return struct.unpack(">II", data[16:24])


@pytest.fixture(scope="module")
def ann_run(real_data_dir, tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("runs")
    argv = SMALL + ["--epochs", "2", "--out-dir", str(out_dir)]
    ann.main(argv)
    (run_dir,) = out_dir.iterdir()
    return run_dir, json.loads((run_dir / "metrics.json").read_text()), argv


def test_every_plot_is_a_png_of_the_expected_size(ann_run):
    run_dir, _, _ = ann_run
    assert png_size(run_dir / "curves.png") == (1000, 400)
    assert png_size(run_dir / "confusion.png") == (900, 800)
    assert png_size(run_dir / "misclassified.png") == (1200, 900)


def test_confusion_matrix_agrees_with_the_test_accuracy(ann_run):
    _, record, _ = ann_run
    confusion = torch.tensor(record["test_confusion"], dtype=torch.float64)
    assert confusion.sum() == 1200
    rates = confusion / confusion.sum(1, keepdim=True)
    assert torch.allclose(rates.sum(1), torch.ones(10, dtype=torch.float64))
    assert confusion.trace() / confusion.sum() == pytest.approx(record["final"]["test_acc"])
    per_class = record["per_class_test_acc"]
    assert list(per_class) == list(common.CLASSES)
    assert [per_class[c] for c in common.CLASSES] == pytest.approx(rates.diag().tolist())


def test_record_names_the_environment(ann_run):
    _, record, _ = ann_run
    assert record["torch_version"] == torch.__version__ and record["device_name"]
    assert record["trainable_params"] == sum(p.numel() for p in ann.ANN(dropout=0.1).parameters())


def test_model_pt_reproduces_the_saved_test_accuracy(ann_run):
    run_dir, record, argv = ann_run
    hp = common.parse_hparams(vars(ann), argv)
    model = ann.ANN(hp.dropout)
    model.load_state_dict(torch.load(run_dir / "model.pt", weights_only=True))
    splits = common.load_splits(common.find_fashion_mnist(hp.data_dir), hp.subset, hp.val_size, hp.seed)
    data, _ = common.to_device_normalized(splits, torch.device("cpu"))
    amp = common.autocast(torch.device("cpu"), record["precision"])
    _, test_acc = common.evaluate(model, *data.test, amp, tta_flip=hp.tta_flip)
    assert test_acc == pytest.approx(record["final"]["test_acc"])


def test_runs_started_in_the_same_second_get_their_own_folders(tmp_path):
    folders = {common.Run("same", settings(out_dir=str(tmp_path))).dir for _ in range(5)}
    assert len(folders) == 5


def test_compare_groups_seeds_and_survives_broken_folders(ann_run, tmp_path, capsys):
    run_dir, record, _ = ann_run
    runs = tmp_path / "runs"
    runs.mkdir()

    def fake_run(name, **changes):
        folder = runs / name
        folder.mkdir()
        (folder / "metrics.json").write_text(json.dumps({**record, **changes}))

    fake_run("ann-20260101-000000")
    fake_run("ann-20260101-000050", hparams={**record["hparams"], "SEED": 7}, started="2026-01-01T00:00:50")
    fake_run(
        "ann-20260101-000100",
        started="2026-01-01T00:01:00",
        hparams={**record["hparams"], "LR": 0.01},
        final={**record["final"], "test_acc": 0.5},
    )
    fake_run("cnn-20260101-000200", started="2026-01-01T00:02:00", script="cnn", status="interrupted", final=None)
    (runs / "ann-20260101-000300").mkdir()
    (runs / "ann-20260101-000300" / "metrics.json").write_text('{"script": "ann", "hist')  # half-written
    (runs / "notes").mkdir()  # a foreign folder

    code = common.run_main(compare.main, ["--out-dir", str(runs)])
    out, err = capsys.readouterr()
    assert code == 0
    lines = out.strip().splitlines()
    assert lines[0].split()[:3] == ["group", "script", "n"]
    rows = {line.split()[0]: line for line in lines[1:3]}
    assert rows["A"].split()[:3] == ["A", "ann", "2"] and f"lr={ann.LR}" in rows["A"]  # two seeds, one group
    assert rows["B"].split()[:3] == ["B", "ann", "1"] and "lr=0.01" in rows["B"] and "50.00% (n=1" in rows["B"]
    assert "noise unknown" in rows["B"] and "seed" not in lines[0]
    assert "batch_size" not in out  # equal in every run, so not shown
    assert "cnn-20260101-000200 (interrupted)" in lines[3]
    assert "ann-20260101-000300" in err and "notes" in err
    assert png_size(runs / "compare.png") == (1100, 500)


def fake_record(seed, test_acc, lr=0.1):
    history = [{"epoch": e, "val_acc": test_acc - 0.01 * (3 - e)} for e in (1, 2, 3)]
    final = {"test_acc": test_acc, "val_acc": test_acc + 0.005, "seconds": 60.0}
    hparams = {"LR": lr, "SEED": seed, "EPOCHS": 3}
    return {"script": "cnn", "status": "completed", "hparams": hparams, "history": history, "final": final}


@pytest.mark.parametrize(
    "b_accuracies, expected",
    [
        ([0.925, 0.926, 0.924], "larger than the seed spread"),  # 2 points apart, spread 0.1
        ([0.905, 0.915, 0.897], "within the seed spread"),  # 0.1 apart, spread about 0.9
        ([0.93], "noise unknown"),
    ],
)
def test_compare_says_whether_a_difference_is_beyond_the_seed_spread(b_accuracies, expected, tmp_path, capsys):
    records = [fake_record(seed, acc) for seed, acc in enumerate([0.905, 0.906, 0.904], 1)]
    records += [fake_record(seed, acc, lr=0.05) for seed, acc in enumerate(b_accuracies, 1)]
    for i, record in enumerate(records):
        record["started"] = f"2026-01-01T00:00:{i:02d}"
        (tmp_path / f"cnn-{i}").mkdir()
        (tmp_path / f"cnn-{i}" / "metrics.json").write_text(json.dumps(record))
    assert common.run_main(compare.main, ["--out-dir", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "90.50% ± 0.10%" in lines[1] and lines[1].rstrip().endswith("reference")
    assert lines[2].split()[:3] == ["B", "cnn", str(len(b_accuracies))] and "lr=0.05" in lines[2]
    assert "vs A:" in lines[2] and expected in lines[2]


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
