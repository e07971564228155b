"""Photos as phones take them: test items rendered as photos in several conditions, through predict.py's preparation.

Each of the first N test images is rendered as a photo would show it (a dark item on a light background,
upscaled, off centre) in each condition below: sensor noise, uneven lighting, a soft shadow, JPEG, far off
centre, mirrored, and combined. Each photo is prepared as predict.py prepares one and classified by a run's
model, rebuilt as predict.py rebuilds it. Per condition: the share of photos that get the class the original
28x28 image gets (agreement), the share that get the right class (accuracy), and the share that predict.py
warns about (prepare's problem: blank, a tiny item, one cut off), which should be none. The last condition,
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
from plumbing import files  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from accuracy import machine, measured_on  # noqa: E402
from PIL import Image, ImageFilter  # noqa: E402

import predict  # noqa: E402
from photo_prep import prepare  # noqa: E402

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

# Clothes photographed where they lie (issue #34): a coloured item on a surface, with a soft shadow, tilted 5-15
# degrees either way, 30-50% of the frame's height and off centre, JPEG 60-85, but for the control.
WHERE_THEY_LIE = {"shadow": 0.3, "tilt": (5, 15), "fraction": (0.3, 0.5), "jpeg": (60, 85)}
SCENES = {
    "control: plain, centred, upright": {"surface": ("plain", (236, 234, 230)), "item": (40, 40, 45)},
    "plain, tilted, off centre": {"surface": ("plain", (236, 234, 230)), "item": (40, 40, 45), **WHERE_THEY_LIE},
    "light item on dark wood": {"surface": ("wood", (105, 65, 40)), "item": (232, 230, 225), **WHERE_THEY_LIE},
    "light item on dark carpet": {"surface": ("carpet", (62, 58, 70)), "item": (232, 230, 225), **WHERE_THEY_LIE},
    "dark item on light wood": {"surface": ("wood", (214, 178, 128)), "item": (35, 35, 40), **WHERE_THEY_LIE},
    "dark item on light carpet": {"surface": ("carpet", (200, 192, 182)), "item": (35, 35, 40), **WHERE_THEY_LIE},
    "red item on beige, warm light": {
        "surface": ("plain", (226, 206, 172)), "item": (190, 35, 45), "balance": [(1.08, 1.0, 0.86)], **WHERE_THEY_LIE
    },
    "grey item on white, cool light": {
        "surface": ("plain", (244, 244, 242)), "item": (150, 150, 150), "balance": [(0.9, 1.0, 1.12)], **WHERE_THEY_LIE
    },
    "blue item on a gingham tablecloth": {
        "surface": ("gingham", (215, 50, 55)), "item": (40, 70, 170), **WHERE_THEY_LIE
    },
    "letterboxed (black bars)": {
        "surface": ("plain", (236, 234, 230)), "item": (40, 40, 45), "bars": 0.12, **WHERE_THEY_LIE
    },
    "a 6-px dark frame": {"surface": ("plain", (236, 234, 230)), "item": (40, 40, 45), "frame": 6, **WHERE_THEY_LIE},
}  # fmt: skip


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


def surface(kind, colour, height, width, rng):
    """A surface clothes lie on, (height, width, 3) float32 levels: plain, wood grain (stripes that wander),
    carpet (a fine mottle) or a gingham tablecloth (checks of `colour` and white)."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.broadcast_to(np.asarray(colour, dtype=np.float32), (height, width, 3))
    if kind == "plain":
        return base.copy()
    if kind == "wood":  # grain along a random direction, stripes 6-14 px apart, warped by a slow wave
        angle = rng.uniform(0, np.pi)
        along, across = x * np.cos(angle) + y * np.sin(angle), -x * np.sin(angle) + y * np.cos(angle)
        period = rng.uniform(6, 14)
        grain = np.sin(2 * np.pi * (across + 8 * np.sin(along / 60)) / period) + 0.5 * rng.normal(0, 1, y.shape)
        return base * (1 + 0.12 * grain[..., None])
    if kind == "carpet":  # a mottle of 2-4 px, in brightness and a little in colour
        scale = rng.uniform(2, 4)
        small = rng.normal(0, 1, (round(height / scale), round(width / scale))).astype(np.float32)
        mottle = np.asarray(Image.fromarray(small).resize((width, height), Image.Resampling.BICUBIC))
        return base * (1 + 0.3 * mottle[..., None] * np.array([1, 0.95, 0.9], dtype=np.float32))
    cell = rng.uniform(14, 30)  # gingham: a band of colour every other cell, across and down; pink where they cross
    bands = ((x // cell) % 2 == 0).astype(np.float32) + ((y // cell) % 2 == 0).astype(np.float32)
    white = np.array([246, 244, 240], dtype=np.float32)
    return white + (base - white) * (0.45 * bands)[..., None]


def scene_photo(image, rng, surface_kind, item, shadow=0, tilt=0, fraction=0.45, jpeg=None, balance=(1, 1, 1), bars=0,
                frame=0):  # fmt: skip
    """One test image as a photo of the item lying on a surface: a 640x480 colour photo, the item `fraction` of
    its height, tilted by `tilt` degrees either way, at a random place (centred for the control), its outline
    casting a soft shadow, the light's colour `balance`, then black letterbox bars (`bars` of the height at top
    and bottom) or a dark frame `frame` px wide. The item is alpha-composited: the 28x28 image says how much of
    each pixel it covers."""
    height, width = 480, 640
    size = round(fraction * height)
    angle = tilt * rng.choice([-1, 1])
    alpha = Image.fromarray((255 * item_alpha(image, size)).astype(np.uint8))
    alpha = np.asarray(alpha.rotate(angle, Image.Resampling.BICUBIC, expand=True), dtype=np.float32) / 255
    h, w = alpha.shape
    if tilt:
        top, left = rng.integers(10, height - h - 10), rng.integers(10, width - w - 10)
    else:
        top, left = (height - h) // 2, (width - w) // 2
    ink = np.zeros((height, width), dtype=np.float32)
    ink[top : top + h, left : left + w] = alpha
    picture = surface(*surface_kind, height, width, rng)
    if shadow:  # the outline, blurred and shifted down and to one side, darkens the surface it falls on
        blurred = Image.fromarray((255 * ink).astype(np.uint8)).filter(ImageFilter.GaussianBlur(size / 20))
        shade = np.roll(
            np.asarray(blurred, dtype=np.float32) / 255, (size // 12, size // 12 * rng.choice([-1, 1])), (0, 1)
        )
        picture = picture * (1 - shadow * shade)[..., None]
    picture = picture * (1 - ink[..., None]) + np.asarray(item, dtype=np.float32) * ink[..., None]
    picture = picture * np.asarray(balance, dtype=np.float32) + rng.normal(0, 3, picture.shape)
    if bars:
        band = round(bars * height)
        picture[:band], picture[-band:] = rng.uniform(0, 12), rng.uniform(0, 12)
    if frame:
        level = rng.uniform(10, 40)
        picture[:frame], picture[-frame:], picture[:, :frame], picture[:, -frame:] = level, level, level, level
    result = Image.fromarray(picture.clip(0, 255).round().astype(np.uint8))
    if jpeg:
        buffer = io.BytesIO()
        result.save(buffer, "JPEG", quality=round(jpeg))
        result = Image.open(buffer)
    return result


def prepared(photos):
    """(the photos as predict.py prepares them for the model, uint8 (N, 1, 28, 28); the share it warns about, %)."""
    arrays, problems = zip(*(prepare(p) for p in photos), strict=True)
    return torch.stack([torch.from_numpy(a) for a in arrays]).unsqueeze(1), 100 * sum(map(bool, problems)) / len(photos)


def measure(model, x, y):
    """{condition: {"agreement": %, "accuracy": %}} for the test images x (uint8 (N, 1, 28, 28)), labels y."""
    original = model(x).argmax(1)
    results = {}
    for i, (name, settings) in enumerate([*CONDITIONS.items(), (VARIED, None), *SCENES.items()]):
        rng, chance = np.random.default_rng([SEED, i]), random.Random(SEED)
        if settings is None:
            photos = [varied_photo(image[0].numpy(), chance) for image in x]
        elif name in SCENES:
            scene = {k: v for k, v in settings.items() if k not in ("surface", "item")}
            photos = [
                scene_photo(image[0].numpy(), rng, settings["surface"], settings["item"],
                            **{k: drawn(v, rng) for k, v in scene.items()})
                for image in x
            ]  # fmt: skip
        else:
            photos = [photo(image[0].numpy(), rng, **{k: drawn(v, rng) for k, v in settings.items()}) for image in x]
        images, warned = prepared(photos)
        predicted = model(images).argmax(1)
        results[name] = {
            "agreement": 100 * (predicted == original).float().mean().item(),
            "accuracy": 100 * (predicted == y).float().mean().item(),
            "warned": warned,
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
        raise common.UserError(f"--images {args.images}: use a number from 1 to 10000")
    files.writable_folder(args.results, "--results")  # checked now, not after the measurements
    device = common.pick_device(args.device)
    model = predict.load(args.run, device).logits
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
