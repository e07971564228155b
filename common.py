"""Plumbing shared by ann.py, cnn.py and resnet_transfer.py.

Data loading and verification, the hyperparameter command line, device and precision, the
train/evaluate loop, run folders with metrics.json, and plots. Models, optimizers and training
recipes are decisions, so they live in the scripts where a reader can see them.
"""

import argparse
import contextlib
import copy
import datetime
import gzip
import hashlib
import io
import itertools
import json
import math
import os
import platform
import re
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

HERE = Path(__file__).resolve().parent
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
DOWNLOAD_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
# SHA-256 of the *decompressed* files: the official .gz files and Debian's recompressed ones both pass.
FILES = {
    "train-images-idx3-ubyte": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
    "train-labels-idx1-ubyte": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
    "t10k-images-idx3-ubyte": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
    "t10k-labels-idx1-ubyte": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
}
N_TRAIN = 60_000


class UserError(Exception):
    """A problem the user can fix (bad setting, bad data, unwritable folder): one line, exit code 2."""


class Diverged(Exception):
    """The training loss became NaN or infinite: exit code 1."""


# ----------------------------------------------------------------------------------------------
# Hyperparameters: the UPPER_CASE constants of a script are its command line.

HPARAM_CHECKS = {
    "EPOCHS": (lambda v: v >= 1, "an integer >= 1"),
    "BATCH_SIZE": (lambda v: v >= 1, "an integer >= 1"),
    "LR": (lambda v: math.isfinite(v) and v > 0, "a finite number > 0"),
    "WEIGHT_DECAY": (lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0"),
    "DROPOUT": (lambda v: 0 <= v < 1, "a number in [0, 1)"),
    "LABEL_SMOOTHING": (lambda v: 0 <= v < 1, "a number in [0, 1)"),
    "EMA_DECAY": (lambda v: 0 <= v < 1, "a number in [0, 1) (0 turns EMA off)"),
    "MAX_SHIFT": (lambda v: 0 <= v <= 8, "an integer in [0, 8] (pixels)"),
    "VAL_SIZE": (lambda v: 0 <= v < N_TRAIN, f"an integer in [0, {N_TRAIN})"),
    "SUBSET": (lambda v: 0 <= v <= N_TRAIN, f"an integer in [0, {N_TRAIN}] (0 = all)"),
    "SEED": (lambda v: v >= 0, "an integer >= 0"),
    "DEVICE": (
        lambda v: v in ("auto", "cpu", "cuda", "mps") or re.fullmatch(r"cuda:\d+", v),
        "auto, cpu, cuda, cuda:N or mps",
    ),
    "PRECISION": (lambda v: v in ("auto", "bf16", "fp32"), "auto, bf16 or fp32"),
}


class _OneLineParser(argparse.ArgumentParser):
    def error(self, message):
        raise UserError(message)


def _comments(source):
    """Trailing comments of `NAME = value  # comment` lines: the help text of each flag."""
    pattern = re.compile(r"^([A-Z][A-Z0-9_]*)\s*=.*?#\s*(.+)$", re.MULTILINE)
    return {name: comment.strip() for name, comment in pattern.findall(source)}


def parse_hparams(namespace, argv=None, checks=None):
    """Turn the script's UPPER_CASE constants into flags (EPOCHS -> --epochs) and return the values.

    `namespace` is the script's globals(); the constants' values are the flags' defaults and their
    trailing comments the help. Every value is checked before any work starts.
    """
    defaults = {k: v for k, v in namespace.items() if k.isupper() and type(v) in (int, float, str, bool)}
    helps = _comments(Path(namespace["__file__"]).read_text()) if "__file__" in namespace else {}
    script = Path(namespace.get("__file__", "script")).name
    parser = _OneLineParser(prog=script, description=(namespace.get("__doc__") or "").strip().splitlines()[0])
    for name, default in defaults.items():
        flag = "--" + name.lower().replace("_", "-")
        help_text = helps.get(name, "").replace("%", "%%") + " (default: %(default)s)"
        if type(default) is bool:
            parser.add_argument(flag, dest=name, default=default, action=argparse.BooleanOptionalAction, help=help_text)
        else:
            parser.add_argument(flag, dest=name, default=default, type=type(default), metavar=name, help=help_text)
    hp = vars(parser.parse_args(argv))
    for name, (ok, allowed) in {**HPARAM_CHECKS, **(checks or {})}.items():
        if name in hp and not ok(hp[name]):
            raise UserError(f"--{name.lower().replace('_', '-')} ({name}) = {hp[name]!r} is not allowed: use {allowed}")
    if "VAL_SIZE" in hp and "BATCH_SIZE" in hp:
        n_train = (hp.get("SUBSET") or N_TRAIN) - hp["VAL_SIZE"]
        if n_train < 1:
            raise UserError(
                f"--val-size {hp['VAL_SIZE']} leaves no training images: make it smaller than --subset {hp['SUBSET']}"
            )
        if hp["BATCH_SIZE"] > n_train:
            raise UserError(
                f"--batch-size {hp['BATCH_SIZE']} is larger than the {n_train} training images: use at most {n_train}"
            )
    return hp


# ----------------------------------------------------------------------------------------------
# Device and precision


def resolve_device(name):
    """'auto' picks CUDA, then MPS, then the CPU; an explicit device must exist."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name}: no CUDA GPU is visible to PyTorch; use --device cpu or auto")
    if name.startswith("cuda:") and int(name[5:]) >= torch.cuda.device_count():
        raise UserError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here; use cuda:0 or auto")
    if name == "mps" and not torch.backends.mps.is_available():
        raise UserError("--device mps: Apple's MPS backend is not available here; use --device cpu or auto")
    return torch.device(name)


def bf16_is_fast(device):
    """bf16 pays off on CUDA GPUs that support it and on CPUs with AVX-512-BF16 or AMX."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        cpu = torch.cpu
        return bool(
            getattr(cpu, "_is_avx512_bf16_supported", lambda: False)()
            or getattr(cpu, "_is_amx_tile_supported", lambda: False)()
        )
    return False


def resolve_precision(name, device):
    if name == "auto":
        return "bf16" if bf16_is_fast(device) else "fp32"
    if name == "bf16" and device.type == "mps":
        raise UserError("--precision bf16 is not supported on MPS here; use fp32 or auto")
    return name


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "cpu":
        return f"{cpu_model()}, {torch.get_num_threads()} threads"
    return device.type


def cpu_model():
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


# ----------------------------------------------------------------------------------------------
# Data: the four IDX files, found, verified and read into uint8 tensors.


def _candidate_dirs(data_dir):
    dirs = []
    chosen = data_dir or os.environ.get("FASHION_MNIST_DIR")
    if chosen:
        chosen = Path(chosen).expanduser()
        if not chosen.is_dir():
            raise UserError(
                f"data folder {chosen} does not exist; create it, or leave --data-dir empty to search the defaults"
            )
        if not os.access(chosen, os.R_OK | os.X_OK):
            raise UserError(f"data folder {chosen} is not readable; fix its permissions or pick another --data-dir")
        dirs += [chosen, chosen / "FashionMNIST" / "raw"]
    dirs += [HERE / "data", HERE / "data" / "FashionMNIST" / "raw", DEBIAN_DIR]
    return dirs


def _find_file(folder, name):
    for candidate in (folder / name, folder / (name + ".gz")):
        if candidate.is_file():
            return candidate
    return None


def _read_verified(path, name):
    """Decompressed bytes of one IDX file, refused unless they are exactly the official content."""
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except PermissionError:
        raise UserError(f"{path}: permission denied; make it readable or point --data-dir elsewhere") from None
    except (OSError, EOFError, gzip.BadGzipFile, ValueError) as error:
        raise UserError(
            f"{path}: not a readable gzip file ({error}); it is truncated or corrupt: "
            "delete it and run again to re-download"
        ) from None
    if hashlib.sha256(raw).hexdigest() != FILES[name]:
        raise UserError(
            f"{path}: content is not the official Fashion-MNIST {name} "
            "(SHA-256 mismatch: truncated, corrupt or another "
            "dataset); delete it and run again to re-download, or point --data-dir at the right files"
        )
    return raw


def _parse_idx(raw):
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return torch.from_numpy(np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape).copy())


def _download(folder):
    from torchvision.datasets import FashionMNIST

    print(f"Fashion-MNIST not found locally; downloading it with torchvision into {folder} ...", flush=True)
    try:
        FashionMNIST(root=str(folder), train=True, download=True)
    except Exception as error:  # torchvision raises RuntimeError, URLError or OSError depending on the failure
        raise UserError(
            f"could not download Fashion-MNIST into {folder} ({type(error).__name__}); get the four .gz files from "
            f"{DOWNLOAD_URL}, or install the Debian/Ubuntu package dataset-fashion-mnist, or pass --data-dir FOLDER"
        ) from None
    return folder / "FashionMNIST" / "raw"


def find_fashion_mnist(data_dir=None):
    """The first folder holding all four files, downloading into the data folder when there is none."""
    dirs = _candidate_dirs(data_dir)
    for folder in dirs:
        if all(_find_file(folder, name) for name in FILES):
            return folder
    return _download(dirs[0] if data_dir or os.environ.get("FASHION_MNIST_DIR") else HERE / "data")


def load_fashion_mnist(data_dir=None):
    """(x_train, y_train, x_test, y_test): uint8 images (N, 1, 28, 28) and int64 labels, verified."""
    folder = find_fashion_mnist(data_dir)
    arrays = [_parse_idx(_read_verified(_find_file(folder, name), name)) for name in FILES]
    x_train, y_train, x_test, y_test = arrays
    return x_train.unsqueeze(1), y_train.long(), x_test.unsqueeze(1), y_test.long()


def stratified_split(labels, val_size, seed):
    """Indices (train, val) with `val_size` validation images spread evenly over the classes."""
    generator = torch.Generator().manual_seed(seed)
    n_classes = int(labels.max()) + 1
    shuffled = torch.randperm(len(labels), generator=generator)
    order = shuffled[torch.argsort(labels[shuffled], stable=True)]  # grouped by class, random within
    counts = torch.bincount(labels, minlength=n_classes)
    rank = torch.arange(len(labels)) - torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
    per_class = torch.full((n_classes,), val_size // n_classes)
    per_class[: val_size % n_classes] += 1
    is_val = rank < per_class[labels[order]]
    return order[~is_val].sort().values, order[is_val].sort().values


def load_splits(hp):
    """uint8 train/val/test splits of Fashion-MNIST, honouring DATA_DIR, SUBSET, VAL_SIZE and SEED."""
    return split_data(hp, *load_fashion_mnist(hp["DATA_DIR"] or None))


def take_subset(n, *arrays):
    """The first n rows of each array (all of them when n is 0): SUBSET, for quick dry runs."""
    return tuple(a[:n] for a in arrays) if n else arrays


def split_data(hp, x_train, y_train, x_test, y_test):
    """{"train", "val", "test"}: (x, y) pairs, the validation images held out of the training set."""
    x_train, y_train, x_test, y_test = take_subset(hp["SUBSET"], x_train, y_train, x_test, y_test)
    train_idx, val_idx = stratified_split(y_train, hp["VAL_SIZE"], hp["SEED"])
    return {
        "train": (x_train[train_idx], y_train[train_idx]),
        "val": (x_train[val_idx], y_train[val_idx]),
        "test": (x_test, y_test),
    }


def to_device_normalized(splits, device):
    """Float images on the device, normalised once with the training split's mean and std."""
    x_train = splits["train"][0].float()
    mean, std = x_train.mean(), x_train.std()
    return {name: (((x.float() - mean) / std).to(device), y.to(device)) for name, (x, y) in splits.items()}


# ----------------------------------------------------------------------------------------------
# Augmentation, vectorised on the device.


def random_flip_and_shift(x, max_shift, generator, flip=True):
    """Each image mirrored left-right with probability 1/2 and shifted by up to `max_shift` pixels.

    One gather per batch: the flip reverses the column index and the shift offsets both indices
    into a copy padded with the background value (the minimum, i.e. a black pixel). A flat
    `gather` is about twice as fast on a CPU as indexing with three broadcast index tensors.
    """
    n, c, h, w = x.shape
    device = x.device
    padded = F.pad(x, (max_shift,) * 4, value=float(x.min())) if max_shift else x
    dy, dx = torch.randint(0, 2 * max_shift + 1, (2, n, 1, 1), device=device, generator=generator)
    rows = torch.arange(h, device=device).view(1, h, 1) + dy
    cols = torch.arange(w, device=device).view(1, 1, w)
    if flip:
        mirrored = torch.rand(n, 1, 1, device=device, generator=generator) < 0.5
        cols = torch.where(mirrored, w - 1 - cols, cols)
    index = (rows * padded.shape[3] + dx + cols).view(n, 1, h * w).expand(n, c, h * w)
    return padded.flatten(2).gather(2, index).view(n, c, h, w)


def warmup_cosine(optimizer, total_steps, warmup):
    """Per-step schedule: linear warm-up over the first `warmup` fraction of steps, then cosine decay to 0."""
    warmup_steps = max(1, round(warmup * total_steps))

    def factor(step):
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class EMA(torch.nn.Module):
    """A copy of the model whose weights and BatchNorm statistics are an exponential moving average.

    The decay ramps up as min(decay, (1 + t) / (10 + t)), so the nearly random weights of the first
    steps are forgotten quickly instead of lingering for thousands of steps.
    """

    def __init__(self, model, decay):
        super().__init__()
        self.module = copy.deepcopy(model).requires_grad_(False)
        self.decay = decay
        self.steps = 0

    @staticmethod
    def _floats(model):
        return [t for t in itertools.chain(model.parameters(), model.buffers()) if t.is_floating_point()]

    @torch.no_grad()
    def update(self, model):
        self.steps += 1
        decay = min(self.decay, (1 + self.steps) / (10 + self.steps))
        torch._foreach_lerp_(self._floats(self.module), self._floats(model), 1 - decay)

    def forward(self, x):
        return self.module(x)


# ----------------------------------------------------------------------------------------------
# Runs: a folder per run with metrics.json (rewritten atomically) and plots.


def atomic_write(path, data):
    """Write-then-rename, so a reader never sees a half-written file; a full disk is a user error."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as error:
        tmp.unlink(missing_ok=True)
        raise UserError(f"cannot write {path}: {error.strerror}; free some space or choose another --out-dir") from None


def save_tensors(path, tensors):
    """A dict of tensors (and strings), saved atomically in torch's format: no pickle needed to load it."""
    buffer = io.BytesIO()
    torch.save({k: v.detach().cpu() if torch.is_tensor(v) else v for k, v in tensors.items()}, buffer)
    atomic_write(path, buffer.getvalue())


def load_cached_tensors(path, key):
    """The dict save_tensors wrote to path if its "key" entry equals key; None (after a notice) otherwise."""
    if not path.exists():
        return None
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(saved, dict) and saved.get("key") == key:
            return saved
        reason = "stale (made with other settings)"
    except Exception as error:  # any unreadable file is treated the same way: rebuilt
        reason = f"corrupt ({type(error).__name__})"
    print(f"cache {path} is {reason}; rebuilding it", flush=True)
    return None


class Run:
    """One training run: its folder, hyperparameters, device, precision and metrics record."""

    def __init__(self, script, hp):
        self.started = time.perf_counter()
        self.script = script
        self.hp = hp
        self.device = resolve_device(hp["DEVICE"])
        self.precision = resolve_precision(hp.get("PRECISION", "fp32"), self.device)
        self.dir = self._make_dir(Path(hp["OUT_DIR"] or HERE / "runs"))
        self.record = {
            "script": script,
            "status": "running",
            "device": str(self.device),
            "device_name": device_name(self.device),
            "precision": self.precision,
            "torch_version": torch.__version__,
            "started": datetime.datetime.now().isoformat(timespec="seconds"),
            "hparams": hp,
            "history": [],
            "final": None,
        }

    def _make_dir(self, out_dir):
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
            for n in range(1000):
                path = out_dir / (f"{self.script}-{stamp}" + (f"-{n}" if n else ""))
                with contextlib.suppress(FileExistsError):
                    path.mkdir()  # atomic: two runs started in the same second never share a folder
                    return path
        except OSError as error:
            raise UserError(
                f"cannot create a run folder in {out_dir}: {error.strerror}; choose a writable --out-dir"
            ) from None
        raise UserError(f"{out_dir} already holds 1000 runs named {self.script}-{stamp}; choose another --out-dir")

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        """A run stopped by Ctrl-C, SIGTERM or divergence keeps its record and plots of the epochs it finished."""
        if exc_type is not None and issubclass(exc_type, KeyboardInterrupt):  # Ctrl-C or SIGTERM
            self.finish("interrupted")
        elif exc_type is Diverged:
            self.finish("diverged")
        return False

    def finish(self, status):
        """Record the status, write metrics.json and curves.png, and print the summary line."""
        self.record["status"] = status
        self.save()
        if self.record["history"]:
            plot_curves(self.record["history"], self.dir / "curves.png", title=f"{self.script}  ({self.dir.name})")
        final = self.record["final"]
        if final:
            val = "n/a" if final["val_acc"] is None else f"{final['val_acc']:.2%}"
            print(
                f"{self.script}: train_acc={final['train_acc']:.2%} val_acc={val} "
                f"test_acc={final['test_acc']:.2%} seconds={final['seconds']:.1f}"
            )
        else:
            done = len(self.record["history"])
            print(
                f"{self.script}: {status} after {done} epoch(s); record in {self.dir / 'metrics.json'}", file=sys.stderr
            )
        if status == "completed" and self.hp.get("SHOW"):
            show_plots(sorted(self.dir.glob("*.png")))

    @property
    def bf16(self):
        return self.precision == "bf16"

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16)

    def seconds(self):
        return time.perf_counter() - self.started

    def save(self):
        atomic_write(self.dir / "metrics.json", json.dumps(self.record, indent=2).encode())

    def print_header(self):
        print(
            f"{self.script}: device={self.device} ({self.record['device_name']}) "
            f"precision={self.precision} run={self.dir}"
        )
        print("  " + "  ".join(f"{k.lower()}={v}" for k, v in self.hp.items()), flush=True)


# ----------------------------------------------------------------------------------------------
# Training and evaluation


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
def predict(model, x, run, tta_flip=False, tta_shift=0, batch_size=2048):
    """Logits for all of x, in large chunks; with tta_flip or tta_shift, averaged over `tta_views`."""
    model.eval()
    background = float(x.min()) if len(x) else 0.0  # one value for all chunks: the black pixel
    chunks = []
    for xb in x.split(batch_size):
        views = tta_views(xb, tta_flip, tta_shift, background)
        with run.autocast():
            logits = sum(model(view.contiguous()).float() for view in views) / len(views)
        chunks.append(logits)
    return torch.cat(chunks)


def evaluate(model, x, y, run, tta_flip=False, tta_shift=0):
    """(cross-entropy loss, accuracy) of the model on x, y."""
    logits = predict(model, x, run, tta_flip, tta_shift)
    return F.cross_entropy(logits, y).item(), (logits.argmax(1) == y).float().mean().item()


def train_one_epoch(run, model, x, y, *, optimizer, loss_fn, batch_size, generator, scheduler, augment, ema, desc):
    """One pass over (x, y) in a fresh random order; returns (mean loss, accuracy) on the batches seen."""
    model.train()
    loss_sum = torch.zeros((), device=run.device)
    correct = torch.zeros((), device=run.device, dtype=torch.long)
    order = torch.randperm(len(x), device=run.device, generator=generator)
    batches = order.split(batch_size)
    for step, idx in enumerate(tqdm(batches, desc=desc, leave=False, disable=not sys.stdout.isatty())):
        xb, yb = x.index_select(0, idx), y.index_select(0, idx)  # 3x faster than x[idx] on a CPU
        if augment is not None:
            xb = augment(xb, generator)
        with run.autocast():
            logits = model(xb)
            loss = loss_fn(logits.float(), yb)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        if ema is not None:
            ema.update(model)
        loss_sum += loss.detach() * len(idx)
        correct += (logits.argmax(1) == yb).sum()
        if step % 20 == 0 and not torch.isfinite(loss_sum):  # a host sync, so only every 20 steps
            break
    train_loss = loss_sum.item() / len(x)
    if not math.isfinite(train_loss):
        raise Diverged(desc)
    return train_loss, correct.item() / len(x)


def train(
    run,
    model,
    data,
    *,
    optimizer,
    loss_fn,
    epochs,
    batch_size,
    scheduler=None,
    augment=None,
    ema=None,
    tta_flip=False,
    tta_shift=0,
    test_images=None,
):
    """Train, evaluate on validation each epoch and on test once; record everything in the run.

    The scheduler steps once per batch. `augment(x, generator)` transforms a training batch;
    `ema` (an EMA of the model) is updated every step and evaluated instead of the model.
    `tta_flip` averages every evaluation over each image and its mirror; `tta_shift` adds shifted views
    (see `tta_views`) to the final validation and test evaluations only, as they cost a pass per view.
    `test_images` are what misclassified.png shows (default: the test inputs). Returns `final`.
    """
    (x_train, y_train), (x_val, y_val), (x_test, y_test) = data["train"], data["val"], data["test"]
    generator = torch.Generator(run.device).manual_seed(run.hp["SEED"])
    evaluated = ema if ema is not None else model
    run.record["trainable_params"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"{'epoch':>5} {'train_loss':>10} {'train_acc':>9} {'val_loss':>8} {'val_acc':>7} {'lr':>9} {'seconds':>7}")
    for epoch in range(1, epochs + 1):
        epoch_start = time.perf_counter()
        train_loss, train_acc = train_one_epoch(
            run,
            model,
            x_train,
            y_train,
            optimizer=optimizer,
            loss_fn=loss_fn,
            batch_size=batch_size,
            generator=generator,
            scheduler=scheduler,
            augment=augment,
            ema=ema,
            desc=f"epoch {epoch}",
        )
        train_seconds = time.perf_counter() - epoch_start
        val_loss, val_acc = evaluate(evaluated, x_val, y_val, run, tta_flip) if len(x_val) else (None, None)
        lr = optimizer.param_groups[0]["lr"]
        run.record["history"].append(
            {
                "epoch": epoch,
                "train_loss": train_loss,
                "train_acc": train_acc,
                "val_loss": val_loss,
                "val_acc": val_acc,
                "lr": lr,
                "train_seconds": train_seconds,
            }
        )
        run.save()
        val = f"{val_loss:>8.4f} {val_acc:>7.2%}" if len(x_val) else f"{'-':>8} {'-':>7}"
        seconds = time.perf_counter() - epoch_start
        print(f"{epoch:>5} {train_loss:>10.4f} {train_acc:>9.2%} {val} {lr:>9.2e} {seconds:>7.1f}", flush=True)

    _, train_acc = evaluate(evaluated, x_train, y_train, run, tta_flip)
    val_acc = run.record["history"][-1]["val_acc"]  # already with tta_flip; the shifted views change it
    if tta_shift and len(x_val):
        _, val_acc = evaluate(evaluated, x_val, y_val, run, tta_flip, tta_shift)
    test_logits = predict(evaluated, x_test, run, tta_flip, tta_shift)
    predicted = test_logits.argmax(1)
    confusion = torch.zeros(10, 10, dtype=torch.long, device=predicted.device)
    confusion.index_put_((y_test, predicted), torch.ones_like(y_test), accumulate=True)
    run.record["final"] = {
        "train_acc": train_acc,
        "val_acc": val_acc,
        "test_acc": (predicted == y_test).float().mean().item(),
        "test_loss": F.cross_entropy(test_logits, y_test).item(),
        "seconds": run.seconds(),
    }
    confusion = confusion.cpu()
    run.record["per_class_test_acc"] = {
        name: (confusion[i, i] / confusion[i].sum().clamp(min=1)).item() for i, name in enumerate(CLASSES)
    }
    run.record["test_confusion"] = confusion.tolist()
    save_state_dict(evaluated.module if isinstance(evaluated, EMA) else evaluated, run.dir / "model.pt")
    plot_confusion(confusion, run.dir / "confusion.png", title=f"{run.script}: test confusion, rows = true class")
    images = test_images if test_images is not None else x_test
    plot_misclassified(images.cpu(), y_test.cpu(), test_logits.cpu(), run.dir / "misclassified.png")
    run.finish("completed")
    return run.record["final"]


def save_state_dict(model, path):
    """The weights as a plain state dict of CPU tensors: loadable with torch.load(path, weights_only=True)."""
    save_tensors(path, model.state_dict())


# ----------------------------------------------------------------------------------------------
# Plots: drawn with the Agg canvas, so they never block and need no display.


def plot_curves(history, path, title=""):
    from matplotlib.figure import Figure

    epochs = [h["epoch"] for h in history]
    fig = Figure(figsize=(10, 4), dpi=100)
    for ax, key, label in ((fig.add_subplot(1, 2, 1), "loss", "loss"), (fig.add_subplot(1, 2, 2), "acc", "accuracy")):
        ax.plot(epochs, [h[f"train_{key}"] for h in history], "o-", label="train")
        if history[0][f"val_{key}"] is not None:
            ax.plot(epochs, [h[f"val_{key}"] for h in history], "o-", label="validation")
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path)


def plot_confusion(confusion, path, title=""):
    """The confusion matrix normalised per true class (rows sum to 1), with per-class accuracy."""
    from matplotlib.figure import Figure

    rates = (confusion / confusion.sum(1, keepdim=True).clamp(min=1)).numpy()
    fig = Figure(figsize=(9, 8), dpi=100)
    ax = fig.add_subplot()
    ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    for i in range(10):
        for j in range(10):
            if rates[i, j] >= 0.005:
                ax.text(
                    j,
                    i,
                    f"{rates[i, j]:.2f}",
                    ha="center",
                    va="center",
                    fontsize=8,
                    color="white" if rates[i, j] > 0.5 else "black",
                )
    ax.set_xticks(range(10), CLASSES, rotation=45, ha="right")
    ax.set_yticks(range(10), [f"{name} ({rates[i, i]:.1%})" for i, name in enumerate(CLASSES)])
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class (per-class accuracy)")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path)


def plot_misclassified(images, labels, logits, path, count=24):
    """A grid of the test images the model was most confident about and got wrong."""
    from matplotlib.figure import Figure

    probabilities = logits.softmax(1)
    confidence, predicted = probabilities.max(1)
    wrong = (predicted != labels).nonzero().flatten()
    wrong = wrong[confidence[wrong].argsort(descending=True)][:count]
    fig = Figure(figsize=(12, 9), dpi=100)
    for k, i in enumerate(wrong.tolist()):
        ax = fig.add_subplot(4, 6, k + 1)
        ax.imshow(images[i].float().mean(0).numpy(), cmap="gray_r")
        ax.set_title(f"true: {CLASSES[labels[i]]}\npred: {CLASSES[predicted[i]]} ({confidence[i]:.0%})", fontsize=8)
        ax.axis("off")
    fig.suptitle(f"{len(wrong)} most confident mistakes of {int((predicted != labels).sum())}")
    fig.tight_layout()
    fig.savefig(path)


def show_plots(paths):
    """Open each figure in a window and wait until they are closed; without a display, say where they are."""
    if sys.platform.startswith("linux") and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        print(f"--show: no display here; the plots are in {paths[0].parent}", file=sys.stderr)
        return
    import matplotlib.pyplot as plt

    for path in paths:
        plt.figure(path.name, figsize=(10, 7))
        plt.imshow(plt.imread(path))
        plt.axis("off")
    plt.show()


# ----------------------------------------------------------------------------------------------
# Entry point: settings and data problems end in one line and exit code 2, never a traceback.


class Terminated(KeyboardInterrupt):
    """SIGTERM (`kill`, a job scheduler's time limit): handled like Ctrl-C, so the run's record is kept."""


def _terminate(signum, frame):
    raise Terminated


def run_main(main, argv=None):
    """Call main(argv) and turn the expected failures into exit codes.

    2 user error, 1 diverged, 130 Ctrl-C, 143 SIGTERM (128 + the signal, as shells report it).
    """
    script = Path(sys.argv[0]).name
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        main(argv)
    except UserError as error:
        print(f"{script}: error: {error}", file=sys.stderr)
        return 2
    except Diverged as error:
        print(f"{script}: error: the loss became NaN or infinite ({error}); try a smaller --lr", file=sys.stderr)
        return 1
    except Terminated:
        print(f"{script}: terminated", file=sys.stderr)
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:
        print(f"{script}: interrupted", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0
