"""Training: the models, the batches, each script's epoch step and loop, the learning-rate schedule and the
weight average, and what training does with its settings (the same seed, no validation split, a last batch of
one image). What a finished run writes is in test_runs.py; precision and the loss scaler in test_precision.py.
"""

import common

import json

import pytest
import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode

import ann
import cnn
import resnet_transfer
from conftest import SMALL, run_cli

# ----------------------------------------------------------------------------------------------
# Models


def test_models_map_images_to_ten_logits_and_their_widths_follow_the_settings():
    x = torch.randn(5, 1, 28, 28)
    assert ann.ANN(dropout=0.1)(x).shape == cnn.CNN(fc_width=32, dropout=0.1)(x).shape == (5, 10)
    # FC_WIDTH is the width of the hidden layer the classifier's last layer reads.
    for width in (16, 64):
        model = cnn.CNN(fc_width=width, dropout=0.1).eval()
        assert model.classifier[:-1](model.features(x)).shape == (5, width)
    # A layer followed by BatchNorm needs no bias of its own (BatchNorm's shift replaces it).
    for model in (ann.ANN(0.1), cnn.CNN(64, 0.1)):
        layers = list(model.modules())
        norms = [i for i, layer in enumerate(layers) if isinstance(layer, nn.BatchNorm1d | nn.BatchNorm2d)]
        assert len(norms) == 2
        for i in norms:
            assert next(m for m in reversed(layers[:i]) if hasattr(m, "weight")).bias is None


# ----------------------------------------------------------------------------------------------
# Batches


@pytest.mark.parametrize(
    "n, batches",
    [(1003, 16), (1025, 16), (65, 1), (59_905, 117)],  # not a multiple of 64; one image over; one over one batch;
)
def test_every_training_index_is_used_once_per_epoch_and_no_batch_holds_one_image(n, batches):
    """The last case is the whole training set of --val-size 95 in batches of 512: 117 * 512 + 1 images."""
    size = 512 if n == 59_905 else 64
    x = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1)
    y = torch.arange(n)
    generator = torch.Generator().manual_seed(0)
    epochs = [list(common.shuffled_batches(x, y, size, generator)) for _ in range(2)]
    assert common.steps_per_epoch(n, size) == batches  # what the schedule is sized by
    for epoch in epochs:
        assert len(epoch) == batches
        assert min(len(labels) for _, labels in epoch) >= 2  # BatchNorm cannot train on one image
        assert all(torch.equal(images.flatten().long(), labels) for images, labels in epoch)
        assert torch.equal(torch.cat([labels for _, labels in epoch]).sort().values, torch.arange(n))
    assert not torch.equal(torch.cat([y for _, y in epochs[0]]), torch.cat([y for _, y in epochs[1]]))


def test_a_last_batch_of_one_image_trains_the_batchnorm_model(real_data_dir, tmp_path, capsys):
    """1,001 training images in batches of 100: the image left over joins the last batch (as the whole training
    set, 59,905 = 117 * 512 + 1 images, would in batches of 512)."""
    argv = ["--subset", "1201", "--val-size", "200", "--batch-size", "100"]
    code, err = run_cli(ann, argv + ["--epochs", "1", "--out-dir", str(tmp_path)], capsys)
    assert code == 0, err
    (run_dir,) = tmp_path.iterdir()
    assert json.loads((run_dir / "metrics.json").read_text())["status"] == "completed"


# ----------------------------------------------------------------------------------------------
# The scripts' epoch step and loop


@pytest.mark.parametrize("script", [ann, cnn])
def test_the_scripts_epoch_steps_optimizer_scheduler_and_average_once_per_batch(script):
    x, y = torch.randn(1003, 1, 28, 28), torch.randint(0, 10, (1003,))
    model = ann.ANN(dropout=0.1) if script is ann else cnn.CNN(16, 0.1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    ema = common.EMA(model, 0.9)
    batches = common.shuffled_batches(x, y, 64, torch.Generator().manual_seed(0))
    amp = common.autocast(torch.device("cpu"), "fp32")
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    step = (optimizer, scheduler, nn.CrossEntropyLoss(), ema, amp, scaler)
    loss, acc = script.train_one_epoch(model, batches, *step)
    steps = common.steps_per_epoch(1003, 64)
    assert scheduler.last_epoch == steps == 16 and ema.steps == steps
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
        step = (optimizer, scheduler, loss_fn, None, amp, scaler)
        losses.append(script.train_one_epoch(model, batches, *step)[0])
    assert losses[-1] < 0.5 * losses[0]  # measured 0.34-0.42 (seeds 0-4, AVX2, AVX-512, bf16); no learning: 1


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


def test_cnn_trains_with_momentum_zero_as_its_settings_allow(real_data_dir, out_dir, monkeypatch):
    """MOMENTUM allows 0, where SGD's Nesterov variant would refuse to run: plain SGD then, and Nesterov's
    otherwise."""
    optimizers, sgd = [], torch.optim.SGD
    monkeypatch.setattr(
        torch.optim, "SGD", lambda *args, **kwargs: optimizers.append(sgd(*args, **kwargs)) or optimizers[-1]
    )
    for momentum in ("0", "0.9"):
        cnn.main(SMALL + ["--momentum", momentum, "--lr", "0.05", "--out-dir", str(out_dir)])
    (plain,), (nesterov,) = (optimizer.param_groups[:1] for optimizer in optimizers)
    assert (plain["momentum"], plain["nesterov"]) == (0, False) and (nesterov["momentum"], nesterov["nesterov"]) == (
        0.9,
        True,
    )
    records = [json.loads(path.read_text()) for path in sorted(out_dir.glob("*/metrics.json"))]
    assert [r["status"] for r in records] == ["completed", "completed"]


def test_a_fixed_conv1_keeps_the_training_images_patterns_and_the_rest_trains(real_data_dir, out_dir):
    """FIXED_CONV1: conv1 holds the 3x3 patches' principal directions (orthonormal), mixtures of them and each
    negated, untouched by training; with --no-fixed-conv1 conv1 trains."""
    for fixed in ("--fixed-conv1", "--no-fixed-conv1"):
        cnn.main(SMALL + [fixed, "--out-dir", str(out_dir / fixed)])
    hp = common.parse_hparams(vars(cnn), SMALL)
    data, _ = common.to_device_normalized(
        common.load_splits(real_data_dir, hp.subset, hp.val_size, hp.seed), torch.device("cpu")
    )
    filters = cnn.pattern_filters(data.train[0], hp.seed).view(32, 9)
    assert torch.allclose(filters[:9] @ filters[:9].T, torch.eye(9), atol=1e-5) and torch.equal(
        filters[16:], -filters[:16]
    )
    for fixed, kept in (("--fixed-conv1", True), ("--no-fixed-conv1", False)):
        (weights,) = (out_dir / fixed).glob("*/model.pt")
        conv1 = torch.load(weights, weights_only=True)["features.0.weight"].view(32, 9)
        assert torch.equal(conv1, filters) == kept, fixed


# ----------------------------------------------------------------------------------------------
# Learning-rate schedule and the weight average


def test_learning_rate_warms_up_linearly_then_decays_to_zero():
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    scheduler = common.warmup_cosine(optimizer, total_steps=100, warmup=0.2)
    lrs = []
    for _ in range(100):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    # 20 warm-up steps climb in equal steps of 0.005 to the peak, which the decay starts from
    assert lrs[:20] == pytest.approx([0.005 * (i + 1) for i in range(20)]) and lrs[20] == pytest.approx(0.1)
    decay = lrs[20:] + [optimizer.param_groups[0]["lr"]]  # 80 decay steps, and where they end
    assert all(a >= b for a, b in zip(decay, decay[1:], strict=False)) and decay[-1] < 1e-12
    # a half cosine: half the peak halfway, symmetric about that point, above a straight line before it
    assert decay[40] == pytest.approx(0.05)
    assert all(decay[k] + decay[80 - k] == pytest.approx(0.1) for k in range(81))
    assert all(decay[k] > 0.1 * (1 - k / 80) for k in range(1, 40))


def test_ema_ramps_its_decay_up_and_averages_batchnorm_statistics():
    """Fed a model whose weight and BatchNorm running mean step up by 1 each time (t = 0, 1, 2, ...)."""
    model = nn.Sequential(nn.Linear(1, 1, bias=False), nn.BatchNorm1d(1))
    averaged = common.EMA(model, decay=0.9)
    lags = []
    for t in range(200):
        with torch.no_grad():
            model[0].weight.fill_(t)
            model[1].running_mean.fill_(t)
            model[1].num_batches_tracked.fill_(t)
        averaged.update_parameters(model)
        weight = averaged.module[0].weight.item()
        assert averaged.module[1].running_mean.item() == pytest.approx(weight, rel=1e-6)  # averaged like a weight
        assert averaged.module[1].num_batches_tracked.item() == t  # a counter: copied, not averaged
        lags.append(t - weight)
    assert lags[0] == 0  # the first average is the model itself
    # The decay ramps up: the average starts close behind the model and falls further behind as it ramps up ...
    assert all(0 < lag < 0.5 for lag in lags[1:5]) and all(a < b for a, b in zip(lags[1:80], lags[2:81], strict=True))
    # ... to the lag of an average with the full decay, 0.9 / (1 - 0.9) = 9 steps behind a steady climb.
    assert lags[-1] == pytest.approx(9, abs=0.01)


def test_ema_forgets_the_first_random_weights_within_a_few_hundred_steps():
    """With decay 0.999, a fixed decay would still hold 0.999**300 = 74% of the first weights after 300 steps."""
    model = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(1000.0)  # the freshly initialised weights
    averaged = common.EMA(model, decay=0.999)
    averaged.update_parameters(model)
    with torch.no_grad():
        model.weight.fill_(0.0)  # where training has taken them
    for _ in range(300):
        averaged.update_parameters(model)
    assert abs(averaged.module.weight.item()) < 1e-6


# ----------------------------------------------------------------------------------------------
# The step never waits for the device


class DeviceReads(TorchDispatchMode):
    """Counts the operations that read a value back from the device to the host: .item(), float(), bool() and
    comparisons of a tensor in an `if` all end in one of these. On a GPU each makes the host wait for the device."""

    READS = {
        torch.ops.aten._local_scalar_dense.default,
        torch.ops.aten.is_nonzero.default,
        torch.ops.aten.equal.default,
    }

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func in self.READS
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize(
    "script, extra",
    [
        (ann, []),
        (cnn, []),
        (resnet_transfer, ["--weights", "none", "--backbone", "resnet18", "--image-size", "32"]),
    ],
)
def test_the_training_step_reads_at_most_one_value_from_the_device_per_ten_steps(
    script, extra, real_data_dir, tmp_path, monkeypatch
):
    """The script's own train_one_epoch, its batches (and their augmentation) drawn inside it, as main() runs it."""
    counted, original = [], script.train_one_epoch

    def counting_epoch(model, batches, *args):
        steps = []

        def counting(batches):
            for batch in batches:
                steps.append(batch)
                yield batch

        with DeviceReads() as reads:
            result = original(model, counting(batches), *args)
        counted.append((reads.count, len(steps)))
        return result

    monkeypatch.setattr(script, "train_one_epoch", counting_epoch)
    argv = ["--subset", "3500", "--val-size", "500", "--batch-size", "50", "--epochs", "1", *extra]
    if script is resnet_transfer:
        argv += ["--cache-dir", str(tmp_path / "cache")]
    script.main(argv + ["--out-dir", str(tmp_path / "runs")])
    reads, steps = (sum(column) for column in zip(*counted, strict=True))
    assert steps == 60 and reads / steps <= 0.1, f"{reads} reads in {steps} steps"
