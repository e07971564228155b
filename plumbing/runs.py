"""The run folder, the one place that knows it: runs/<script>-<date>-<time>/ with metrics.json (the record), model.pt
(the weights) and the figures. Run writes it as a script trains; read_record and load_run read it back, for
predict.py and compare.py alike. docs/run-record.md says what each field means."""

from plumbing import figures, files
from plumbing.settings import check_recorded, has_fast
from plumbing.stops import Diverged, UserError, shown, signals_deferred

import argparse
import contextlib
import datetime
import hashlib
import inspect
import io
import json
import os
import re
import sys
import time
import tokenize
from pathlib import Path

import torch

TRAIN_SAMPLE = 10_000  # training images the final train accuracy is measured on: all 55,000 cost a third of an epoch


def runs_folder(out_dir):
    """Where run folders go: OUT_DIR, or runs/ beside the scripts."""
    return Path(out_dir or files.HERE / "runs")


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


def device_name(device, units=False):
    """The device as a run records it: the GPU with its capability and memory, or the CPU and its threads (with
    `units`, and whether it has bf16 units)."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        memory = torch.cuda.get_device_properties(device).total_memory / 2**30
        return f"{torch.cuda.get_device_name(device)}, compute capability {major}.{minor}, {memory:.0f} GiB"
    if device.type != "cpu":
        return device.type
    bf16 = f", {'with' if has_fast('bf16', device) else 'no'} bf16 units" if units else ""
    model = os.name  # where there is no /proc/cpuinfo (not Linux)
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as info:
        model = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), model)
    return f"{model}, {torch.get_num_threads()} threads{bf16}"


def source_text(path):
    """A source file's text ("" where it cannot be read)."""
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


# The modules the scripts share, as this process imported them: a notebook that runs a script again after common.py
# was edited (`%run ann.py`) runs the common.py it imported first, and its runs are fingerprinted with that one.
SHARED_CODE = [(p.name, source_text(p)) for p in [files.HERE / "common.py", *sorted(files.HERE.glob("plumbing/*.py"))]]


def code_fingerprint(source, settings):
    """A short hash of the code that ran: the script's file and the modules it shares (common.py, plumbing/), as
    airbench keeps its source with its results. The settings' lines count without their values: those are recorded
    apart, so editing EPOCHS = 5 in the file is the same code as passing --epochs 5."""
    text = re.sub(rf"(?m)^({'|'.join(map(re.escape, settings))}) *=.*$", r"\1 =", source_text(source))
    digest = hashlib.sha256(f"{source.name}\0{text}\0".encode())
    for name, shared in SHARED_CODE:
        digest.update(f"{name}\0{shared}\0".encode())
    return digest.hexdigest()[:12]


def model_code(model):
    """A short hash of the code of the model's own classes (those not torch's or torchvision's), comments and blank
    lines aside: predict.py rebuilds a run's model only from code that is still the same. None where it has no file
    to read (a class typed into a notebook)."""
    classes = {type(m) for m in model.modules() if type(m).__module__.partition(".")[0] not in ("torch", "torchvision")}
    try:
        sources = [inspect.getsource(c) for c in sorted(classes, key=lambda c: c.__qualname__)]
    except (OSError, TypeError):
        return None
    tokens = tokenize.generate_tokens(io.StringIO("".join(sources)).readline)
    words = "\0".join(t.string for t in tokens if t.type not in (tokenize.COMMENT, tokenize.NL))
    return hashlib.sha256(words.encode()).hexdigest()[:12]


# ----------------------------------------------------------------------------------------------
# Written: a record of what main() hands it, saved after every epoch together with the weights.


class Run:
    """One training run's folder and record, written as main() hands it what happened. A run that trained an epoch
    keeps its record, curves and the weights of its last finished epoch whatever ends it; one that fails before its
    first epoch leaves no folder behind. The record, and the weights it names, are written with stops deferred."""

    def __init__(self, script, hp, device, precision):
        self.script, self.started, self.unsaved = script, time.perf_counter(), None
        # The file of the code that trained: the one whose main() started the run (a lesson, a learner's copy of it,
        # and not a sweep or an app that calls the lesson's main()); `script`.py where it has none (a notebook).
        source = sys._getframe(1).f_globals.get("__file__")
        source = Path(source).resolve() if source else files.HERE / f"{script}.py"
        hparams = {k.upper(): v for k, v in vars(hp).items()}
        started = datetime.datetime.now().astimezone().isoformat("T", "seconds")  # local time and its UTC offset
        self.record = dict(script=script, status="running", device=str(device), device_name=device_name(device))
        self.record.update(precision=precision, torch_version=torch.__version__, started=started)
        self.record.update(hparams=hparams, code=code_fingerprint(source, hparams), history=[], final=None)
        print(f"{script}: device={device} ({device_name(device, units=True)}) precision={precision}")
        print("  " + "  ".join(f"{k.lower()}={v}" for k, v in hparams.items()), flush=True)
        self.dir = new_run_folder(hp.out_dir, script)  # after the flush: an output that fails first (stdout on a
        print(f"  run folder: {self.dir}")  # full disk) leaves no empty folder behind

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        """How the run ended, recorded: interrupted (Ctrl-C, a signal, a closed output), diverged or failed."""
        if exc_type is None or self.record["status"] == "completed":  # e.g. Ctrl-C while a figure is drawn
            return False
        stopped = issubclass(exc_type, (KeyboardInterrupt, BrokenPipeError))
        status = "interrupted" if stopped else "diverged" if exc_type is Diverged else "failed"
        if status == "failed" and not self.record["history"]:
            with contextlib.suppress(OSError):
                self.dir.rmdir()  # empty: nothing is written before the first epoch
            return False
        self.record["status"] = status
        if status == "failed":
            self.record["error"] = (str(exc).splitlines() or [exc_type.__name__])[0]
        self.save()
        done = len(self.record["history"])
        print(f"{self.script}: {status} after {done} epoch(s); record in {self.dir}", file=sys.stderr)
        if done:
            ended = f"{status} after epoch {done} of {self.epochs}"
            self.draw(figures.plot_curves, "curves.png", self.record["history"], self.legend, self.dir.name, ended)
        return False

    def start_training(self, data, model, evaluated, epochs, views, trained):
        """Record the split sizes and trainable parameters, print them and the epoch table's header, start the clock.
        `evaluated`: the model whose weights are saved (the weight average, where there is one); `views`: the test-
        time views the final evaluation averages; `trained`: {words: whether they apply}, for the curves' legend."""
        sizes = {name: len(split[0]) for name, split in data._asdict().items()}
        params = sum(p.numel() for p in model.parameters() if p.requires_grad)
        self.model, self.epochs, self.views = getattr(evaluated, "module", evaluated), epochs, views
        self.record.update(split_sizes=sizes, trainable_params=params, model_code=model_code(self.model))
        self.examples = data.train[0].dim() == 4 and (data.train[0][:30].float().cpu(), data.train[1][:30].cpu())
        # The final evaluation, in epochs: a training image costs about 3 forward passes, each view evaluated 1.
        sample = min(sizes["train"], TRAIN_SAMPLE)
        self.final_cost = (sample + sizes["val"] + sizes["test"]) * views / (3 * sizes["train"] + sizes["val"])
        batches = ", ".join(words for words, applies in trained.items() if applies)
        average = ", weight average" if evaluated is not model else ""
        self.legend = ("training batches" + (f" ({batches})" if batches else ""), f"validation (evaluated{average})")
        print(f"  {params:,} trainable parameters; {sizes['train']:,} training, {sizes['val']:,} validation images")
        print("epoch train_loss train_acc val_loss val_acc        lr seconds")
        print("      (train: the batches as trained; val: each image once; lr: where the epoch ends)")
        self.epoch_started = time.perf_counter()

    def log_epoch(self, epoch, train_loss, train_acc, val_loss, val_acc, lr):
        """Add the epoch's row to the record and save its weights with it, then print the row."""
        seconds, was_unsaved = time.perf_counter() - self.epoch_started, self.unsaved
        row = dict(epoch=epoch, train_batch_loss=train_loss, train_batch_acc=train_acc, val_loss=val_loss)
        self.record["history"].append({**row, "val_acc": val_acc, "lr": lr, "seconds": seconds})
        self.unsaved = self.save(weights=True)
        if self.unsaved is not None and was_unsaved is None:  # said once, and only if the record could be written
            print(f"{self.script}: warning: {self.unsaved}; training goes on without saving weights", file=sys.stderr)
        val = f"{val_loss:>8.4f} {val_acc:>7.2%}" if val_loss is not None else f"{'-':>8} {'-':>7}"
        print(f"{epoch:>5} {train_loss:>10.4f} {train_acc:>9.2%} {val} {lr:>9.2e} {seconds:>7.1f}", flush=True)
        if epoch == 2 and self.epochs > 2:  # the first epoch pays one-off costs, so the second sets the pace
            minutes = (time.perf_counter() - self.started + seconds * (self.epochs - 2 + self.final_cost)) / 60
            print(f"      (about {minutes:.1f} min in all at this pace, the final evaluation included)")
        self.epoch_started = time.perf_counter()

    def finish(self, final, test_logits, test_images, test_labels):
        """Print and record the final accuracies and the test confusion matrix, then draw the curves, the confusion
        matrix and the test images (uint8, on the CPU) the model was most confident about and got wrong. They are
        printed first: a disk that fills now loses none of them. The weights are the last epoch's, saved then."""
        final = {**final, "seconds": time.perf_counter() - self.started}
        shown = " ".join(f"{k}={'n/a' if final[k] is None else f'{final[k]:.2%}'}" for k in list(final)[:3])
        sample = f"train: a sample of {TRAIN_SAMPLE:,}; " if self.record["split_sizes"]["train"] > TRAIN_SAMPLE else ""
        views = f"{sample}{self.views} view(s) of each image"
        print(f"{self.script}: {shown} seconds={final['seconds']:.1f} ({views})", flush=True)
        test_logits, test_labels = test_logits.float().cpu(), test_labels.cpu()
        confusion = figures.confusion_matrix(test_logits, test_labels)
        rates = dict(zip(figures.CLASSES, (confusion.diag() / confusion.sum(1).clamp(min=1)).tolist(), strict=True))
        self.record.update(final=final, per_class_test_acc=rates, test_confusion=confusion.tolist(), status="completed")
        if self.unsaved is not None:
            self.record["not_written"] = str(self.unsaved)  # model.pt holds an earlier epoch's weights
        try:
            self.save()
        except UserError as error:
            raise UserError(f"{error}; the final accuracies are printed above") from None
        self.draw(figures.plot_curves, "curves.png", self.record["history"], self.legend, self.dir.name)
        title = f"{self.script}: test confusion, rows = true class"
        self.draw(figures.plot_confusion, "confusion.png", confusion, title)
        self.draw(figures.plot_misclassified, "misclassified.png", test_images, test_labels, test_logits)
        if self.examples and not (self.dir.parent / "training-images.png").exists():  # once beside the run folders
            self.draw(figures.plot_training_images, "../training-images.png", *self.examples)
        if self.unsaved is not None:
            raise UserError(f"{self.unsaved}; the accuracies are recorded in {self.dir / 'metrics.json'}")

    def draw(self, plot, name, *args):
        """A figure that cannot be drawn (a full disk, a broken matplotlib) is named on stderr; the run stands."""
        try:
            files.write_figure(plot, self.dir / name, *args)
        except UserError as error:
            print(f"{self.script}: {error}", file=sys.stderr)

    def save(self, weights=False):
        """Write the record, with stops deferred. With `weights`, the model's weights too: written aside, their
        fingerprint recorded in the epoch's row, renamed into model.pt once the record is written. So whatever
        instant a run is killed at, model.pt holds weights that a row of the record on disk names. Returns why the
        weights could not be written (model.pt then keeps earlier ones, which the record still names), or None."""
        with signals_deferred():
            aside, unsaved, written = None, None, False
            if weights:
                state = self.model.state_dict()
                self.record["history"][-1]["weights"] = files.fingerprint(state)
                try:
                    aside = files.staged(self.dir / "model.pt", files.tensor_bytes(state))
                except UserError as error:  # a full disk: training goes on, so that its accuracies are recorded
                    unsaved = error
            try:
                with aside or contextlib.nullcontext():  # deleted, not renamed, if the record cannot be written
                    record = json.dumps(self.record, indent=2, allow_nan=False).encode()
                    files.atomic_write(self.dir / "metrics.json", record)
                    written = True
            except UserError as error:
                if not written:
                    raise
                unsaved = error  # the weights could not be put in place
        return unsaved


# ----------------------------------------------------------------------------------------------
# Read back: a record checked field by field, and a trained model rebuilt from its folder in one call.

RECORD_LIMIT = 2**24  # bytes: a record of ten thousand epochs takes about 2 MB


def is_number(value):
    """A finite number (not a bool, NaN or infinite)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and abs(value) < 1e300


FINAL = ("train_acc", "val_acc", "test_acc", "test_loss", "seconds")  # the fields of `final` a tool reads


def layout_problem(record):
    """What is wrong with a parsed record's layout, in a few words, or None. Only the fields a tool reads are checked.
    A `final` that is not a table of accuracies is damage in a completed run; in one that did not end (a hand-edited
    record) it is read as no final accuracies. A loss or a time that is NaN or infinite (as records written before
    they were strict JSON may hold) is read as missing."""
    if not isinstance(record, dict) or not isinstance(record.get("hparams"), dict):
        return "not a run's record"
    if not all(isinstance(record.get(k), (str, type(None))) for k in ("script", "status", "started", "precision")):
        return "not the record of a run (its script, status, start time or precision is not text)"
    if not isinstance(record.get("model_pt"), (str, type(None))):
        return "it names no weights (model_pt is not text)"
    history = record.setdefault("history", [])
    if not isinstance(history, list) or not all(isinstance(h, dict) and is_number(h.get("epoch")) for h in history):
        return "its history is not a list of numbered epochs"
    if not all(h.get("val_acc") is None or is_number(h["val_acc"]) for h in history):
        return "an epoch's val_acc is not a number"
    final, damage = record.get("final"), None
    if final is not None and not isinstance(final, dict):
        damage = "its final results are not a table of numbers: no final test accuracy"
    for name in FINAL if isinstance(final, dict) else ():
        value = final.get(name)
        if name.endswith("_acc") and value is not None and not (is_number(value) and 0 <= value <= 1):
            damage = damage or f"final {name} is {value!r}, not an accuracy in [0, 1]"
        elif not name.endswith("_acc") and isinstance(value, float) and not is_number(value):
            final[name] = None  # NaN or infinite: missing
        elif not name.endswith("_acc") and value is not None and not is_number(value):
            damage = damage or f"final {name} is {value!r}, not a number"
    if record.get("status") == "completed" and damage:
        return f"the record is damaged: {damage}"
    if record.get("status") == "completed" and (final is None or final.get("test_acc") is None):
        return "the record is damaged: no final test accuracy, though the run completed"
    if damage:
        record["final"] = None
    return None


def read_record(path):
    """A run's metrics.json, read as every file a user hands us is (a regular file of bounded size) and checked
    (layout_problem), or a UserError saying what is wrong."""
    data = files.read_file(path, "run record", RECORD_LIMIT)
    try:
        record = json.loads(data)
    except RecursionError:  # json nests as deep as the file says: no record of a run is nested that deep
        raise UserError(f"{path} is damaged (nested too deeply to be a run's record)") from None
    except ValueError as error:  # not JSON, or not UTF-8
        raise UserError(f"{path} is unreadable ({type(error).__name__})") from None
    problem = layout_problem(record)
    if problem:
        raise UserError(f"{path}: {problem}")
    return record


# The settings of each script's record that rebuilding its model reads ("?": runs from before it may lack it).
RECORDED = {
    "ann": ("DROPOUT", "TTA_FLIP", "SUBSET"),
    "cnn": ("DROPOUT", "FC_WIDTH", "TTA_FLIP", "TTA_SHIFT?", "SUBSET"),
    "resnet_transfer": ("BACKBONE", "WEIGHTS", "IMAGE_SIZE", "FINETUNE", "DROPOUT", "BATCH_SIZE", "EXTRACT_BATCH"),
}
RECORDED["resnet_transfer"] += ("SEED", "SUBSET")
RECORD_CHECKS = {
    "SEED": (int, lambda v: 0 <= v < 2**64, "an integer in [0, 2**64)"),  # runs from before SEED was 32 bits
    "IN_FEATURES": (int, lambda v: v in (512, 2048), "512 or 2048 (a backbone's features)"),  # the transfer head's
}
PRECISIONS = {"fp32": "fp32", "tf32": "fp32", "bf16": "bf16", "fp16": "fp16"}  # what ran -> what to ask for again


class SavedRun(argparse.Namespace):
    """A run folder read back: its `folder`, `record`, `script`, `settings` (by name, checked), `precision` (to ask
    for again), `final` ({train_acc, val_acc, test_acc, ...} or None when the run did not end), once its weights are
    loaded `weights` (the words that say which model.pt holds) and `final_weights` (whether they are those the
    final accuracies are of), `model_args` (the arguments the script built its model with, checked; {} in runs from
    before they were recorded)."""

    @property
    def final(self):
        final = self.record.get("final")
        return final if final and final.get("test_acc") is not None else None


def load_run(folder):
    """The run in `folder`, its record and the settings a tool needs checked, or a UserError naming what is wrong
    with it. A run that was stopped, or is still training, or whose final weights could not be written, has the
    weights of an earlier epoch: they are used, and that is said."""
    path = folder / "metrics.json"
    if files.kind(path, "run folder") is None:
        raise UserError(f"{folder}: no metrics.json; pass a run folder (runs/<script>-<date>), or a script's name")
    record = read_record(path)
    script, status = record.get("script"), record.get("status")
    if script not in RECORDED:
        raise UserError(f"{path}: not the record of a run of {', '.join(f'{s}.py' for s in RECORDED)}")
    if not os.path.lexists(folder / "model.pt") or "model_pt" in record and record["model_pt"] is None:
        raise UserError(f"{folder}: the run's status is {status!r} and it saved no weights; train it again")
    if record.get("precision", "fp32") not in PRECISIONS:
        raise UserError(f"{path}: its precision {record['precision']!r} is not one that runs here")
    try:
        settings = check_recorded(record["hparams"], RECORDED[script], checks=RECORD_CHECKS)
    except UserError as error:
        raise UserError(f"{path}: its settings are incomplete or damaged ({error})") from None
    args = record.get("model_args", {})
    try:
        if not isinstance(args, dict) or not all(isinstance(k, str) and k.isidentifier() for k in args):
            raise UserError("model_args is not a table of named settings")
        args = check_recorded({k.upper(): v for k, v in args.items()}, [k.upper() for k in args], RECORD_CHECKS)
    except (UserError, KeyError) as error:  # KeyError: a name no model takes
        raise UserError(f"{path}: the arguments of its model are damaged ({error})") from None
    run = SavedRun(folder=folder, record=record, script=script, settings=settings, model_args=vars(args))
    run.precision = PRECISIONS[record.get("precision", "fp32")]
    return run


def started_at(record):
    """When the run started, a moment the same in every time zone: the local time its record keeps, with its UTC
    offset (records from before they kept one: the machine's local time); the oldest one if it has none."""
    try:
        return datetime.datetime.fromisoformat(record["started"]).astimezone(datetime.UTC)
    except (KeyError, TypeError, ValueError, OverflowError, OSError):
        return datetime.datetime.min.replace(tzinfo=datetime.UTC)


def latest_run(script, out_dir="", best=False):
    """The folder of the newest completed run of `script` (ann, cnn or resnet_transfer) in OUT_DIR or runs/; with
    `best`, of the completed run with the highest final validation accuracy (the newest of equals; runs without a
    validation split are not ranked)."""
    chosen = None
    for folder in sorted(runs_folder(out_dir).glob(f"{script}-*")):
        with contextlib.suppress(UserError, OSError):
            record = read_record(folder / "metrics.json")
            val_acc = (record.get("final") or {}).get("val_acc")
            key = (val_acc, started_at(record)) if best else (started_at(record),)
            if record.get("status") == "completed" and None not in key and (chosen is None or key >= chosen[0]):
                chosen = key, folder
    if chosen is None:
        which = "completed run with a validation accuracy" if best else "completed run"
        raise UserError(f"no {which} of {script}.py in {runs_folder(out_dir)}: train one with python {script}.py")
    return chosen[1]


def load_weights(model, run, name, device):
    """The model (built on the meta device: shapes, no memory) with the run's weights, on the device and in eval
    mode; weights of another model, or damaged ones, are refused in one line. Weights of an earlier epoch than the
    last (a run stopped, or whose final weights could not be written) are used, and that is said."""
    path = run.folder / "model.pt"
    code = model_code(model)  # records from before it kept none: not checked
    if run.record.get("model_code", code) != code:
        raise UserError(
            f"{run.folder}: its model ({name}) was trained with other code than there is now (edited since, or "
            "trained by a copy of the script); put that code back, or train again"
        )
    state = files.load_tensors(path, f"{run.folder}: model.pt", files.state_bytes(model))
    files.check_state_dict(state, model, str(path), name)
    run.weights, run.final_weights = weights_held(run.record, state)
    if run.weights is None and run.record.get("status") == "running":  # an epoch saved since its record was read
        with contextlib.suppress(UserError):
            run.record = read_record(run.folder / "metrics.json")
        run.weights, run.final_weights = weights_held(run.record, state)
    if run.weights is None:
        raise UserError(f"{path}: holds weights its record names for no epoch (replaced or damaged); train it again")
    words = shown(run.weights)  # an older record's own words
    if run.record.get("status") != "completed":
        print(f"note: the run is {run.record.get('status')!r}, not completed; using its {words}", file=sys.stderr)
    elif not run.final_weights:
        held = f"model.pt holds its {words}, not the weights its accuracies were measured with"
        print(f"note: the run completed, but its final weights could not be saved: {held}", file=sys.stderr)
    model = model.to_empty(device=device)  # memory, now that the weights are known to fit
    model.load_state_dict(state)
    return model.to(memory_format=torch.channels_last).eval()


def weights_held(record, state):
    """(words naming the weights `state` holds, whether they are the final ones), from the fingerprint each epoch's
    row of the record keeps (older records: from the words they kept in model_pt); (None, False) for weights no row
    names."""
    history = record["history"]
    if not any("weights" in row for row in history):
        words = record.get("model_pt") or "weights of an unknown epoch"
        return words, record.get("status") == "completed" and words.startswith("final weights")
    held = files.fingerprint(state)
    epoch = next((row["epoch"] for row in reversed(history) if row.get("weights") == held), None)
    if epoch is None:
        return None, False
    final = record.get("status") == "completed" and epoch == history[-1]["epoch"]
    return ("final weights, as evaluated" if final else "weights") + f" after epoch {epoch}", final
