"""Files a user hands us (run records, weights, feature caches) are untrusted: read only as regular files of
bounded size, in the formats named, never unpickled; tensors are checked against the model before they are used."""

import argparse
import contextlib
import io
import json
import math
import os
import reprlib
import stat
import sys
import warnings
import zipfile

from plumbing import SETTINGS, UserError, _has_type

import torch

RECORD_LIMIT = 2**24  # bytes: a record of ten thousand epochs takes about 2 MB


def read_file(path, what, limit):
    """The bytes of a file a user handed us (a record, weights, a cache), refused in one line naming `what`
    unless it is a regular file of at most `limit` bytes: a FIFO would hang, /dev/zero never end. Only the file's
    own size is read (and a byte more, should it grow meanwhile), however large the limit."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))  # opening a FIFO must not wait for a writer
        with os.fdopen(fd, "rb") as f:
            info = os.fstat(f.fileno())
            if not stat.S_ISREG(info.st_mode):
                raise UserError(f"{what} {path}: not a regular file (a folder, pipe or device), so not read")
            data = f.read(min(info.st_size, limit) + 1)
    except OSError as error:
        raise UserError(f"{what} {path}: cannot read it ({error.strerror})") from None
    if len(data) > limit:
        raise UserError(f"{what} {path}: larger than the {limit:,} bytes such a file can be, so not read")
    return data


def load_tensors(path, what, limit):
    """The dict of tensors torch.save wrote to path, loaded without running any code in it and refused in one line
    naming `what` unless its tensors take at most `limit` bytes: the size is read from the file's table of
    contents before anything is inflated. `{"state_dict": ...}`, as training frameworks save weights, is
    unwrapped."""
    with contextlib.suppress(OSError):  # read_file names a file that cannot be read
        if os.stat(path).st_size > limit + 2**20:  # the tensors, and a little room for their names
            raise UserError(
                f"{what} {path}: {os.stat(path).st_size:,} bytes, more than the {limit:,} the expected tensors "
                "take: the weights of another model, or no weights"
            )
    data = read_file(path, what, limit + 2**20)
    if not data:
        raise UserError(f"{what} {path}: the file is empty")
    try:
        inflated = 0  # torch's older format (not a zip) stores its tensors as they are: nothing to inflate
        if zipfile.is_zipfile(io.BytesIO(data)):
            with zipfile.ZipFile(io.BytesIO(data)) as archive:
                inflated = sum(entry.file_size for entry in archive.infolist())
        if inflated > limit + 2**20:
            raise UserError(f"{what} {path}: its tensors would take {inflated:,} bytes, more than expected ({limit:,})")
        with warnings.catch_warnings():  # torch warns about unusual pickles: the one line below says it all
            warnings.simplefilter("ignore")
            state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except UserError:
        raise
    except Exception as error:  # pickle, zip and format errors all mean the same thing to the user
        if "Weights only load failed" in str(error):
            raise UserError(
                f"{what} {path}: holds pickled Python objects (a whole model, or code), which are never loaded "
                "here because loading them can run code; save and pass model.state_dict() instead"
            ) from None
        raise UserError(f"{what} {path}: not a file written by torch.save (empty, corrupt or another format)") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    tensors = {k: v for k, v in state.items() if torch.is_tensor(v)} if isinstance(state, dict) else {}
    if not tensors or not all(isinstance(name, str) for name in tensors):
        raise UserError(f"{what} {path}: holds no state dict (a dict of parameter names, text, to tensors)")
    return tensors


# The types weights may come in (copied into the model's own as they are loaded): no complex numbers, 8-bit floats,
# quantized or sparse tensors, which the checks below and load_state_dict cannot take.
FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INTEGERS = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def state_bytes(model):
    """The bytes a state dict of the model takes: what a weights file for it may hold."""
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def check_state_dict(state, model, what, name):
    """Refuse, in words, a state dict whose names, shapes or values do not fit the model (called `name`)."""
    expected = model.state_dict()
    missing, foreign = sorted(expected.keys() - state.keys()), sorted(state.keys() - expected.keys())
    if missing or foreign:
        example = f"it lacks {missing[0]}" if missing else f"it has {foreign[0]}"
        raise UserError(
            f"{what}: not a {name} state dict ({len(missing)} of its {len(expected)} tensors missing, "
            f"{len(foreign)} foreign: {example}); was it saved from another architecture?"
        )
    for key, tensor in expected.items():
        if tuple(state[key].shape) != tuple(tensor.shape):
            raise UserError(
                f"{what}: not a {name} state dict ({key} has shape {tuple(state[key].shape)} where {name} has "
                f"{tuple(tensor.shape)}: the weights come from a model of other sizes)"
            )
        value = state[key]
        kinds = FLOATS if tensor.is_floating_point() else INTEGERS
        if value.layout != torch.strided or value.dtype not in kinds:
            raise UserError(
                f"{what}: {key} is a {str(value.dtype).removeprefix('torch.')} tensor ({value.layout}) where {name} "
                f"has {str(tensor.dtype).removeprefix('torch.')}: the weights are damaged or of another kind"
            )
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise UserError(f"{what}: {key} holds NaN or infinite values: the weights are damaged")
        if key.endswith("running_var") and (value < 0).any():
            raise UserError(f"{what}: {key} holds negative variances: the weights are damaged")


def read_record(path):
    """A run's metrics.json as a dict, or a UserError saying what is wrong with it. It is read as every file a
    user hands us is (a regular file, of bounded size), and must be JSON of a sane depth."""
    data = read_file(path, "run record", RECORD_LIMIT)
    try:
        record = json.loads(data)
    except RecursionError:  # json nests as deep as the file says: no record of a run is nested that deep
        raise UserError(f"{path} is damaged (nested too deeply to be a run's record)") from None
    except ValueError as error:  # not JSON, or not UTF-8
        raise UserError(f"{path} is unreadable ({type(error).__name__})") from None
    if not isinstance(record, dict):
        raise UserError(f"{path} is not a run's record")
    return record


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


# ----------------------------------------------------------------------------------------------
# A run folder read back: by predict.py, compare.py, and ann.py for its teacher.

PRECISIONS = {"fp32": "fp32", "tf32": "fp32", "bf16": "bf16", "fp16": "fp16"}  # what ran -> what to ask for again


class Run(argparse.Namespace):
    """A run folder read back: its `folder`, `record`, `settings` (by name, checked), `precision` (to ask for
    again), `final` ({train_acc, val_acc, test_acc, ...} or None when the run did not end) and `weights`, the words
    that say which weights model.pt holds, `final_weights` whether they are those the final accuracies are of."""


def load_run(folder, recorded, checks=None):
    """The run in `folder`, or a UserError naming what is wrong with it. `recorded` maps each script whose runs may
    be read to the settings its model needs: they are checked as their flags are (`checks` overrides a check),
    since a damaged one would fail deep in the model's code. A run that was stopped, or is still training, or whose
    final weights could not be written, has the weights of an earlier epoch: they are used, and that is said."""
    path = folder / "metrics.json"
    if not os.path.lexists(path):
        raise UserError(f"{folder}: no metrics.json; pass a run folder (runs/<script>-<date>)")
    record = read_record(path)
    script, status, final = record.get("script"), record.get("status"), record.get("final")
    if not isinstance(script, str) or script not in recorded or not isinstance(record.get("hparams"), dict):
        raise UserError(f"{path} is not the record of a run of {' or '.join(f'{s}.py' for s in recorded)}")
    accuracies = ("train_acc", "val_acc", "test_acc")
    if not (isinstance(final, dict) and all(isinstance(final.get(k), (int, float, type(None))) for k in accuracies)):
        final = None
    if final is None or not isinstance(final.get("test_acc"), (int, float)):
        if status == "completed":
            raise UserError(f"{path} has no final test accuracy: the record is damaged")
        final = None
    weights = record.get("model_pt")
    if not isinstance(weights, str) or status != "completed" and not (folder / "model.pt").exists():
        raise UserError(f"{folder}: the run's status is {status!r} and it saved no weights; train it again")
    final_weights = status == "completed" and weights.startswith("final weights")
    if status != "completed":
        print(f"note: the run is {status!r}, not completed; using its {weights}", file=sys.stderr)
    elif not final_weights:
        print(
            f"note: the run completed, but its final weights could not be saved: model.pt holds its {weights}, "
            "not the weights its accuracies were measured with",
            file=sys.stderr,
        )
    precision = PRECISIONS.get(record.get("precision", "fp32"))
    if precision is None:
        raise UserError(f"{path}: its precision {reprlib.repr(record.get('precision'))} is damaged")
    try:
        settings = check_recorded(record["hparams"], recorded[script], checks=checks)
    except UserError as error:
        raise UserError(f"{path}: its settings are incomplete or damaged ({error})") from None
    return Run(
        folder=folder,
        record=record,
        script=script,
        settings=settings,
        precision=precision,
        final=final,
        weights=weights,
        final_weights=final_weights,
    )


def check_normalization(run):
    """The {"mean", "std"} the run normalised its images with, refused in one line if missing or damaged."""
    norm = run.record.get("normalization")
    if not isinstance(norm, dict) or "mean" not in norm or "std" not in norm:
        raise UserError(f"{run.folder}: made before runs recorded their normalisation (or damaged); train it again")
    for key in ("mean", "std"):
        value = norm[key]
        if type(value) not in (int, float) or not math.isfinite(value) or key == "std" and value <= 0:
            raise UserError(
                f"{run.folder}/metrics.json: its normalisation is damaged (normalization.{key} = {value!r}; "
                f"it must be a finite number{' > 0' if key == 'std' else ''})"
            )
    return norm


def load_weights(model, run, name, device):
    """The model (built on the meta device: shapes, no memory) with the run's weights, on the device and in eval
    mode; weights of another model, or damaged ones, are refused in one line."""
    path = run.folder / "model.pt"
    state = load_tensors(path, f"{run.folder}: model.pt", state_bytes(model))
    check_state_dict(state, model, str(path), name)
    model = model.to_empty(device=device)  # memory, now that the weights are known to fit
    model.load_state_dict(state)
    return model.to(memory_format=torch.channels_last).eval()
