"""Use a trained model: what it thinks of your own images, and its accuracy on the official test set again.

    python predict.py cnn my_shirt.jpg photos/                   # the latest cnn.py run: top three classes of each
    python predict.py cnn:best my_shirt.jpg                      # the cnn.py run with the best validation accuracy
    python predict.py runs/cnn-20261125-120000 --test            # that run's test accuracy, recomputed

The model is rebuilt exactly from the run folder: its script's model class with the model_args in metrics.json, the
weights from model.pt (loaded with weights_only=True: nothing is unpickled), the normalisation the run trained with,
and the same test-time augmentation and precision as the run's test evaluation. Photos are prepared the way
Fashion-MNIST itself was made (photo_prep.py): grey, the background subtracted and trimmed, the longest edge resized
to 28 px, centred on a 28x28 canvas, light item on black. Every image gets one of the ten classes: one with nothing
to classify (blank, a speck, an item cut off at every edge) gets a warning beside its answer and under its image in
the figure. The figure (a new predictions.png, predictions-2.png, ... in the run folder at each call, unless --out
names one) shows, for each image, the 28x28 input the model saw beside its ten class probabilities, and the true
class where it is known (--test, which shows the mistakes first, or a file named as the README's export names it).
"""

import common
from plumbing import files, runs
from plumbing.settings import expand_path
from plumbing.stops import shown

import importlib
import os
import re
import sys
import textwrap
from pathlib import Path

import numpy as np
import torch

import photo_prep as photos

# --- Settings: each one is also a flag (OUT -> --out).
OUT = ""  # the figure: a .png, .pdf or .svg file, replaced if there ("" = a new predictions[-N].png in the run folder)
FIGURE_IMAGES = 16  # the figure shows the first N images: more rows than about 16 are too small to read
RAW = False  # the images are already 28x28 Fashion-MNIST style (light item on black): use them as they are
TEST = False  # instead of images, evaluate the model on the official test set and print its accuracy
DEVICE = "auto"  # auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps
PRECISION = ""  # "" = the one the run was evaluated in (its --test then gives its digits), or auto, bf16, fp16, fp32
DATA_DIR = ""  # folder with the Fashion-MNIST files, for --test ("" = as the training scripts search)

# What each setting above allows, checked as the flags are (DEVICE and DATA_DIR as in the training scripts).
CHECKS = {
    "OUT": (
        expand_path,
        lambda v: v == "" or Path(v).suffix.lower() in (".png", ".pdf", ".svg"),
        "a .png, .pdf or .svg file",
    ),
    "FIGURE_IMAGES": (int, lambda v: v >= 1, "an integer >= 1"),
    "PRECISION": (str, lambda v: v in ("", "auto", "bf16", "fp16", "fp32"), "auto, bf16, fp16, fp32 or empty"),
}


def load_images(paths, raw):
    """(paths, uint8 images (N, 1, 28, 28), warnings) of those that could be read, each warning saying why the
    answer for its image may mean nothing (or None); the others are named on stderr."""
    good, images, warnings = [], [], []
    for path in paths:
        image, problem = photos.read_image(path)
        if image is not None and raw and image.size != (28, 28):
            problem = f"cannot be used (is {image.size[0]}x{image.size[1]}, but --raw needs 28x28)"
        if problem:
            print(f"{shown(path)}: {problem}", file=sys.stderr)
            continue
        try:
            prepared = (photos.grey_levels(image).round().astype(np.uint8), None) if raw else photos.prepare(image)
            array, warning = prepared
        except MemoryError:  # this photo alone: the others are still answered
            print(f"{shown(path)}: too large to prepare in the memory here; crop or shrink it", file=sys.stderr)
            continue
        good.append(path)
        images.append(torch.from_numpy(array))
        warnings.append(warning)
    images = torch.stack(images).unsqueeze(1) if images else torch.zeros(0, 1, 28, 28, dtype=torch.uint8)
    return good, images, warnings


def plot_predictions(names, images, probabilities, truths, warnings):
    """For each image: the 28x28 input the model saw, titled with its answer (and the true class, where known:
    green when they agree, red when not) and with its warning (or None) below it, beside a bar chart of the ten
    class probabilities."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 2.2 * len(names)), dpi=100)
    for i, (name, image, p, truth, warning) in enumerate(
        zip(names, images, probabilities, truths, warnings, strict=True)
    ):
        ax = fig.add_subplot(len(names), 2, 2 * i + 1)
        # Light on black over the full 0-255 range: as the model sees it, and as the run's misclassified.png shows.
        ax.imshow(image[0].numpy(), cmap="gray", vmin=0, vmax=255)
        answer = f"{shown(Path(name).name)}\nanswer: {common.CLASSES[p.argmax()]}"
        colour = "black" if truth is None else "tab:green" if truth == p.argmax() else "tab:red"
        answer += "" if truth is None else f", true: {common.CLASSES[truth]}"
        ax.set_title(answer, fontsize=9, color=colour, parse_math=False)  # "$" in a name is no formula
        ax.axis("off")
        if warning:
            words = textwrap.fill(f"warning: {warning}", 48)
            ax.text(0.5, -0.04, words, transform=ax.transAxes, ha="center", va="top", fontsize=7, color="tab:red")
        ax = fig.add_subplot(len(names), 2, 2 * i + 2)
        ax.barh(range(10), 100 * p.numpy(), color=["tab:blue" if k != p.argmax() else "tab:orange" for k in range(10)])
        ax.set_yticks(range(10), common.CLASSES, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlim(0, 100)
        ax.set_xlabel("probability (%): the model's softmax, not a calibrated confidence", fontsize=8)
    fig.tight_layout()
    return fig


def input_images(names, out):
    """The image files named and in the folders named, checked before any work: there are some, and --out (the
    figure) is none of them."""
    if not names:
        raise common.UserError("no images given: python predict.py RUN IMAGE... (files or folders), or --test")
    paths, skipped = photos.image_paths(names)
    for line in skipped:
        print(line, file=sys.stderr)
    if not paths:
        raise common.UserError(f"no PNG, JPEG, BMP or WebP files in {' '.join(map(shown, names))}")
    if any(same_file(out, path) for path in paths):
        raise common.UserError(f"--out {shown(out)} is one of the input images; the figure would overwrite it")
    return paths


def same_file(a, b):
    """Whether two paths name one file on disk (a link, a hard link, a case-insensitive disk)."""
    try:
        return os.path.samefile(a, b)
    except OSError:  # either does not exist (yet): the figure is new
        return False


# ----------------------------------------------------------------------------------------------
# The model rebuilt from its run folder, as nanoGPT's sample.py rebuilds GPT from its checkpoint's model_args.

MODELS = {"ann": "ANN", "cnn": "CNN", "resnet_transfer": "Head"}  # the class of each script's model
OLDER_ARGS = {  # runs from before records kept model_args: the same arguments, from their settings
    "ann": lambda hp, script: dict(dropout=hp.dropout),
    "cnn": lambda hp, script: dict(fc_width=hp.fc_width, dropout=hp.dropout),
    "resnet_transfer": lambda hp, script: dict(in_features=script.FEATURES[hp.backbone], dropout=hp.dropout),
}


def rebuilt(run, device, precision):
    """A function from uint8 images (N, 1, 28, 28) to logits: the run's model with its weights, and the preparation
    its inputs had (its normalisation, or the frozen backbone of a transfer run), computed in `precision` ("": the
    one the run was evaluated in). Only the run's own script is imported. Outputs that are not numbers are refused."""
    script, hp = importlib.import_module(run.script), run.settings
    amp = common.autocast(device, common.pick_precision(precision or run.precision, device))
    args = run.model_args or OLDER_ARGS[run.script](hp, script)
    with torch.device("meta"):  # shapes without memory: model.pt is checked against them before anything is loaded
        try:
            model = getattr(script, MODELS[run.script])(**args)
        except TypeError:
            raise common.UserError(f"{run.folder}/metrics.json: its model_args {args} do not fit the model") from None
    if run.script != "resnet_transfer":
        norm = normalization(run)
        model = runs.load_weights(model, run, run.script, device)
        tta = (hp.tta_flip, getattr(hp, "tta_shift", 0))
        return lambda x: finite(common.compute_logits(model, (x.float() - norm["mean"]) / norm["std"], amp, *tta), run)
    torch.manual_seed(hp.seed)  # a random backbone (--weights none) is rebuilt from the run's seed
    backbone, weights_id, image_mean, image_std = script.load_backbone(hp.backbone, hp.weights, hp.seed)
    if weights_id != run.record.get("weights"):
        raise common.UserError(f"{run.folder}: the backbone weights now at {hp.weights} are not the ones the run used")
    image_size = run.record.get("image_size", hp.image_size)  # the size that ran (IMAGE_SIZE may say "auto")
    if type(image_size) is not int or not 32 <= image_size <= 512:
        raise common.UserError(f"{run.folder}/metrics.json: its image_size {image_size!r} is damaged (32 to 512 px)")
    preprocess = script.Preprocess(image_size, image_mean, image_std)
    if hp.finetune:  # model.pt holds the whole fine-tuned model: backbone (with its trained layer4) and head
        finetuned = script.FineTuned(preprocess, backbone, model)
        finetuned = runs.load_weights(finetuned, run, "resnet_transfer.py --finetune", device)
        return lambda x: finite(common.compute_logits(finetuned, x, amp, chunk=hp.batch_size), run)  # training's memory
    head = runs.load_weights(model, run, "resnet_transfer.py head", device)
    backbone, preprocess = backbone.to(device, memory_format=torch.channels_last), preprocess.to(device)
    features = lambda x: script.extract_features(preprocess, backbone, x, device, amp, hp.extract_batch)  # noqa: E731
    return lambda x: finite(common.compute_logits(head, features(x), amp, chunk=hp.batch_size), run)


def load(folder, device, precision=""):
    """The run in `folder` (runs.load_run) with `logits`: uint8 images (N, 1, 28, 28) -> its model's logits."""
    run = runs.load_run(folder)
    run.logits = rebuilt(run, device, precision)
    return run


def finite(logits, run):
    """The logits, unless some are NaN or infinite: then no answer is better than a made-up one."""
    if not torch.isfinite(logits).all():
        raise common.UserError(
            f"{run.folder}: the model's outputs are NaN or infinite; its model.pt or the normalisation in its "
            "metrics.json is damaged: train it again"
        )
    return logits


def normalization(run):
    """The {"mean", "std"} the run normalised its images with, refused in one line if missing or damaged."""
    norm = run.record.get("normalization")
    if not isinstance(norm, dict) or "mean" not in norm or "std" not in norm:
        raise common.UserError(f"{run.folder}: made before runs recorded their normalisation (or damaged); train again")
    for key in ("mean", "std"):
        value = norm[key]
        if not runs.is_number(value) or key == "std" and value <= 0:
            raise common.UserError(
                f"{run.folder}/metrics.json: its normalisation is damaged (normalization.{key} = {value!r}; "
                f"it must be a finite number{' > 0' if key == 'std' else ''})"
            )
    return norm


def main(argv=None):
    run_help = (
        "a run folder; or ann, cnn or resnet_transfer: that script's latest completed run; or cnn:best (ann:best, "
        "...): its completed run with the highest final validation accuracy"
    )
    images_help = {"nargs": "*", "help": "image files (PNG, JPEG, BMP, WebP) or folders of them"}
    positionals = [("run", {"help": run_help}), ("images", images_help)]
    hp = common.parse_hparams(globals(), argv, positionals, intermixed=True, checks=CHECKS)  # flags anywhere
    folder = Path(expand_path(hp.run))
    script, _, pick = hp.run.partition(":")
    if script.removesuffix(".py") in runs.RECORDED and pick in ("", "best") and files.kind(folder, "run") != "folder":
        folder = runs.latest_run(script.removesuffix(".py"), best=pick == "best")
        folder = Path(os.path.relpath(folder)) if not os.path.relpath(folder).startswith("..") else folder
    out = Path(hp.out) if hp.out else None  # None: a new predictions.png in the run folder, beside the model
    paths = None if hp.test else input_images(hp.images, out or folder / "predictions.png")
    run = load(folder, common.pick_device(hp.device), hp.precision)
    print(shown(f"run: {folder} ({about(run)})"), flush=True)  # a shared record's words cannot drive the terminal
    if hp.test:
        subset = run.settings.subset
        _, _, x_test, y_test = common.take_subset(subset, *common.load_fashion_mnist(hp.data_dir or None))
        logits = run.logits(x_test).cpu()
        accuracy = (logits.argmax(1) == y_test).float().mean().item()
        images = f"the first {len(y_test):,} test images (as the run's --subset)" if subset else "the test set"
        if run.final is None:
            recorded = "the run recorded none: it did not end"
        else:
            recorded = f"recorded in the run: {run.final['test_acc']:.2%}"
            recorded += "" if run.final_weights else ", with its final weights, which were not saved"
        print(f"test accuracy on {images}: {accuracy:.2%} ({recorded})")
        order = (logits.argmax(1) == y_test).int().argsort(stable=True)  # the mistakes first: they are what teaches
        names = [f"test image {i}" for i in order.tolist()]
        probabilities = logits.softmax(1)[order]
        figure(out or folder, names, x_test[order], probabilities, y_test[order].tolist(), [None] * len(names), hp)
        return accuracy
    good, images, warnings = load_images(paths, hp.raw)
    probabilities = run.logits(images).softmax(1).cpu() if good else None
    for path, p, warning in zip(good, probabilities if good else [], warnings, strict=True):
        top = p.argsort(descending=True)[:3].tolist()
        print(f"{shown(path)}: " + ", ".join(f"{common.CLASSES[k]} {100 * p[k]:.0f}%" for k in top), flush=True)
        if warning:  # right below its answer: the model answers with one of its ten classes whatever it is shown
            print(f"{shown(path)}: warning: {warning}", file=sys.stderr, flush=True)
    if good:
        figure(out or folder, good, images, probabilities, [named_class(path) for path in good], warnings, hp)
    if len(good) < len(paths):
        raise common.UserError(f"{len(paths) - len(good)} of {len(paths)} images could not be used (named above)")
    return probabilities


# Settings that say where files went, or (EPOCHS) are said otherwise: not what a run's description needs.
NOT_DESCRIBED = ("EPOCHS", "DATA_DIR", "OUT_DIR", "CACHE_DIR", "SHOW")


def about(run):
    """The run in a few words: its epochs, the settings that differ from its script's defaults, its test accuracy."""
    script, hparams = importlib.import_module(run.script), run.record["hparams"]
    done, planned = len(run.record["history"]), hparams.get("EPOCHS")
    words = f"{done} epoch" + "s" * (planned != 1)
    words = f"{done} of {planned} epochs, {run.record.get('status')}" if done != planned else words
    differ = [
        f"{k.lower()}={v}"
        for k, v in hparams.items()
        if k not in NOT_DESCRIBED and hasattr(script, k) and v != getattr(script, k)
    ]
    words += f"; {' '.join(differ)}, not {run.script}.py's defaults" if differ else f"; {run.script}.py's defaults"
    final = "no test accuracy: it did not end" if run.final is None else f"test accuracy {run.final['test_acc']:.2%}"
    return f"{words}; {final}"


def figure(out, names, images, probabilities, truths, warnings, hp):
    """predictions.png: the first --figure-images images; the answers printed above stand whatever happens to it.
    `out` is --out, or else the run folder, where each call adds a figure (predictions.png, predictions-2.png, ...)
    and never replaces one: its name is claimed by creating it (O_EXCL), then the figure is written over it."""
    drawn = min(len(names), hp.figure_images)
    claimed = not hp.out
    path = claim_name(out) if claimed else out
    shown_first = [x[:drawn] for x in (names, images, probabilities, truths, warnings)]
    try:
        files.write_figure(plot_predictions, path, *shown_first)
    except BaseException as error:  # a stop while it is drawn included: a figure appears whole or not at all
        if claimed:
            path.unlink(missing_ok=True)  # the empty file that claimed the name
        if not isinstance(error, common.UserError):
            raise
        raise common.UserError(f"{'' if claimed else '--out '}{shown(path)}: {error}") from None
    print(f"figure: {shown(path)}" + (f" (the first {drawn} of {len(names)} images)" if drawn < len(names) else ""))


def claim_name(folder, most=1000):
    """A new file predictions.png, else predictions-2.png, ... in `folder`, created empty: the name is then ours,
    whatever another call of predict.py does at the same moment."""
    for n in range(1, most + 1):
        path = folder / ("predictions.png" if n == 1 else f"predictions-{n}.png")
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644))
            return path
        except FileExistsError:
            continue
        except OSError as error:
            why = f"cannot write a figure in {shown(folder)} ({error.strerror}); pass --out FILE"
            raise common.UserError(why) from None
    raise common.UserError(f"{shown(folder)} holds {most} predictions figures; delete some, or pass --out FILE")


def _class_pattern(name):
    """A class name as a whole word in a file name: its words joined by one separator or none (ankle_boot,
    ankleboot), what follows a "/" optional (T-shirt/top: t-shirt), a plural allowed (sneakers, dresses)."""
    first, *rest = (r"[\W_]?".join(re.findall("[a-z]+", part)) for part in name.lower().split("/"))
    optional = "".join(r"(?:[\W_]?" + part + ")?" for part in rest)
    return re.compile(rf"(?<![a-z]){first}{optional}(?:e?s)?(?![a-z])")


CLASS_NAMES = [_class_pattern(name) for name in common.CLASSES]


def named_class(path):
    """The class a file's name names (3_Trouser.png, as the README's export names test images; t-shirt.png,
    ankleboot2.jpg, sneakers.webp), or None: none, or two different ones. Longer names are matched first, so that
    the shirt inside "t-shirt" is no Shirt."""
    stem, found, taken = Path(path).stem.lower(), set(), []
    matches = [
        (m.end() - m.start(), m.start(), m.end(), k) for k, c in enumerate(CLASS_NAMES) for m in c.finditer(stem)
    ]
    for _, start, end, k in sorted(matches, reverse=True):
        if all(end <= s or start >= e for s, e in taken):
            found.add(k)
            taken.append((start, end))
    return found.pop() if len(found) == 1 else None


if __name__ == "__main__":
    raise SystemExit(common.run_main(main))
