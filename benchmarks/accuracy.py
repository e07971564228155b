"""Accuracy benchmark: each script's default recipe over seeds 1, 2, 3 (mean ± std test accuracy, wall time),
and an ablation table that turns one technique off at a time (validation accuracy, seconds).

    python benchmarks/accuracy.py                      # ann and cnn, seeds 1 2 3
    python benchmarks/accuracy.py --ablation           # ...plus one run per technique switched off (seed 1)
    python benchmarks/accuracy.py --scripts cnn --epochs-grid 8 12 16   # time to accuracy: epochs vs test, seconds
    python benchmarks/accuracy.py --scripts cnn --epochs 15             # unknown flags go to every script run
    python benchmarks/accuracy.py --runs runs          # keep the run folders where compare.py looks
    python benchmarks/accuracy.py --quick              # tiny smoke run, for the test suite

Writes accuracy.json and accuracy.md into benchmarks/latest/ (or --results DIR; the tracked tables in
benchmarks/results/ change only with --results benchmarks/results).
"""

import argparse
import contextlib
import datetime
import io
import json
import platform
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import common  # noqa: E402
from plumbing import files, runs  # noqa: E402

import torch  # noqa: E402

import ann  # noqa: E402
import cnn  # noqa: E402

SCRIPTS = {"ann": ann, "cnn": cnn}
# Each technique of the recipes switched off (or a tempting alternative switched on): the flags that do it.
# Flip augmentation goes with the test-time flip: a model never shown mirrored images cannot average over them.
ABLATIONS = {
    "ann": {
        "no flips, in training or at test time": ["--no-flip", "--no-tta-flip"],
        "with ±1 px shifts (off by default)": ["--max-shift", "1"],
        "no label smoothing": ["--label-smoothing", "0"],
        "no EMA of weights": ["--ema-decay", "0"],
        "no test-time flip": ["--no-tta-flip"],
        "no dropout": ["--dropout", "0"],
        "weight decay 0.01 instead of 0.1": ["--weight-decay", "0.01"],
    },
    "cnn": {
        "no flips, in training or at test time": ["--no-flip", "--no-tta-flip"],
        "no shift augmentation": ["--max-shift", "0"],
        "no label smoothing": ["--label-smoothing", "0"],
        "with a weight average (off by default)": ["--ema-decay", "0.999"],
        "no test-time shifts": ["--tta-shift", "0"],
        f"15 epochs instead of {cnn.EPOCHS}": ["--epochs", "15"],
    },
}
QUICK = ["--subset", "1000", "--val-size", "200", "--epochs", "1", "--batch-size", "100"]


def run_script(name, argv, out_dir):
    """One run of a script's main() with its output captured; returns its final metrics."""
    with contextlib.redirect_stdout(io.StringIO()):
        return SCRIPTS[name].main(argv + ["--out-dir", str(out_dir)])


def machine():
    return {
        "cpu": runs.device_name(torch.device("cpu")).rsplit(",", 1)[0],  # the model, without its threads
        "threads": torch.get_num_threads(),
        "cpu_bf16": common.has_fast("bf16", torch.device("cpu")),  # decides PRECISION = "auto" on the CPU
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": datetime.date.today().isoformat(),
    }


def measured_on(m):
    """The markdown tables' first line: where and when."""
    bf16 = ", with bf16 units" if m["cpu_bf16"] and not m["gpu"] else ""
    return f"Measured {m['date']} on {m['gpu'] or m['cpu']} ({m['threads']} threads{bf16}), torch {m['torch']}."


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scripts", nargs="+", default=list(SCRIPTS), choices=list(SCRIPTS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    parser.add_argument("--ablation", action="store_true", help="also run each technique switched off (first seed)")
    parser.add_argument("--quick", action="store_true", help="tiny runs: checks the pipeline, measures nothing")
    parser.add_argument("--epochs-grid", nargs="+", type=int, default=[], help="epoch counts to time (all seeds)")
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "latest", help="tables go here")
    parser.add_argument("--runs", type=Path, help="keep the run folders here (default: a temporary folder)")
    args, passed_on = parser.parse_known_args(argv)
    files.writable_folder(args.results, "--results")  # checked now, not after hours of training
    extra = (QUICK if args.quick else []) + passed_on
    results = {"machine": machine(), "quick": args.quick, "seeds": args.seeds, "flags": " ".join(passed_on)}
    results.update(scripts={}, ablation={}, epochs_grid={})

    with tempfile.TemporaryDirectory() as tmp:
        out_dir = args.runs or tmp
        for name in args.scripts:
            runs = []
            for seed in args.seeds:
                final = run_script(name, extra + ["--seed", str(seed)], out_dir)
                runs.append({"seed": seed, **final})
                print(
                    f"{name} seed {seed}: test_acc={final['test_acc']:.2%} seconds={final['seconds']:.1f}", flush=True
                )
            accs, secs = [r["test_acc"] for r in runs], [r["seconds"] for r in runs]
            results["scripts"][name] = {
                "runs": runs,
                "test_acc_mean": statistics.mean(accs),
                "test_acc_std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                "seconds_mean": statistics.mean(secs),
            }
            save(results, args)
            if args.ablation:
                seed = ["--seed", str(args.seeds[0])]
                rows = results["ablation"][name] = {"default recipe": {"flags": "", **runs[0]}}
                for label, flags in ABLATIONS[name].items():
                    rows[label] = {"flags": " ".join(flags), **run_script(name, extra + seed + flags, out_dir)}
                    print(f"{name} {label}: val_acc={rows[label]['val_acc']:.2%}", flush=True)
                    save(results, args)
            for epochs in args.epochs_grid:
                finals = [
                    run_script(name, extra + ["--seed", str(s), "--epochs", str(epochs)], out_dir) for s in args.seeds
                ]
                accs, secs = [f["test_acc"] for f in finals], [f["seconds"] for f in finals]
                results["epochs_grid"].setdefault(name, {})[epochs] = {
                    "test_acc": accs,
                    "test_acc_mean": statistics.mean(accs),
                    "test_acc_std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                    "seconds_mean": statistics.mean(secs),
                }
                print(
                    f"{name} {epochs} epochs: test_acc={statistics.mean(accs):.2%} seconds={statistics.mean(secs):.0f}"
                )
                save(results, args)
    print(markdown(results))


def save(results, args, name="accuracy", table=None):
    """Results so far as NAME.json and NAME.md (NAME-quick.* for --quick), rewritten after every run: an
    interrupted benchmark keeps what it measured. `table(results)` makes the markdown (default: this file's)."""
    args.results.mkdir(parents=True, exist_ok=True)
    stem = f"{name}-quick" if args.quick else name
    (args.results / f"{stem}.json").write_text(json.dumps(results, indent=2))
    (args.results / f"{stem}.md").write_text((table or markdown)(results))


def markdown(results):
    lines = [
        measured_on(results["machine"]),
        "",
        f"| script | test accuracy (mean ± std, seeds {', '.join(map(str, results['seeds']))}) | wall seconds (mean) |",
        "|---|---|---|",
    ]
    for name, r in results["scripts"].items():
        acc = f"{r['test_acc_mean']:.2%} ± {r['test_acc_std']:.2%}"
        lines.append(f"| {name}.py | {acc} | {r['seconds_mean']:.0f} |")
    if results.get("flags"):
        lines += ["", f"Every run with `{results['flags']}`."]
    for name, grid in results.get("epochs_grid", {}).items():
        lines += ["", f"Time to accuracy of {name}.py (seeds {', '.join(map(str, results['seeds']))}):", ""]
        lines += ["| epochs | test accuracy (mean ± std) | wall seconds (mean) |", "|---|---|---|"]
        for epochs, r in grid.items():
            lines.append(f"| {epochs} | {r['test_acc_mean']:.2%} ± {r['test_acc_std']:.2%} | {r['seconds_mean']:.0f} |")
    for name, rows in results["ablation"].items():
        lines += ["", f"Ablation of {name}.py (seed {results['seeds'][0]}):", ""]
        lines += [
            "| variant | flags | val accuracy | change (val points) | test accuracy | wall seconds |",
            "|---|---|---|---|---|---|",
        ]
        default = rows["default recipe"]["val_acc"]
        for label, r in rows.items():
            flags = f"`{r['flags']}`" if r["flags"] else ""
            change = f"{100 * (r['val_acc'] - default):+.2f}" if r["flags"] else ""
            lines.append(
                f"| {label} | {flags} | {r['val_acc']:.2%} | {change} | {r['test_acc']:.2%} | {r['seconds']:.0f} |"
            )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(common.run_main(main))  # a user error is one line and exit code 2, Ctrl-C cleans up
