"""Fashion-MNIST with a fully connected network: 784 -> 128 -> 64 -> 10, with BatchNorm and dropout.

Run `python ann.py`, or override any constant below from the command line (`python ann.py --epochs 5`).
With `--teacher runs/cnn-...` it also learns from a trained CNN's predictions (knowledge distillation, Hinton,
Vinyals and Dean 2015): their probabilities say which wrong classes are nearly right, which labels do not.
"""

from pathlib import Path

import common  # first: then a Ctrl-C while torch loads ends in one line
import plumbing
from plumbing import reading

import torch
import torch.nn as nn
import torch.nn.functional as F

import cnn

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
TTA_FLIP = True  # at evaluation, average the predictions on each image and its mirror (needs FLIP)
VAL_SIZE = 5000  # training images held out for validation, class-balanced (0 = train on all 60,000)
SUBSET = 0  # use only the first N training and N test images, for quick dry runs (0 = all)
SEED = 0  # seeds initialisation, the validation split, batch order and augmentation
DEVICE = "auto"  # auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps
PRECISION = "fp32"  # fp32: 16 bits gain little for so small a net; or auto (see cnn.py), bf16, fp16
DATA_DIR = ""  # folder with the Fashion-MNIST files ("" = $FASHION_MNIST_DIR, ./data, the Debian package, download)
OUT_DIR = ""  # where run folders go ("" = runs/ beside this script)
SHOW = False  # at the end, open the plots in windows (needs a display; they are always saved as PNGs)
TEACHER = ""  # a cnn.py run folder to learn from as well as from the labels ("" = the labels alone)
TEMPERATURE = 4.0  # with TEACHER: divides both models' logits, softening the probabilities compared, > 0
DISTILL_WEIGHT = 0.5  # with TEACHER: share of the loss that is the teacher's, the rest the labels', in [0, 1]


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


def train_one_epoch(model, batches, optimizer, scheduler, loss_fn, ema, amp, scaler, temperature, distill_weight):
    """One pass over the batches: one optimizer step per batch. A batch brings its images, their labels and the
    teacher's logits for them (None without a teacher). Returns the batches' mean loss and accuracy."""
    model.train()
    tally = common.Tally()  # running loss and accuracy, and a check that the loss stays finite
    for images, (labels, teacher_logits) in batches:
        with amp:  # the forward pass in 16 bits where the hardware is fast at it (PRECISION)
            logits = model(images)
            loss = loss_fn(logits.float(), labels)
        if teacher_logits is not None:  # the teacher's probabilities, and ours, softened by the temperature:
            ours = F.log_softmax(logits.float() / temperature, dim=1)  # the KL divergence between them, times T²
            theirs = F.log_softmax(teacher_logits / temperature, dim=1)  # so its gradients keep their size
            distillation = F.kl_div(ours, theirs, log_target=True, reduction="batchmean") * temperature**2
            loss = (1 - distill_weight) * loss + distill_weight * distillation
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()  # fp16 only: the loss is scaled up so that small gradients do not round to 0
        scaler.step(optimizer)  # unscales the gradients, and skips the step if they overflowed
        scaler.update()  # the scale adapts: down after an overflow, up after a long run without one
        scheduler.step()  # the learning rate changes every step
        if ema is not None:
            ema.update_parameters(model)
        tally.add(loss, logits, labels)
    return tally.result()


TEACHER_SETTINGS = ("DROPOUT", "FC_WIDTH", "TTA_FLIP", "SUBSET", "VAL_SIZE", "SEED")  # what the teacher is read with


def load_teacher(folder, hp, device):
    """A trained cnn.py run (plumbing.reading.Run) with its `model` and its `normalization`, read as predict.py
    reads one: its record checked, its weights read within bounds and verified. It must have trained on this run's
    data."""
    try:
        run = reading.load_run(Path(folder), {"cnn": TEACHER_SETTINGS})
        if (run.settings.subset, run.settings.val_size) != (hp.subset, hp.val_size):
            raise plumbing.UserError(
                f"{folder} trained on other data (--subset {run.settings.subset} --val-size {run.settings.val_size}, "
                f"here {hp.subset} and {hp.val_size}): pick a run trained as this one trains"
            )
        with torch.device("meta"):  # shapes without memory, until the weights are known to fit
            model = cnn.CNN(run.settings.fc_width, run.settings.dropout)
        run.model, run.normalization = (
            reading.load_weights(model, run, "cnn.py", device),
            reading.check_normalization(run),
        )
        return run
    except plumbing.UserError as error:
        raise plumbing.UserError(f"--teacher {error}") from None


def teacher_logits(teacher, images, device):
    """The teacher's logits for uint8 images, computed once: averaged over each image and its mirror when the
    teacher was evaluated so (then they are the same for a mirrored image, as FLIP shows the ANN)."""
    norm = teacher.normalization
    x = ((images.float() - norm["mean"]) / norm["std"]).to(device)
    return common.predict(teacher.model, x, common.autocast(device, "fp32"), teacher.settings.tta_flip)


def main(argv=None):
    hp = common.parse_hparams(globals(), argv)
    device = common.pick_device(hp.device)  # auto: CUDA, then Apple's MPS, then the CPU
    precision = common.pick_precision(hp.precision, device)  # auto: 16 bits where the device has the units for it
    amp = common.autocast(device, precision)  # the context the forward passes run in
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")  # a no-op unless fp16
    with common.Run("ann", hp, device, precision, hp.out_dir) as run:
        torch.manual_seed(hp.seed)
        teacher = load_teacher(hp.teacher, hp, device) if hp.teacher else None
        data_dir = common.find_fashion_mnist(hp.data_dir)
        # With a teacher, validate on the images it never trained on: the split its own seed chose.
        splits = common.load_splits(data_dir, hp.subset, hp.val_size, teacher.settings.seed if teacher else hp.seed)
        data, normalization = common.to_device_normalized(splits, device)
        run.record.update(data_dir=str(data_dir), normalization=normalization)
        soft = teacher_logits(teacher, splits.train[0], device) if teacher else None  # once, before training
        if teacher:
            run.record["teacher"] = {"run": str(teacher.folder), "final": teacher.final}

        model = ANN(hp.dropout).to(device)
        # fused: one kernel updates every parameter, 3x faster steps than the default on a CPU
        optimizer = torch.optim.AdamW(model.parameters(), lr=hp.lr, weight_decay=hp.weight_decay, fused=True)
        steps = hp.epochs * common.steps_per_epoch(len(data.train[0]), hp.batch_size)
        scheduler = common.warmup_cosine(optimizer, steps, hp.warmup)
        ema = common.EMA(model, hp.ema_decay) if hp.ema_decay else None
        evaluated = ema if ema is not None else model  # the weight average, where there is one, is what gets evaluated
        loss_fn = nn.CrossEntropyLoss(label_smoothing=hp.label_smoothing)
        generator = torch.Generator(device).manual_seed(hp.seed)  # batch order and augmentation

        black = float(data.train[0].min())  # the background pixel, normalised: read once, not at every step

        def augment(images):
            return common.random_flip_and_shift(images, hp.max_shift, generator, hp.flip, black)

        views = 1 + hp.tta_flip  # each image and its mirror, at the end
        trained = {
            "augmented": hp.flip or hp.max_shift,
            "dropout on": hp.dropout,
            "label smoothing in the loss": hp.label_smoothing,
            "a teacher's probabilities in the loss": hp.teacher,
        }
        run.start_training(data, model, evaluated, hp.epochs, views, trained)
        for epoch in range(1, hp.epochs + 1):
            batches = common.shuffled_batches(data.train[0], (data.train[1], soft), hp.batch_size, generator, augment)
            train_loss, train_acc = train_one_epoch(
                model, batches, optimizer, scheduler, loss_fn, ema, amp, scaler, hp.temperature, hp.distill_weight
            )
            val_loss, val_acc = common.evaluate(evaluated, *data.val, amp)  # test-time views only at the end
            run.log_epoch(epoch, train_loss, train_acc, val_loss, val_acc, scheduler.get_last_lr()[0])

        sample = [x[: common.TRAIN_SAMPLE] for x in data.train]  # a fixed sample: all of it would cost far more
        train_acc = common.evaluate(evaluated, *sample, amp, hp.tta_flip)[1]
        val_acc = common.evaluate(evaluated, *data.val, amp, hp.tta_flip)[1]
        # The test set, evaluated once, after training: every choice was made on validation.
        test_logits = common.predict(evaluated, data.test[0], amp, hp.tta_flip)
        test_loss, test_acc = common.scores(test_logits, data.test[1])
        final = dict(train_acc=train_acc, val_acc=val_acc, test_acc=test_acc, test_loss=test_loss)
        mistakes = (common.plot_misclassified, "misclassified.png", splits.test[0], splits.test[1], test_logits.cpu())
        run.finish(final, common.confusion_matrix(test_logits, data.test[1]), [mistakes])
    if hp.show:
        common.show_plots(run.dir)
    return run.record["final"]


if __name__ == "__main__":
    raise SystemExit(common.run_main(main))
