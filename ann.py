"""Fashion-MNIST with a fully connected network: 784 -> 128 -> 64 -> 10, with BatchNorm and dropout.

Run `python ann.py`, or override any constant below from the command line (`python ann.py --epochs 5`).
"""

import common  # first: from here on a Ctrl-C, even while torch loads, ends the program in one line

import torch
import torch.nn as nn

# --- Hyperparameters: each one is also a flag (EPOCHS -> --epochs); `python ann.py --help` lists them.
# What each one buys, measured over seeds, is in RESULTS.md.
EPOCHS = 60  # passes over the training split
BATCH_SIZE = 512  # images per optimizer step
LR = 0.004  # peak learning rate of AdamW (linear warm-up, then cosine decay to 0)
WEIGHT_DECAY = 0.1  # AdamW's decoupled weight decay, >= 0
WARMUP = 0.2  # fraction of the steps spent warming the learning rate up, in (0, 1)
DROPOUT = 0.1  # dropout after each hidden layer, in [0, 1)
LABEL_SMOOTHING = 0.1  # share of each target spread over the other classes, in [0, 1)
MAX_SHIFT = 0  # random translation of training images, in pixels (0 = off)
FLIP = True  # mirror training images left-right at random
EMA_DECAY = 0.999  # moving average of the weights, evaluated instead of them (0 = off)
TTA_FLIP = True  # at evaluation, average the predictions on each image and its mirror; ignored (off) when FLIP is off
VAL_SIZE = 5000  # training images held out for validation, class-balanced (0 = train on all 60,000)
SUBSET = 0  # use only the first N training and N test images, for quick dry runs (0 = all)
SEED = 0  # seeds initialisation, the validation split, batch order and augmentation
DEVICE = "auto"  # auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps
PRECISION = "fp32"  # fp32: 16 bits gain little for so small a net; or auto (see cnn.py), bf16, fp16
DATA_DIR = ""  # folder with the Fashion-MNIST files ("" = $FASHION_MNIST_DIR, ./data, the Debian package, download)
OUT_DIR = ""  # where run folders go ("" = runs/ beside this script)
SHOW = False  # at the end, open the plots in windows (needs a display; they are always saved as PNGs)


class ANN(nn.Module):
    def __init__(self, dropout):
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(),
            nn.Linear(28 * 28, 128, bias=False),  # BatchNorm supplies the bias
            nn.BatchNorm1d(128),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(128, 64, bias=False),
            nn.BatchNorm1d(64),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(64, 10),
        )

    def forward(self, x):
        return self.net(x)


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
    with common.Run("ann", hp, device, precision) as run:
        torch.manual_seed(hp.seed)
        data_dir = common.find_fashion_mnist(hp.data_dir)
        splits = common.load_splits(data_dir, hp.subset, hp.val_size, hp.seed)
        data, normalization = common.to_device_normalized(splits, device)
        run.record.update(data_dir=str(data_dir), normalization=normalization)

        model_args = dict(dropout=hp.dropout)  # recorded: predict.py rebuilds the model from them
        model = ANN(**model_args).to(device)
        run.record["model_args"] = model_args
        # fused: one kernel updates every parameter, 3x faster steps than the default on a CPU
        optimizer = torch.optim.AdamW(model.parameters(), lr=hp.lr, weight_decay=hp.weight_decay, fused=True)
        steps = hp.epochs * common.steps_per_epoch(len(data.train[0]), hp.batch_size)
        scheduler = common.warmup_cosine(optimizer, steps, hp.warmup)
        ema = common.EMA(model, hp.ema_decay) if hp.ema_decay else None
        evaluated = ema if ema is not None else model  # the weight average, where there is one, is what gets evaluated
        loss_fn = nn.CrossEntropyLoss(label_smoothing=hp.label_smoothing)
        generator = torch.Generator(device).manual_seed(hp.seed)  # batch order and augmentation

        background = float(data.train[0].min())  # a black pixel, normalised: read once, not at every step

        def augment(images):
            return common.random_flip_and_shift(images, hp.max_shift, generator, hp.flip, background)

        views = 1 + hp.tta_flip  # each image and its mirror, at the end
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
        train_acc = common.evaluate(evaluated, *sample, amp, hp.tta_flip)[1]
        val_acc = common.evaluate(evaluated, *data.val, amp, hp.tta_flip)[1]
        # The test set, evaluated once, after training: every choice was made on validation.
        test_logits = common.compute_logits(evaluated, data.test[0], amp, hp.tta_flip)
        test_loss, test_acc = common.scores(test_logits, data.test[1])
        final = dict(train_acc=train_acc, val_acc=val_acc, test_acc=test_acc, test_loss=test_loss)
        run.finish(final, test_logits, *splits.test)  # recorded and printed, then the figures drawn
    if hp.show:
        common.show_plots(run.dir)
    return run.record["final"]


if __name__ == "__main__":
    raise SystemExit(common.run_main(main, memory=["BATCH_SIZE"]))  # what to lower if memory runs out
