"""Footwear facing either way: trained models on the test set's shoes, sandals and boots, mirrored or not.

All of Fashion-MNIST's footwear faces left; a shoe photographed facing right is its mirror image. Each run
folder's model is rebuilt as predict.py rebuilds it (with the run's test-time views) and applied to the test
images, to the same images rendered as photos (upscaled 8x, dark on light, through predict.py's preparation),
and to the footwear among them (sandal, sneaker, ankle boot) as it is and mirrored, as 28x28 images and as
photos. Runs are grouped as compare.py groups them (settings alike but the seed); figures are mean ± std over
a group's runs.

    python benchmarks/footwear.py --runs runs                # every completed run in runs/
    python benchmarks/footwear.py --runs runs --images 2000  # the first 2,000 test images only (quicker)

Writes footwear.json and footwear.md into benchmarks/latest/ (or --results DIR).
"""

import argparse
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import common  # noqa: E402
from plumbing import files  # noqa: E402

import torch  # noqa: E402
from accuracy import machine, measured_on  # noqa: E402
from PIL import Image  # noqa: E402

import compare  # noqa: E402
import predict  # noqa: E402
from photo_prep import prepare_photo  # noqa: E402

FOOTWEAR = [5, 7, 9]  # sandal, sneaker, ankle boot
COLUMNS = {  # what each column measures: (images, labels) from the test images x, their photos and labels y
    "test": lambda x, photos, y, foot: (x, y),
    "photos": lambda x, photos, y, foot: (photos, y),
    "footwear": lambda x, photos, y, foot: (x[foot], y[foot]),
    "footwear mirrored": lambda x, photos, y, foot: (x[foot].flip(3), y[foot]),
    "footwear photos": lambda x, photos, y, foot: (photos[foot], y[foot]),
    "footwear photos mirrored": lambda x, photos, y, foot: (photos[foot].flip(3), y[foot]),
}


def as_photos(images):
    """28x28 test images as a photo shows an item (dark on light, 224 px), prepared as predict.py prepares one."""
    photos = []
    for image in images:
        photo = Image.fromarray(255 - image[0].numpy()).resize((224, 224), Image.Resampling.BICUBIC)
        photos.append(torch.from_numpy(prepare_photo(photo)))
    return torch.stack(photos).unsqueeze(1)


def accuracies(folder, x, photos, y, device):
    """{column: accuracy in %} of one run's model."""
    run = predict.load(folder, device)
    model = run.logits
    foot = torch.isin(y, torch.tensor(FOOTWEAR))
    scores = {}
    for column, take in COLUMNS.items():
        images, labels = take(x, photos, y, foot)
        scores[column] = 100 * (model(images.to(device)).argmax(1).cpu() == labels).float().mean().item()
    return scores


def markdown(results):
    lines = [measured_on(results["machine"]), "", f"First {results['images']} test images.", ""]
    lines += ["| group | runs | " + " | ".join(COLUMNS) + " |", "|---" * (len(COLUMNS) + 2) + "|"]
    for group in results["groups"]:
        cells = [f"{group['mean'][c]:.2f}% ± {group['std'][c]:.2f}" for c in COLUMNS]
        lines.append(f"| {group['name']} | {len(group['runs'])} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, default=ROOT / "runs", help="the folder of run folders")
    parser.add_argument("--images", type=int, default=10_000, help="the first N test images (1-10000)")
    parser.add_argument("--device", default="cpu", help="as the scripts' --device")
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "latest", help="tables go here")
    args = parser.parse_args(argv)
    device = common.pick_device(args.device)
    if not 1 <= args.images <= 10_000:
        raise common.UserError(f"--images {args.images}: use a number from 1 to 10000")
    if not args.runs.is_dir():
        raise common.UserError(f"--runs {args.runs}: not a folder; point it at the folder of run folders")
    files.writable_folder(args.results, "--results")  # checked now, not after the measurements
    runs = compare.load_runs(args.runs)
    groups = compare.group_runs(runs, runs)
    if not groups:
        raise common.UserError(f"--runs {args.runs}: no completed runs there")
    folders = {id(record): folder for folder, record in runs}
    _, _, x, y = common.load_fashion_mnist()
    x, y = x[: args.images], y[: args.images]
    photos = as_photos(x)
    names = compare.differing_hparams(groups)
    results = {"machine": machine(), "images": args.images, "groups": []}
    for group in groups:
        runs_scores = {folders[id(r)].name: accuracies(folders[id(r)], x, photos, y, device) for r in group.records}
        per_column = {c: [scores[c] for scores in runs_scores.values()] for c in COLUMNS}
        results["groups"].append(
            {
                "name": compare.describe(group, names),
                "runs": runs_scores,
                "mean": {c: statistics.mean(v) for c, v in per_column.items()},
                "std": {c: statistics.stdev(v) if len(v) > 1 else 0.0 for c, v in per_column.items()},
            }
        )
        print(f"{compare.describe(group, names)}: {len(runs_scores)} runs", flush=True)
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "footwear.json").write_text(json.dumps(results, indent=2))
    (args.results / "footwear.md").write_text(markdown(results))
    print(markdown(results))
    return results


if __name__ == "__main__":
    raise SystemExit(common.run_main(main))  # a user error is one line and exit code 2, Ctrl-C cleans up
