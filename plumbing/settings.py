"""Settings: a script's UPPER_CASE constants are its command line (EPOCHS -> --epochs), each checked before any work
starts; the settings a run's record keeps are checked the same way when it is read back."""

from plumbing.stops import UserError

import argparse
import math
import os
import re
import reprlib
import sys
from pathlib import Path

N_TRAIN = 60_000


def import_torchvision():
    """torchvision, or one line and exit code 2 where it does not load: a torchvision built for another torch fails
    at import (`operator torchvision::nms does not exist`), which can happen at a script's first line, before any
    main() could turn it into one line."""
    try:
        import torchvision
    except (ImportError, OSError, RuntimeError) as error:
        import torch

        reason = (str(error).splitlines() or [type(error).__name__])[0][:160]
        print(
            f"{Path(sys.argv[0]).name}: error: torchvision does not load with torch {torch.__version__} ({reason}); "
            "install the pair tested, pip install torch==2.14.1 torchvision==0.29.1 (.ci/constraints.txt), "
            'and check with python -c "import torch, torchvision"',
            file=sys.stderr,
        )
        raise SystemExit(2) from None
    return torchvision


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
    from plumbing import files  # torch, loaded by the time settings are checked

    return value in ("DEFAULT", "none") or value.startswith("IMAGENET") or files.kind(value, "--weights") == "file"


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
    "SEED": (int, lambda v: 0 <= v < 2**32, "an integer in [0, 2**32): torch's generators keep 32 bits of a seed"),
    "DEVICE": (str, lambda v: re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", v), "auto, cpu, cuda, cuda:N or mps"),
    "PRECISION": (str, lambda v: v in ("auto", "bf16", "fp16", "fp32"), "auto, bf16, fp16 or fp32"),
    "DATA_DIR": (expand_path, anything, "a folder"),
    "OUT_DIR": (expand_path, anything, "a folder"),
    "CACHE_DIR": (expand_path, anything, "a folder"),
    "SHOW": (bool, anything, "on or off"),
    "BACKBONE": (str, lambda v: v in ("resnet18", "resnet34", "resnet50"), "resnet18, resnet34 or resnet50"),
    "WEIGHTS": (expand_path, is_weights, "DEFAULT, IMAGENET1K_V1, IMAGENET1K_V2, none, or a state-dict file"),
    "IMAGE_SIZE": (
        pixels,
        lambda v: v == "auto" or type(v) is int and 32 <= v <= 512,
        "auto or an integer in [32, 512]",
    ),
    "FINETUNE": (bool, anything, "on or off"),
    "EXTRACT_BATCH": (int, lambda v: v >= 1, "an integer >= 1"),
}


class _OneLineParser(argparse.ArgumentParser):
    def error(self, message):
        raise UserError(message)


def flag(name):
    return "--" + name.lower().replace("_", "-")


def hyphenated(arg, flags):
    """--label_smoothing, as the constant is spelt, is --label-smoothing (the one spelling --help shows)."""
    name, equals, value = arg.partition("=")
    dashed = "--" + name[2:].replace("_", "-")
    return dashed + equals + value if arg.startswith("--") and dashed in flags else arg


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
    Every value is checked before any work starts. argv None is no flags: the command line is read by run_main
    alone, so that main() in a notebook, a sweep or an app never takes its host's flags (Jupyter's `-f kernel.json`).
    """
    checks = {**SETTINGS, **(checks or {})}
    script = Path(namespace.get("__file__", "script")).name
    helps = _comments(Path(namespace["__file__"]).read_text()) if "__file__" in namespace else {}
    parser = _OneLineParser(prog=script, description=(namespace.get("__doc__") or "").strip().split("\n")[0])
    for name, keywords in positionals:
        parser.add_argument(name, **keywords)
    flags = set()  # the flags' spellings (a bool's --no- one too): what hyphenated() may rewrite an argument to
    for name, (kind, default) in _constants(namespace, script, checks).items():
        help_text = helps.get(name, "").replace("%", "%%") + " (default: %(default)s)"
        how = dict(action=argparse.BooleanOptionalAction) if kind is bool else dict(type=kind, metavar=name)
        flags.update(parser.add_argument(flag(name), default=default, help=help_text, **how).option_strings)
    argv = [hyphenated(arg, flags) for arg in argv or []]
    hp = parser.parse_intermixed_args(argv) if intermixed else parser.parse_args(argv)
    for name, value in vars(hp).items():
        _, ok, allowed = checks.get(name.upper(), (None, anything, ""))
        if not ok(value):
            raise UserError(f"{flag(name)} ({name.upper()}) = {value!r} is not allowed: use {allowed}")
    _check_split(hp)
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


def has_fast(dtype, device):
    """Whether the device has units that compute in this 16-bit type at full speed (elsewhere it is emulated).

    CUDA: bf16 from compute capability 8.0 (Ampere) on, fp16 tensor cores from 7.0 (Volta, Turing: the T4).
    torch.cuda.is_bf16_supported() is no guide: it also answers True where bf16 is only emulated.
    CPU: bf16 with AVX-512-BF16 or AMX, fp16 with AMX-FP16, unless the kernels are held below them
    (ATEN_CPU_CAPABILITY=avx2, ONEDNN_MAX_CPU_ISA=AVX2 or AVX512_CORE: a newer CPU standing in for an older one,
    which then emulates 16 bits as that one would). MPS: not verified here, so neither."""
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_capability(device)[0] >= (8 if dtype == "bf16" else 7)
    held = os.environ.get("ONEDNN_MAX_CPU_ISA", "ALL").upper()
    if torch.backends.cpu.get_cpu_capability() in ("DEFAULT", "AVX2") or not re.search("ALL|DEFAULT|BF16|AMX", held):
        return False
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported") if dtype == "bf16" else ("_is_amx_fp16_supported",)
    return device.type == "cpu" and any(getattr(torch.cpu, probe, lambda: False)() for probe in probes)


def check_recorded(values, names, checks=None):
    """The settings `names` from `values`, the {NAME: value} a run's record keeps, checked against SETTINGS (or
    `checks`) as their flags are: returned by name (hp.dropout), or a UserError naming the first one that is
    missing, of the wrong type or not allowed. A name ending in "?" may be missing: runs from before it existed."""
    checked = {}
    for name in names:
        optional, name = name.endswith("?"), name.rstrip("?")
        if name not in values:
            if not optional:
                raise UserError(f"{name} is missing")
            continue
        kind, ok, allowed = {**SETTINGS, **(checks or {})}[name]
        value = values[name]
        if not _has_type(value, kind) or not ok(value):
            raise UserError(f"{name} = {reprlib.repr(value)} is not allowed: it must be {allowed}")
        checked[name.lower()] = float(value) if kind is float else value
    return argparse.Namespace(**checked)
