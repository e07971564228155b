"""Settings: a script's UPPER_CASE constants are its flags and defaults, its --help lists them with their comments,
and a bad value, given as a flag or edited into a constant, is refused in one line (exit code 2) before any work.

resnet_transfer.py's own settings (--backbone, --image-size, --weights) are tested in test_transfer.py.
"""

import common
from plumbing import settings

import importlib
import json
from pathlib import Path

import pytest
import torch

import ann
import cnn
from conftest import ROOT, SMALL, one_line, run_cli

# ----------------------------------------------------------------------------------------------
# Constants are flags


def test_main_called_from_python_takes_no_flags_from_its_hosts_command_line(tmp_path, monkeypatch):
    """In Jupyter sys.argv is the kernel's: `import ann; ann.main()` parsed `-f kernel-....json` and ended in
    "unrecognized arguments" before any work. From Python, main() takes the module's constants (edited as a notebook
    cell would) and its own arguments; the command line is the one run_main passes."""
    monkeypatch.setattr("sys.argv", ["/opt/venv/lib/ipykernel_launcher.py", "-f", "/root/jupyter/kernel-4f1c.json"])
    for name, value in {"SUBSET": 1200, "VAL_SIZE": 200, "EPOCHS": 1, "OUT_DIR": str(tmp_path)}.items():
        monkeypatch.setattr(ann, name, value)
    assert 0 <= ann.main()["test_acc"] <= 1
    record = json.loads(next(tmp_path.glob("ann-*/metrics.json")).read_text())
    assert record["status"] == "completed" and record["hparams"]["SUBSET"] == 1200


def test_flags_override_constants_and_defaults_are_the_constants():
    hp = common.parse_hparams(vars(cnn), ["--epochs", "3", "--lr", "0.5", "--no-flip", "--fc-width", "64"])
    assert (hp.epochs, hp.lr, hp.flip, hp.fc_width) == (3, 0.5, False, 64)
    assert hp.batch_size == cnn.BATCH_SIZE and hp.seed == cnn.SEED
    defaults = vars(common.parse_hparams(vars(ann), []))
    assert defaults == {
        k.lower(): v for k, v in vars(ann).items() if k.isupper() and type(v) in (int, float, str, bool)
    }


@pytest.mark.parametrize("script", ["ann", "cnn", "resnet_transfer", "predict", "compare"])
def test_every_constant_has_a_one_line_comment_that_becomes_its_help(script):
    source = (ROOT / f"{script}.py").read_text()
    module = importlib.import_module(script)
    checks = {**settings.SETTINGS, **getattr(module, "CHECKS", {})}
    constants = settings._constants(vars(module), script, checks)  # those that become flags
    helps = settings._comments(source)
    assert constants and all(helps.get(name) for name in constants), set(constants) - set(helps)


def test_help_lists_every_constant_with_its_comment_and_default(capsys):
    with pytest.raises(SystemExit) as exit_info:
        common.parse_hparams(vars(cnn), ["--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for name in (
        "EPOCHS",
        "BATCH_SIZE",
        "LR",
        "WEIGHT_DECAY",
        "DROPOUT",
        "SEED",
        "VAL_SIZE",
        "DEVICE",
        "DATA_DIR",
        "OUT_DIR",
    ):
        assert "--" + name.lower().replace("_", "-") in text
    epochs_line = next(line for line in Path(cnn.__file__).read_text().splitlines() if line.startswith("EPOCHS ="))
    assert f"{epochs_line.split('# ', 1)[1]} (default: {cnn.EPOCHS})" in text


def test_a_float_setting_keeps_a_float_flag_whatever_its_default_is_written_as():
    hp = common.parse_hparams({"DROPOUT": 0, "LR": 1, "EPOCHS": 3}, ["--dropout", "0.3", "--lr", "0.05"])
    assert (hp.dropout, hp.lr, hp.epochs) == (0.3, 0.05, 3) and type(hp.epochs) is int
    assert type(common.parse_hparams({"DROPOUT": 0}, []).dropout) is float


def test_tta_flip_without_flip_is_recorded_as_off(real_data_dir, tmp_path):
    """TTA_FLIP says where it is declared (and so in --help) that it is ignored when FLIP is off, in words that cannot
    be read as "off whenever FLIP is on"; the script records it so."""
    assert "; ignored (off) when FLIP is off" in Path(cnn.__file__).read_text()
    cnn.main(SMALL + ["--no-flip", "--out-dir", str(tmp_path)])
    (metrics,) = tmp_path.glob("*/metrics.json")
    assert json.loads(metrics.read_text())["hparams"]["TTA_FLIP"] is False
    assert common.parse_hparams(vars(cnn), ["--tta-flip", "--flip"]).tta_flip is True


def test_folder_flags_expand_the_tilde_like_a_shell(real_data_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    code, err = run_cli(ann, SMALL + ["--out-dir=~/runs"], capsys)
    assert code == 0, err
    assert not (tmp_path / "~").exists()
    assert len(list((tmp_path / "home" / "runs").iterdir())) == 1


@pytest.mark.parametrize(
    "argv, env",
    [
        (["--out-dir", "~nosuchuser/runs"], {}),
        (["--data-dir", "~nosuchuser/d"], {}),
        ([], {"FASHION_MNIST_DIR": "~nosuchuser/d"}),
    ],
)
def test_a_tilde_for_a_user_who_does_not_exist_is_one_line(argv, env, tmp_path, monkeypatch, capsys):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    code, err = run_cli(ann, SMALL + ["--out-dir", str(tmp_path / "runs"), *argv], capsys)
    assert code == 2
    one_line(err, "~nosuchuser", "no such user")
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_the_largest_seed_trains_and_is_recorded(real_data_dir, tmp_path, capsys):
    code, err = run_cli(ann, SMALL + ["--seed", str(2**32 - 1), "--out-dir", str(tmp_path)], capsys)
    assert code == 0, err
    (metrics,) = tmp_path.glob("*/metrics.json")
    record = json.loads(metrics.read_text())
    assert record["status"] == "completed" and record["hparams"]["SEED"] == 2**32 - 1


# ----------------------------------------------------------------------------------------------
# Bad values are refused before any work


@pytest.mark.parametrize(
    "argv, names",
    [
        (["--epochs", "0"], "--epochs"),
        (["--epochs", "two"], "--epochs"),
        (["--batch-size", "0"], "--batch-size"),
        (["--batch-size", "1"], "--batch-size"),  # BatchNorm cannot train on one image
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
        (["--seed", str(2**32)], "2**32"),  # torch's generators keep 32 bits: 2**32 + 1 would be seed 1 again
        (["--seed", str(2**70)], "--seed"),
        (["--device", "tpu"], "--device"),
        (["--precision", "fp8"], "--precision"),
        (["--fc-width", "0"], "--fc-width"),
        (["--tta-shift", "-1"], "--tta-shift"),
        (["--tta-shift", "5"], "--tta-shift"),
        (["--tta-shift", "0.5"], "--tta-shift"),
        (["--subset", "1000", "--val-size", "1000"], "--val-size"),
        (["--subset", "2", "--val-size", "1"], "make --val-size at most 0"),  # one image left: BatchNorm needs 2
        (["--no-such-flag", "1"], "--no-such-flag"),
    ],
)
def test_bad_settings_are_refused_before_any_work(argv, names, capsys, tmp_path, monkeypatch):
    for name in ("find_fashion_mnist", "read_fashion_mnist", "load_fashion_mnist"):  # none may run, nor download
        monkeypatch.setattr(common, name, lambda *a: pytest.fail("data looked for despite a bad setting"))
    code, err = run_cli(cnn, argv + ["--out-dir", str(tmp_path)], capsys)
    assert code == 2
    one_line(err, names)
    assert not any(tmp_path.iterdir())  # no run folder either


@pytest.mark.parametrize(
    "constants, name",
    [({"EPOCHS": 1e1}, "EPOCHS"), ({"FLIP": 1}, "FLIP"), ({"SEED": True}, "SEED"), ({"LR": "0.1"}, "LR")],
)
def test_a_constant_edited_to_the_wrong_type_is_refused_naming_it(constants, name):
    with pytest.raises(common.UserError, match=rf"^{name} = .* is not allowed: make it"):
        common.parse_hparams(constants, [])


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_missing_cuda_device_is_refused(capsys, tmp_path):
    code, err = run_cli(ann, ["--device", "cuda", "--out-dir", str(tmp_path)], capsys)
    assert code == 2 and len(err) == 1 and "no CUDA GPU" in err[0]


def test_a_flag_may_be_spelt_as_its_constant_is_and_help_shows_one_spelling(capsys):
    hp = common.parse_hparams(vars(cnn), ["--label_smoothing", "0.2", "--no_flip", "--max_shift=2"])
    assert (hp.label_smoothing, hp.flip, hp.max_shift) == (0.2, False, 2)
    with pytest.raises(SystemExit):
        common.parse_hparams(vars(cnn), ["--help"])
    text = capsys.readouterr().out
    assert "--label-smoothing" in text and "--label_smoothing" not in text
