"""The CNN's default against an earlier one, side by side on one machine: `python cnn.py` from this tree and from a
git commit's, run alternately, each timed from start to exit (the wall time a learner waits).

    python benchmarks/defaults.py --baseline 421884b --seeds 1 2 3                  # as the machine is
    python benchmarks/defaults.py --baseline 421884b --emulate-avx2 --precision fp32    # a CPU without bf16 units
    python benchmarks/defaults.py --baseline HEAD --quick                           # a smoke run: measures nothing

--emulate-avx2 sets ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 for both, so
that a CPU with AVX-512 and bf16 units runs as a laptop's without them (MKL's flag moves the linear layers off
AVX-512 too). The runs alternate (baseline, current, baseline, ...), so that a drift of a shared machine hits both
alike; the table gives each seed's wall time and test accuracy, and the medians and their ratio. Writes
defaults[-avx2][-PRECISION].json and .md into benchmarks/latest/ (or --results DIR).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import common  # noqa: E402
from plumbing import files  # noqa: E402

from accuracy import machine, measured_on  # noqa: E402

AVX2 = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}
QUICK = ["--subset", "1200", "--val-size", "200", "--batch-size", "100", "--epochs", "1"]


def checkout(ref, folder):
    """The project as it was at git commit `ref`, in folder (a worktree: nothing of this tree changes)."""
    done = subprocess.run(
        ["git", "-C", str(ROOT), "worktree", "add", "--detach", str(folder), ref], capture_output=True, text=True
    )
    if done.returncode:
        raise common.UserError(f"--baseline {ref}: git cannot check it out ({done.stderr.strip()[:200]})")
    return folder


def timed_run(tree, argv, env, out):
    """(wall seconds, final record) of `python cnn.py argv` in tree, its run folder in out."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "cnn.py", *argv, "--out-dir", str(out)], cwd=tree, env=env,
                          capture_output=True, text=True)  # fmt: skip
    seconds = time.perf_counter() - start
    if done.returncode:
        raise common.UserError(f"cnn.py in {tree} failed: {done.stderr.strip().splitlines()[-1:]}")
    (record,) = [json.loads(p.read_text()) for p in out.glob("*/metrics.json")]
    return seconds, record


def markdown(results):
    lines = [measured_on(results["machine"]), "", f"`python cnn.py --seed N {results['flags']}`".replace("  ", " ")]
    lines[-1] += f", environment: {results['environment'] or 'as is'}; baseline: commit {results['baseline']}."
    lines += [
        "",
        "| seed | baseline wall s | baseline test | current wall s | current test | ratio |",
        "|---" * 6 + "|",
    ]
    for row in results["rows"]:
        lines.append(
            f"| {row['seed']} | {row['baseline']['wall']:.0f} | {100 * row['baseline']['test_acc']:.2f}% "
            f"| {row['current']['wall']:.0f} | {100 * row['current']['test_acc']:.2f}% | {row['ratio']:.2f} |"
        )
    summary = results["summary"]
    lines.append(
        f"| median | {summary['baseline_wall']:.0f} | {100 * summary['baseline_test']:.2f}% "
        f"| {summary['current_wall']:.0f} | {100 * summary['current_test']:.2f}% | {summary['ratio']:.2f} |"
    )
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", default="421884b", help="the git commit whose default is the baseline")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1])
    parser.add_argument("--precision", default="", help="passed on as cnn.py's --precision (default: its own)")
    parser.add_argument("--emulate-avx2", action="store_true", help="run both as on a CPU without AVX-512 or bf16")
    parser.add_argument("--quick", action="store_true", help="tiny runs: checks the pipeline, measures nothing")
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "latest", help="tables go here")
    args = parser.parse_args(argv)
    files.writable_folder(args.results, "--results")  # checked now, not after the measurements
    flags = (QUICK if args.quick else []) + (["--precision", args.precision] if args.precision else [])
    env = {**os.environ, **(AVX2 if args.emulate_avx2 else {})}
    results = {"machine": machine(), "baseline": args.baseline, "flags": " ".join(flags), "rows": []}
    results["environment"] = " ".join(f"{k}={v}" for k, v in AVX2.items()) if args.emulate_avx2 else ""
    with tempfile.TemporaryDirectory() as tmp:
        baseline = checkout(args.baseline, Path(tmp) / "baseline")
        try:
            for seed in args.seeds:
                row = {"seed": seed}
                for name, tree in (("baseline", baseline), ("current", ROOT)):
                    wall, record = timed_run(tree, ["--seed", str(seed), *flags], env, Path(tmp) / f"{name}-{seed}")
                    row[name] = {
                        "wall": wall,
                        "test_acc": record["final"]["test_acc"],
                        "epochs": len(record["history"]),
                    }
                    print(f"seed {seed} {name}: {wall:.1f} s, test {record['final']['test_acc']:.2%}", flush=True)
                row["ratio"] = row["current"]["wall"] / row["baseline"]["wall"]
                results["rows"].append(row)
        finally:
            subprocess.run(
                ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(baseline)], capture_output=True
            )
    rows = results["rows"]
    results["summary"] = {
        f"{name}_{key}": statistics.median(row[name][key if key == "wall" else "test_acc"] for row in rows)
        for name in ("baseline", "current")
        for key in ("wall", "test")
    }
    results["summary"]["ratio"] = statistics.median(row["ratio"] for row in rows)
    stem = "-".join(["defaults"] + ["avx2"] * args.emulate_avx2 + [args.precision] * bool(args.precision))
    stem += "-quick" * args.quick
    (args.results / f"{stem}.json").write_text(json.dumps(results, indent=2))
    (args.results / f"{stem}.md").write_text(markdown(results))
    print(markdown(results))
    return results


if __name__ == "__main__":
    raise SystemExit(common.run_main(main))  # a user error is one line and exit code 2
