import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import ann
import cnn
import common
from conftest import SMALL


def test_models_map_images_to_ten_logits_and_their_widths_follow_the_settings():
    x = torch.randn(5, 1, 28, 28)
    assert ann.ANN(dropout=0.1)(x).shape == cnn.CNN(fc_width=32, dropout=0.1)(x).shape == (5, 10)
    # FC_WIDTH is the hidden layer's width: each extra unit adds its weights in, its bias and its weights out.
    narrow, wide = (sum(p.numel() for p in cnn.CNN(w, 0.1).parameters()) for w in (64, 65))
    assert wide - narrow == cnn.CNN(64, 0.1).classifier[1].in_features + 1 + 10
    # A layer followed by BatchNorm needs no bias of its own (BatchNorm's shift replaces it).
    for model in (ann.ANN(0.1), cnn.CNN(64, 0.1)):
        layers = list(model.modules())
        norms = [i for i, layer in enumerate(layers) if isinstance(layer, nn.BatchNorm1d | nn.BatchNorm2d)]
        assert len(norms) == 2
        for i in norms:
            assert next(m for m in reversed(layers[:i]) if hasattr(m, "weight")).bias is None


@pytest.mark.parametrize("n", [1003, 1025, 65])  # not a multiple of 64; one image over; one image over, 2 batches
def test_every_training_index_is_used_once_per_epoch_and_no_batch_holds_one_image(n):
    x = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1)
    y = torch.arange(n)
    generator = torch.Generator().manual_seed(0)
    epochs = [list(common.shuffled_batches(x, y, 64, generator)) for _ in range(2)]
    for batches in epochs:
        assert len(batches) == common.steps_per_epoch(n, 64)
        assert min(len(labels) for _, labels in batches) >= 2  # BatchNorm cannot train on one image
        assert all(torch.equal(images.flatten().long(), labels) for images, labels in batches)
        assert torch.equal(torch.cat([labels for _, labels in batches]).sort().values, torch.arange(n))
    assert not torch.equal(torch.cat([y for _, y in epochs[0]]), torch.cat([y for _, y in epochs[1]]))


@pytest.mark.parametrize("script", [ann, cnn])
def test_the_scripts_epoch_steps_optimizer_scheduler_and_average_once_per_batch(script):
    x, y = torch.randn(1003, 1, 28, 28), torch.randint(0, 10, (1003,))
    model = ann.ANN(dropout=0.1) if script is ann else cnn.CNN(16, 0.1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    ema = common.ema_model(model, 0.9)
    batches = common.shuffled_batches(x, y, 64, torch.Generator().manual_seed(0))
    amp = common.autocast(torch.device("cpu"), "fp32")
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    loss, acc = script.train_one_epoch(model, batches, optimizer, scheduler, nn.CrossEntropyLoss(), ema, amp, scaler)
    steps = common.steps_per_epoch(1003, 64)
    assert scheduler.last_epoch == steps == 16 and ema.n_averaged.item() == steps
    assert loss > 0 and 0 <= acc <= 1


@pytest.mark.parametrize("script", [ann, cnn])
def test_the_scripts_training_loop_lowers_the_loss_on_real_images(script, real_data_dir):
    """Three epochs of the script's own train_one_epoch on 2,000 real images: the mean loss falls by half."""
    x, y, _, _ = common.take_subset(2000, *common.load_fashion_mnist(real_data_dir))
    x = (x.float() - x.float().mean()) / x.float().std()
    torch.manual_seed(0)
    model = ann.ANN(dropout=0.1) if script is ann else cnn.CNN(64, 0.1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    amp = common.autocast(torch.device("cpu"), "fp32")
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    generator = torch.Generator().manual_seed(0)
    loss_fn = nn.CrossEntropyLoss()
    losses = []
    for _ in range(3):
        batches = common.shuffled_batches(x, y, 100, generator)
        losses.append(script.train_one_epoch(model, batches, optimizer, scheduler, loss_fn, None, amp, scaler)[0])
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
        "train_batch_loss",
        "train_batch_acc",
        "val_loss",
        "val_acc",
        "lr",
        "seconds",
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
    strip = [[{k: v for k, v in h.items() if k != "seconds"} for h in r["history"]] for r in records]
    assert strip[0] == strip[1]


def test_val_size_zero_trains_on_everything(real_data_dir, out_dir):
    final = ann.main(
        ["--subset", "600", "--val-size", "0", "--batch-size", "100", "--epochs", "1", "--out-dir", str(out_dir)]
    )
    assert final["val_acc"] is None
    (run_dir,) = out_dir.iterdir()
    assert json.loads((run_dir / "metrics.json").read_text())["history"][0]["val_acc"] is None


def test_flags_override_constants_and_defaults_are_the_constants():
    hp = common.parse_hparams(vars(cnn), ["--epochs", "3", "--lr", "0.5", "--flip", "--fc-width", "64"])
    assert (hp.epochs, hp.lr, hp.flip, hp.fc_width) == (3, 0.5, True, 64)
    assert hp.batch_size == cnn.BATCH_SIZE and hp.seed == cnn.SEED
    defaults = vars(common.parse_hparams(vars(ann), []))
    assert defaults == {
        k.lower(): v for k, v in vars(ann).items() if k.isupper() and type(v) in (int, float, str, bool)
    }


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


def test_ema_ramps_its_decay_up_and_averages_batchnorm_statistics():
    model = nn.Sequential(nn.Linear(1, 1, bias=False), nn.BatchNorm1d(1))
    averaged = common.ema_model(model, decay=0.9)
    expected = None
    for t in range(30):  # the model's weight and running mean step up by 1 each time
        with torch.no_grad():
            model[0].weight.fill_(t)
            model[1].running_mean.fill_(t)
        averaged.update_parameters(model)
        decay = min(0.9, (1 + t) / (10 + t))  # t averaged steps before this one
        expected = float(t) if expected is None else decay * expected + (1 - decay) * t
        assert averaged.module[0].weight.item() == pytest.approx(expected, rel=1e-5)
        assert averaged.module[1].running_mean.item() == pytest.approx(expected, rel=1e-5)
    assert 20 < expected < 29  # behind the model, by about decay / (1 - decay) steps


def test_learning_rate_warms_up_linearly_then_decays_to_zero():
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    scheduler = common.warmup_cosine(optimizer, total_steps=100, warmup=0.2)
    lrs = []
    for _ in range(100):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[:3] == pytest.approx([0.005, 0.01, 0.015]) and lrs[19] == pytest.approx(0.1)
    assert lrs[60] == pytest.approx(0.05 * (1 + math.cos(math.pi * 40 / 80)))
    assert all(a >= b for a, b in zip(lrs[19:], lrs[20:], strict=False)) and optimizer.param_groups[0]["lr"] < 1e-12
