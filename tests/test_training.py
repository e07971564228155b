import json
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import ann
import cnn
import common

SMALL = ["--subset", "1200", "--val-size", "200", "--batch-size", "100", "--epochs", "1"]


def test_model_shapes_and_parameter_counts():
    x = torch.randn(5, 1, 28, 28)
    ann_model, cnn_model = ann.ANN(), cnn.CNN(fc_width=256)
    assert ann_model(x).shape == (5, 10) and cnn_model(x).shape == (5, 10)
    # Linear weights (no bias before BatchNorm) + BatchNorm scale/shift + the last layer's bias.
    assert sum(p.numel() for p in ann_model.parameters()) == 784 * 128 + 2 * 128 + 128 * 64 + 2 * 64 + 64 * 10 + 10
    conv = 1 * 32 * 9 + 2 * 32 + 32 * 64 * 9 + 2 * 64
    assert sum(p.numel() for p in cnn_model.parameters()) == conv + 3136 * 256 + 256 + 256 * 10 + 10


class RecordingModel(nn.Module):
    """A linear classifier that remembers which images it was trained on (each image holds its index)."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 10)
        self.seen = []

    def forward(self, x):
        if self.training:
            self.seen.append(x[:, 0, 0, 0].long())
        return self.linear(x.flatten(1)[:, :4])


def fake_run(tmp_path, **hp):
    hp = {"DEVICE": "cpu", "PRECISION": "fp32", "OUT_DIR": str(tmp_path), "SEED": 0, **hp}
    return common.Run("test", hp)


def test_every_training_index_is_used_once_per_epoch(tmp_path):
    n = 1003  # not a multiple of the batch size
    x = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 1, 2, 2).contiguous()
    y = torch.randint(0, 10, (n,))
    data = {"train": (x, y), "val": (x[:10], y[:10]), "test": (x[:10], y[:10])}
    model = RecordingModel()
    common.train(
        fake_run(tmp_path),
        model,
        data,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.0),
        loss_fn=nn.CrossEntropyLoss(),
        epochs=2,
        batch_size=64,
    )
    epoch_size = -(-n // 64)
    for epoch in range(2):
        seen = torch.cat(model.seen[epoch * epoch_size : (epoch + 1) * epoch_size])
        assert torch.equal(seen.sort().values, torch.arange(n))
    assert not torch.equal(torch.cat(model.seen[:epoch_size]), torch.cat(model.seen[epoch_size:]))


def test_loss_falls_over_a_few_steps(real_data_dir):
    x, y, _, _ = common.load_fashion_mnist(real_data_dir)
    x = (x[:512].float() / 255 - 0.286) / 0.353
    y = y[:512]
    torch.manual_seed(0)
    model = ann.ANN()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


@pytest.mark.parametrize("script, extra", [(ann, []), (cnn, ["--lr", "0.02"])])  # 10 steps need a gentler peak
def test_main_runs_end_to_end_and_writes_the_run_folder(script, extra, real_data_dir, out_dir, capsys):
    final = script.main(SMALL + extra + ["--out-dir", str(out_dir)])
    (run_dir,) = out_dir.iterdir()
    record = json.loads((run_dir / "metrics.json").read_text())
    assert record["status"] == "completed" and record["script"] == script.__name__
    assert len(record["history"]) == 1 and record["final"] == final
    assert set(record["history"][0]) == {
        "epoch",
        "train_loss",
        "train_acc",
        "val_loss",
        "val_acc",
        "lr",
        "train_seconds",
    }
    assert set(final) == {"train_acc", "val_acc", "test_acc", "test_loss", "seconds"}
    assert 0.3 < final["test_acc"] <= 1  # one epoch on 1000 images is far above chance (0.1)
    assert (run_dir / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    last_line = capsys.readouterr().out.strip().splitlines()[-1]
    assert last_line.startswith(f"{script.__name__}: train_acc=") and "test_acc=" in last_line


def test_same_seed_gives_identical_metrics(real_data_dir, tmp_path):
    args = SMALL + ["--epochs", "2", "--out-dir", str(tmp_path)]
    first, second = ann.main(args), ann.main(args)
    assert {k: v for k, v in first.items() if k != "seconds"} == {k: v for k, v in second.items() if k != "seconds"}
    records = [json.loads((d / "metrics.json").read_text()) for d in sorted(tmp_path.iterdir())]
    strip = [[{k: v for k, v in h.items() if k != "train_seconds"} for h in r["history"]] for r in records]
    assert strip[0] == strip[1]


def test_val_size_zero_trains_on_everything(real_data_dir, out_dir):
    final = ann.main(
        ["--subset", "600", "--val-size", "0", "--batch-size", "100", "--epochs", "1", "--out-dir", str(out_dir)]
    )
    assert final["val_acc"] is None
    (run_dir,) = out_dir.iterdir()
    assert json.loads((run_dir / "metrics.json").read_text())["history"][0]["val_acc"] is None


def test_flags_override_constants_and_defaults_are_the_constants():
    hp = common.parse_hparams(vars(cnn), ["--epochs", "3", "--lr", "0.5", "--flip", "--fc-width", "64"], cnn.CHECKS)
    assert (hp["EPOCHS"], hp["LR"], hp["FLIP"], hp["FC_WIDTH"]) == (3, 0.5, True, 64)
    assert hp["BATCH_SIZE"] == cnn.BATCH_SIZE and hp["SEED"] == cnn.SEED
    defaults = common.parse_hparams(vars(ann), [], ann.CHECKS)
    assert defaults == {k: v for k, v in vars(ann).items() if k.isupper() and type(v) in (int, float, str, bool)}


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
