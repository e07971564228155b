"""compare.py over a folder of runs: runs differing only in their seed form a group, each difference between
groups is judged against the seed spread, and broken or foreign folders and an unwritable figure are named
on stderr without stopping the table.
"""

import json

import pytest

import ann
import common
import compare
from conftest import one_line, png_size


def fake_record(seed, test_acc, lr=0.1):
    history = [{"epoch": e, "val_acc": test_acc - 0.01 * (3 - e)} for e in (1, 2, 3)]
    final = {"test_acc": test_acc, "val_acc": test_acc + 0.005, "seconds": 60.0}
    hparams = {"LR": lr, "SEED": seed, "EPOCHS": 3}
    return {"script": "cnn", "status": "completed", "hparams": hparams, "history": history, "final": final}


def test_compare_groups_seeds_and_survives_broken_folders(ann_run, tmp_path, capsys):
    """Copies of a real ann.py record, with a seed, a learning rate or the status changed."""
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
    code = common.run_main(compare.main, ["--out-dir", str(tmp_path)])
    out, err = capsys.readouterr()
    assert code == 0 and out.splitlines()[1].split()[:3] == ["A", "ann", "1"]  # the good run, alone in the table
    err = err.strip().splitlines()
    assert len(err) == 6 and all(line.startswith("warning: skipping ann-") for line in err)
    assert {line.split()[2].rstrip(":") for line in err} == set(records) - {"ann-good"}  # each bad one, named
    assert png_size(tmp_path / "compare.png") == (1100, 500)


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
