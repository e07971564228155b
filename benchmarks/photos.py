"""Photos as phones take them: test items rendered as photos in several conditions, through predict.py's preparation.

Each of the first N test images is rendered as a photo would show it (a dark item on a light background,
upscaled, off centre) in each condition below: sensor noise, uneven lighting, a soft shadow, JPEG, far off
centre, mirrored, and combined. Each photo is prepared as predict.py prepares one and classified by a run's
model, rebuilt as predict.py rebuilds it. Per condition: the share of photos that get the class the original
28x28 image gets (agreement), the share that get the right class (accuracy), and the share that predict.py
warns about (photo_problem: blank, a tiny item, one cut off), which should be none. The last condition,
"varied", draws every setting at random per image, with a generator and a lighting model of its own (a smooth
random field, not the gradients above), so that the preparation is not judged only on the renderer it was
written for.

    python benchmarks/photos.py --run runs/cnn-20261128-104745               # 500 images per condition
    python benchmarks/photos.py --run runs/cnn-20261128-104745 --images 100  # quicker

Writes photos.json and photos.md into benchmarks/latest/ (or --results DIR).
"""

import argparse
import io
import json
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import common  # noqa: E402
import plumbing  # noqa: E402
from plumbing.photos import photo_problem, prepare_photo  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from accuracy import machine, measured_on  # noqa: E402
from PIL import Image, ImageFilter  # noqa: E402

import predict  # noqa: E402

SEED = 27  # the photos are the same on every run of the benchmark
# Each condition's settings for photo(); a pair (low, high) is drawn uniformly per image, a list chosen from.
# Gradients are in grey levels across the whole photo; noise is the standard deviation of the sensor's noise.
CONDITIONS = {
    "clean": {},
    **{f"noise {sigma}": {"noise": sigma} for sigma in (2, 4, 6, 8, 10)},
    "linear gradient (45 levels)": {"lighting": "linear", "gradient": 45},
    "radial gradient (45 levels)": {"lighting": "radial", "gradient": 45},
    "soft shadow": {"shadow": 0.25},
    "JPEG quality 60": {"jpeg": 60},
    "JPEG quality 85": {"jpeg": 85},
    "far off centre": {"size": 160, "width": 480, "height": 360, "corner": True},
    "mirrored": {"mirror": True},
    "product-style (grey, gradient 25, noise 3, JPEG 85)": {
        "background": 190,
        "lighting": "linear",
        "gradient": 25,
        "noise": 3,
        "jpeg": 85,
    },
    "phone-like (gradient 30-60, noise 4-6, JPEG 60-85)": {
        "lighting": ["linear", "radial"],
        "gradient": (30, 60),
        "noise": (4, 6),
        "jpeg": (60, 85),
    },
}
VARIED = "varied (every setting random, own generator and lighting)"


def drawn(value, rng):
    """A setting for one image: a pair is a uniform range, a list a choice, anything else itself."""
    if isinstance(value, tuple):
        return rng.uniform(*value)
    if isinstance(value, list):
        return value[rng.integers(len(value))]
    return value


def item_alpha(image, size, resample=Image.Resampling.BICUBIC):
    """A 28x28 test image (light on black) upscaled to size x size, as 0-1: how much of the item each pixel shows."""
    return np.asarray(Image.fromarray(image).resize((size, size), resample), dtype=np.float32).clip(0, 255) / 255


def finish(grey, noise, jpeg, rng):
    """The photo's sensor: noise, 8-bit levels, and JPEG compression if a quality is given."""
    grey = grey + rng.normal(0, noise, grey.shape) if noise else grey
    picture = Image.fromarray(grey.clip(0, 255).round().astype(np.uint8))
    if jpeg:
        buffer = io.BytesIO()
        picture.convert("RGB").save(buffer, "JPEG", quality=round(jpeg))  # as phones save: RGB, 4:2:0 colour
        picture = Image.open(buffer)
    return picture


def photo(image, rng, size=224, width=320, height=270, background=240, noise=0, lighting=None, gradient=0, shadow=0,
          jpeg=None, corner=False, mirror=False):  # fmt: skip
    """One test image (28x28, uint8) as a photo: a dark item on a light background of the given level, size px
    wide, at a random place on a width x height canvas (in a corner if corner), lit and shaded as asked."""
    ink = np.zeros((height, width), dtype=np.float32)
    if corner:
        top, left = rng.integers(0, 10), [rng.integers(0, 10), width - size - rng.integers(0, 10)][rng.integers(2)]
    else:
        top, left = rng.integers(5, height - size - 5), rng.integers(5, width - size - 5)
    ink[top : top + size, left : left + size] = item_alpha(image, size)
    light = np.full((height, width), float(background), dtype=np.float32)
    y, x = np.mgrid[0:height, 0:width] / max(height, width)
    if lighting == "linear":  # brighter towards one side, in a random direction
        angle = rng.uniform(0, 2 * np.pi)
        along = x * np.cos(angle) + y * np.sin(angle)
        light += gradient * ((along - along.min()) / np.ptp(along) - 0.5)
    elif lighting == "radial":  # a lamp above a point near the middle: darker towards the edges
        cy, cx = rng.uniform(0.3, 0.7) * height / max(height, width), rng.uniform(0.3, 0.7) * width / max(height, width)
        r2 = (y - cy) ** 2 + (x - cx) ** 2
        light += gradient * (0.5 - r2 / r2.max())
    if shadow:  # the item's outline, blurred and shifted down and to one side, darkens what it falls on
        blurred = Image.fromarray((255 * ink).astype(np.uint8)).filter(ImageFilter.GaussianBlur(size / 20))
        shade = np.roll(
            np.asarray(blurred, dtype=np.float32) / 255, (size // 12, size // 12 * rng.choice([-1, 1])), (0, 1)
        )
        light *= 1 - shadow * shade
    grey = light * (1 - 0.9 * ink)  # the item's darkest parts reflect a tenth of the light
    picture = finish(grey, noise, jpeg, rng)
    return picture.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if mirror else picture


def varied_photo(image, chance):
    """One test image as a photo whose every setting is drawn at random by chance (a random.Random), lit by a
    smooth random field (a 3x3 grid of levels, upscaled) rather than by photo()'s gradients."""
    size = chance.randint(60, 400)
    width, height = size + chance.randint(20, size), size + chance.randint(20, size)
    resample = chance.choice([Image.Resampling.BILINEAR, Image.Resampling.BICUBIC, Image.Resampling.LANCZOS])
    ink = np.zeros((height, width), dtype=np.float32)
    top, left = chance.randint(0, height - size), chance.randint(0, width - size)
    ink[top : top + size, left : left + size] = item_alpha(image, size, resample)
    base, spread = chance.uniform(110, 235), chance.uniform(0, 70)
    grid = np.array([[base + spread * (chance.random() - 0.5) for _ in range(3)] for _ in range(3)], dtype=np.float32)
    light = np.asarray(Image.fromarray(grid).resize((width, height), Image.Resampling.BICUBIC), dtype=np.float32)
    if chance.random() < 0.3:  # slightly out of focus
        blurred = Image.fromarray((255 * ink).astype(np.uint8)).filter(ImageFilter.GaussianBlur(chance.uniform(0.5, 2)))
        ink = np.asarray(blurred, dtype=np.float32) / 255
    grey = light * (1 - chance.uniform(0.6, 0.95) * ink)
    rng = np.random.default_rng(chance.randrange(2**32))
    noise = chance.uniform(0, 10) * np.sqrt(grey.clip(1, None) / base)  # brighter pixels are noisier, as in sensors
    picture = finish(grey + rng.normal(0, 1, grey.shape) * noise, 0, chance.choice([None, 50, 70, 90, 95]), rng)
    return picture.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if chance.random() < 0.5 else picture


def prepared(photos):
    """The photos as predict.py prepares them for the model: uint8 (N, 1, 28, 28)."""
    return torch.stack([torch.from_numpy(prepare_photo(p)) for p in photos]).unsqueeze(1)


def measure(model, x, y):
    """{condition: {"agreement": %, "accuracy": %}} for the test images x (uint8 (N, 1, 28, 28)), labels y."""
    original = model(x).argmax(1)
    results = {}
    for i, (name, settings) in enumerate([*CONDITIONS.items(), (VARIED, None)]):
        rng, chance = np.random.default_rng([SEED, i]), random.Random(SEED)
        if settings is None:
            photos = [varied_photo(image[0].numpy(), chance) for image in x]
        else:
            photos = [photo(image[0].numpy(), rng, **{k: drawn(v, rng) for k, v in settings.items()}) for image in x]
        predicted = model(prepared(photos)).argmax(1)
        results[name] = {
            "agreement": 100 * (predicted == original).float().mean().item(),
            "accuracy": 100 * (predicted == y).float().mean().item(),
            "warned": 100 * sum(photo_problem(p) is not None for p in photos) / len(photos),
        }
        print(f"{name}: " + ", ".join(f"{v:.1f}% {k}" for k, v in results[name].items()), flush=True)
    return results, 100 * (original == y).float().mean().item()


def markdown(results):
    lines = [measured_on(results["machine"]), "", f"Run {results['run']}; the first {results['images']} test images"]
    lines[-1] += f" (the 28x28 originals: {results['original_accuracy']:.1f}% right)."
    lines += ["", "| condition | agrees with the 28x28 original | right class | warned about |", "|---|---|---|---|"]
    for name, scores in results["conditions"].items():
        lines.append(f"| {name} | {scores['agreement']:.1f}% | {scores['accuracy']:.1f}% | {scores['warned']:.1f}% |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True, help="a run folder of ann.py, cnn.py or resnet_transfer.py")
    parser.add_argument("--images", type=int, default=500, help="the first N test images (1-10000)")
    parser.add_argument("--device", default="cpu", help="as the scripts' --device")
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "latest", help="tables go here")
    args = parser.parse_args(argv)
    if not 1 <= args.images <= 10_000:
        raise plumbing.UserError(f"--images {args.images}: use a number from 1 to 10000")
    plumbing.writable_folder(args.results, "--results")  # checked now, not after the measurements
    run = predict.load_run(args.run)
    device = common.pick_device(args.device)
    model = predict.build_model(run, device)
    _, _, x, y = common.load_fashion_mnist()
    x, y = x[: args.images], y[: args.images]
    conditions, original = measure(lambda images: model(images.to(device)).cpu(), x, y)
    results = {"machine": machine(), "run": str(args.run), "images": args.images, "original_accuracy": original}
    results["conditions"] = conditions
    (args.results / "photos.json").write_text(json.dumps(results, indent=2))
    (args.results / "photos.md").write_text(markdown(results))
    print(markdown(results))
    return results


if __name__ == "__main__":
    raise SystemExit(common.run_main(main))  # a user error is one line and exit code 2
