"""compare.py over a folder of runs: runs differing only in their seed form a group; repeats of a seed count once;
each group's validation accuracy is judged against the reference group's with a paired t-test on shared seeds, else
Welch's; broken or foreign folders, NaN accuracies and an unwritable figure are named on stderr without stopping the
table, which fits in 120 columns.
"""

import common
from plumbing import runs

import json
import math
import resource
import shutil
import subprocess
import sys
import warnings

import pytest

import ann
import compare
from conftest import ROOT, SMALL, as_nobody, one_line, png_size, run_cli


def fake_record(seed, test_acc, lr=0.1, val_acc=None, script="cnn", **hparams):
    """What compare.py reads of a completed run; validation accuracy 0.5 points above test unless given."""
    val_acc = test_acc + 0.005 if val_acc is None else val_acc
    history = [{"epoch": e, "val_acc": val_acc - 0.01 * (3 - e)} for e in (1, 2, 3)]
    final = {"test_acc": test_acc, "val_acc": val_acc, "seconds": 60.0}
    hparams = {"LR": lr, "SEED": seed, "EPOCHS": 3, **hparams}
    return {"script": script, "status": "completed", "hparams": hparams, "history": history, "final": final}


def write_runs(folder, records):
    """One run folder per record, started in this order."""
    folder.mkdir(exist_ok=True)
    for i, record in enumerate(records):
        record = {**record, "started": f"2026-01-01T00:{i // 60:02d}:{i % 60:02d}"}
        (folder / f"run-{i:03d}").mkdir()
        (folder / f"run-{i:03d}" / "metrics.json").write_text(json.dumps(record))


def compare_out(folder, capsys, *flags):
    """(stdout lines, stderr lines) of a successful `compare.py --out-dir folder`."""
    assert common.run_main(compare.main, ["--out-dir", str(folder), *flags]) == 0
    out, err = capsys.readouterr()
    return out.splitlines(), err.strip().splitlines()


def header(lines):
    """The table's header line, found by its first column."""
    return next(line for line in lines if line.startswith("group "))


def rows(lines):
    """{group letter: table row} of compare.py's output (the rows follow the header up to the first empty line)."""
    start = lines.index(header(lines)) + 1
    return {line.split()[0]: line for line in lines[start : lines.index("", start)]}


def legend(lines):
    """{group letter: legend line}: the lines below the table that start with a group's letter, as rows do."""
    start = lines.index("", lines.index(header(lines)))
    table = rows(lines)
    return {line.split()[0]: line for line in lines[start:] if line.split()[:1] and line.split()[0] in table}


@pytest.mark.figures
def test_compare_groups_seeds_and_survives_broken_folders(runs, tmp_path, capsys):
    """Copies of a real ann.py record, with a seed, a learning rate or the status changed."""
    record = json.loads((runs["ann"] / "metrics.json").read_text())
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

    lines, err = compare_out(runs, capsys)
    assert header(lines).split()[:3] == ["group", "script", "n"]
    table, described = rows(lines), legend(lines)
    assert table["A"].split()[:3] == ["A", "ann", "2"]  # two seeds, one group
    assert table["B"].split()[:3] == ["B", "ann", "1"] and "50.00" in table["B"] and "no verdict (n=1" in table["B"]
    assert "seed" not in header(lines)
    assert f"lr={ann.LR}" in described["A"] and "seeds 0,7" in described["A"] and "lr=0.01" in described["B"]
    assert "batch_size" not in "\n".join(lines)  # equal in every run, so not shown
    assert any("cnn-20260101-000200 (interrupted)" in line for line in lines)
    assert any("ann-20260101-000300" in line for line in err) and any("notes" in line for line in err)
    assert png_size(runs / "compare.png")[0] == 1200


@pytest.mark.parametrize(
    "b_accuracies, expected",
    [
        ([0.925, 0.927, 0.924], "(paired t, n=3): beyond seed noise"),  # 2.0, 2.1 and 2.0 points apart
        ([0.905, 0.915, 0.897], "(paired t, n=3): within seed noise"),  # 0.1 apart, spread about 0.9
        ([0.93], "no verdict (n=1"),
    ],
)
def test_compare_says_whether_a_difference_is_beyond_the_seed_noise(b_accuracies, expected, tmp_path, capsys):
    """Updated from the old verdict on test accuracy in "%" ("larger than the seed spread", 2 SE): the verdict is
    now on validation accuracy, in points, by a t-test, and n = 1 gets none."""
    records = [fake_record(seed, acc) for seed, acc in enumerate([0.905, 0.906, 0.904], 1)]
    records += [fake_record(seed, acc, lr=0.05) for seed, acc in enumerate(b_accuracies, 1)]
    write_runs(tmp_path / "runs", records)
    lines, _ = compare_out(tmp_path / "runs", capsys)
    a, b = rows(lines)["A"], rows(lines)["B"]
    assert "91.00 ± 0.10  90.50 ± 0.10" in a and a.endswith("reference")  # val, then test
    assert b.split()[:3] == ["B", "cnn", str(len(b_accuracies))] and legend(lines)["B"].startswith("B  cnn, lr=0.05")
    assert "vs A" in header(lines) and expected in b and " pt" in b and "%" not in b


def val_gain_records(b_seeds):
    """A: validation 90.0, 91.0, 89.0 on seeds 1-3 (spread 1 point); B: 0.3-0.4 points above on each, run
    with `b_seeds`. Test accuracy says the opposite, so a verdict read from it would show."""
    a = [fake_record(s, 0.90, val_acc=v) for s, v in zip((1, 2, 3), (0.900, 0.910, 0.890), strict=True)]
    b_val = (0.9030, 0.9140, 0.8935)
    b = [fake_record(s, 0.85, lr=0.05, val_acc=v) for s, v in zip(b_seeds, b_val, strict=True)]
    return a + b


def test_a_consistent_small_gain_on_shared_seeds_is_real_by_the_paired_test(tmp_path, capsys):
    write_runs(tmp_path / "runs", val_gain_records((1, 2, 3)))
    b = rows(compare_out(tmp_path / "runs", capsys)[0])["B"]
    assert "+0.35 ± 0.12 pt (paired t, n=3): beyond seed noise" in b  # t(2) = 4.30 times a standard error of 0.029


def test_the_same_gain_on_different_seeds_is_not_real_by_welch(tmp_path, capsys):
    write_runs(tmp_path / "runs", val_gain_records((4, 5, 6)))
    b = rows(compare_out(tmp_path / "runs", capsys)[0])["B"]
    assert "+0.35 ±" in b and "(Welch t, n=3+3): within seed noise" in b


def test_one_shared_seed_is_compared_unpaired(tmp_path, capsys):
    write_runs(tmp_path / "runs", val_gain_records((1, 5, 6)))
    assert "(Welch t, n=3+3)" in rows(compare_out(tmp_path / "runs", capsys)[0])["B"]


@pytest.mark.parametrize(
    "df, t", [(1, 12.706), (2, 4.303), (3, 3.182), (4, 2.776), (9, 2.262), (10, 2.228), (30, 2.042), (120, 1.980)]
)
def test_t_critical_values_are_the_published_two_sided_95_percent_ones(df, t):
    assert compare.t_critical(df) == pytest.approx(t, abs=5e-4)


def test_t_critical_between_whole_degrees_of_freedom_and_in_the_normal_limit():
    """Welch gives fractional degrees of freedom: the value lies between its neighbours."""
    assert compare.t_critical(3) > compare.t_critical(3.5) > compare.t_critical(4)
    assert compare.t_critical(1e7) == pytest.approx(1.95996, abs=1e-4)


def test_t_critical_is_exact_where_a_closed_form_is_known():
    """df 1 is the Cauchy distribution, t = tan(0.475 pi); df 2 has t = 2q sqrt(2 / (1 - (2q)^2)) with 2q = 0.95."""
    assert compare.t_critical(1) == pytest.approx(math.tan(0.475 * math.pi), abs=1e-12)
    assert compare.t_critical(2) == pytest.approx(0.95 * math.sqrt(2 / (1 - 0.95**2)), abs=1e-12)


def test_a_single_seed_gets_no_verdict_and_no_spread(tmp_path, capsys):
    write_runs(tmp_path / "runs", [fake_record(1, 0.90), fake_record(1, 0.95, lr=0.05)])
    lines, _ = compare_out(tmp_path / "runs", capsys)
    b = rows(lines)["B"]
    assert "no verdict" in b and "±" not in b and "seed noise" not in b


def test_a_copied_run_folder_changes_nothing(tmp_path, capsys):
    """Repeats of a seed with the same settings are one value, not spread: copying every run of A leaves the table
    as it was, and a copied single run still has no spread."""
    records = val_gain_records((4, 5, 6))
    write_runs(tmp_path / "once", records)
    write_runs(tmp_path / "copied", records + records[:3])
    once, copied = (rows(compare_out(tmp_path / name, capsys)[0]) for name in ("once", "copied"))
    assert once == copied and copied["A"].split()[2] == "3"
    b = [fake_record(s, 0.91 + s / 100, lr=0.05) for s in (1, 2, 3)]
    write_runs(tmp_path / "single", [fake_record(1, 0.90)] * 2 + b)
    lines, _ = compare_out(tmp_path / "single", capsys)
    table = rows(lines)
    assert "± 0.00" not in "\n".join(lines) and table["A"].split()[2] == "1" and "no verdict" in table["A"]
    assert any(line.startswith("A  cnn, lr=0.1; seeds 1(×2)") for line in lines)


def test_repeats_of_a_seed_are_averaged(tmp_path, capsys):
    """Seed 1 twice (validation 90.5 and 92.5) and seed 2 once (94.5): two values, 91.5 and 94.5."""
    records = [fake_record(1, 0.90), fake_record(1, 0.92), fake_record(2, 0.94)]
    write_runs(tmp_path / "runs", records)
    assert rows(compare_out(tmp_path / "runs", capsys)[0])["A"].split()[2:7] == ["2", "93.00", "±", "2.12", "92.50"]


def test_nan_or_missing_accuracies_are_skipped_and_named(tmp_path, capsys):
    good = [fake_record(s, 0.90 + s / 1000) for s in (1, 2, 3)]
    nan_val, nan_test, no_val = fake_record(4, 0.90), fake_record(5, 0.90), fake_record(6, 0.9)
    nan_val["final"]["val_acc"], nan_test["final"]["test_acc"] = math.nan, math.inf
    no_val["final"]["val_acc"] = None  # a run with --val-size 0 has nothing to judge
    write_runs(tmp_path / "runs", good + [nan_val, nan_test, no_val])
    lines, err = compare_out(tmp_path / "runs", capsys)
    table = rows(lines)
    assert list(table) == ["A"] and table["A"].split()[2:4] == ["3", "90.70"] and "nan" not in table["A"]
    assert [line.split()[2] for line in err] == ["run-003:", "run-004:", "run-005:"]
    assert "val_acc is nan" in err[0] and "test_acc is inf" in err[1] and "without a validation split" in err[2]


@pytest.mark.figures
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
        "ann-not-a-dict": [good],
    }
    for name, record in records.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.json").write_text(json.dumps(record))
    (tmp_path / "ann-deep").mkdir()  # json.loads raises RecursionError on this
    (tmp_path / "ann-deep" / "metrics.json").write_text("[" * 200_000 + "]" * 200_000)
    lines, err = compare_out(tmp_path, capsys)
    assert list(rows(lines)) == ["A"] and rows(lines)["A"].split()[:3] == ["A", "ann", "1"]  # the good run alone
    assert len(err) == 8 and all(line.startswith("warning: skipping ann-") for line in err)
    assert {line.split()[2].rstrip(":") for line in err} == set(records) - {"ann-good"} | {"ann-deep"}  # each named
    assert png_size(tmp_path / "compare.png")[0] == 1200


def test_compare_prints_the_table_when_the_figure_cannot_be_written(tmp_path):
    """A folder the figure cannot be written to (here a file-size limit refuses it, as a read-only folder or a full
    disk would): the table stands, the figure is named on stderr, exit code 0."""
    record = {"script": "ann", "status": "completed", "hparams": {}, "history": [{"epoch": 1, "val_acc": 0.5}]}
    record["final"] = {"test_acc": 0.5, "val_acc": 0.5, "seconds": 1.0}
    (tmp_path / "ann-1").mkdir()
    (tmp_path / "ann-1" / "metrics.json").write_text(json.dumps(record))
    done = subprocess.run(
        [sys.executable, "compare.py", "--out-dir", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (1000, 1000)),
    )
    assert done.returncode == 0 and rows(done.stdout.splitlines())["A"].split()[:3] == ["A", "ann", "1"]
    one_line(done.stderr.strip().splitlines(), "compare.png not drawn", "File too large")
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*"))


def drawn_figures(monkeypatch):
    """The figures compare.main draws, kept for a look at their legend and axes."""
    figures, draw = [], compare.plot
    monkeypatch.setattr(compare, "plot", lambda *args: figures.append(draw(*args)) or figures[-1])
    return figures


@pytest.mark.figures
def test_the_figure_names_each_groups_settings_and_has_whole_epochs(tmp_path, capsys, monkeypatch):
    figures = drawn_figures(monkeypatch)
    write_runs(tmp_path, [fake_record(s, 0.9, dropout=d) for d in (0.1, 0.3) for s in (1, 2)])
    compare_out(tmp_path, capsys)
    left, right = figures[0].axes
    labels = [text.get_text() for text in left.get_yticklabels()]
    assert labels == ["A: cnn, dropout=0.1, n=2", "B: cnn, dropout=0.3, n=2"]
    assert "groups A, B" in figures[0].get_suptitle() and "final validation" in left.get_xlabel()
    assert "95% interval" in right.get_xlabel() and "difference from A" in right.get_xlabel()
    assert png_size(tmp_path / "compare.png")[0] == 1200


@pytest.mark.figures
def test_a_dollar_sign_in_a_script_name_or_setting_is_drawn_as_text(tmp_path, capsys, monkeypatch):
    figures = drawn_figures(monkeypatch)
    records = [fake_record(s, 0.9, script="$\\foo$", MODE="$x^$") for s in (1, 2)]
    write_runs(tmp_path, records + [fake_record(s, 0.9, script="$\\foo$", MODE="$\\bar{") for s in (1, 2)])
    lines, err = compare_out(tmp_path, capsys)
    assert rows(lines)["A"].split()[1] == "$\\foo$" and err == []
    labels = [text.get_text() for text in figures[0].axes[0].get_yticklabels()]
    assert labels[0] == "A: $\\foo$, mode=$x^$, n=2"
    assert png_size(tmp_path / "compare.png")[0] == 1200


@pytest.mark.figures
@pytest.mark.parametrize("b_seeds, paired", [((1, 2, 3), True), ((4, 5, 6), False)])
def test_the_figure_shows_each_seeds_own_difference_where_the_test_is_paired(
    b_seeds, paired, tmp_path, monkeypatch, capsys
):
    """The seeds' dots of A and B overlap (a spread of 1 point) while B wins by 0.3-0.4 on every seed: the figure
    shows the per-seed differences the paired verdict is formed from; an unpaired test has none to show."""
    figures = drawn_figures(monkeypatch)
    write_runs(tmp_path, val_gain_records(b_seeds))
    assert compare_out(tmp_path, capsys)[1] == []
    right = figures[0].axes[1]
    diamonds = [line.get_xdata()[0] for line in right.get_lines() if line.get_marker() == "d"]
    assert [round(d, 2) for d in diamonds] == ([0.3, 0.4, 0.35] if paired else [])
    assert [t.get_text() for t in right.texts if t.get_text().isdigit()] == (["1", "2", "3"] if paired else [])
    assert "each seed's own difference" in right.get_xlabel()


def test_reference_picks_the_group_the_others_are_compared_against(tmp_path, capsys):
    write_runs(tmp_path, val_gain_records((1, 2, 3)))
    lines, _ = compare_out(tmp_path, capsys, "--reference", "B")
    table = rows(lines)
    assert "vs B" in header(lines) and table["B"].endswith("reference")
    assert "-0.35 ± 0.12 pt (paired t, n=3): beyond seed noise" in table["A"]
    assert common.run_main(compare.main, ["--out-dir", str(tmp_path), "--reference", "C"]) == 2
    one_line(capsys.readouterr().err.strip().splitlines(), "--reference C", "A, B")


def test_four_groups_differing_in_four_settings_fit_in_120_columns(tmp_path, capsys):
    """The settings that differ go to a legend below the table, one wrapped line per group."""
    settings = {"DROPOUT": 0.3, "LABEL_SMOOTHING": 0.1, "WEIGHT_DECAY": 0.0005, "EMA_DECAY": 0.999}
    other = {"EPOCHS": 30, "BATCH_SIZE": 256, "MAX_SHIFT": 1, "FLIP": True, "VAL_SIZE": 5000, "PRECISION": "auto"}
    variants = [{}, {"DROPOUT": 0.5}, {"LABEL_SMOOTHING": 0.05, "EMA_DECAY": 0.9995}, {"WEIGHT_DECAY": 0.00005}]
    records = []
    for g, variant in enumerate(variants):
        for seed in (1, 2, 3):
            hparams = {**other, **settings, **variant}
            records.append(fake_record(seed, 0.9312 + g / 1000 + seed / 300 + (g * seed * seed) % 5 / 2000, **hparams))
    write_runs(tmp_path, records)
    lines, _ = compare_out(tmp_path, capsys)
    shown = lines[: next(i for i, line in enumerate(lines) if line.startswith("figure of what the table judges:"))]
    assert max(len(line) for line in shown) <= 120, "\n".join(shown)
    assert len(rows(lines)) == 4 and all("seed noise" in row for row in list(rows(lines).values())[1:])
    described = legend(lines)
    assert [line[:3] for line in described.values()] == ["A  ", "B  ", "C  ", "D  "]
    differing = ("dropout=", "label_smoothing=", "ema_decay=", "weight_decay=")
    assert all(name in line for line in described.values() for name in differing)
    assert "epochs=" not in "\n".join(described.values()) and "lr=" not in "\n".join(described.values())  # all alike


def test_help_describes_the_script_in_a_complete_sentence(capsys):
    with pytest.raises(SystemExit):
        compare.main(["--help"])
    out = capsys.readouterr().out
    description = compare.__doc__.strip().split("\n")[0]
    assert description.endswith(".") and description in " ".join(out.split()) and "--reference REFERENCE" in out


def test_an_out_dir_that_is_a_file_is_named_as_such(tmp_path, capsys):
    (tmp_path / "runs").write_text("not a folder")
    code, err = run_cli(compare, ["--out-dir", str(tmp_path / "runs")], capsys)
    assert code == 2
    one_line(err, "is a file, not a folder")


def test_runs_in_another_precision_or_on_other_hardware_form_their_own_group(tmp_path, capsys):
    """PRECISION "auto" is bf16 on one machine and fp32 on another: the same seed is not the same run there."""
    records = []
    for precision, device in (
        ("bf16", "AMD EPYC, 2 threads"),
        ("fp32", "AMD EPYC, 2 threads"),
        ("bf16", "NVIDIA H200"),
    ):
        for seed in (1, 2):
            record = fake_record(seed, 0.9, PRECISION="auto", DEVICE="auto")
            records.append({**record, "precision": precision, "device_name": device})
    write_runs(tmp_path / "runs", records)
    lines, _ = compare_out(tmp_path / "runs", capsys)
    assert list(rows(lines)) == ["A", "B", "C"]
    assert any("precision=fp32" in line for line in lines) and any("device=NVIDIA H200" in line for line in lines)


def readme_loop_records():
    """The README's quick start in a runs folder: its dry run, then the loop of three seeds of two settings."""
    dry_run = fake_record(0, 0.80, SUBSET=2000, VAL_SIZE=500, EPOCHS=1, LABEL_SMOOTHING=0.1)
    loop = {"SUBSET": 0, "VAL_SIZE": 5000, "EPOCHS": 8}
    records = [dry_run]
    for seed, (a, b) in zip((1, 2, 3), ((0.9290, 0.9310), (0.9360, 0.9362), (0.9330, 0.9370)), strict=True):
        records.append(fake_record(seed, a - 0.005 + seed / 2000, val_acc=a, **loop, LABEL_SMOOTHING=0.1))
        records.append(fake_record(seed, b - 0.006, val_acc=b, **loop, LABEL_SMOOTHING=0.0))
    return records


def test_the_readme_loop_after_its_dry_run_gets_a_paired_verdict(tmp_path, capsys):
    """The dry run is the first group but not the reference: one seed, and trained on other data for one epoch, so
    it is not judged against the loop's groups either; the two settings of the loop are paired on seeds 1-3."""
    write_runs(tmp_path / "runs", readme_loop_records())
    lines, err = compare_out(tmp_path / "runs", capsys, "--script", "cnn")
    table = rows(lines)
    assert list(table) == ["A", "B", "C"] and err == []
    assert table["A"].split()[2] == "1" and "not comparable: other subset, val_size, epochs" in table["A"]
    assert table["B"].endswith("reference") and "vs B" in header(lines)
    assert "+0.21 ± 0.47 pt (paired t, n=3): within seed noise" in table["C"]
    assert "label_smoothing=0.0" in legend(lines)["C"] and "epochs=8" in legend(lines)["C"]
    one_line([line for line in lines if line.startswith("reference ")], "reference B:", "2+ seeds")
    assert max(len(line) for line in lines) <= 120


def test_reference_by_flag_is_said_so_and_may_be_a_group_of_one_seed(tmp_path, capsys):
    write_runs(tmp_path / "runs", readme_loop_records())
    lines, _ = compare_out(tmp_path / "runs", capsys, "--reference", "a")
    table = rows(lines)
    assert table["A"].endswith("reference") and all("not comparable" in table[g] for g in "BC")
    one_line([line for line in lines if line.startswith("reference ")], "reference A:", "--reference")


@pytest.mark.parametrize("records", [[fake_record(1, 0.90)], [fake_record(1, 0.90), fake_record(1, 0.91, lr=0.05)]])
def test_without_a_group_of_two_seeds_there_is_no_reference(records, tmp_path, capsys):
    """Right after the README's dry run, or any runs of one seed each: one seed has no spread to judge by."""
    write_runs(tmp_path / "runs", records)
    lines, _ = compare_out(tmp_path / "runs", capsys)
    assert all(row.endswith("no verdict: no group has 2+ seeds") for row in rows(lines).values())
    one_line([line for line in lines if line.startswith("reference ")], "reference none", "2+ seeds")


def test_groups_of_another_script_are_not_comparable(tmp_path, capsys):
    records = [fake_record(s, 0.90 + s / 100, script=script) for script in ("cnn", "ann") for s in (1, 2, 3)]
    write_runs(tmp_path / "runs", records)
    table = rows(compare_out(tmp_path / "runs", capsys)[0])
    assert table["A"].endswith("reference") and table["B"].endswith("not comparable: other script")


@pytest.mark.parametrize(
    "a_val, b_val, b_seeds, how",
    [
        ((0.900, 0.910), (0.902, 0.912), (1, 2), "paired t, n=2"),  # one image in 500 better on each seed
        ((0.900, 0.900), (0.902, 0.902), (3, 4), "Welch t, n=2+2"),  # no seed moved either group
    ],
)
def test_no_spread_measured_gives_no_verdict(a_val, b_val, b_seeds, how, tmp_path, capsys):
    records = [fake_record(s, 0.9, val_acc=v) for s, v in zip((1, 2), a_val, strict=True)]
    records += [fake_record(s, 0.9, lr=0.05, val_acc=v) for s, v in zip(b_seeds, b_val, strict=True)]
    write_runs(tmp_path / "runs", records)
    b = rows(compare_out(tmp_path / "runs", capsys)[0])["B"]
    assert b.endswith(f"+0.20 pt, no spread measured ({how}); add seeds") and "seed noise" not in b


def test_a_paired_verdict_names_the_seeds_it_left_out(tmp_path, capsys):
    """B has seeds 1-10, A 1-3 and 11: the table's means are over all of them, the paired verdict over 1, 2 and 3."""
    records = [fake_record(s, 0.90 + s / 1000) for s in (1, 2, 3, 11)]
    records += [fake_record(s, 0.91 + s / 1000 + s % 2 / 1000, lr=0.05) for s in range(1, 11)]  # 1.1, 1.0, 1.1 pt
    write_runs(tmp_path / "runs", records)
    lines, _ = compare_out(tmp_path / "runs", capsys)
    table = rows(lines)
    assert table["A"].split()[2] == "4" and table["B"].split()[2] == "10"
    assert "(paired t, n=3*): beyond seed noise" in table["B"]
    note = " ".join(" ".join(lines[lines.index(next(line for line in lines if line.startswith("* B:"))) :]).split())
    assert "seeds 1,2,3" in note and "B's seeds 4,5,6,7,8,9,10" in note and "A's seed 11" in note
    assert max(len(line) for line in lines) <= 120


def test_a_paired_verdict_on_all_seeds_has_no_note(tmp_path, capsys):
    write_runs(tmp_path / "runs", val_gain_records((1, 2, 3)))
    lines, _ = compare_out(tmp_path / "runs", capsys)
    assert "(paired t, n=3)" in rows(lines)["B"] and not any(line.startswith("*") for line in lines)


def test_extra_keys_in_final_are_ignored_but_the_fields_read_are_checked(tmp_path, capsys):
    records = [fake_record(s, 0.9) for s in (1, 2, 3)]
    records[0]["final"].update(note="fast", per_class=[0.9] * 10, checkpoint={"path": "model.pt"})
    records[1]["final"]["seconds"] = "one minute"
    write_runs(tmp_path / "runs", records)
    lines, err = compare_out(tmp_path / "runs", capsys)
    assert rows(lines)["A"].split()[2] == "2" and legend(lines)["A"].endswith("seeds 1,3")
    one_line(err, "run-001", "seconds")


@pytest.mark.figures
def test_hundreds_of_groups_draw_without_matplotlib_warnings(tmp_path, capsys, monkeypatch):
    """Too many groups to fit: the figure shows the first 20 and says so; tight_layout does not warn."""
    figures = drawn_figures(monkeypatch)
    write_runs(tmp_path, [fake_record(1, 0.9, lr=i / 1000) for i in range(60)])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lines, err = compare_out(tmp_path, capsys)
    assert [str(w.message) for w in caught] == [] and err == [] and len(rows(lines)) == 60
    assert len(figures[0].axes[0].get_yticklabels()) == 20 and "(20 of 60)" in figures[0].get_suptitle()
    assert png_size(tmp_path / "compare.png")[0] == 1200


def mixed_runs(folder):
    """ann and cnn runs, two groups each, in folders whose names do not follow their start times."""
    records = [fake_record(s, 0.88, lr=lr, script="ann") for lr in (0.1, 0.2) for s in (1, 2)]
    records += [fake_record(s, 0.92, lr=lr, script="cnn") for lr in (0.3, 0.4) for s in (1, 2)]
    folder.mkdir()
    for i, record in enumerate(records):  # run-000 started last, run-007 first
        (folder / f"run-{i:03d}").mkdir()
        record = {**record, "started": f"2026-01-01T00:00:{59 - i:02d}"}
        (folder / f"run-{i:03d}" / "metrics.json").write_text(json.dumps(record))


def test_script_lists_only_the_groups_of_that_script(tmp_path, capsys):
    mixed_runs(tmp_path / "runs")
    everything = rows(compare_out(tmp_path / "runs", capsys)[0])
    assert sorted(row.split()[1] for row in everything.values()) == ["ann", "ann", "cnn", "cnn"]
    lines, _ = compare_out(tmp_path / "runs", capsys, "--script", "cnn")
    assert [row.split()[1:3] for row in rows(lines).values()] == [["cnn", "2"], ["cnn", "2"]]
    assert [line.split(";")[0] for line in legend(lines).values()] == ["A  cnn, lr=0.4", "B  cnn, lr=0.3"]  # by start


def test_last_takes_the_most_recently_started_runs(tmp_path, capsys):
    """The last three by start time are runs 2, 1 and 0 (ann lr=0.2 seed 1, ann lr=0.1 seeds 2 and 1), oldest
    first; by folder name they would be the cnn runs."""
    mixed_runs(tmp_path / "runs")
    lines, _ = compare_out(tmp_path / "runs", capsys, "--last", "3")
    assert [row.split()[1:3] for row in rows(lines).values()] == [["ann", "1"], ["ann", "2"]]
    # Each group keeps the letter it has among all the folder's runs (by first start: cnn lr=0.4, cnn lr=0.3, ...).
    assert [line.split(";")[0] for line in legend(lines).values()] == ["C  ann, lr=0.2", "D  ann, lr=0.1"]
    lines, _ = compare_out(tmp_path / "runs", capsys, "--script", "cnn", "--last", "1")
    assert [row.split()[1:3] for row in rows(lines).values()] == [["cnn", "1"]]
    assert legend(lines)["B"].startswith("B  cnn; seeds 1")


def test_identical_gains_on_two_seeds_say_why_there_is_no_verdict(tmp_path, capsys):
    """Two seeds with the same gain: no spread to measure the interval from, and a line saying so in words."""
    records = [fake_record(s, 0.9, val_acc=0.9 + s / 100) for s in (1, 2)]
    records += [fake_record(s, 0.9, lr=0.2, val_acc=0.905 + s / 100) for s in (1, 2)]
    write_runs(tmp_path, records)
    lines, _ = compare_out(tmp_path, capsys)
    assert "no spread measured" in rows(lines)["B"]
    assert any(line.startswith("no spread measured: the 95% interval is measured from how") for line in lines)
    assert "n-1" in "\n".join(lines)


def test_runs_of_different_code_are_never_pooled_as_repeats_of_a_seed(real_data_dir, tmp_path, capsys):
    """A learner edits the step and runs again with the same settings and seed: the two runs were averaged as one
    seed's repeats. Here the edit is real: a copy of the project whose ann.py scales its loss."""
    copy = tmp_path / "edited"
    copy.mkdir()
    for name in ("ann.py", "common.py"):
        shutil.copy(ROOT / name, copy / name)
    shutil.copytree(ROOT / "plumbing", copy / "plumbing", ignore=shutil.ignore_patterns("__pycache__"))
    step = "loss = loss_fn(logits.float(), labels)"
    (copy / "ann.py").write_text((ROOT / "ann.py").read_text().replace(step, step + " * 2"))
    out = tmp_path / "runs"
    for folder in (ROOT, copy):
        argv = [sys.executable, "ann.py", *SMALL, "--out-dir", str(out)]
        done = subprocess.run(argv, cwd=folder, capture_output=True)
        assert done.returncode == 0, done.stderr
    lines, _ = compare_out(out, capsys)
    assert set(rows(lines)) == {"A", "B"}  # two groups of one seed each, not one group with a repeat
    assert "(×2)" not in "\n".join(lines) and any(line.startswith("code: a fingerprint") for line in lines)


def test_runs_are_fingerprinted_with_the_code_that_trained_them(real_data_dir, tmp_path):
    """A learner's sweep.py calls ann.main() per seed: the runs were fingerprinted with sweep.py instead of ann.py.
    Then common.py is edited while the program runs (a notebook that runs ann.py again, `%run`): the runs were
    fingerprinted with the common.py on disk, not the one imported. Both runs are ann.py's as the project has it."""
    copy = tmp_path / "project"
    copy.mkdir()
    for name in ("ann.py", "common.py"):
        shutil.copy(ROOT / name, copy / name)
    shutil.copytree(ROOT / "plumbing", copy / "plumbing", ignore=shutil.ignore_patterns("__pycache__"))
    (copy / "sweep.py").write_text(
        "import pathlib, sys\nimport ann\n\n"
        "ann.main(sys.argv[1:] + ['--seed', '1'])\n"
        "common = pathlib.Path('common.py')\n"
        "common.write_text(common.read_text() + '\\n# edited while the program runs\\n')\n"
        "ann.main(sys.argv[1:] + ['--seed', '2'])\n"
    )
    out = tmp_path / "runs"
    done = subprocess.run([sys.executable, "sweep.py", *SMALL, "--out-dir", str(out)], cwd=copy, capture_output=True)
    assert done.returncode == 0, done.stderr
    records = [json.loads(path.read_text()) for path in sorted(out.glob("*/metrics.json"))]
    assert len(records) == 2 and "edited" in (copy / "common.py").read_text()
    assert {r["code"] for r in records} == {runs.code_fingerprint(ROOT / "ann.py", records[0]["hparams"])}


def test_a_setting_edited_in_the_file_is_the_same_code_as_its_flag(tmp_path):
    """EPOCHS = 5 written in the file is recorded as a setting, as --epochs 5 is: the code is the same."""
    shutil.copy(ROOT / "ann.py", tmp_path / "ann.py")
    settings = {"EPOCHS": 60, "LR": 0.004}
    before = runs.code_fingerprint(tmp_path / "ann.py", settings)
    text = (tmp_path / "ann.py").read_text()
    (tmp_path / "ann.py").write_text(text.replace("EPOCHS = 60", "EPOCHS = 5"))
    assert runs.code_fingerprint(tmp_path / "ann.py", settings) == before
    (tmp_path / "ann.py").write_text(text.replace("model.train()", "model.train(True)"))
    assert runs.code_fingerprint(tmp_path / "ann.py", settings) != before


def test_text_from_a_record_is_printed_with_its_control_characters_visible(tmp_path, capsys):
    """A shared record whose script, settings, status and folder name hold escape sequences and newlines: printed as
    they were, they could clear the screen or redraw the table with a verdict compare.py never gave."""
    fake_row = "\nB  cnn  3  99.00  +9.00 ± 0.10 pt (paired t, n=3): beyond seed noise\x1b[1A"
    evil = {"script": "cnn\x1b[2J", "EVIL\x1b]0;title\x07": "adam" + fake_row}
    records = [fake_record(s, 0.90 + s / 1000, **evil) for s in (1, 2)] + [fake_record(s, 0.91, lr=0.2) for s in (1, 2)]
    unfinished = {**fake_record(3, 0.9), "status": "\x1b[2Krunning\r", "final": None}
    write_runs(tmp_path / "runs", [*records, unfinished])
    (tmp_path / "runs" / "run-\x1b[31mred").mkdir()
    (tmp_path / "runs" / "run-\x1b[31mred" / "metrics.json").write_text("{not json\x1b[2J")
    lines, err = compare_out(tmp_path / "runs", capsys)
    for line in lines + err:
        assert not any(c in line for c in "\x1b\x07\r"), line
    assert not any(line.startswith("B  cnn  3  99.00") for line in lines)  # the record's text drew no row
    assert "cnn\\x1b[2J" in rows(lines)["A"] and "\\nB  cnn  3  99.00" in legend(lines)["A"]
    assert any(line.startswith("not completed") and "\\x1b[2Krunning\\r" in line for line in lines)
    assert len(err) == 1 and err[0].startswith("warning: skipping run-\\x1b[31mred: ")


def test_a_run_folder_we_may_not_look_into_is_named_and_passed_over(public_dir):
    """pathlib's is_file raises PermissionError on a locked folder: one locked run folder ended compare.py."""
    runs = public_dir / "runs"
    write_runs(runs, [fake_record(1, 0.90), fake_record(2, 0.91), fake_record(3, 0.92)])
    runs.chmod(0o777)  # compare.png is written there
    (runs / "run-001").chmod(0o700)  # root's alone
    done = as_nobody([sys.executable, "compare.py", "--out-dir", str(runs)], public_dir)
    assert done.returncode == 0, done.stderr
    one_line(done.stderr.strip().splitlines(), "skipping run-001", "cannot look at it")
    assert rows(done.stdout.splitlines())["A"].split()[:3] == ["A", "cnn", "2"]


def test_runs_are_ordered_by_the_moment_they_started_whatever_the_time_zone(tmp_path, capsys):
    """A run started at 12:00 in Tokyo (03:00 UTC) is older than one started at 10:00 in London the same day: ordered
    by the clock's text, compare's oldest-first list and predict.py's "latest run" had them the other way round."""
    tokyo, london = fake_record(1, 0.90), fake_record(1, 0.91)
    tokyo["started"], london["started"] = "2026-01-01T12:00:00+09:00", "2026-01-01T10:00:00+00:00"
    for name, record in (("cnn-london", london), ("cnn-tokyo", tokyo)):  # the folders' names order them as the text
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.json").write_text(json.dumps(record))
    assert [folder.name for folder, _ in compare.load_runs(tmp_path)] == ["cnn-tokyo", "cnn-london"]
    assert runs.latest_run("cnn", out_dir=tmp_path).name == "cnn-london"
