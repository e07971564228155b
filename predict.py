"""Use a trained model: what it thinks of your own images, and its accuracy on the official test set again.

    python predict.py runs/cnn-20261125-120000 my_shirt.jpg photos/     # top three classes of each image
    python predict.py runs/cnn-20261125-120000 --test                   # the run's test accuracy, recomputed

The model is rebuilt exactly from the run folder: the script and settings from metrics.json, the weights
from model.pt (loaded with weights_only=True: nothing is unpickled), the normalisation the run trained with,
and the same test-time augmentation and precision as the run's test evaluation. Photos are prepared the way
Fashion-MNIST itself was made (plumbing/photos.py): grey, the background subtracted and trimmed, the longest edge
resized to 28 px, centred on a 28x28 canvas, light item on black. Every image gets one of the ten classes: one
with nothing to classify (blank, a speck, an item cut off at every edge) gets a warning beside its answer.
predictions.png (in the run folder unless --out says otherwise) shows, for each image, the 28x28 input the model
saw beside its ten class probabilities.
"""

import os
import sys
from pathlib import Path

import common
import plumbing
from plumbing import photos, reading
from plumbing.photos import shown

import numpy as np
import torch

import ann
import cnn
import resnet_transfer

# --- Settings: each one is also a flag (OUT -> --out).
OUT = ""  # the figure: a .png, .pdf or .svg file ("" = predictions.png in the run folder)
FIGURE_IMAGES = 16  # the figure shows the first N images: more rows than about 16 are too small to read
RAW = False  # the images are already 28x28 Fashion-MNIST style (light item on black): use them as they are
TEST = False  # instead of images, evaluate the model on the official test set and print its accuracy
DEVICE = "auto"  # auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps
PRECISION = ""  # "" = the one the run was evaluated in (its --test then gives its digits), or auto, bf16, fp16, fp32
DATA_DIR = ""  # folder with the Fashion-MNIST files, for --test ("" = as the training scripts search)

# What each setting above allows, checked as the flags are (DEVICE and DATA_DIR as in the training scripts).
CHECKS = {
    "OUT": (
        plumbing.expand_path,
        lambda v: v == "" or Path(v).suffix.lower() in (".png", ".pdf", ".svg"),
        "a .png, .pdf or .svg file",
    ),
    "FIGURE_IMAGES": (int, lambda v: v >= 1, "an integer >= 1"),
    "PRECISION": (str, lambda v: v in ("", "auto", "bf16", "fp16", "fp32"), "auto, bf16, fp16, fp32 or empty"),
}

MODELS = {
    "ann": lambda hp: ann.ANN(hp.dropout),
    "cnn": lambda hp: cnn.CNN(hp.fc_width, hp.dropout),
    "resnet_transfer": lambda hp: resnet_transfer.Head(resnet_transfer.FEATURES[hp.backbone], hp.dropout),
}
# The settings of each script's record that rebuilding its model reads ("?": runs from before it may lack it).
RECORDED = {
    "ann": ("DROPOUT", "TTA_FLIP", "SUBSET"),
    "cnn": ("DROPOUT", "FC_WIDTH", "TTA_FLIP", "TTA_SHIFT?", "SUBSET"),
    "resnet_transfer": ("BACKBONE", "WEIGHTS", "IMAGE_SIZE", "FINETUNE", "DROPOUT", "BATCH_SIZE", "EXTRACT_BATCH"),
}
RECORDED["resnet_transfer"] += ("SEED", "SUBSET")
# A record holds the image size that ran, never "auto".
RECORD_CHECKS = {"IMAGE_SIZE": (int, lambda v: 32 <= v <= 512, "an integer in [32, 512]")}


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
        array, warning = (photos.grey_levels(image).round().astype(np.uint8), None) if raw else photos.prepare(image)
        good.append(path)
        images.append(torch.from_numpy(array))
        warnings.append(warning)
    images = torch.stack(images).unsqueeze(1) if images else torch.zeros(0, 1, 28, 28, dtype=torch.uint8)
    return good, images, warnings


def load_run(run_dir):
    """The run in run_dir, read back and checked (plumbing/reading.py), or a UserError saying what is wrong."""
    return reading.load_run(run_dir, RECORDED, RECORD_CHECKS)


def build_model(run, device, precision=""):
    """A function from uint8 images (N, 1, 28, 28) to logits: the run's model with its weights, and the
    preparation its inputs had (normalisation, or the frozen backbone of a transfer run), computed in `precision`
    ("": the one the run was evaluated in). Outputs that are not numbers are refused in one line."""
    amp = common.autocast(device, common.pick_precision(precision or run.precision, device))
    hp, run_dir = run.settings, run.folder
    with torch.device("meta"):  # shapes without memory: model.pt is checked against them before anything is loaded
        model = MODELS[run.script](hp)
    if run.script != "resnet_transfer":
        norm = reading.check_normalization(run)
        model = reading.load_weights(model, run, run.script, device)
        tta = (hp.tta_flip, getattr(hp, "tta_shift", 0))
        return lambda x: finite(common.predict(model, (x.float() - norm["mean"]) / norm["std"], amp, *tta), run_dir)
    torch.manual_seed(hp.seed)  # a random backbone (--weights none) is rebuilt from the run's seed
    backbone, weights_id, image_mean, image_std = resnet_transfer.load_backbone(hp.backbone, hp.weights, hp.seed)
    if weights_id != run.record.get("weights"):
        raise plumbing.UserError(f"{run_dir}: the backbone weights now at {hp.weights} are not the ones the run used")
    preprocess = resnet_transfer.Preprocess(hp.image_size, image_mean, image_std)
    if hp.finetune:  # model.pt holds the whole fine-tuned model: backbone (with its trained layer4) and head
        finetuned = resnet_transfer.FineTuned(preprocess, backbone, model)
        finetuned = reading.load_weights(finetuned, run, "resnet_transfer.py --finetune", device)
        return lambda x: finite(common.predict(finetuned, x, amp, chunk=hp.batch_size), run_dir)  # training's memory
    head = reading.load_weights(model, run, "resnet_transfer.py head", device)
    backbone = backbone.to(device, memory_format=torch.channels_last)
    preprocess = preprocess.to(device)
    extract = resnet_transfer.extract_features
    features = lambda x: extract(preprocess, backbone, x, device, amp, hp.extract_batch)
    return lambda x: finite(common.predict(head, features(x), amp, chunk=hp.batch_size), run_dir)


def finite(logits, run_dir):
    """The logits, unless some are NaN or infinite: then no answer is better than a made-up one."""
    if not torch.isfinite(logits).all():
        raise plumbing.UserError(
            f"{run_dir}: the model's outputs are NaN or infinite; its model.pt or the normalisation in its "
            "metrics.json is damaged: train it again"
        )
    return logits


def plot_predictions(paths, images, probabilities):
    """For each image: the 28x28 input the model saw, and a bar chart of the ten class probabilities."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 2.2 * len(paths)), dpi=100)
    for i, (name, image, p) in enumerate(zip(paths, images, probabilities, strict=True)):
        ax = fig.add_subplot(len(paths), 2, 2 * i + 1)
        # Light on black over the full 0-255 range: as the model sees it, and as the run's misclassified.png shows.
        ax.imshow(image[0].numpy(), cmap="gray", vmin=0, vmax=255)
        ax.set_title(shown(Path(name).name), fontsize=9, parse_math=False)  # "$" in a name is no formula
        ax.axis("off")
        ax = fig.add_subplot(len(paths), 2, 2 * i + 2)
        ax.barh(range(10), 100 * p.numpy(), color=["tab:blue" if k != p.argmax() else "tab:orange" for k in range(10)])
        ax.set_yticks(range(10), common.CLASSES, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlim(0, 100)
        ax.set_xlabel("probability (%)", fontsize=8)
    fig.tight_layout()
    return fig


def input_images(names, out):
    """The image files named and in the folders named, checked before any work: there are some, and --out (the
    figure) is none of them."""
    if not names:
        raise plumbing.UserError("no images given: python predict.py RUN_DIR IMAGE... (files or folders), or --test")
    paths, skipped = photos.image_paths(names)
    for line in skipped:
        print(line, file=sys.stderr)
    if not paths:
        raise plumbing.UserError(f"no PNG, JPEG, BMP or WebP files in {' '.join(map(shown, names))}")
    if any(same_file(out, path) for path in paths):
        raise plumbing.UserError(f"--out {shown(out)} is one of the input images; the figure would overwrite it")
    return paths


def same_file(a, b):
    """Whether two paths name one file: the same path once resolved, or the same file on disk (a hard link, a
    case-insensitive disk)."""
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # either does not exist (yet)
        return False


def main(argv=None):
    positionals = [
        ("run_dir", {"type": plumbing.expand_path, "help": "a run folder of ann.py, cnn.py or resnet_transfer.py"}),
        ("images", {"nargs": "*", "help": "image files (PNG, JPEG, BMP, WebP) or folders of them"}),
    ]
    hp = common.parse_hparams(globals(), argv, positionals, intermixed=True, checks=CHECKS)  # flags anywhere
    run = load_run(Path(hp.run_dir))
    out = Path(hp.out or run.folder / "predictions.png")  # beside the model, out of the way of the photos
    paths = None if hp.test else input_images(hp.images, out)
    device = common.pick_device(hp.device)
    model = build_model(run, device, hp.precision)
    if hp.test:
        subset = run.settings.subset
        _, _, x_test, y_test = common.take_subset(subset, *common.load_fashion_mnist(hp.data_dir or None))
        accuracy = (model(x_test.to(device)).argmax(1).cpu() == y_test).float().mean().item()
        images = f"the first {len(y_test):,} test images (as the run's --subset)" if subset else "the test set"
        if run.final is None:
            recorded = "the run recorded none: it did not end"
        else:
            recorded = f"recorded in the run: {run.final['test_acc']:.2%}"
            recorded += "" if run.final_weights else ", with its final weights, which were not saved"
        print(f"test accuracy on {images}: {accuracy:.2%} ({recorded})")
        return accuracy
    good, images, warnings = load_images(paths, hp.raw)
    probabilities = model(images.to(device)).softmax(1).cpu() if good else None
    for path, p, warning in zip(good, probabilities if good else [], warnings, strict=True):
        top = p.argsort(descending=True)[:3].tolist()
        print(f"{shown(path)}: " + ", ".join(f"{common.CLASSES[k]} {100 * p[k]:.0f}%" for k in top), flush=True)
        if warning:  # right below its answer: the model answers with one of its ten classes whatever it is shown
            print(f"{shown(path)}: warning: {warning}", file=sys.stderr, flush=True)
    if good:
        drawn = min(len(good), hp.figure_images)
        try:
            common.draw(plot_predictions, out, good[:drawn], images[:drawn], probabilities[:drawn])
        except plumbing.UserError as error:  # the answers above stand
            raise plumbing.UserError(f"--out {shown(out)}: {error}") from None
        print(f"figure: {shown(out)}" + (f" (the first {drawn} of {len(good)} images)" if drawn < len(good) else ""))
    if len(good) < len(paths):
        raise plumbing.UserError(f"{len(paths) - len(good)} of {len(paths)} images could not be used (named above)")
    return probabilities


if __name__ == "__main__":
    raise SystemExit(common.run_main(main))
