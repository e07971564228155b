"""What keeps runs safe, and teaches nothing about training: checked settings, verified data files, files written
atomically, run folders, and clean stops. Whatever a user can get wrong ends in one line and exit code 2 instead of
a traceback (`run_main`), and a run that trained an epoch keeps it. The training scripts reach this through `common`.

What only the tools use lives beside it: reading.py (files a user hands us, and run folders read back) and
photos.py (a photo prepared as Fashion-MNIST's images were made).
"""

import argparse
import contextlib
import datetime
import errno
import functools
import gzip
import hashlib
import io
import math
import os
import re
import secrets
import signal
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]  # the project's folder: runs/ and data/ are found beside the scripts


class UserError(Exception):
    """A problem the user can fix (bad setting, bad data, unwritable folder): one line, exit code 2."""


class Diverged(Exception):
    """The training loss became NaN or infinite: exit code 1."""


# ----------------------------------------------------------------------------------------------
# Settings: the UPPER_CASE constants of a script are its command line.
N_TRAIN = 60_000


def expand_path(text):
    """A folder or file argument, with `~` expanded as a shell would (`~user` only for a user that exists)."""
    try:
        return str(Path(text).expanduser()) if text else text
    except RuntimeError:  # no home folder for that user: argparse turns this into one line naming the flag
        raise argparse.ArgumentTypeError(f"{text}: no such user to expand {text.split('/')[0]} for") from None


def anything(value):
    return True


def pixels(text):
    """An image size: a whole number of pixels, or "auto"."""
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid image size: {text!r} (a number of pixels, or auto)") from None


def is_weights(value):
    return value in ("DEFAULT", "none") or value.startswith("IMAGENET") or Path(value).is_file()


# The training scripts' settings: (type, check, what is allowed). The type is the flag's, whatever the default
# is written as (DROPOUT = 0 still takes --dropout 0.3); a constant of another type is refused. predict.py and
# compare.py add their own (`checks`).
SETTINGS = {
    "EPOCHS": (int, lambda v: v >= 1, "an integer >= 1"),
    "BATCH_SIZE": (int, lambda v: v >= 2, "an integer >= 2 (BatchNorm cannot train on one image)"),
    "LR": (float, lambda v: math.isfinite(v) and v > 0, "a finite number > 0"),
    "MOMENTUM": (float, lambda v: 0 <= v < 1, "a number in [0, 1)"),
    "WEIGHT_DECAY": (float, lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0"),
    "WARMUP": (float, lambda v: 0 < v < 1, "a number in (0, 1)"),
    "DROPOUT": (float, lambda v: 0 <= v < 1, "a number in [0, 1)"),
    "FC_WIDTH": (int, lambda v: 1 <= v <= 2**16, "an integer in [1, 65536]"),
    "LABEL_SMOOTHING": (float, lambda v: 0 <= v < 1, "a number in [0, 1)"),
    "EMA_DECAY": (float, lambda v: 0 <= v < 1, "a number in [0, 1) (0 turns EMA off)"),
    "MAX_SHIFT": (int, lambda v: 0 <= v <= 8, "an integer in [0, 8] (pixels)"),
    "FLIP": (bool, anything, "on or off"),
    "FIXED_CONV1": (bool, anything, "on or off"),
    "TTA_FLIP": (bool, anything, "on or off"),
    "TTA_SHIFT": (int, lambda v: 0 <= v <= 4, "an integer in [0, 4]"),
    "VAL_SIZE": (int, lambda v: 0 <= v < N_TRAIN, f"an integer in [0, {N_TRAIN})"),
    "SUBSET": (int, lambda v: 0 <= v <= N_TRAIN, f"an integer in [0, {N_TRAIN}] (0 = all)"),
    "SEED": (int, lambda v: 0 <= v < 2**64, "an integer in [0, 2**64)"),
    "DEVICE": (str, lambda v: re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", v), "auto, cpu, cuda, cuda:N or mps"),
    "PRECISION": (str, lambda v: v in ("auto", "bf16", "fp16", "fp32"), "auto, bf16, fp16 or fp32"),
    "DATA_DIR": (expand_path, anything, "a folder"),
    "OUT_DIR": (expand_path, anything, "a folder"),
    "CACHE_DIR": (expand_path, anything, "a folder"),
    "SHOW": (bool, anything, "on or off"),
    "BACKBONE": (str, lambda v: v in ("resnet18", "resnet34", "resnet50"), "resnet18, resnet34 or resnet50"),
    "WEIGHTS": (expand_path, is_weights, "DEFAULT, IMAGENET1K_V1, IMAGENET1K_V2, none, or a state-dict file"),
    "IMAGE_SIZE": (pixels, lambda v: v == "auto" or 32 <= v <= 512, "auto or an integer in [32, 512]"),
    "FINETUNE": (bool, anything, "on or off"),
    "EXTRACT_BATCH": (int, lambda v: v >= 1, "an integer >= 1"),
    "TEACHER": (expand_path, anything, "a cnn.py run folder, or empty"),
    "TEMPERATURE": (float, lambda v: 0 < v <= 100, "a number in (0, 100]"),
    "DISTILL_WEIGHT": (float, lambda v: 0 <= v <= 1, "a number in [0, 1]"),
}


class _OneLineParser(argparse.ArgumentParser):
    def error(self, message):
        raise UserError(message)


def flag(name):
    return "--" + name.lower().replace("_", "-")


def _comments(source):
    """Trailing comments of `NAME = value  # comment` lines: the help text of each flag."""
    pattern = re.compile(r"^([A-Z][A-Z0-9_]*)\s*=.*?#\s*(.+)$", re.MULTILINE)
    return {name: comment.strip() for name, comment in pattern.findall(source)}


def _has_type(value, kind):
    """Whether value is of a setting's type: an int is a float too, but True is no number, and paths are strings."""
    expected = {int: int, float: (int, float), bool: bool, pixels: (int, str)}.get(kind, str)
    return isinstance(value, expected) and (type(value) is not bool or kind is bool)


def _constants(namespace, script, checks):
    """{NAME: (type, default)} of the script's settings; a constant of the wrong type is refused."""
    constants = {}
    for name, value in namespace.items():
        if not name.isupper() or type(value) not in (int, float, str, bool):
            continue
        kind = checks.get(name, (type(value),))[0]
        if not _has_type(value, kind):
            wanted = {int: "an integer", float: "a number", bool: "True or False"}.get(kind, "a string")
            raise UserError(f"{name} = {value!r} in {script} is not allowed: make it {wanted}")
        constants[name] = (kind, float(value) if kind is float else value)
    return constants


def parse_hparams(namespace, argv=None, positionals=(), intermixed=False, checks=None):
    """The script's UPPER_CASE constants as flags (EPOCHS -> --epochs); returns the values by name (hp.epochs).

    `namespace` is the script's globals(): the constants are the defaults and their trailing comments the
    help. `checks` adds {NAME: (type, check, allowed)} to SETTINGS for a tool's own settings. `positionals` are
    (name, argparse keywords) of arguments that come before the flags, or anywhere among them with `intermixed`.
    Every value is checked before any work starts.
    """
    checks = {**SETTINGS, **(checks or {})}
    script = Path(namespace.get("__file__", "script")).name
    helps = _comments(Path(namespace["__file__"]).read_text()) if "__file__" in namespace else {}
    parser = _OneLineParser(prog=script, description=(namespace.get("__doc__") or "").strip().split("\n")[0])
    for name, keywords in positionals:
        parser.add_argument(name, **keywords)
    for name, (kind, default) in _constants(namespace, script, checks).items():
        help_text = helps.get(name, "").replace("%", "%%") + " (default: %(default)s)"
        if kind is bool:
            parser.add_argument(flag(name), default=default, action=argparse.BooleanOptionalAction, help=help_text)
        else:
            parser.add_argument(flag(name), default=default, type=kind, metavar=name, help=help_text)
    hp = parser.parse_intermixed_args(argv) if intermixed else parser.parse_args(argv)
    for name, value in vars(hp).items():
        _, ok, allowed = checks.get(name.upper(), (None, anything, ""))
        if not ok(value):
            raise UserError(f"{flag(name)} ({name.upper()}) = {value!r} is not allowed: use {allowed}")
    _check_split(hp)
    if getattr(hp, "tta_flip", False) and not getattr(hp, "flip", True):
        hp.tta_flip = False  # recorded as it runs: mirrored images mislead a model never trained on them
        print(f"{script}: note: --tta-flip is off because --flip is off (the model never sees mirrored images)")
    return hp


def _check_split(hp):
    if not hasattr(hp, "val_size") or not hasattr(hp, "batch_size"):
        return
    n_train = (hp.subset or N_TRAIN) - hp.val_size
    if n_train < 2:  # BatchNorm cannot train on fewer than two images
        raise UserError(
            f"--val-size {hp.val_size} leaves {max(n_train, 0)} training image(s) of --subset {hp.subset or N_TRAIN}; "
            f"at least 2 are needed: make --val-size at most {(hp.subset or N_TRAIN) - 2}"
        )
    if hp.batch_size > n_train:
        raise UserError(
            f"--batch-size {hp.batch_size} is larger than the {n_train} training images: use at most {n_train}"
        )


def check_device(name):
    """Refuse, in one line, a device named that is not here."""
    import torch

    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name}: no CUDA GPU is visible to PyTorch; use --device cpu or auto")
    if name.startswith("cuda:") and int(name[5:]) >= torch.cuda.device_count():
        raise UserError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here; use cuda:0 or auto")
    if name == "mps" and not torch.backends.mps.is_available():
        raise UserError("--device mps: Apple's MPS backend is not available here; use --device cpu or auto")
    if name not in ("cuda", "mps") and not (name.startswith("cuda:") and name[5:].isdigit()):
        raise UserError(f"--device {name}: not a device; use auto, cpu, cuda, cuda:N or mps")


# ----------------------------------------------------------------------------------------------
# Data files: found, verified against the official content, parsed into uint8 tensors.

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
    try:
        folder.stat()
    except OSError as error:
        problem = "is a symlink loop" if error.errno == errno.ELOOP else "does not exist"
        raise UserError(
            f"{flag} {folder} {problem}; point it at a folder (it may be empty: the data is downloaded there)"
        ) from None
    if not folder.is_dir():
        raise UserError(f"{flag} {folder} is a file, not a folder; point it at the folder that holds the data files")
    if not os.access(folder, os.R_OK | os.X_OK):
        raise UserError(f"{flag} {folder} is not readable; fix its permissions or pick another folder")
    return folder


def find_file(folder, name):
    for candidate in (folder / name, folder / (name + ".gz")):
        if candidate.is_file():
            return candidate
    return None


def _download(folder):
    from torchvision.datasets import FashionMNIST

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
    dirs = (
        [named, named / "FashionMNIST" / "raw"]
        if named
        else [HERE / "data", HERE / "data" / "FashionMNIST" / "raw", DEBIAN_DIR]
    )
    for folder in dirs:
        if all(find_file(folder, name) for name in FILES):
            return folder
    return _download(named or HERE / "data")


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
    except (OSError, EOFError, gzip.BadGzipFile, ValueError) as error:
        raise UserError(
            f"{path}: not a readable gzip file ({error}); it is truncated or corrupt: "
            "delete it and run again to re-download"
        ) from None
    if hashlib.sha256(raw).hexdigest() != FILES[name][1]:
        raise UserError(
            f"{path}: content is not the official Fashion-MNIST {name} "
            "(SHA-256 mismatch: truncated, corrupt or another "
            "dataset); delete it and run again to re-download, or point --data-dir at the right files"
        )
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    import torch  # imported where used: this module is imported before torch (a Ctrl-C while it loads, above)

    return torch.frombuffer(bytearray(raw), dtype=torch.uint8, offset=4 + 4 * ndim).reshape(shape)


# ----------------------------------------------------------------------------------------------
# Files a user hands us are read within bounds; files we write are written atomically.


def atomic_write(path, data):
    """Write-then-rename, so a reader never sees a half-written file; a full disk is a user error.

    The rename replaces whatever is at path, a symlink included, instead of writing through it. Each writer creates
    its own temporary file (a random name, O_EXCL), so two runs writing the same file at once never mix their
    bytes; it gets the mode the umask gives, as any new file."""
    tmp, created = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp"), False
    try:
        with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666), "wb") as f:
            created = True
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as error:  # Ctrl-C included: a half-written temporary file is never left behind
        if created:
            tmp.unlink(missing_ok=True)
        if not isinstance(error, OSError):
            raise
        advice = "free some space or " if error.errno in (errno.ENOSPC, errno.EDQUOT) else ""
        raise UserError(f"cannot write {path}: {error.strerror}; {advice}choose another folder or file") from None


def save_tensors(path, tensors):
    """A dict of tensors (and strings), saved atomically in torch's format: no pickle needed to load it."""
    import torch

    buffer = io.BytesIO()
    torch.save({k: v.detach().cpu() if torch.is_tensor(v) else v for k, v in tensors.items()}, buffer)
    atomic_write(path, buffer.getvalue())


def writable_folder(path, flag):
    """path, created if needed and checked to be a folder we can write to, before any long work uses it."""
    if path.exists() and not path.is_dir():
        raise UserError(f"{flag} {path} is a file, not a folder; point {flag} at a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=path).close()
    except OSError as error:
        raise UserError(
            f"{flag} {path} is not writable ({error.strerror}); point {flag} at a writable folder"
        ) from None
    return path


def runs_folder(out_dir):
    """Where run folders go: OUT_DIR, or runs/ beside the scripts."""
    return Path(out_dir or HERE / "runs")


def new_run_folder(out_dir, script):
    """A new, empty folder for a run of `script` in `out_dir`, named after the script and the time it started."""
    out_dir = runs_folder(out_dir)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        for n in range(1000):
            path = out_dir / (f"{script}-{stamp}" + (f"-{n}" if n else ""))
            with contextlib.suppress(FileExistsError):
                path.mkdir()  # atomic: two runs started in the same second never share a folder
                return path
    except OSError as error:
        raise UserError(
            f"cannot create a run folder in {out_dir}: {error.strerror}; choose a writable --out-dir"
        ) from None
    raise UserError(f"{out_dir} already holds 1000 runs named {script}-{stamp}; choose another --out-dir")


# ----------------------------------------------------------------------------------------------
# Entry point: what a user can cause ends in one line and an exit code, never a traceback.
STOP_SIGNALS = [signal.SIGTERM] + ([signal.SIGHUP] if hasattr(signal, "SIGHUP") else [])  # no SIGHUP on Windows


class Stopped(KeyboardInterrupt):
    """SIGTERM (`kill`, a job scheduler) or SIGHUP (a closed terminal): handled like Ctrl-C, the record is kept."""

    def __init__(self, signum):
        super().__init__(signum)
        self.signum = signum


def _stop(signum, frame):
    raise Stopped(signum)


def stopped_line(signum):
    return "interrupted" if signum == signal.SIGINT else f"stopped by {signal.Signals(signum).name}"


def _quiet_exit(signum, frame):
    """A stop while the program loads (torch takes seconds) or after its work is done: there is nothing to keep,
    so one line and the usual exit code, at once (an exception here could land inside torch's C++ start-up)."""
    os.write(2, f"{Path(sys.argv[0]).name}: {stopped_line(signum)}\n".encode())
    os._exit(128 + signum)


def _program_is_ours():
    """Whether the program running is one of the project's scripts, tools or benchmarks: not the test suite, nor a
    program of the user's that imports a script (its Ctrl-C stays its own)."""
    main = getattr(sys.modules.get("__main__"), "__file__", None)
    return main is not None and Path(main).resolve().parent in (HERE, HERE / "benchmarks")


if _program_is_ours():  # plumbing is imported before torch: from here on, a stop is one line
    for _signal in (signal.SIGINT, *STOP_SIGNALS):
        signal.signal(_signal, _quiet_exit)


@contextlib.contextmanager
def signals_deferred():
    """Ctrl-C and the stop signals wait until the block ends: what it writes together (an epoch's weights and the
    record that names them) is never cut in two. One that came meanwhile is raised as the block ends."""
    received, handled = [], [signal.SIGINT, *STOP_SIGNALS]
    previous = {s: signal.signal(s, lambda signum, frame: received.append(signum)) for s in handled}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if received:
            signal.raise_signal(received[0])


def _out_of_memory(error):
    text, torch = str(error), sys.modules.get("torch")
    return (
        isinstance(error, MemoryError)
        or torch is not None
        and isinstance(error, torch.OutOfMemoryError)
        or (isinstance(error, RuntimeError) and ("can't allocate memory" in text or "out of memory" in text.lower()))
    )


# The settings that size a script's tensors: the out-of-memory advice names those the script has.
MEMORY_SETTINGS = ["BATCH_SIZE", "EXTRACT_BATCH", "IMAGE_SIZE", "FC_WIDTH"]


def _memory_advice(main):
    flags = [flag(name) for name in MEMORY_SETTINGS if name in getattr(main, "__globals__", {})]  # the script's
    if not flags:
        return "close other programs, or use a device with more memory"
    return "use a smaller " + (", ".join(flags[:-1]) + " or " if len(flags) > 1 else "") + flags[-1]


def _output_gone():
    """Point stdout at /dev/null, so that Python's own flush at exit meets no closed pipe or full disk either."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def run_main(main, argv=None):
    """Call main(argv) and turn the expected failures into exit codes and one line on stderr.

    2 user error, out of memory or an output that cannot be written (stdout on a full disk), 1 diverged, 130
    Ctrl-C, 128 + the signal for SIGTERM (143), SIGHUP (129) and a reader that went away (`| head`: 141, as
    `cat` ends, with no message of its own). Names the terminal's encoding cannot show are printed escaped.
    """
    script = Path(sys.argv[0]).name
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    handlers = {signal.SIGINT: signal.default_int_handler, **{s: _stop for s in STOP_SIGNALS}}
    previous = {s: signal.signal(s, handler) for s, handler in handlers.items()}
    try:
        main(argv)
        sys.stdout.flush()  # lines still buffered meet a closed pipe or a full disk here, not at exit
    except UserError as error:
        print(f"{script}: error: {error}", file=sys.stderr)
        return 2
    except Diverged as error:
        print(f"{script}: error: the loss became NaN or infinite ({error}); try a smaller --lr", file=sys.stderr)
        return 1
    except Stopped as stop:
        print(f"{script}: {stopped_line(stop.signum)}", file=sys.stderr)
        return 128 + stop.signum
    except KeyboardInterrupt:
        print(f"{script}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        _output_gone()
        return 128 + 13  # as a program ended by SIGPIPE, which Python turns into this exception instead
    except OSError as error:
        if error.errno not in (errno.ENOSPC, errno.EIO):  # writing the output failed; other errors are ours
            raise
        _output_gone()
        print(f"{script}: error: cannot write its output ({error.strerror}); send it elsewhere", file=sys.stderr)
        return 2
    except Exception as error:
        if not _out_of_memory(error):
            raise
        reason = (str(error).splitlines() or [type(error).__name__])[0][:160]  # a MemoryError may have no message
        print(f"{script}: error: out of memory ({reason}); {_memory_advice(main)}", file=sys.stderr)
        return 2
    finally:
        for s, handler in previous.items():  # the program's own: after its work a stop ends it quietly
            signal.signal(
                s, _quiet_exit if getattr(main, "__module__", "") == "__main__" and _program_is_ours() else handler
            )
    return 0
