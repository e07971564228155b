"""Fashion-MNIST with a small convolutional network: two conv layers (32 and 64 channels) and a classifier.

Run `python cnn.py`, or override any constant below from the command line (`python cnn.py --epochs 5`).
"""

import common  # first: from here on a Ctrl-C, even while torch loads, ends the program in one line

import torch
import torch.nn as nn
import torch.nn.functional as F

# --- Hyperparameters: each one is also a flag (EPOCHS -> --epochs); `python cnn.py --help` lists them.
# What each one buys, measured over seeds, is in RESULTS.md.
EPOCHS = 18  # passes over the training split
BATCH_SIZE = 256  # images per optimizer step
LR = 0.2  # peak learning rate of SGD with Nesterov momentum (linear warm-up, then cosine decay to 0)
MOMENTUM = 0.9  # SGD momentum, in [0, 1)
WEIGHT_DECAY = 2.5e-4  # L2 penalty on all weights, >= 0
WARMUP = 0.2  # fraction of the steps spent warming the learning rate up, in (0, 1)
DROPOUT = 0.1  # dropout before the last linear layer, in [0, 1)
FC_WIDTH = 128  # units of the fully connected hidden layer
FIXED_CONV1 = True  # conv1's 32 filters fixed to the 3x3 patterns the training images vary by most, not trained
LABEL_SMOOTHING = 0.1  # share of each target spread over the other classes, in [0, 1)
MAX_SHIFT = 1  # random translation of training images, in pixels (0 = off)
FLIP = True  # mirror training images left-right at random, so that shoes facing right are recognised
EMA_DECAY = 0.0  # moving average of the weights, evaluated instead of them, in [0, 1) (0 = off)
TTA_FLIP = True  # at evaluation, average the predictions on each image and its mirror; ignored (off) when FLIP is off
TTA_SHIFT = 1  # final evaluation also averages over views moved 1..N px up, down, left, right (0 = off)
VAL_SIZE = 5000  # training images held out for validation, class-balanced (0 = train on all 60,000)
SUBSET = 0  # use only the first N training and N test images, for quick dry runs (0 = all)
SEED = 0  # seeds initialisation, the validation split, batch order and augmentation
DEVICE = "auto"  # auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps
PRECISION = "auto"  # auto (bf16 on Ampere+ GPUs and bf16 CPUs, fp16 on a T4 or V100, else fp32), bf16, fp16, fp32
DATA_DIR = ""  # folder with the Fashion-MNIST files ("" = $FASHION_MNIST_DIR, ./data, the Debian package, download)
OUT_DIR = ""  # where run folders go ("" = runs/ beside this script)
SHOW = False  # at the end, open the plots in windows (needs a display; they are always saved as PNGs)


class CNN(nn.Module):
    def __init__(self, fc_width, dropout):
        super().__init__()
        # Each max pool comes straight after its convolution, before BatchNorm and ReLU: pooling commutes
        # with ReLU, and nearly so with BatchNorm, so the model barely changes while those two layers
        # work on a quarter of the pixels; that halves the training time on a CPU.
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, kernel_size=3, padding=1, bias=False),  # BatchNorm supplies the bias
            nn.MaxPool2d(2),  # 28x28 -> 14x14
            nn.BatchNorm2d(32),
            nn.ReLU(inplace=True),
            nn.Conv2d(32, 64, kernel_size=3, padding=1, bias=False),
            nn.MaxPool2d(2),  # 14x14 -> 7x7
            nn.BatchNorm2d(64),
            nn.ReLU(inplace=True),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(64 * 7 * 7, fc_width),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(fc_width, 10),
        )

    def forward(self, x):
        return self.classifier(self.features(x))


@torch.no_grad()
def pattern_filters(images, seed):
    """conv1's filters when FIXED_CONV1 (as airbench fixes its first layer): the 9 directions in which the 3x3
    patches of the first 10,000 training images vary most (their principal components), 7 random mixtures of them
    leaning to the rarer ones, and each of these 16 negated (the max pool after conv1 keeps only one sign)."""
    # On the CPU in double precision (MPS has none): a small eigenproblem, once, before training.
    patches = F.unfold(images[:10_000].cpu().float(), 3, padding=1).transpose(1, 2).reshape(-1, 9).double()
    variance, directions = torch.linalg.eigh(patches.T @ patches / len(patches))
    whitened = directions.T / (variance.sqrt()[:, None] + 1e-2)  # each scaled by its rarity
    mixtures = torch.randn(7, 9, generator=torch.Generator().manual_seed(seed), dtype=torch.double) @ whitened
    filters = torch.cat([whitened, mixtures])
    filters = filters / filters.norm(dim=1, keepdim=True)  # BatchNorm sets their scale
    return torch.cat([filters, -filters]).float().view(32, 1, 3, 3)


def train_one_epoch(model, batches, optimizer, scheduler, loss_fn, ema, amp, scaler):
    """One pass over the batches: one optimizer step per batch. Returns the batches' mean loss and accuracy."""
    model.train()
    tally = common.Tally()  # running loss and accuracy, and a check that the loss stays finite
    for images, labels in batches:
        with amp:  # the forward pass in 16 bits where the hardware is fast at it (PRECISION)
            logits = model(images)
            loss = loss_fn(logits.float(), labels)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()  # fp16 only: the loss is scaled up so that small gradients do not round to 0
        scaler.step(optimizer)  # unscales the gradients, and skips the step if they overflowed
        scaler.update()  # the scale adapts: down after an overflow, up after a long run without one
        scheduler.step()  # the learning rate changes every step
        if ema is not None:
            ema.update_parameters(model)
        tally.add(loss, logits, labels)
    return tally.result()


def main(argv=None):
    hp = common.parse_hparams(globals(), argv)
    hp.tta_flip = hp.tta_flip and hp.flip  # mirrored images would mislead a model never trained on them
    device = common.pick_device(hp.device)  # auto: CUDA, then Apple's MPS, then the CPU
    precision = common.pick_precision(hp.precision, device)  # auto: 16 bits where the device has the units for it
    amp = common.autocast(device, precision)  # the context the forward passes run in
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")  # a no-op unless fp16
    with common.Run("cnn", hp, device, precision) as run:
        torch.manual_seed(hp.seed)
        data_dir = common.find_fashion_mnist(hp.data_dir)
        splits = common.load_splits(data_dir, hp.subset, hp.val_size, hp.seed)
        data, normalization = common.to_device_normalized(splits, device)
        run.record.update(data_dir=str(data_dir), normalization=normalization)

        # channels_last lets oneDNN (CPU) and cuDNN (GPU) pick their fastest convolution kernels.
        model_args = dict(fc_width=hp.fc_width, dropout=hp.dropout)  # recorded: predict.py rebuilds the model from them
        model = CNN(**model_args).to(device, memory_format=torch.channels_last)
        run.record["model_args"] = model_args
        if hp.fixed_conv1:  # its gradient is never computed: a quicker step (RESULTS.md measures what it costs)
            model.features[0].weight.requires_grad_(False).copy_(pattern_filters(data.train[0], hp.seed))
        optimizer = torch.optim.SGD(
            [p for p in model.parameters() if p.requires_grad],
            lr=hp.lr,
            momentum=hp.momentum,
            nesterov=hp.momentum > 0,  # Nesterov momentum needs a momentum to look ahead with
            weight_decay=hp.weight_decay,
            fused=True,  # one kernel updates every parameter: faster steps than the default
        )
        steps = hp.epochs * common.steps_per_epoch(len(data.train[0]), hp.batch_size)
        scheduler = common.warmup_cosine(optimizer, steps, hp.warmup)
        ema = common.EMA(model, hp.ema_decay) if hp.ema_decay else None
        evaluated = ema if ema is not None else model  # the weight average, where there is one, is what gets evaluated
        loss_fn = nn.CrossEntropyLoss(label_smoothing=hp.label_smoothing)
        generator = torch.Generator(device).manual_seed(hp.seed)  # batch order and augmentation

        background = float(data.train[0].min())  # a black pixel, normalised: read once, not at every step

        def augment(images):
            return common.random_flip_and_shift(images, hp.max_shift, generator, hp.flip, background)

        views = (1 + hp.tta_flip) * (1 + 4 * hp.tta_shift)  # each image, its shifts and their mirrors, at the end
        trained = {
            "augmented": hp.flip or hp.max_shift,
            "dropout on": hp.dropout,
            "label smoothing in the loss": hp.label_smoothing,
        }
        run.start_training(data, model, evaluated, hp.epochs, views, trained)
        for epoch in range(1, hp.epochs + 1):
            batches = common.shuffled_batches(*data.train, hp.batch_size, generator, augment)
            train_loss, train_acc = train_one_epoch(model, batches, optimizer, scheduler, loss_fn, ema, amp, scaler)
            val_loss, val_acc = common.evaluate(evaluated, *data.val, amp)  # test-time views only at the end
            run.log_epoch(epoch, train_loss, train_acc, val_loss, val_acc, scheduler.get_last_lr()[0])

        sample = [x[: common.TRAIN_SAMPLE] for x in data.train]  # a fixed sample: all of it would cost far more
        train_acc = common.evaluate(evaluated, *sample, amp, hp.tta_flip, hp.tta_shift)[1]
        val_acc = common.evaluate(evaluated, *data.val, amp, hp.tta_flip, hp.tta_shift)[1]
        # The test set, evaluated once, after training: every choice was made on validation.
        test_logits = common.compute_logits(evaluated, data.test[0], amp, hp.tta_flip, hp.tta_shift)
        test_loss, test_acc = common.scores(test_logits, data.test[1])
        final = dict(train_acc=train_acc, val_acc=val_acc, test_acc=test_acc, test_loss=test_loss)
        run.finish(final, test_logits, *splits.test)  # recorded and printed, then the figures drawn
    if hp.show:
        common.show_plots(run.dir)
    return run.record["final"]


if __name__ == "__main__":
    raise SystemExit(common.run_main(main, memory=["BATCH_SIZE", "FC_WIDTH"]))  # what to lower if memory runs out
