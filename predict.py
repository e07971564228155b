"""Use a trained model: what it thinks of your own images, and its accuracy on the official test set again.

    python predict.py runs/cnn-20261125-120000 my_shirt.jpg photos/     # top three classes of each image
    python predict.py runs/cnn-20261125-120000 --test                   # the run's test accuracy, recomputed

The model is rebuilt exactly from the run folder: the script and settings from metrics.json, the weights
from model.pt (loaded with weights_only=True: nothing is unpickled), the normalisation the run trained with,
and the same test-time augmentation as the run's test evaluation. Photos are prepared the way Fashion-MNIST
itself was made (Xiao et al. 2017, section 2): grey, the background (estimated from the border, uneven lighting
included) subtracted and trimmed, the longest edge resized to 28 px, centred on a 28x28 canvas, light item on
black. Every image gets one of the ten classes: one with nothing to classify (blank, a speck, an item cut off at
every edge) gets a warning on stderr beside its answer.
predictions.png (in the run folder unless --out says otherwise) shows, for each image, the 28x28 input the model
saw beside its ten class probabilities.
"""

import math
import os
import stat
import struct
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

import ann
import cnn
import common
import resnet_transfer

# --- Settings: each one is also a flag (OUT -> --out).
OUT = ""  # the figure: a .png, .pdf or .svg file ("" = predictions.png in the run folder)
FIGURE_IMAGES = 16  # the figure shows the first N images: more rows than about 16 are too small to read
RAW = False  # the images are already 28x28 Fashion-MNIST style (light item on black): use them as they are
TEST = False  # instead of images, evaluate the model on the official test set and print its accuracy
DEVICE = "auto"  # auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps
DATA_DIR = ""  # folder with the Fashion-MNIST files, for --test ("" = as the training scripts search)

# What each setting above allows, checked as the flags are (DEVICE and DATA_DIR as in the training scripts).
CHECKS = {
    "OUT": (
        common.expand_path,
        lambda v: v == "" or Path(v).suffix.lower() in (".png", ".pdf", ".svg"),
        "a .png, .pdf or .svg file",
    ),
    "FIGURE_IMAGES": (int, lambda v: v >= 1, "an integer >= 1"),
}

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}
# Pillow picks its reader from a file's content, not its name: a PostScript file named shirt.png would go to
# Ghostscript. Only these readers are ever used.
FORMATS = ["PNG", "JPEG", "BMP", "WEBP"]
# What Pillow's readers raise on a damaged file besides OSError: a broken PNG chunk is a SyntaxError, an
# unsupported variant a NotImplementedError, a cut header struct.error, IndexError, TypeError or ValueError.
READ_ERRORS = (OSError, EOFError, SyntaxError, NotImplementedError, struct.error, IndexError, TypeError, ValueError)
MODELS = {
    "ann": lambda hp: ann.ANN(hp.dropout),
    "cnn": lambda hp: cnn.CNN(hp.fc_width, hp.dropout),
    "resnet_transfer": lambda hp: resnet_transfer.Head(resnet_transfer.FEATURES[hp.backbone], hp.dropout),
}
# The settings of each script's record that rebuilding its model reads (PRECISION: the one the run computed in).
RECORDED = {
    "ann": ("DROPOUT", "TTA_FLIP", "SUBSET", "PRECISION"),
    "cnn": ("DROPOUT", "FC_WIDTH", "TTA_FLIP", "SUBSET", "PRECISION"),
    "resnet_transfer": (
        "BACKBONE",
        "WEIGHTS",
        "IMAGE_SIZE",
        "FINETUNE",
        "DROPOUT",
        "BATCH_SIZE",
        "EXTRACT_BATCH",
        "SEED",
        "SUBSET",
        "PRECISION",
    ),
}
OPTIONAL = ("TTA_SHIFT",)  # ann.py has none, and cnn.py runs from before it had one evaluated without it


def shown(path):
    """A file name as it can be printed and drawn: bytes that are not UTF-8 as \\xff, other characters that
    cannot be shown (a newline, say) escaped too, so that every message stays one line."""
    text = os.fsencode(path).decode("utf-8", "backslashreplace")
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def grey_levels(image):
    """The image's grey levels, float32 in 0-255. convert("L") would clip deeper images at 255 and lose the
    item: 16-bit ones are scaled (65535 -> 255); 32-bit integer and float ones are read as 8-bit levels if they
    fit 0-255, as 16-bit ones (how older Pillows open 16-bit PNGs) if they fit 0-65535, else by their own range."""
    if image.mode.startswith("I;16"):
        return np.asarray(image, dtype=np.float32) / 257
    if image.mode not in ("I", "F"):
        return np.asarray(image.convert("L"), dtype=np.float32)
    values = np.nan_to_num(np.asarray(image, dtype=np.float64))
    low, high = float(values.min()), float(values.max())
    if low >= 0 and high <= 65535:
        return (values if high <= 255 else values / 257).astype(np.float32)
    return ((values - low) * (255 / max(high - low, 1))).astype(np.float32)


def background(small, where):
    """(the background's level at each pixel of small, the sigma of its noise), from the pixels where `where` is
    true. Lighting is uneven (a gradient, a lamp's pool of light): the level is a cubic surface fitted to those
    pixels, refitted without those it fits worst (the item, where it reaches them), plus the local mean of what the
    surface misses (lighting no cubic follows) over a window a quarter of the photo wide."""
    height, width = small.shape
    v, u = np.mgrid[0:height, 0:width]
    u, v = (u + 0.5) / width, (v + 0.5) / height
    terms = np.stack([u**i * v**j for i in range(4) for j in range(4 - i)], axis=-1)  # 1, v, v², v³, u, uv, ...
    level, keep = np.median(small[where]), where  # first one level, the median: the item cannot pull it far
    for _ in range(3):
        residuals = np.abs(small - level)
        noise = 1.4826 * float(np.median(residuals[keep]))  # the median absolute residual, as a sigma
        keep = where & (residuals <= max(3 * noise, 1))
        chosen = terms[keep]  # least squares by the normal equations: quicker than lstsq on thousands of rows
        level = terms @ np.linalg.lstsq(chosen.T @ chosen, chosen.T @ small[keep], rcond=None)[0]
    noise = 1.4826 * float(np.median(np.abs(small - level)[keep]))
    radius = max(height, width) // 8
    # Shrunk towards 0 where the window holds little background: deep inside a large item.
    missed = window_sum((small - level) * keep, radius) / (window_sum(keep, radius) + 2 * radius + 1)
    return (level + missed).astype(np.float32), noise


def window_sum(array, radius):
    """The sum of each pixel's (2 radius + 1)² neighbourhood (cut off at the edges), from cumulative sums."""
    height, width = array.shape
    total = np.pad(array.astype(np.float64), ((1, 0), (1, 0))).cumsum(0).cumsum(1)
    top, bottom = np.clip(np.arange(height) - radius, 0, height), np.clip(np.arange(height) + radius + 1, 0, height)
    left, right = np.clip(np.arange(width) - radius, 0, width), np.clip(np.arange(width) + radius + 1, 0, width)
    return total[bottom][:, right] - total[top][:, right] - total[bottom][:, left] + total[top][:, left]


def spread(array):
    """Each pixel's largest value among itself and its eight neighbours."""
    height, width = array.shape
    padded = np.pad(array, 1)
    return np.max([padded[i : i + height, j : j + width] for i in range(3) for j in range(3)], axis=0)


def largest_parts(mask):
    """mask without its specks: its 8-connected components of under 4 pixels or a twentieth of the largest one.
    Components are found with numpy alone: each pixel is labelled with its own number, then takes the largest
    label among its neighbours' until none changes."""
    labels = np.where(mask, np.arange(1, mask.size + 1).reshape(mask.shape), 0)
    while not np.array_equal(labels, grown := spread(labels) * mask):
        labels = np.where(mask, grown.ravel()[grown - 1], 0)  # and the label that label's pixel has: far quicker
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return np.isin(labels, np.flatnonzero(sizes >= max(4, sizes.max() / 20))) & mask


def find_item(grey):
    """(grey less its background, the item's box (top, bottom, left, right) in grey's pixels, or None when nothing
    stands out from the background). The item is looked for in a copy of at most 128 px a side: averaging blocks
    of pixels averages the sensor's noise away, and makes the search quick on a 12-megapixel photo."""
    factor = max(1, math.ceil(max(grey.shape) / 128))
    size = (max(1, grey.shape[1] // factor), max(1, grey.shape[0] // factor))  # each pixel the mean of as many
    small = np.asarray(Image.fromarray(grey).resize(size, Image.Resampling.BOX), dtype=np.float32)
    height, width = small.shape
    v, u = np.mgrid[0:height, 0:width]
    where = (np.minimum(v, height - 1 - v) < 2) | (np.minimum(u, width - 1 - u) < 2)  # first, the border
    for _ in range(2):  # then all that is not the item, for lighting that the border alone does not show
        level, noise = background(small, where)
        # The item: what differs from the background by more than 5% of 255 (the paper's trim), or by more
        # than the noise measured on the background would (4 sigma), where the photo is noisier than that.
        item = largest_parts(np.abs(small - level) > max(0.05 * 255, 4 * noise))
        where = ~spread(spread(item))  # the item's edge, blurred by the averaging, is no background either
        if where.sum() < 100:  # too little background left to fit
            break
    level = np.asarray(Image.fromarray(level).resize(grey.shape[::-1], Image.Resampling.BILINEAR))
    rows, cols = np.flatnonzero(item.any(1)), np.flatnonzero(item.any(0))
    if not len(rows):
        return grey - level, None
    down, across = grey.shape[0] / small.shape[0], grey.shape[1] / small.shape[1]  # the small pixels' size
    box = round(rows[0] * down), round((rows[-1] + 1) * down), round(cols[0] * across), round((cols[-1] + 1) * across)
    return grey - level, tuple(map(int, box))


def photo_problem(image):
    """Why the model's answer for a photo (PIL, or its grey levels as an array) may mean nothing, in a few words,
    or None: nothing stands out from the background, the item is a speck, or it reaches all four edges."""
    grey = image if isinstance(image, np.ndarray) else grey_levels(image)
    _, box = find_item(grey)
    if box is None:
        return "the image is blank or of one colour: there is no item to classify"
    top, bottom, left, right = box
    height, width = grey.shape
    if max(bottom - top, right - left) < max(height, width) / 10:
        return f"the item found is tiny ({right - left}x{bottom - top} px of {width}x{height}): crop the photo to it"
    if (top, left, bottom, right) == (0, 0, height, width):
        return "the item reaches all four edges: it may be cut off (leave some background around it)"
    return None


def prepare_photo(image):
    """A photo (PIL, any size) as a 28x28 uint8 array in Fashion-MNIST's style: light item on black. Its background
    is subtracted (uneven lighting with it), the item's box cut out, its longest edge resized to 28 px, centred."""
    difference, box = find_item(grey_levels(image))
    if box:
        top, bottom, left, right = box
        difference = difference[top:bottom, left:right]
    height, width = difference.shape
    scale = 28 / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    crop = Image.fromarray(difference)
    small = np.asarray(crop.resize(size, Image.Resampling.LANCZOS), dtype=np.float32)
    canvas = np.zeros((28, 28), dtype=np.float32)  # the background: no difference from itself
    top, left = (28 - size[1]) // 2, (28 - size[0]) // 2
    canvas[top : top + size[1], left : left + size[0]] = small
    # How far each pixel is from the background, less the 5% that counts as background: light on black, whether
    # the item was darker than its background or lighter. The item's strongest part becomes 255, as measured on
    # a box-filtered copy: LANCZOS overshoots at an edge (the box keeps a little background around the item),
    # and that overshoot, taken as the strongest part, would dim all the rest.
    distance = np.clip(np.abs(canvas) - 0.05 * 255, 0, None)
    strongest = np.abs(np.asarray(crop.resize(size, Image.Resampling.BOX))).max() - 0.05 * 255
    return (255 * distance / max(strongest, 1)).round().clip(0, 255).astype(np.uint8)


def image_paths(arguments):
    """The image files named, and those inside the folders named, sorted within each folder."""
    paths = []
    for argument in map(Path, arguments):
        if argument.is_dir():
            try:
                paths += sorted(p for p in argument.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            except OSError as error:  # an unreadable folder
                raise common.UserError(f"{shown(argument)}: cannot list the folder ({error.strerror})") from None
        else:
            paths.append(argument)
    return paths


def read_image(path):
    """(the image in the file at path, decoded and upright, None), or (None, why the file cannot be used)."""
    try:
        # Only regular files are opened: a FIFO would block until something writes to it, a device never end.
        if not stat.S_ISREG(path.stat().st_mode):
            return None, "not a regular file (a folder, pipe or device), so not opened"
        with warnings.catch_warnings():
            # Past Pillow's warning limit (89 megapixels) a file is no photo, and decoding it takes gigabytes.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path, formats=FORMATS) as image:
                image.load()
                if 0 in image.size:
                    return None, "has no pixels"
                return ImageOps.exif_transpose(image), None  # phone photos: upright as their camera meant them
    except FileNotFoundError:
        return None, "no such file"
    except UnidentifiedImageError:
        return None, "not an image in a format read here (PNG, JPEG, BMP or WebP)"
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        return None, "too many pixels to be a photo worth opening (Pillow's decompression-bomb limit)"
    except READ_ERRORS as error:
        return None, f"cannot be used ({' '.join(str(error).split()) or type(error).__name__})"


def load_images(paths, raw):
    """(paths, uint8 images (N, 1, 28, 28)) of those that could be read; the others are named on stderr."""
    good, images = [], []
    for path in paths:
        image, problem = read_image(path)
        if image is not None and raw and image.size != (28, 28):
            problem = f"cannot be used (is {image.size[0]}x{image.size[1]}, but --raw needs 28x28)"
        if problem:
            print(f"{shown(path)}: {problem}", file=sys.stderr)
            continue
        array = grey_levels(image).round().astype(np.uint8) if raw else prepare_photo(image)
        warning = None if raw else photo_problem(image)
        if warning:  # the model still answers with one of its ten classes: say that the answer may mean nothing
            print(f"{shown(path)}: warning: {warning}", file=sys.stderr)
        good.append(path)
        images.append(torch.from_numpy(array))
    return good, torch.stack(images).unsqueeze(1) if images else torch.zeros(0, 1, 28, 28, dtype=torch.uint8)


def load_run(run_dir):
    """(record, settings) of a run with weights, or a UserError saying what is wrong with the folder. A run that
    was stopped, or is still training, has the weights of its last finished epoch: they are used, and said."""
    path = run_dir / "metrics.json"
    if not os.path.lexists(path):
        raise common.UserError(f"{run_dir}: no metrics.json; pass a run folder (runs/<script>-<date>)")
    record = common.read_record(path)
    if record.get("script") not in MODELS or not isinstance(record.get("hparams"), dict):
        raise common.UserError(f"{path} is not the record of a run of ann.py, cnn.py or resnet_transfer.py")
    status, final = record.get("status"), record.get("final")
    if status == "completed" and not (isinstance(final, dict) and isinstance(final.get("test_acc"), (int, float))):
        raise common.UserError(f"{path} has no final test accuracy: the record is damaged")
    if status != "completed":
        if not isinstance(record.get("model_pt"), str) or not (run_dir / "model.pt").exists():
            raise common.UserError(f"{run_dir}: the run's status is {status!r} and it saved no weights; train it again")
        print(f"note: the run is {status!r}, not completed; using its {record['model_pt']}", file=sys.stderr)
    if record["script"] != "resnet_transfer":
        check_normalization(run_dir, record.get("normalization"))
    # The record's settings are checked as their flags are: a damaged one would fail deep in the model's code.
    settings = {**record["hparams"], "PRECISION": record.get("precision", "fp32")}
    try:
        hp = common.check_recorded(settings, RECORDED[record["script"]], OPTIONAL)
    except common.UserError as error:
        raise common.UserError(f"{run_dir}/metrics.json: its settings are incomplete or damaged ({error})") from None
    return record, hp


def check_normalization(run_dir, norm):
    """Refuse, in one line, a recorded normalisation that is missing or that no run could have computed."""
    if not isinstance(norm, dict) or "mean" not in norm or "std" not in norm:
        raise common.UserError(f"{run_dir}: made before runs recorded their normalisation (or damaged); train it again")
    for key in ("mean", "std"):
        value = norm[key]
        if type(value) not in (int, float) or not math.isfinite(value) or key == "std" and value <= 0:
            raise common.UserError(
                f"{run_dir}/metrics.json: its normalisation is damaged (normalization.{key} = {value!r}; "
                f"it must be a finite number{' > 0' if key == 'std' else ''})"
            )


def build_model(run_dir, record, hp, device):
    """A function from uint8 images (N, 1, 28, 28) to logits: the run's model with its weights, and the
    preparation its inputs had (normalisation, or the frozen backbone of a transfer run), computed in the
    precision the run trained in. Outputs that are not numbers are refused in one line."""
    amp = common.autocast(device, hp.precision)
    with torch.device("meta"):  # shapes without memory: model.pt is checked against them before anything is loaded
        model = MODELS[record["script"]](hp)
    if record["script"] != "resnet_transfer":
        model = with_weights(model, run_dir, record["script"], device)
        mean, std = record["normalization"]["mean"], record["normalization"]["std"]
        tta = (hp.tta_flip, getattr(hp, "tta_shift", 0))
        return lambda x: finite(common.predict(model, (x.float() - mean) / std, amp, *tta), run_dir)
    torch.manual_seed(hp.seed)  # a random backbone (--weights none) is rebuilt from the run's seed
    backbone, weights_id, image_mean, image_std = resnet_transfer.load_backbone(hp.backbone, hp.weights, hp.seed)
    if weights_id != record.get("weights"):
        raise common.UserError(f"{run_dir}: the backbone weights now at {hp.weights} are not the ones the run used")
    preprocess = resnet_transfer.Preprocess(hp.image_size, image_mean, image_std)
    if hp.finetune:  # model.pt holds the whole fine-tuned model: backbone (with its trained layer4) and head
        finetuned = resnet_transfer.FineTuned(preprocess, backbone, model)
        finetuned = with_weights(finetuned, run_dir, "resnet_transfer.py --finetune", device)
        return lambda x: finite(common.predict(finetuned, x, amp, chunk=hp.batch_size), run_dir)  # training's memory
    head = with_weights(model, run_dir, "resnet_transfer.py head", device)
    backbone = backbone.to(device, memory_format=torch.channels_last)
    preprocess = preprocess.to(device)
    extract = resnet_transfer.extract_features
    features = lambda x: extract(preprocess, backbone, x, device, amp, hp.extract_batch)
    return lambda x: finite(common.predict(head, features(x), amp, chunk=hp.batch_size), run_dir)


def with_weights(model, run_dir, name, device):
    """The model with the run's weights, on the device and in eval mode; other weights are refused in one line."""
    state = common.load_tensors(run_dir / "model.pt", f"{run_dir}: model.pt", common.state_bytes(model))
    common.check_state_dict(state, model, f"{run_dir}/model.pt", name)
    model = model.to_empty(device=device)  # memory, now that the weights are known to fit
    model.load_state_dict(state)
    return model.to(memory_format=torch.channels_last).eval()


def finite(logits, run_dir):
    """The logits, unless some are NaN or infinite: then no answer is better than a made-up one."""
    if not torch.isfinite(logits).all():
        raise common.UserError(
            f"{run_dir}: the model's outputs are NaN or infinite; its model.pt or the normalisation in its "
            "metrics.json is damaged: train it again"
        )
    return logits


def plot_predictions(paths, images, probabilities, path):
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
    common.save_figure(fig, path)


def input_images(names, out):
    """The image files named and in the folders named, checked before any work: there are some, and --out (the
    figure) is none of them."""
    if not names:
        raise common.UserError("no images given: python predict.py RUN_DIR IMAGE... (files or folders), or --test")
    paths = image_paths(names)
    if not paths:
        raise common.UserError(f"no PNG, JPEG, BMP or WebP files in {' '.join(map(shown, names))}")
    if any(same_file(out, path) for path in paths):
        raise common.UserError(f"--out {shown(out)} is one of the input images; the figure would overwrite it")
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
        ("run_dir", {"type": common.expand_path, "help": "a run folder of ann.py, cnn.py or resnet_transfer.py"}),
        ("images", {"nargs": "*", "help": "image files (PNG, JPEG, BMP, WebP) or folders of them"}),
    ]
    hp = common.parse_hparams(globals(), argv, positionals, intermixed=True, checks=CHECKS)  # flags anywhere
    record, run_hp = load_run(Path(hp.run_dir))
    out = Path(hp.out or Path(hp.run_dir) / "predictions.png")  # beside the model, out of the way of the photos
    paths = None if hp.test else input_images(hp.images, out)
    device = common.pick_device(hp.device)
    model = build_model(Path(hp.run_dir), record, run_hp, device)
    if hp.test:
        _, _, x_test, y_test = common.take_subset(run_hp.subset, *common.load_fashion_mnist(hp.data_dir or None))
        accuracy = (model(x_test.to(device)).argmax(1).cpu() == y_test).float().mean().item()
        images = f"the first {len(y_test):,} test images (as the run's --subset)" if run_hp.subset else "the test set"
        final = record["final"]
        recorded = f"recorded in the run: {final['test_acc']:.2%}" if final else "the run recorded none: it did not end"
        print(f"test accuracy on {images}: {accuracy:.2%} ({recorded})")
        return accuracy
    good, images = load_images(paths, hp.raw)
    probabilities = model(images.to(device)).softmax(1).cpu() if good else None
    for path, p in zip(good, probabilities if good else [], strict=True):
        top = p.argsort(descending=True)[:3].tolist()
        print(f"{shown(path)}: " + ", ".join(f"{common.CLASSES[k]} {100 * p[k]:.0f}%" for k in top))
    if good:
        drawn = min(len(good), hp.figure_images)
        try:
            plot_predictions(good[:drawn], images[:drawn], probabilities[:drawn], out)
        except OSError as error:
            raise common.UserError(f"--out {shown(out)}: cannot write the figure ({error.strerror})") from None
        print(f"figure: {shown(out)}" + (f" (the first {drawn} of {len(good)} images)" if drawn < len(good) else ""))
    if len(good) < len(paths):
        raise common.UserError(f"{len(paths) - len(good)} of {len(paths)} images could not be used (named above)")
    return probabilities


if __name__ == "__main__":
    raise SystemExit(common.run_main(main))
