"""What ann.py, cnn.py and resnet_transfer.py share about training, in the order a run uses it: the device and
precision, the data, augmentation, the learning-rate schedule and the weight average, batches and the running tally
of an epoch, and evaluation. The models, optimizers, the step and the test evaluation are what a reader came to see:
they live in the scripts. What keeps a run safe (checked settings, verified files, the run folder and its figures,
clean stops) is the machinery in plumbing/, which the scripts reach through the names imported below.
"""

from plumbing import stops  # noqa: F401  first: from here on, a Ctrl-C or a stop ends the program in one line
from plumbing.data import CLASSES, find_fashion_mnist, load_fashion_mnist, read_fashion_mnist  # noqa: F401
from plumbing.figures import show_plots  # noqa: F401
from plumbing.runs import TRAIN_SAMPLE, Run  # noqa: F401  (the run folder: its record, weights and figures)
from plumbing.settings import check_device, has_fast, import_torchvision, parse_hparams  # noqa: F401
from plumbing.stops import Diverged, UserError, run_main  # noqa: F401

import collections
import copy
import math
import sys

import torch
import torch.nn.functional as F
from tqdm import tqdm

# ----------------------------------------------------------------------------------------------
# Device and precision: each script's main() picks them in three lines.


def pick_device(name):
    """DEVICE: "auto" picks CUDA, then Apple's MPS, then the CPU; a device named must exist. On CUDA, cuDNN is
    told to use only deterministic kernels, so that a seed gives the same numbers twice on one GPU (the CPU's
    kernels are deterministic already)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if name != "cpu":
        check_device(name)  # one that is not here is refused in one line
    if name.startswith("cuda"):
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    return torch.device(name)


def pick_precision(name, device):
    """PRECISION: "auto" picks bf16 where the device has bf16 units, else fp16 on CUDA tensor cores (with loss
    scaling), else fp32. An explicit one is refused where it cannot work and warned about where it is emulated.
    fp32 on an Ampere or newer GPU runs its matrix products in TF32 (fp32's range, a 10-bit mantissa), several
    times faster, as cuDNN's convolutions already do: that precision is called "tf32"."""
    if name == "auto":
        fp16 = device.type == "cuda" and has_fast("fp16", device)
        name = "bf16" if has_fast("bf16", device) else "fp16" if fp16 else "fp32"
    elif name == "bf16" and device.type == "mps":
        raise UserError("--precision bf16 is not supported on MPS here; use fp16, fp32 or auto")
    elif name != "fp32" and not torch.amp.is_autocast_available(device.type):
        raise UserError(f"--precision {name}: PyTorch has no autocast for {device.type} here; use fp32 or auto")
    elif name != "fp32" and device.type != "mps" and not has_fast(name, device):
        print(
            f"warning: --precision {name} on a {device.type.upper()} without {name} units is emulated and runs "
            f"several times slower than fp32; --precision auto picks {pick_precision('auto', device)} here",
            file=sys.stderr,
        )
    if name == "fp32" and device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 8:
        torch.set_float32_matmul_precision("high")
        return "tf32"
    return name


def autocast(device, precision):
    """The context that the forward passes run in: autocast to bf16 or fp16 on the device (matrix products and
    convolutions in 16 bits, sums and losses in fp32), a no-op in fp32 and tf32. One object serves every `with`."""
    dtype = torch.float16 if precision == "fp16" else torch.bfloat16
    return torch.autocast(device.type, dtype=dtype, enabled=precision in ("bf16", "fp16"))


# ----------------------------------------------------------------------------------------------
# Data: uint8 tensors, loaded once, split, normalised once, kept on the device.


Splits = collections.namedtuple("Splits", ["train", "val", "test"])  # (images, labels) of each split


def take_subset(n, *arrays):
    """The first n rows of each array (all of them when n is 0): SUBSET, for quick dry runs."""
    return tuple(a[:n] for a in arrays) if n else arrays


def stratified_split(labels, val_size, seed):
    """Indices (train, val) with `val_size` validation images spread evenly over the classes, drawn at random."""
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    n = int(labels.max()) + 1  # classes
    is_val = torch.zeros(len(labels), dtype=torch.bool)
    for c in range(n):  # the first val_size / n images of each class, in the random order
        is_val[order[labels[order] == c][: val_size // n + (c < val_size % n)]] = True
    return (~is_val).nonzero().flatten(), is_val.nonzero().flatten()


def split_validation(x_train, y_train, x_test, y_test, val_size, seed):
    """Splits with `val_size` class-balanced validation images held out of the training set."""
    train_idx, val_idx = stratified_split(y_train, val_size, seed)
    return Splits((x_train[train_idx], y_train[train_idx]), (x_train[val_idx], y_train[val_idx]), (x_test, y_test))


def load_splits(data_dir, subset, val_size, seed):
    """uint8 train/val/test splits of Fashion-MNIST from data_dir (a folder `find_fashion_mnist` found):
    the first `subset` images of each set (0 = all), `val_size` of the training images held out."""
    arrays = take_subset(subset, *read_fashion_mnist(data_dir))
    return split_validation(*arrays, val_size, seed)


def to_device_normalized(splits, device):
    """(splits as float images on the device, {"mean", "std"}): normalised once with the training split's mean
    and std, which a run records so that predict.py can prepare new images exactly the same way."""
    x_train = splits.train[0].float()
    mean, std = x_train.mean(), x_train.std()
    data = Splits(*[(((x.float() - mean) / std).to(device), y.to(device)) for x, y in splits])
    return data, {"mean": mean.item(), "std": std.item()}


# ----------------------------------------------------------------------------------------------
# Augmentation, vectorised on the device.


def random_flip_and_shift(x, max_shift, generator, flip=True, background=0.0):
    """Each image mirrored left-right with probability 1/2 and shifted by up to `max_shift` pixels.

    One gather per batch: the flip reverses the column index and the shift offsets both indices into a copy
    padded with `background` (the value of a black pixel, a Python number: reading it from the batch would make
    the step wait for the device). A flat `gather` is about twice as fast on a CPU as indexing with three
    broadcast index tensors.
    """
    if not max_shift and not flip:
        return x
    n, c, h, w = x.shape
    device = x.device
    padded = F.pad(x, (max_shift,) * 4, value=background) if max_shift else x
    dy, dx = torch.randint(0, 2 * max_shift + 1, (2, n, 1, 1), device=device, generator=generator)
    rows = torch.arange(h, device=device).view(1, h, 1) + dy
    cols = torch.arange(w, device=device).view(1, 1, w)
    if flip:
        mirrored = torch.rand(n, 1, 1, device=device, generator=generator) < 0.5
        cols = torch.where(mirrored, w - 1 - cols, cols)
    index = (rows * padded.shape[3] + dx + cols).view(n, 1, h * w).expand(n, c, h * w)
    return padded.flatten(2).gather(2, index).view(n, c, h, w)


# ----------------------------------------------------------------------------------------------
# Learning-rate schedule and the moving average of the weights


def warmup_cosine(optimizer, total_steps, warmup):
    """Per-step schedule: linear warm-up over the first `warmup` fraction of steps, then cosine decay to 0."""
    warmup_steps = max(1, round(warmup * total_steps))
    ramp = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=1 / warmup_steps, total_iters=warmup_steps - 1)
    decay = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, total_steps - warmup_steps))
    return torch.optim.lr_scheduler.SequentialLR(optimizer, [ramp, decay], milestones=[warmup_steps])


class EMA(torch.nn.Module):
    """A copy of the model whose weights and BatchNorm statistics are an exponential moving average of its own,
    evaluated in its place. The decay ramps up as min(decay, (1 + t) / (10 + t)) over the t averaged steps, so the
    nearly random weights of the first steps are forgotten within a few hundred steps instead of lingering.

    The step count is a Python number, so an update never waits for the device (torch's AveragedModel keeps
    its count in a tensor and reads it at every update)."""

    def __init__(self, model, decay):
        super().__init__()
        self.module = copy.deepcopy(model).requires_grad_(False)
        self.decay, self.steps = decay, 0

    def forward(self, x):
        return self.module(x)

    @torch.no_grad()
    def update_parameters(self, model):
        pairs = list(zip(self.state_tensors(self.module), self.state_tensors(model), strict=True))
        floats = [(mine, theirs) for mine, theirs in pairs if mine.is_floating_point()]
        counters = [(mine, theirs) for mine, theirs in pairs if not mine.is_floating_point()]  # BatchNorm's
        if self.steps == 0:  # the first update takes the weights of the first step as they are
            floats, counters = [], pairs
        else:
            weight = 1 - min(self.decay, (1 + self.steps) / (10 + self.steps))
            torch._foreach_lerp_([m for m, _ in floats], [t for _, t in floats], weight)
        if counters:
            torch._foreach_copy_([m for m, _ in counters], [t for _, t in counters])
        self.steps += 1

    @staticmethod
    def state_tensors(model):
        return [*model.parameters(), *model.buffers()]


# ----------------------------------------------------------------------------------------------
# Batches and the running tally of an epoch


def steps_per_epoch(n, batch_size):
    """How many batches `shuffled_batches` makes of n images (a last batch of one image joins the one before)."""
    return max(1, n // batch_size + (n % batch_size > 1))


def shuffled_batches(x, y, batch_size, generator, augment=None):
    """(images, labels) batches that cover every image exactly once, in a fresh random order.

    A last batch of a single image is folded into the one before: BatchNorm cannot train on one image.
    `augment(images)` transforms each batch of images.
    """
    batches = list(torch.randperm(len(x), device=x.device, generator=generator).split(batch_size))
    if len(batches) > 1 and len(batches[-1]) == 1:
        batches[-2:] = [torch.cat(batches[-2:])]
    for idx in tqdm(batches, leave=False, disable=not sys.stdout.isatty()):
        images = x.index_select(0, idx)  # 3x faster than x[idx] on a CPU
        yield (augment(images) if augment else images), y.index_select(0, idx)


class Tally:
    """An epoch's running training loss and accuracy, summed on the device: reading them at every step would make
    the CPU wait for the device each time. Every 20 steps it checks that the loss is still finite.

    They are measured on the batches as they were trained: augmented, in train mode (dropout on) and with the
    weights of each moment, so they are not comparable to an evaluation."""

    def __init__(self):
        self.loss_sum, self.correct, self.seen, self.steps = 0, 0, 0, 0

    def add(self, loss, logits, labels):
        self.loss_sum += loss.detach() * len(labels)
        self.correct += (logits.argmax(1) == labels).sum()
        self.seen, self.steps = self.seen + len(labels), self.steps + 1
        if self.steps % 20 == 1 and not torch.isfinite(self.loss_sum):  # a host sync, so only every 20 steps
            raise Diverged(f"at step {self.steps} of the epoch")

    def result(self):
        """(mean loss, accuracy) over the batches added."""
        loss, accuracy = self.loss_sum.item() / self.seen, self.correct.item() / self.seen
        if not math.isfinite(loss):
            raise Diverged("by the end of the epoch")
        return loss, accuracy


# ----------------------------------------------------------------------------------------------
# Evaluation


def tta_views(x, flip=False, max_shift=0, background=None):
    """The views that test-time augmentation averages over: x itself; x shifted by 1..max_shift pixels
    up, down, left and right, with `background` (default: x's minimum) filling in; with flip, each mirrored."""
    views = [x]
    if max_shift:
        h, w = x.shape[2:]
        fill = float(x.min()) if background is None else background
        padded = F.pad(x, (max_shift,) * 4, value=fill)
        for s in range(1, max_shift + 1):
            for dy, dx in ((-s, 0), (s, 0), (0, -s), (0, s)):
                views.append(padded[:, :, max_shift + dy : max_shift + dy + h, max_shift + dx : max_shift + dx + w])
    return views + [view.flip(3) for view in views] if flip else views


@torch.inference_mode()
def compute_logits(model, x, amp, tta_flip=False, tta_shift=0, chunk=256):
    """Logits for all of x, `chunk` images per forward pass (small enough that a chunk's activations stay in the
    CPU's caches); with tta_flip or tta_shift, averaged over `tta_views`."""
    model.eval()
    background = float(x.min()) if len(x) else 0.0  # one value for all chunks: the black pixel
    chunks = []
    for xb in x.split(chunk):
        views = tta_views(xb, tta_flip, tta_shift, background)
        with amp:
            logits = sum(model(view.contiguous()).float() for view in views) / len(views)
        chunks.append(logits)
    return torch.cat(chunks)


def evaluate(model, x, y, amp, tta_flip=False, tta_shift=0, chunk=256):
    """(cross-entropy loss, accuracy) of the model on x, y; (None, None) when x is empty."""
    if not len(x):
        return None, None
    return scores(compute_logits(model, x, amp, tta_flip, tta_shift, chunk), y)


def scores(logits, labels):
    """(cross-entropy loss, accuracy) of the logits against the labels. Outputs that overflowed (a model whose
    weights grew huge, while its training loss stayed finite) are a divergence: argmax would pick class 0."""
    loss = F.cross_entropy(logits, labels).item()
    if not math.isfinite(loss):
        raise Diverged("in evaluation: the model's outputs overflowed")
    return loss, (logits.argmax(1) == labels).float().mean().item()
