"""Use a trained model: what it thinks of your own images, and its accuracy on the official test set again.

    python predict.py runs/cnn-20261125-120000 my_shirt.jpg photos/     # top three classes of each image
    python predict.py runs/cnn-20261125-120000 --test                   # the run's test accuracy, recomputed

The model is rebuilt exactly from the run folder: the script and settings from metrics.json, the weights
from model.pt (loaded with weights_only=True: nothing is unpickled), the normalisation the run trained with,
and the same test-time augmentation as the run's test evaluation. Photos are prepared the way Fashion-MNIST
itself was made (Xiao et al. 2017, section 2): grey, the background trimmed, the longest edge resized to
28 px, centred on a 28x28 canvas, and inverted when the background is light, so the item is light on black.
predictions.png shows, for each image, the 28x28 input the model saw beside its ten class probabilities.
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

import ann
import cnn
import common
import resnet_transfer

# --- Settings: each one is also a flag (OUT -> --out).
OUT = "predictions.png"  # the figure: each input as the model saw it, beside its ten class probabilities
FIGURE_IMAGES = 16  # the figure shows the first N images: more rows than about 16 are too small to read
RAW = False  # the images are already 28x28 Fashion-MNIST style (light item on black): use them as they are
TEST = False  # instead of images, evaluate the model on the official test set and print its accuracy
DEVICE = "auto"  # auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps
DATA_DIR = ""  # folder with the Fashion-MNIST files, for --test ("" = as the training scripts search)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}
MODELS = {
    "ann": lambda hp: ann.ANN(hp.dropout),
    "cnn": lambda hp: cnn.CNN(hp.fc_width, hp.dropout),
    "resnet_transfer": lambda hp: resnet_transfer.Head(resnet_transfer.FEATURES[hp.backbone], hp.dropout),
}


def prepare_photo(image):
    """A photo (PIL, any size) as a 28x28 uint8 array in Fashion-MNIST's style: light item on black."""
    grey = np.asarray(image.convert("L"), dtype=np.float32)
    border = np.concatenate([grey[0], grey[-1], grey[:, 0], grey[:, -1]])
    background = float(np.median(border))
    item = np.abs(grey - background) > 0.05 * 255  # the paper trims what is within 5% of the corners' colour
    rows, cols = np.flatnonzero(item.any(1)), np.flatnonzero(item.any(0))
    if len(rows):
        grey = grey[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    height, width = grey.shape
    scale = 28 / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    small = np.asarray(Image.fromarray(grey).resize(size, Image.Resampling.LANCZOS), dtype=np.float32)
    canvas = np.full((28, 28), background, dtype=np.float32)
    top, left = (28 - size[1]) // 2, (28 - size[0]) // 2
    canvas[top : top + size[1], left : left + size[0]] = small
    # How far each pixel is from the background, less the 5% that counts as background: light on black.
    distance = np.clip(np.abs(canvas - background) - 0.05 * 255, 0, None)
    return (255 * distance / max(distance.max(), 1)).round().clip(0, 255).astype(np.uint8)


def image_paths(arguments):
    """The image files named, and those inside the folders named, sorted within each folder."""
    paths = []
    for argument in map(Path, arguments):
        if argument.is_dir():
            paths += sorted(p for p in argument.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        else:
            paths.append(argument)
    return paths


def load_images(paths, raw):
    """(paths, uint8 images (N, 1, 28, 28)) of those that could be read; the others are named on stderr."""
    good, images = [], []
    for path in paths:
        try:
            with Image.open(path) as image:
                image.load()
                image = ImageOps.exif_transpose(image)  # phone photos: upright as their camera meant them
                if raw and image.size != (28, 28):
                    raise ValueError(f"is {image.size[0]}x{image.size[1]}, but --raw needs 28x28")
                array = np.asarray(image.convert("L")) if raw else prepare_photo(image)
        except FileNotFoundError:
            print(f"{path}: no such file", file=sys.stderr)
        except UnidentifiedImageError:
            print(f"{path}: not an image Pillow can read (PNG, JPEG, BMP, WebP, ...)", file=sys.stderr)
        except Image.DecompressionBombError:
            print(
                f"{path}: too many pixels to be a photo worth opening (Pillow's decompression-bomb limit)",
                file=sys.stderr,
            )
        except (OSError, ValueError) as error:  # a truncated file is an OSError
            print(f"{path}: cannot be used ({error})", file=sys.stderr)
        else:
            good.append(path)
            images.append(torch.from_numpy(array.copy()))
    return good, torch.stack(images).unsqueeze(1) if images else torch.zeros(0, 1, 28, 28, dtype=torch.uint8)


def load_run(run_dir):
    """(record, settings) of a completed run, or a UserError saying what is wrong with the folder."""
    try:
        record = json.loads((run_dir / "metrics.json").read_text())
    except FileNotFoundError:
        raise common.UserError(f"{run_dir}: no metrics.json; pass a run folder (runs/<script>-<date>)") from None
    except (OSError, ValueError) as error:
        raise common.UserError(f"{run_dir}/metrics.json is unreadable ({type(error).__name__})") from None
    if (
        not isinstance(record, dict)
        or record.get("script") not in MODELS
        or not isinstance(record.get("hparams"), dict)
    ):
        raise common.UserError(
            f"{run_dir}/metrics.json is not the record of a run of ann.py, cnn.py or resnet_transfer.py"
        )
    if record.get("status") != "completed":
        raise common.UserError(f"{run_dir}: the run's status is {record.get('status')!r}, not 'completed'")
    final, norm = record.get("final"), record.get("normalization")
    if not isinstance(final, dict) or not isinstance(final.get("test_acc"), (int, float)):
        raise common.UserError(f"{run_dir}/metrics.json has no final test accuracy: the record is damaged")
    if record["script"] != "resnet_transfer" and not (
        isinstance(norm, dict) and all(isinstance(norm.get(k), (int, float)) for k in ("mean", "std"))
    ):
        raise common.UserError(f"{run_dir}: made before runs recorded their normalisation (or damaged); train it again")
    return record, argparse.Namespace(**{name.lower(): value for name, value in record["hparams"].items()})


def build_model(run_dir, record, hp, device):
    """A function from uint8 images (N, 1, 28, 28) to logits: the run's model with its weights, and the
    preparation its inputs had (normalisation, or the frozen backbone of a transfer run), computed in the
    precision the run trained in."""
    amp = common.autocast(device, record.get("precision", "fp32"))
    state = common.load_weights_file(run_dir / "model.pt", f"{run_dir}: model.pt")
    try:
        model = MODELS[record["script"]](hp)
    except (AttributeError, KeyError, TypeError) as error:
        raise common.UserError(f"{run_dir}/metrics.json: its settings are incomplete or damaged ({error})") from None
    if record["script"] != "resnet_transfer":
        model = with_weights(model, state, run_dir, record["script"], device)
        mean, std = record["normalization"]["mean"], record["normalization"]["std"]
        tta = (hp.tta_flip, getattr(hp, "tta_shift", 0))
        return lambda x: common.predict(model, (x.float() - mean) / std, amp, *tta)
    torch.manual_seed(hp.seed)  # a random backbone (--weights none) is rebuilt from the run's seed
    backbone, weights_id, image_mean, image_std = resnet_transfer.load_backbone(hp.backbone, hp.weights, hp.seed)
    if weights_id != record.get("weights"):
        raise common.UserError(f"{run_dir}: the backbone weights now at {hp.weights} are not the ones the run used")
    preprocess = resnet_transfer.Preprocess(hp.image_size, image_mean, image_std)
    if hp.finetune:  # model.pt holds the whole fine-tuned model: backbone (with its trained layer4) and head
        finetuned = resnet_transfer.FineTuned(preprocess, backbone, model)
        finetuned = with_weights(finetuned, state, run_dir, "resnet_transfer.py --finetune", device)
        return lambda x: common.predict(finetuned, x, amp)
    head = with_weights(model, state, run_dir, "resnet_transfer.py head", device)
    backbone = backbone.to(device, memory_format=torch.channels_last)
    preprocess = preprocess.to(device)
    extract = resnet_transfer.extract_features
    return lambda x: common.predict(head, extract(preprocess, backbone, x, device, amp, 256), amp)


def with_weights(model, state, run_dir, name, device):
    """The model with the run's weights, on the device and in eval mode; other weights are refused in one line."""
    common.check_state_dict(state, model, f"{run_dir}/model.pt", name)
    model.load_state_dict(state)
    return model.to(device, memory_format=torch.channels_last).eval()


def plot_predictions(paths, images, probabilities, path):
    """For each image: the 28x28 input the model saw, and a bar chart of the ten class probabilities."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 2.2 * len(paths)), dpi=100)
    for i, (name, image, p) in enumerate(zip(paths, images, probabilities, strict=True)):
        ax = fig.add_subplot(len(paths), 2, 2 * i + 1)
        ax.imshow(image[0].numpy(), cmap="gray", vmin=0, vmax=255)
        ax.set_title(Path(name).name, fontsize=9)
        ax.axis("off")
        ax = fig.add_subplot(len(paths), 2, 2 * i + 2)
        ax.barh(range(10), 100 * p.numpy(), color=["tab:blue" if k != p.argmax() else "tab:orange" for k in range(10)])
        ax.set_yticks(range(10), common.CLASSES, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlim(0, 100)
        ax.set_xlabel("probability (%)", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)


def main(argv=None):
    positionals = [
        ("run_dir", {"type": common.expand_path, "help": "a run folder of ann.py, cnn.py or resnet_transfer.py"}),
        ("images", {"nargs": "*", "help": "image files (PNG, JPEG, BMP, WebP) or folders of them"}),
    ]
    hp = common.parse_hparams(globals(), argv, positionals)
    record, run_hp = load_run(Path(hp.run_dir))
    device = common.resolve_device(hp.device)
    model = build_model(Path(hp.run_dir), record, run_hp, device)
    if hp.test:
        _, _, x_test, y_test = common.take_subset(run_hp.subset, *common.load_fashion_mnist(hp.data_dir or None))
        accuracy = (model(x_test.to(device)).argmax(1).cpu() == y_test).float().mean().item()
        images = f"the first {len(y_test):,} test images (as the run's --subset)" if run_hp.subset else "the test set"
        print(f"test accuracy on {images}: {accuracy:.2%} (recorded in the run: {record['final']['test_acc']:.2%})")
        return accuracy
    if not hp.images:
        raise common.UserError("no images given: python predict.py RUN_DIR IMAGE... (files or folders), or --test")
    paths = image_paths(hp.images)
    if not paths:
        raise common.UserError(f"no PNG, JPEG, BMP or WebP files in {' '.join(hp.images)}")
    good, images = load_images(paths, hp.raw)
    probabilities = model(images.to(device)).softmax(1).cpu() if good else None
    for path, p in zip(good, probabilities if good else [], strict=True):
        top = p.argsort(descending=True)[:3].tolist()
        print(f"{path}: " + ", ".join(f"{common.CLASSES[k]} {100 * p[k]:.0f}%" for k in top))
    if good:
        shown = min(len(good), hp.figure_images)
        try:
            plot_predictions(good[:shown], images[:shown], probabilities[:shown], Path(hp.out))
        except OSError as error:
            raise common.UserError(f"--out {hp.out}: cannot write the figure ({error.strerror})") from None
        print(f"figure: {hp.out}" + (f" (the first {shown} of {len(good)} images)" if shown < len(good) else ""))
    if len(good) < len(paths):
        raise common.UserError(f"{len(paths) - len(good)} of {len(paths)} images could not be used (named above)")
    return probabilities


if __name__ == "__main__":
    raise SystemExit(common.run_main(main))
