"""The Fashion-MNIST files: found (a folder named, ./data, Debian's package), downloaded if missing, verified against
the official content, and parsed into uint8 tensors."""

from plumbing import files
from plumbing.settings import expand_path, import_torchvision
from plumbing.stops import UserError

import argparse
import functools
import gzip
import hashlib
import os
import zlib
from pathlib import Path

import torch

CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
DOWNLOAD_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
# Each file's size and SHA-256, decompressed (a 16- or 8-byte header, then 28x28 images or labels): the official .gz
# files and Debian's recompressed ones both pass, and a file of any other size is refused before it is read whole.
FILES = {
    "train-images-idx3-ubyte": (47_040_016, "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888"),
    "train-labels-idx1-ubyte": (60_008, "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9"),
    "t10k-images-idx3-ubyte": (7_840_016, "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b"),
    "t10k-labels-idx1-ubyte": (10_008, "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34"),
}


def _named_folder(data_dir):
    """The folder the user named with --data-dir or $FASHION_MNIST_DIR (None if neither), checked to be usable."""
    flag = "--data-dir" if data_dir else "$FASHION_MNIST_DIR" if os.environ.get("FASHION_MNIST_DIR") else None
    if flag is None:
        return None
    try:
        folder = Path(expand_path(data_dir or os.environ["FASHION_MNIST_DIR"]))
    except argparse.ArgumentTypeError as error:
        raise UserError(f"{flag} {error}") from None
    found = files.kind(folder, flag)
    if found is None:
        raise UserError(f"{flag} {folder} does not exist; point it at a folder (it may be empty: the data goes there)")
    if found != "folder":
        raise UserError(f"{flag} {folder} is a file, not a folder; point it at the folder that holds the data files")
    if not os.access(folder, os.R_OK | os.X_OK):
        raise UserError(f"{flag} {folder} is not readable; fix its permissions or pick another folder")
    return folder


def find_file(folder, name):
    """The file `name` (decompressed, or .gz) in folder, or None; a folder we may not look into is a UserError."""
    return next((c for c in (folder / name, folder / (name + ".gz")) if files.kind(c, "--data-dir") == "file"), None)


def _download(folder):
    FashionMNIST = import_torchvision().datasets.FashionMNIST

    print(f"Fashion-MNIST not found in {folder}; downloading it there with torchvision ...", flush=True)
    try:
        FashionMNIST(root=str(folder), train=True, download=True)
    except Exception as error:  # torchvision raises RuntimeError, URLError or OSError depending on the failure
        raise UserError(
            f"could not download Fashion-MNIST into {folder} ({type(error).__name__}); get the four .gz files from "
            f"{DOWNLOAD_URL}, or install the Debian/Ubuntu package dataset-fashion-mnist, or pass --data-dir FOLDER"
        ) from None
    return folder / "FashionMNIST" / "raw"


def find_fashion_mnist(data_dir=None):
    """The folder holding all four files: the one the user named (downloading into it when they are missing),
    or else the first of ./data and the Debian package's folder that has them (else a download into ./data)."""
    named = _named_folder(data_dir)
    base = named or files.HERE / "data"  # where a download goes
    for folder in [base, base / "FashionMNIST" / "raw", *([] if named else [DEBIAN_DIR])]:
        if all(find_file(folder, name) for name in FILES):
            return folder
    return _download(base)


def _read_capped(path, name):
    """The decompressed bytes of path, refused as soon as they pass the official file's size."""
    expected = FILES[name][0]
    size = path.stat().st_size
    if path.suffix != ".gz" and size != expected or path.suffix == ".gz" and size > expected + 4096:
        raise UserError(
            f"{path}: {size:,} bytes, but the official {name} is {expected:,} bytes decompressed; "
            "delete it and run again to re-download, or point --data-dir at the right files"
        )
    with gzip.open(path) if path.suffix == ".gz" else open(path, "rb") as f:
        raw = f.read(expected + 1)
    if len(raw) != expected:
        raise UserError(
            f"{path}: holds {'more' if len(raw) > expected else 'less'} than the {expected:,} bytes of the official "
            f"{name}; it is truncated or another file: delete it and run again to re-download"
        )
    return raw


def read_idx(path, name):
    """One IDX file as a uint8 tensor, refused unless its decompressed bytes are exactly the official ones.
    A file is verified once per program: reading it again while it is unchanged (the test suite reads the data
    hundreds of times) gives a copy of what was verified."""
    try:
        info = path.stat()
    except OSError as error:
        raise UserError(f"{path}: cannot read it ({error.strerror}); point --data-dir at the data files") from None
    return _read_verified(path, name, (info.st_size, info.st_mtime_ns, info.st_ino)).clone()


@functools.lru_cache(maxsize=8)
def _read_verified(path, name, identity):
    try:
        raw = _read_capped(path, name)
    except PermissionError:
        raise UserError(f"{path}: permission denied; make it readable or point --data-dir elsewhere") from None
    except (OSError, EOFError, zlib.error, ValueError) as error:  # zlib.error: damage inside the compressed data
        raise UserError(
            f"{path}: damaged ({error}); it is truncated or corrupt: delete it and run again to re-download"
        ) from None
    if hashlib.sha256(raw).hexdigest() != FILES[name][1]:
        raise UserError(
            f"{path}: content is not the official Fashion-MNIST {name} (SHA-256 mismatch: truncated, corrupt or "
            "another dataset); delete it and run again to re-download, or point --data-dir at the right files"
        )
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_fashion_mnist(data_dir=None):
    """(x_train, y_train, x_test, y_test) from the folder `find_fashion_mnist(data_dir)` finds."""
    return read_fashion_mnist(find_fashion_mnist(data_dir))


def read_fashion_mnist(folder):
    """(x_train, y_train, x_test, y_test) from a folder that holds the four files: uint8 images (N, 1, 28, 28)
    and int64 labels, verified. The folder is printed."""
    print(f"  data: {folder}", flush=True)
    x_train, y_train, x_test, y_test = (read_idx(find_file(folder, name), name) for name in FILES)
    return x_train.unsqueeze(1), y_train.long(), x_test.unsqueeze(1), y_test.long()
