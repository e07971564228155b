"""Compare training runs: runs that differ only in their seed form a group, shown as mean ± std, and each
difference between groups is checked against the seed-to-seed spread.

Run `python compare.py` after a few runs of ann.py, cnn.py or resnet_transfer.py (several seeds of each
setting: see the README); `--script cnn --last 6` narrows the list. The table shows only the settings that
differ, and `compare.png` the per-epoch validation accuracy of each group (mean line, min-max band).

The verdict: two groups' mean test accuracies differ by more than the seeds explain when the difference is
larger than twice its standard error, sqrt(s1²/n1 + s2²/n2) (about a 95% check for normal noise). With a
single run in a group its noise is unknown, and so is the verdict.
"""

import json
import math
import statistics
import sys
from pathlib import Path

import common

# --- Settings: each one is also a flag (LAST -> --last).
OUT_DIR = ""  # folder holding the run folders ("" = runs/ beside this script)
SCRIPT = ""  # only runs of this script: ann, cnn or resnet_transfer ("" = all)
LAST = 0  # only the N most recent runs (0 = all)

NOT_COMPARED = {"OUT_DIR", "DATA_DIR", "CACHE_DIR", "SHOW", "SEED"}  # not how the model was trained, or the seed


def load_runs(out_dir):
    """(folder, record) of every readable run, oldest first; unreadable ones are skipped with a warning."""
    runs = []
    for folder in sorted(p for p in out_dir.iterdir() if p.is_dir()):
        path = folder / "metrics.json"
        try:
            record = json.loads(path.read_text())
            if isinstance(record, dict):
                record.setdefault("history", [])
            reason = problem(record)
            if reason:
                raise ValueError(reason)
            runs.append((folder, record))
        except FileNotFoundError:
            print(f"warning: skipping {folder.name}: no metrics.json", file=sys.stderr)
        except (OSError, ValueError) as error:  # json.JSONDecodeError is a ValueError
            print(f"warning: skipping {folder.name}: unreadable metrics.json ({error})", file=sys.stderr)
    return sorted(runs, key=lambda run: run[1].get("started", ""))


def is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def problem(record):
    """Why a parsed metrics.json cannot be listed (None when it can): what compare.py reads must have its type."""
    if not isinstance(record, dict) or not isinstance(record.get("hparams"), dict):
        return "not a run record"
    if not isinstance(record["history"], list) or not all(isinstance(h, dict) for h in record["history"]):
        return "its history is not a list of epochs"
    for h in record["history"]:
        if not is_number(h.get("epoch")) or not (h.get("val_acc") is None or is_number(h["val_acc"])):
            return "an epoch without a number for epoch or val_acc"
    final = record.get("final")
    if final is not None and not (
        isinstance(final, dict)
        and is_number(final.get("test_acc"))
        and all(v is None or is_number(v) for v in final.values())
    ):
        return "its final results are not numbers"
    if not isinstance(record.get("started", ""), str) or not isinstance(record.get("script", ""), str):
        return "its start time or script name is not text"
    return None


def differing_hparams(records):
    names = sorted({name for record in records for name in record["hparams"]} - NOT_COMPARED)
    return [name for name in names if len({repr(r["hparams"].get(name)) for r in records}) > 1]


def group_runs(runs):
    """{(script, settings but the seed): [record, ...]} of the completed runs, in order of first appearance."""
    groups = {}
    for _, record in runs:
        if record.get("status") == "completed" and record.get("final"):
            settings = {k: v for k, v in record["hparams"].items() if k not in NOT_COMPARED}
            groups.setdefault((record.get("script", "?"), json.dumps(settings, sort_keys=True)), []).append(record)
    return groups


def mean_std(values):
    """(mean, std, n) of the numbers that are there; std is None for fewer than two."""
    values = [v for v in values if v is not None]
    if not values:
        return None, None, 0
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else None, len(values)


def spread(values):
    mean, std, n = mean_std(values)
    if mean is None:
        return "-"
    return f"{mean:.2%}" + (f" ± {std:.2%}" if std is not None else " (n=1: noise unknown)")


def verdict(group, reference):
    """Whether the mean test accuracy of `group` differs from `reference`'s by more than seeds explain."""
    (m1, s1, n1), (m2, s2, n2) = (mean_std([r["final"]["test_acc"] for r in g]) for g in (group, reference))
    difference = f"{m1 - m2:+.2%}"
    if s1 is None or s2 is None:
        return f"{difference}: noise unknown (needs 2+ seeds each)"
    error = math.sqrt(s1**2 / n1 + s2**2 / n2)
    if abs(m1 - m2) > 2 * error:
        return f"{difference}: larger than the seed spread (2 SE = {2 * error:.2%})"
    return f"{difference}: within the seed spread (2 SE = {2 * error:.2%})"


def label(index):
    return chr(ord("A") + index) if index < 26 else f"G{index + 1}"


def table(groups, names):
    """One row per group: n, the differing settings, final validation and test accuracy, and the verdict
    against the script's reference group (its largest, the first of equals)."""
    rows = [("group", "script", "n", "settings", "val acc (final)", "test acc", "seconds", "vs reference")]
    references = {}
    for (script, _), records in groups.items():
        references.setdefault(script, records)
        if len(records) > len(references[script]):
            references[script] = records
    for index, ((script, _), records) in enumerate(groups.items()):
        reference = references[script]
        reference_label = label(list(groups.values()).index(reference))
        seconds, _, _ = mean_std([r["final"].get("seconds") for r in records])
        rows.append(
            (
                label(index),
                script,
                str(len(records)),
                " ".join(f"{n.lower()}={records[0]['hparams'][n]}" for n in names if n in records[0]["hparams"]) or "-",
                spread([r["final"].get("val_acc") for r in records]),
                spread([r["final"]["test_acc"] for r in records]),
                "-" if seconds is None else f"{seconds:.0f}",
                "reference" if records is reference else f"vs {reference_label}: {verdict(records, reference)}",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows
    )


def plot(groups, path):
    """Per-epoch validation accuracy of each group: the mean over its runs, and a band from min to max."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 5), dpi=100)
    ax = fig.add_subplot()
    for index, ((script, _), records) in enumerate(groups.items()):
        curves = [{h["epoch"]: h["val_acc"] for h in r["history"] if h.get("val_acc") is not None} for r in records]
        epochs = sorted(set.intersection(*(set(c) for c in curves)))
        if not epochs:
            continue
        values = [[100 * c[e] for c in curves] for e in epochs]
        line = ax.plot(epochs, [statistics.mean(v) for v in values], "o-", markersize=3)[0]
        line.set_label(f"{label(index)}: {script}, n={len(records)}")
        if len(records) > 1:
            ax.fill_between(epochs, [min(v) for v in values], [max(v) for v in values], alpha=0.2)
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation accuracy per epoch (%)")
    ax.set_title("groups as in the table (settings there); band: min to max over seeds")
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1), borderaxespad=0)
    fig.tight_layout()
    fig.savefig(path)


def main(argv=None):
    hp = common.parse_hparams(globals(), argv)
    out_dir = Path(hp.out_dir or common.HERE / "runs")
    if not out_dir.is_dir():
        raise common.UserError(f"--out-dir {out_dir} does not exist; run a training script first or pass --out-dir")
    runs = [run for run in load_runs(out_dir) if not hp.script or run[1].get("script") == hp.script]
    runs = runs[-hp.last :] if hp.last else runs
    groups = group_runs(runs)
    unfinished = [
        f"{folder.name} ({record.get('status', '?')})"
        for folder, record in runs
        if record.get("status") != "completed" or not record.get("final")
    ]
    if not groups:
        print(f"no completed runs in {out_dir}" + (f"; not completed: {', '.join(unfinished)}" if unfinished else ""))
        return groups
    print(table(groups, differing_hparams([records[0] for records in groups.values()])))
    if unfinished:
        print(f"not completed, so not in the table: {', '.join(unfinished)}")
    try:
        plot(groups, out_dir / "compare.png")
    except OSError as error:
        print(f"compare.png not saved: cannot write in {out_dir} ({error.strerror})", file=sys.stderr)
    else:
        print(f"validation curves: {out_dir / 'compare.png'}")
    return groups


if __name__ == "__main__":
    raise SystemExit(common.run_main(main))
