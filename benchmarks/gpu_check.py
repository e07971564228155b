"""GPU check: everything that depends on the device, in one command of at most 8 minutes on one GPU.

    python benchmarks/gpu_check.py            # on a CUDA GPU: the device tests, short runs, the full defaults
    python benchmarks/gpu_check.py --smoke    # any machine: tiny runs that check the pipeline (the suite runs it)

Steps, each printed as one row (wall seconds, median epoch seconds, accuracies):
1. the device-dependent tests (`tests/test_precision.py`; its `_on_cuda` tests need the GPU);
2. short runs of the three scripts (transfer with a random resnet18: offline, no download), and of cnn.py
   in fp16 (the GradScaler path a T4 takes);
3. determinism: cnn.py twice with the same seed, and the cost of cuDNN's deterministic kernels; the CNN's
   epoch without its weight average and with batches twice as large (is the step launch-bound?);
4. the full defaults: `python cnn.py` and `python ann.py`;
5. torch.compile (plain, and with CUDA graphs) against eager on the CNN's training epoch.
Writes gpu_check.json and gpu_check.md into benchmarks/latest/ (or --results DIR); the scripts' own output
goes to gpu_check.log there.
"""

import argparse
import contextlib
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import common  # noqa: E402
from plumbing import files, runs  # noqa: E402

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

import ann  # noqa: E402
import cnn  # noqa: E402
import resnet_transfer  # noqa: E402

SHORT = ["--subset", "10000", "--val-size", "1000", "--epochs", "3"]
SMOKE = ["--subset", "300", "--val-size", "60", "--batch-size", "60", "--epochs", "1"]
TRANSFER = ["--backbone", "resnet18", "--weights", "none", "--image-size", "32"]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny runs on any device: checks the pipeline only")
    parser.add_argument("--device", default="auto", help="as the scripts' --device (default: auto)")
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "latest", help="results go here")
    parser.add_argument("--runs", type=Path, help="the run folders go here (default: gpu_check_runs in --results)")
    args = parser.parse_args(argv)
    device = common.pick_device(args.device)
    results_dir = files.writable_folder(args.results, "--results")
    runs_dir = files.writable_folder(args.runs or results_dir / "gpu_check_runs", "--runs")
    if device.type != "cuda" and not args.smoke:
        raise common.UserError("no CUDA GPU here; use --smoke for the pipeline check on this device")
    short, full = (SMOKE, SMOKE) if args.smoke else (SHORT, [])
    flags = ["--device", args.device, "--out-dir", str(runs_dir)]
    rows = []
    log = results_dir / "gpu_check.log"
    log.write_text("")
    print(f"{runs.device_name(device)}; torch {torch.__version__}")

    def step(name, fn):
        start = time.perf_counter()
        measured = {k: v for k, v in fn().items() if k != "history"}
        row = {"step": name, **measured, "wall_seconds": time.perf_counter() - start}
        rows.append(row)
        print(row_text(row), flush=True)
        save(results_dir, device, rows)

    def run(script, argv):
        with open(log, "a") as out, contextlib.redirect_stdout(out):
            final = script.main(argv + flags)
        path = max(runs_dir.glob("*/metrics.json"), key=lambda p: p.stat().st_mtime)
        record = json.loads(path.read_text())
        epochs = [h["seconds"] for h in record["history"]]
        return {
            "history": [{k: v for k, v in h.items() if k != "seconds"} for h in record["history"]],
            "precision": record["precision"],
            "epochs": len(epochs),
            "epoch_seconds": statistics.median(epochs),
            "train_seconds": sum(epochs),
            "val_acc": final["val_acc"],
            "test_acc": final["test_acc"],
        }

    if not args.smoke:
        step("device tests (tests/test_precision.py)", device_tests)
    step("ann.py short", lambda: run(ann, short))
    step("cnn.py short", lambda: run(cnn, short))
    step("cnn.py short, --precision fp16", lambda: run(cnn, short + ["--precision", "fp16"]))
    step("resnet_transfer.py short (resnet18, random)", lambda: run(resnet_transfer, short + TRANSFER))
    step("resnet_transfer.py --finetune short", lambda: run(resnet_transfer, SMOKE + TRANSFER + ["--finetune"]))
    step("determinism: cnn.py short, same seed twice", lambda: same_seed_twice(run, short))
    step("cuDNN deterministic kernels: their cost", lambda: deterministic_cost(device, args.smoke))
    step("the CNN's epoch: where its time goes", lambda: step_breakdown(device, args.smoke))
    step("python cnn.py" if not args.smoke else "cnn.py (smoke)", lambda: run(cnn, full))
    step("python ann.py" if not args.smoke else "ann.py (smoke)", lambda: run(ann, full))
    if not args.smoke:  # last: compiling takes a while, and the figures above matter more
        step("torch.compile: the CNN's epoch", lambda: compile_probe(device))
    print(markdown(device, rows))


def device_tests():
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rf", "-p", "no:cacheprovider", "tests/test_precision.py"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    lines = result.stdout.strip().splitlines() or [result.stderr[-300:]]
    failed = [line.split(" - ")[0] for line in lines if line.startswith("FAILED")]
    return {"passed": result.returncode == 0, "summary": lines[-1], "failed": " ".join(failed)}


def same_seed_twice(run, short):
    first, second = run(cnn, short), run(cnn, short)
    identical = first["history"] == second["history"] and first["test_acc"] == second["test_acc"]
    return {**second, "identical": identical}


def cnn_epoch(device, precision, compile_mode=None, batches=None, ema=True, batch_size=cnn.BATCH_SIZE):
    """A closure timing one epoch of the script's own train_one_epoch on random images, as cnn.py builds it."""
    torch.manual_seed(0)
    model = cnn.CNN(cnn.FC_WIDTH, cnn.DROPOUT).to(device, memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True, fused=True)
    scheduler = common.warmup_cosine(optimizer, 40 * batches, cnn.WARMUP)
    ema = common.EMA(model, cnn.EMA_DECAY) if ema else None
    amp = common.autocast(device, precision)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    trained = torch.compile(model, mode=compile_mode) if compile_mode else model
    n = batches * cnn.BATCH_SIZE  # an epoch's images, whatever the batch size
    x, y = torch.randn(n, 1, 28, 28, device=device), torch.randint(0, 10, (n,), device=device)
    generator = torch.Generator(device).manual_seed(0)
    loss_fn = nn.CrossEntropyLoss()

    def epoch():
        start = time.perf_counter()
        batches_ = common.shuffled_batches(x, y, batch_size, generator)
        cnn.train_one_epoch(trained, batches_, optimizer, scheduler, loss_fn, ema, amp, scaler)
        return time.perf_counter() - start

    return epoch


def deterministic_cost(device, smoke):
    """Seconds per CNN epoch (215 steps) with cuDNN free to pick any kernel, and restricted to deterministic ones."""
    precision = common.pick_precision("auto", device)
    times = {}
    for deterministic in (False, True, False, True):
        torch.backends.cudnn.deterministic = deterministic
        epoch = cnn_epoch(device, precision, batches=2 if smoke else 215)
        epoch()  # warm-up
        times.setdefault(deterministic, []).extend(epoch() for _ in range(1 if smoke else 3))
    torch.backends.cudnn.deterministic = True  # as the scripts run on CUDA
    free, fixed = statistics.median(times[False]), statistics.median(times[True])
    return {"precision": precision, "epoch_seconds_any_kernel": free, "epoch_seconds": fixed, "cost": fixed / free}


def step_breakdown(device, smoke):
    """Seconds per CNN epoch as the script trains it, without the weight average, and with batches twice as
    large: if that halves the time, the step is bound by launching kernels, not by computing them."""
    precision = common.pick_precision("auto", device)
    out = {"precision": precision}
    variants = {"epoch_seconds": {}, "no_ema_epoch_seconds": {"ema": False}, "batch_512_epoch_seconds": {}}
    variants["batch_512_epoch_seconds"]["batch_size"] = 2 * cnn.BATCH_SIZE
    for key, options in variants.items():
        epoch = cnn_epoch(device, precision, batches=2 if smoke else 215, **options)
        epoch()  # warm-up
        out[key] = statistics.median(epoch() for _ in range(1 if smoke else 3))
    return out


def compile_probe(device):
    """Seconds per CNN epoch, eager against torch.compile (its compile time apart)."""
    precision = common.pick_precision("auto", device)
    out = {"precision": precision}
    for mode in (None, "default", "reduce-overhead"):  # reduce-overhead: CUDA graphs
        epoch = cnn_epoch(device, precision, compile_mode=mode, batches=215)
        first = epoch()
        out[f"{mode or 'eager'}_first_epoch_seconds"] = first
        out[f"{mode or 'eager'}_epoch_seconds"] = statistics.median(epoch() for _ in range(3))
    return out


def row_text(row):
    fields = [f"{row['step']:<45}", f"{row['wall_seconds']:7.1f} s"]
    for key, fmt in (("epoch_seconds", "epoch {:.2f} s"), ("val_acc", "val {:.2%}"), ("test_acc", "test {:.2%}")):
        if row.get(key) is not None:
            fields.append(fmt.format(row[key]))
    extra = {k: v for k, v in row.items() if k not in ("step", "wall_seconds", "epoch_seconds", "val_acc", "test_acc")}
    fields.append(" ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in extra.items()))
    return "  ".join(fields)


def save(results_dir, device, rows):
    """Rewritten after every step: a check stopped halfway keeps what it measured."""
    record = {"device": runs.device_name(device), "torch": torch.__version__, "rows": rows}
    (results_dir / "gpu_check.json").write_text(json.dumps(record, indent=2))
    (results_dir / "gpu_check.md").write_text(markdown(device, rows))


def markdown(device, rows):
    lines = [
        f"Measured {time.strftime('%Y-%m-%d')} on {runs.device_name(device)}, torch {torch.__version__}.",
        "",
        "| step | wall s | epoch s (median) | val accuracy | test accuracy | notes |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:

        def cell(key, fmt, row=row):
            return fmt.format(row[key]) if row.get(key) is not None else ""

        notes = row_text(row).split("  ")[-1]
        lines.append(
            f"| {row['step']} | {row['wall_seconds']:.1f} | {cell('epoch_seconds', '{:.2f}')} | "
            f"{cell('val_acc', '{:.2%}')} | {cell('test_acc', '{:.2%}')} | {notes} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(common.run_main(main))  # a user error is one line and exit code 2, Ctrl-C cleans up
