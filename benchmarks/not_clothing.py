"""Things that are not clothing: can a trained model's own outputs say "this may not be clothing"?

Renders photos of things that are not clothing (balls, cups, faces, cars, landscapes, rockets, cats, houses), each
prepared as predict.py prepares a photo, and the first test items rendered as photos (benchmarks/photos.py's clean
condition). For each signal (the top probability, the logits' logsumexp) the threshold is set on the test photos
alone, so that at most 2% of them are flagged; the table gives the share of each kind of non-clothing flagged at it,
and how often the preparation already warns. A signal is worth a warning if it flags at least half of them.

    python benchmarks/not_clothing.py --run runs/cnn-20261205-003636 --images 1000

Writes not-clothing.json and not-clothing.md into benchmarks/latest/ (or --results DIR).
"""

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import common  # noqa: E402
from plumbing import files  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from accuracy import machine, measured_on  # noqa: E402
from photos import photo  # noqa: E402
from PIL import Image, ImageDraw, ImageFilter  # noqa: E402

import predict  # noqa: E402
from photo_prep import prepare  # noqa: E402


def colour(rng, light=None):
    """A random colour, light or dark as asked."""
    low, high = (150, 255) if light else (0, 110) if light is False else (0, 255)
    return tuple(int(v) for v in rng.integers(low, high, 3))


def thing(kind, rng):
    """A 320x270 photo of a thing that is not clothing, on a plain or graded surface, with noise and blur."""
    light = bool(rng.integers(0, 2))
    image = Image.new("RGB", (320, 270), colour(rng, light))
    draw = ImageDraw.Draw(image)
    ink, other = colour(rng, not light), colour(rng)
    cx, cy, r = rng.integers(120, 200), rng.integers(100, 170), rng.integers(50, 90)
    if kind == "ball":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), ink)
        draw.arc((cx - r, cy - r // 3, cx + r, cy + r // 3), 0, 360, other, width=4)
    elif kind == "cup":
        draw.rectangle((cx - r // 2, cy - r, cx + r // 2, cy + r), ink)
        draw.ellipse((cx + r // 2 - 10, cy - r // 2, cx + r, cy + r // 2), outline=ink, width=10)
    elif kind == "face":
        draw.ellipse((cx - r, cy - int(1.3 * r), cx + r, cy + int(1.3 * r)), ink)
        for dx in (-r // 3, r // 3):
            draw.ellipse((cx + dx - 8, cy - r // 3 - 8, cx + dx + 8, cy - r // 3 + 8), other)
        draw.arc((cx - r // 2, cy, cx + r // 2, cy + r // 2), 20, 160, other, width=5)
    elif kind == "car":
        draw.rectangle((cx - int(1.4 * r), cy - r // 3, cx + int(1.4 * r), cy + r // 3), ink)
        draw.rectangle((cx - r // 2, cy - int(0.8 * r), cx + r // 2, cy - r // 3), ink)
        for dx in (-r, r):
            draw.ellipse((cx + dx - 20, cy + r // 3 - 20, cx + dx + 20, cy + r // 3 + 20), other)
    elif kind == "landscape":
        image = Image.new("RGB", (320, 270), colour(rng, True))
        draw = ImageDraw.Draw(image)
        for _ in range(3):
            x, h = rng.integers(0, 320), rng.integers(60, 180)
            draw.polygon([(x - 120, 270), (x, 270 - h), (x + 120, 270)], colour(rng, False))
        draw.ellipse((250, 20, 290, 60), (250, 220, 90))
    elif kind == "rocket":
        draw.rectangle((cx - r // 4, cy - r, cx + r // 4, cy + r), ink)
        draw.polygon([(cx - r // 4, cy - r), (cx, cy - int(1.6 * r)), (cx + r // 4, cy - r)], ink)
        draw.polygon([(cx - r // 4, cy + r), (cx - r // 2, cy + int(1.3 * r)), (cx - r // 4, cy + r // 2)], other)
        draw.polygon([(cx + r // 4, cy + r), (cx + r // 2, cy + int(1.3 * r)), (cx + r // 4, cy + r // 2)], other)
    elif kind == "cat":
        draw.ellipse((cx - r, cy - r // 2, cx + r, cy + r), ink)
        draw.ellipse((cx + r // 2, cy - r, cx + int(1.3 * r), cy - r // 4), ink)
        draw.polygon([(cx + r // 2, cy - int(0.8 * r)), (cx + int(0.6 * r), cy - int(1.3 * r)), (cx + r, cy - r)], ink)
        draw.line((cx - r, cy, cx - int(1.6 * r), cy - r), ink, width=8)
    else:  # a house
        draw.rectangle((cx - r, cy - r // 2, cx + r, cy + r), ink)
        draw.polygon(
            [(cx - int(1.2 * r), cy - r // 2), (cx, cy - int(1.4 * r)), (cx + int(1.2 * r), cy - r // 2)], other
        )
        draw.rectangle((cx - 12, cy + r // 3, cx + 12, cy + r), other)
    grey = np.asarray(image.filter(ImageFilter.GaussianBlur(1)), dtype=np.float32)
    grey += rng.normal(0, 4, grey.shape)
    return Image.fromarray(grey.clip(0, 255).astype(np.uint8))


KINDS = ["ball", "cup", "face", "car", "landscape", "rocket", "cat", "house"]


def scores(logits):
    """{signal: the score each image gets, higher meaning more like the training images}."""
    return {"top probability": logits.softmax(1).max(1).values, "logsumexp of the logits": logits.logsumexp(1)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.strip().split("\n")[0])
    parser.add_argument("--run", type=Path, required=True, help="a cnn.py or ann.py run folder")
    parser.add_argument("--images", type=int, default=1000, help="test items rendered as photos")
    parser.add_argument("--per-kind", type=int, default=40, help="photos of each thing that is not clothing")
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "latest")
    args = parser.parse_args(argv)
    files.writable_folder(args.results, "--results")
    run = predict.load(args.run, torch.device("cpu"))
    rng = np.random.default_rng(31)
    _, _, x, _ = common.load_fashion_mnist()
    clothes = [prepare(photo(x[i, 0].numpy(), rng)) for i in range(args.images)]
    others = {kind: [prepare(thing(kind, rng)) for _ in range(args.per_kind)] for kind in KINDS}

    def logits(prepared):
        return run.logits(torch.from_numpy(np.stack([a for a, _ in prepared]))[:, None])

    test_scores = scores(logits(clothes))
    rows = {"test items as photos": {"warned": float(np.mean([w is not None for _, w in clothes]))}}
    thresholds = {signal: float(np.quantile(s.numpy(), 0.02)) for signal, s in test_scores.items()}
    for signal, s in test_scores.items():
        rows["test items as photos"][signal] = float((s < thresholds[signal]).float().mean())
    for kind, prepared in others.items():
        rows[kind] = {"warned": float(np.mean([w is not None for _, w in prepared]))}
        for signal, s in scores(logits(prepared)).items():
            rows[kind][signal] = float((s < thresholds[signal]).float().mean())
    rows["all that is not clothing"] = {k: float(np.mean([rows[kind][k] for kind in KINDS])) for k in rows["ball"]}
    header = "| photos | the preparation warns | " + " | ".join(f"flagged by {s}" for s in thresholds) + " |"
    lines = [header, "|---" * (2 + len(thresholds)) + "|"]
    lines += [f"| {name} | " + " | ".join(f"{100 * v:.0f}%" for v in row.values()) + " |" for name, row in rows.items()]
    table = "\n".join(lines)
    print(table)
    result = {"run": str(args.run), "thresholds": thresholds, "rows": rows, "machine": machine()}
    (args.results / "not-clothing.json").write_text(json.dumps(result, indent=2))
    (args.results / "not-clothing.md").write_text(f"{measured_on(result['machine'])}\n\n{table}\n")


if __name__ == "__main__":
    main()
