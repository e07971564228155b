"""ann.py --teacher: the ANN learns from a trained CNN's predictions as well as from the labels (knowledge
distillation), validates on images the teacher never trained on, and refuses a teacher it cannot use in one line."""

import json
import shutil

import common

import pytest
import torch

import ann
import compare
from conftest import SMALL, TRAIN, one_line, run_cli


def record(folder):
    (path,) = folder.glob("*/metrics.json")
    return json.loads(path.read_text())


def test_a_distilled_ann_learns_what_its_teacher_says(run_copy, tmp_path):
    """A teacher that calls every item by the next class's name (its last layer's rows rolled by one): taught by it
    alone (DISTILL_WEIGHT 1), the ANN says what the teacher says, not what the labels say; taught by the labels, it
    does the opposite. Both validate on the images the teacher never trained on: the teacher's split, not theirs."""
    folder = run_copy("cnn")
    state = torch.load(folder / "model.pt", weights_only=True)
    for name in ("classifier.4.weight", "classifier.4.bias"):
        state[name] = state[name].roll(1, dims=0)  # the logit of class c is now that of class c - 1
    torch.save(state, folder / "model.pt")
    teacher = json.loads((folder / "metrics.json").read_text())
    argv = TRAIN + ["--seed", "5", "--teacher", str(folder), "--temperature", "1"]
    for name, weight in (("taught", "1"), ("plain", "0")):
        ann.main(argv + ["--distill-weight", weight, "--out-dir", str(tmp_path / name)])
    taught, plain = (json.loads(next((tmp_path / n).glob("*/metrics.json")).read_text()) for n in ("taught", "plain"))
    for student in (taught, plain):
        assert student["teacher"] == {"run": str(folder), "final": teacher["final"]}
        assert student["normalization"] == teacher["normalization"]  # the training split's mean and std
    said_next = {
        name: torch.tensor(student["test_confusion"]).roll(-1, dims=1).trace().item() / 10_000
        for name, student in (("taught", taught), ("plain", plain))
    }
    assert taught["final"]["test_acc"] < 0.3 < 0.7 < plain["final"]["test_acc"]
    assert said_next["taught"] > 0.7 > 0.1 > said_next["plain"]


def test_the_distillation_term_is_the_softened_kl_divergence_times_t_squared():
    """The step's loss with a teacher: (1 - w) * cross-entropy + w * T² * KL(teacher || student) at temperature T.
    A student that already answers as the teacher does adds nothing to the labels' share; one that does not does."""
    torch.manual_seed(0)
    model = ann.ANN(dropout=0.0).train()
    images, labels = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))
    with torch.no_grad():
        same = model(images)  # in train mode, as the step computes them: BatchNorm on the batch's statistics
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # the model stays as it is
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    amp, scaler = common.autocast(torch.device("cpu"), "fp32"), torch.amp.GradScaler("cpu", enabled=False)
    losses = {}
    for name, teacher_logits in (("same", same), ("other", torch.randn(8, 10) * 5)):
        batches = [(images, (labels, teacher_logits))]
        step = (optimizer, scheduler, torch.nn.CrossEntropyLoss(), None, amp, scaler, 2.0, 0.75)
        losses[name] = ann.train_one_epoch(model, batches, *step)[0]
    assert losses["same"] == pytest.approx(0.25 * torch.nn.functional.cross_entropy(same, labels).item(), rel=1e-5)
    assert losses["other"] > losses["same"] + 0.5


def broken_teacher(run, tmp_path, change):
    folder = tmp_path / "teacher"
    shutil.copytree(run, folder)
    change(folder)
    return folder


def with_record(**changes):
    def change(folder):
        data = json.loads((folder / "metrics.json").read_text())
        (folder / "metrics.json").write_text(json.dumps({**data, **changes}))

    return change


def with_setting(name, value):
    def change(folder):
        data = json.loads((folder / "metrics.json").read_text())
        data["hparams"][name] = value
        (folder / "metrics.json").write_text(json.dumps(data))

    return change


@pytest.mark.parametrize(
    "teacher, change, words",
    [
        ("cnn", lambda f: (f / "metrics.json").unlink(), "no metrics.json; pass a run folder"),
        ("ann", lambda f: None, "not the record of a run of cnn.py"),
        ("cnn", with_record(status="interrupted", model_pt=None, final=None), "it saved no weights"),
        ("cnn", with_setting("FC_WIDTH", 64), "has shape"),
        ("cnn", with_setting("SUBSET", 6000), "trained on other data (--subset 6000"),
        ("cnn", with_setting("VAL_SIZE", 1000), "trained on other data"),
    ],
    ids=["not a run folder", "another script's run", "no weights", "weights that do not fit", "a subset", "val"],
)
def test_a_teacher_that_cannot_teach_is_refused_in_one_line(teacher, change, words, runs, tmp_path, capsys):
    folder = broken_teacher(runs[teacher], tmp_path, change)
    code, err = run_cli(ann, TRAIN + ["--teacher", str(folder), "--out-dir", str(tmp_path / "runs")], capsys)
    assert code == 2
    one_line(err, "--teacher", words)
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


@pytest.mark.parametrize("argv", [["--temperature", "0"], ["--distill-weight", "1.5"]])
def test_bad_distillation_settings_are_refused(argv, capsys):
    code, err = run_cli(ann, SMALL + argv, capsys)
    assert code == 2
    one_line(err, argv[0], "is not allowed")


def test_distilled_runs_are_a_group_of_their_own_and_the_legend_says_so(runs, tmp_path, monkeypatch, capsys):
    drawn = []
    monkeypatch.setattr(common.Run, "draw", lambda self, plot, name, *args: name == "curves.png" and drawn.append(args))
    for seed in ("1", "2"):
        ann.main(TRAIN + ["--epochs", "1", "--seed", seed, "--out-dir", str(tmp_path)])
        ann.main(TRAIN + ["--epochs", "1", "--seed", seed, "--teacher", str(runs["cnn"]), "--out-dir", str(tmp_path)])
    assert "a teacher's probabilities in the loss" in drawn[1][1][0] and "teacher" not in drawn[0][1][0]
    capsys.readouterr()
    assert common.run_main(compare.main, ["--out-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert f"teacher={runs['cnn']};" in out and 'teacher="";' in out  # two groups: with and without the teacher
