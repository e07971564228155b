"""Robustness plumbing for the training scripts: nothing here is needed to see how a model trains.

Checked settings (the UPPER_CASE constants as flags), device and precision, verified data files, atomic
writes, and clean stops on Ctrl-C and signals. Whatever a user can get wrong ends in one line and exit
code 2 instead of a traceback. The scripts reach all of this through `common`.
"""

import argparse
import contextlib
import gzip
import hashlib
import io
import math
import os
import platform
import re
import signal
import sys
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
N_TRAIN = 60_000


class UserError(Exception):
    """A problem the user can fix (bad setting, bad data, unwritable folder): one line, exit code 2."""


class Diverged(Exception):
    """The training loss became NaN or infinite: exit code 1."""


# ----------------------------------------------------------------------------------------------
# Settings: the UPPER_CASE constants of a script are its command line.


def _path(text):
    """A folder or file argument, with `~` expanded as a shell would."""
    return str(Path(text).expanduser()) if text else text


# Every setting of every script: (type, check, what is allowed). The type is the flag's, whatever the
# default is written as (DROPOUT = 0 still takes --dropout 0.3); a constant of another type is refused.
SETTINGS = {
    "EPOCHS": (int, lambda v: v >= 1, "an integer >= 1"),
    "BATCH_SIZE": (int, lambda v: v >= 1, "an integer >= 1"),
    "LR": (float, lambda v: math.isfinite(v) and v > 0, "a finite number > 0"),
    "MOMENTUM": (float, lambda v: 0 <= v < 1, "a number in [0, 1)"),
    "WEIGHT_DECAY": (float, lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0"),
    "WARMUP": (float, lambda v: 0 < v < 1, "a number in (0, 1)"),
    "DROPOUT": (float, lambda v: 0 <= v < 1, "a number in [0, 1)"),
    "FC_WIDTH": (int, lambda v: v >= 1, "an integer >= 1"),
    "LABEL_SMOOTHING": (float, lambda v: 0 <= v < 1, "a number in [0, 1)"),
    "EMA_DECAY": (float, lambda v: 0 <= v < 1, "a number in [0, 1) (0 turns EMA off)"),
    "MAX_SHIFT": (int, lambda v: 0 <= v <= 8, "an integer in [0, 8] (pixels)"),
    "FLIP": (bool, lambda v: True, "on or off"),
    "TTA_FLIP": (bool, lambda v: True, "on or off"),
    "TTA_SHIFT": (int, lambda v: 0 <= v <= 4, "an integer in [0, 4]"),
    "VAL_SIZE": (int, lambda v: 0 <= v < N_TRAIN, f"an integer in [0, {N_TRAIN})"),
    "SUBSET": (int, lambda v: 0 <= v <= N_TRAIN, f"an integer in [0, {N_TRAIN}] (0 = all)"),
    "SEED": (int, lambda v: v >= 0, "an integer >= 0"),
    "DEVICE": (
        str,
        lambda v: v in ("auto", "cpu", "cuda", "mps") or re.fullmatch(r"cuda:\d+", v),
        "auto, cpu, cuda, cuda:N or mps",
    ),
    "PRECISION": (str, lambda v: v in ("auto", "bf16", "fp32"), "auto, bf16 or fp32"),
    "DATA_DIR": (_path, lambda v: True, "a folder"),
    "OUT_DIR": (_path, lambda v: True, "a folder"),
    "CACHE_DIR": (_path, lambda v: True, "a folder"),
    "SHOW": (bool, lambda v: True, "on or off"),
    "BACKBONE": (str, lambda v: v in ("resnet18", "resnet34", "resnet50"), "resnet18, resnet34 or resnet50"),
    "WEIGHTS": (
        _path,
        lambda v: v in ("DEFAULT", "none") or Path(v).is_file(),
        "DEFAULT, none, or the path of an existing state-dict file",
    ),
    "IMAGE_SIZE": (int, lambda v: 32 <= v <= 512, "an integer in [32, 512]: ResNets downsample 32x"),
    "FINETUNE": (bool, lambda v: True, "on or off"),
    "EXTRACT_BATCH": (int, lambda v: v >= 1, "an integer >= 1"),
    "SCRIPT": (str, lambda v: v in ("", "ann", "cnn", "resnet_transfer"), "ann, cnn, resnet_transfer or empty"),
    "LAST": (int, lambda v: v >= 0, "an integer >= 0 (0 = all)"),
}


class _OneLineParser(argparse.ArgumentParser):
    def error(self, message):
        raise UserError(message)


def _flag(name):
    return "--" + name.lower().replace("_", "-")


def _comments(source):
    """Trailing comments of `NAME = value  # comment` lines: the help text of each flag."""
    pattern = re.compile(r"^([A-Z][A-Z0-9_]*)\s*=.*?#\s*(.+)$", re.MULTILINE)
    return {name: comment.strip() for name, comment in pattern.findall(source)}


def _constants(namespace, script):
    """{NAME: (type, default)} of the script's settings; a constant of the wrong type is refused."""
    constants = {}
    for name, value in namespace.items():
        if not name.isupper() or type(value) not in (int, float, str, bool):
            continue
        kind = SETTINGS.get(name, (type(value),))[0]
        expected = {int: int, float: (int, float), bool: bool}.get(kind, str)
        if type(value) is bool and kind is not bool or not isinstance(value, expected):
            wanted = {int: "an integer", float: "a number", bool: "True or False"}.get(kind, "a string")
            raise UserError(f"{name} = {value!r} in {script} is not allowed: make it {wanted}")
        constants[name] = (kind, float(value) if kind is float else value)
    return constants


def parse_hparams(namespace, argv=None):
    """The script's UPPER_CASE constants as flags (EPOCHS -> --epochs); returns the values by name (hp.epochs).

    `namespace` is the script's globals(): the constants are the defaults and their trailing comments the
    help. Every value is checked against SETTINGS before any work starts.
    """
    script = Path(namespace.get("__file__", "script")).name
    helps = _comments(Path(namespace["__file__"]).read_text()) if "__file__" in namespace else {}
    parser = _OneLineParser(prog=script, description=(namespace.get("__doc__") or "").strip().splitlines()[0])
    for name, (kind, default) in _constants(namespace, script).items():
        help_text = helps.get(name, "").replace("%", "%%") + " (default: %(default)s)"
        if kind is bool:
            parser.add_argument(_flag(name), default=default, action=argparse.BooleanOptionalAction, help=help_text)
        else:
            parser.add_argument(_flag(name), default=default, type=kind, metavar=name, help=help_text)
    hp = parser.parse_args(argv)
    for name, value in vars(hp).items():
        _, ok, allowed = SETTINGS.get(name.upper(), (None, lambda v: True, ""))
        if not ok(value):
            raise UserError(f"{_flag(name)} ({name.upper()}) = {value!r} is not allowed: use {allowed}")
    _check_split(hp)
    return hp


def _check_split(hp):
    if not hasattr(hp, "val_size") or not hasattr(hp, "batch_size"):
        return
    n_train = (hp.subset or N_TRAIN) - hp.val_size
    if n_train < 1:
        raise UserError(
            f"--val-size {hp.val_size} leaves no training images: make it smaller than --subset {hp.subset}"
        )
    if hp.batch_size > n_train:
        raise UserError(
            f"--batch-size {hp.batch_size} is larger than the {n_train} training images: use at most {n_train}"
        )


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
# Data files: found, verified against the official content, parsed into uint8 tensors.

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
DOWNLOAD_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
# SHA-256 of the *decompressed* files: the official .gz files and Debian's recompressed ones both pass.
FILES = {
    "train-images-idx3-ubyte": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
    "train-labels-idx1-ubyte": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
    "t10k-images-idx3-ubyte": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
    "t10k-labels-idx1-ubyte": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
}


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


def find_file(folder, name):
    for candidate in (folder / name, folder / (name + ".gz")):
        if candidate.is_file():
            return candidate
    return None


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
        if all(find_file(folder, name) for name in FILES):
            return folder
    return _download(dirs[0] if data_dir or os.environ.get("FASHION_MNIST_DIR") else HERE / "data")


def read_idx(path, name):
    """One IDX file as a uint8 tensor, refused unless its decompressed bytes are exactly the official ones."""
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
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return torch.from_numpy(np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape).copy())


# ----------------------------------------------------------------------------------------------
# Files: written atomically, loaded without unpickling code.


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
