"""Transfer benchmark: what IMAGE_SIZE buys and what it costs.

1. Accuracy by image size with real ImageNet features: resnet_transfer.py's own pipeline, head and recipe,
   with the stand-in backbone (EfficientNet-Lite0 and its ImageNet weights, benchmarks/standin.py), since
   ResNet weights cannot be downloaded where this is developed. Seeds give validation and test accuracy.
2. Cost by image size: seconds for ResNet-50 to extract the features of all 70,000 images, timed on a
   sample (--timing-images) and scaled up. Random weights take the same time as pretrained ones.

    python benchmarks/transfer.py --sizes 32 64 96 128                 # both, seed 1
    python benchmarks/transfer.py --sizes 64 --seeds 1 2 3 --no-timing # accuracy over seeds
    python benchmarks/transfer.py --sizes 64 --dropout 0.5             # unknown flags go to every run
    python benchmarks/transfer.py --quick                              # tiny smoke run, for the test suite

Writes transfer.json and transfer.md into benchmarks/latest/ (or --results DIR).
"""

import argparse
import contextlib
import io
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import common  # noqa: E402
from plumbing import files, runs  # noqa: E402

import standin  # noqa: E402
import torch  # noqa: E402
from accuracy import machine, measured_on, save  # noqa: E402

import resnet_transfer  # noqa: E402

QUICK = ["--subset", "300", "--val-size", "60", "--epochs", "1", "--batch-size", "60"]
N_IMAGES = 70_000


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", type=int, default=[32, 64, 96, 128], help="image sizes, pixels")
    parser.add_argument("--seeds", nargs="+", type=int, default=[1])
    parser.add_argument("--timing", action=argparse.BooleanOptionalAction, default=True, help="time ResNet-50")
    parser.add_argument("--accuracy", action=argparse.BooleanOptionalAction, default=True, help="run the stand-in")
    parser.add_argument("--timing-images", type=int, default=1024, help="images timed per size")
    parser.add_argument("--device", default="auto", help="as the scripts' --device")
    parser.add_argument("--precision", default="auto", help="as the scripts' --precision")
    parser.add_argument("--quick", action="store_true", help="tiny runs: checks the pipeline, measures nothing")
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "latest", help="tables go here")
    parser.add_argument("--cache-dir", type=Path, help="feature caches (default: a temporary folder)")
    args, passed_on = parser.parse_known_args(argv)
    files.writable_folder(args.results, "--results")  # checked now, not after the measurements
    if args.quick:
        args.sizes, args.timing_images = [32], 16
    device = common.pick_device(args.device)
    results = {"machine": machine(), "device": runs.device_name(device), "quick": args.quick}
    results.update(seeds=args.seeds, flags=" ".join(passed_on), accuracy={}, timing={})
    with tempfile.TemporaryDirectory() as tmp:
        cache = args.cache_dir or Path(tmp) / "cache"
        flags = (QUICK if args.quick else []) + passed_on + ["--device", args.device, "--precision", args.precision]
        flags += ["--cache-dir", str(cache), "--out-dir", str(Path(tmp) / "runs")]
        for size in args.sizes if args.accuracy else []:
            results["accuracy"][size] = standin_accuracy(size, args.seeds, flags)
            print_row("stand-in", size, results["accuracy"][size])
            save(results, args, "transfer", markdown)
        for size in args.sizes if args.timing else []:
            results["timing"][size] = extraction_seconds(size, args.timing_images, device, args.precision)
            print_row("ResNet-50 extraction", size, results["timing"][size])
            save(results, args, "transfer", markdown)
    print(markdown(results))


def standin_accuracy(size, seeds, flags):
    """The stand-in's validation and test accuracy at this image size (mean and std over the seeds)."""
    finals = []
    for seed in seeds:
        argv = flags + ["--image-size", str(size), "--seed", str(seed)]
        with standin.swapped_in(resnet_transfer), contextlib.redirect_stdout(io.StringIO()):
            finals.append(resnet_transfer.main(argv))
    test, val = [f["test_acc"] for f in finals], [f["val_acc"] for f in finals if f["val_acc"] is not None]
    return {
        "test_acc": test,
        "test_acc_mean": statistics.mean(test),
        "test_acc_std": statistics.stdev(test) if len(test) > 1 else 0.0,
        "val_acc_mean": statistics.mean(val) if val else None,
        "first_run_seconds": finals[0]["seconds"],  # extraction (none cached yet) and training
    }


def extraction_seconds(size, n, device, precision):
    """Seconds for ResNet-50 to extract the features of all 70,000 images at this size, scaled from n images."""
    precision = common.pick_precision(precision, device)
    amp = common.autocast(device, precision)
    torch.manual_seed(0)
    backbone, _, mean, std = resnet_transfer.load_backbone("resnet50", "none", 0)
    backbone = backbone.to(device, memory_format=torch.channels_last)
    preprocess = resnet_transfer.Preprocess(size, mean, std).to(device)
    images = torch.randint(0, 256, (n, 1, 28, 28), dtype=torch.uint8)
    batch = resnet_transfer.EXTRACT_BATCH
    resnet_transfer.extract_features(preprocess, backbone, images[:batch], device, amp, batch)  # warm-up
    synchronize = torch.cuda.synchronize if device.type == "cuda" else lambda device: None
    synchronize(device)
    start = time.perf_counter()
    resnet_transfer.extract_features(preprocess, backbone, images, device, amp, batch)
    synchronize(device)  # the GPU works asynchronously: wait for it before reading the clock
    seconds = time.perf_counter() - start
    return {"precision": precision, "images_timed": n, "seconds_70k": seconds * N_IMAGES / n}


def print_row(what, size, row):
    print(f"{what} {size} px: " + " ".join(f"{k}={v}" for k, v in row.items()), flush=True)


def markdown(results):
    seeds = ", ".join(map(str, results["seeds"]))
    lines = [measured_on(results["machine"]) + f" Device: {results['device']}.", ""]
    if results["flags"]:
        lines += [f"Every run with `{results['flags']}`.", ""]
    lines += [
        f"| image size | stand-in test accuracy (seeds {seeds}) | stand-in val accuracy (mean) | "
        "first run, s | ResNet-50 extraction of 70,000 images, s |",
        "|---|---|---|---|---|",
    ]
    for size in sorted(set(results["accuracy"]) | set(results["timing"])):
        acc, timing = results["accuracy"].get(size), results["timing"].get(size)
        spread = f" ± {acc['test_acc_std']:.2%}" if acc and len(acc["test_acc"]) > 1 else " (one seed)"
        test = f"{acc['test_acc_mean']:.2%}{spread}" if acc else ""
        val = f"{acc['val_acc_mean']:.2%}" if acc and acc["val_acc_mean"] is not None else ""
        first = f"{acc['first_run_seconds']:.0f}" if acc else ""
        extraction = f"{timing['seconds_70k']:.0f} ({timing['precision']})" if timing else ""
        lines.append(f"| {size} | {test} | {val} | {first} | {extraction} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(common.run_main(main))  # a user error is one line and exit code 2, Ctrl-C cleans up
