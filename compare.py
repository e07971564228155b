"""Compare training runs: a table of every run folder under runs/ and their validation curves on one figure.

Run `python compare.py` after a few runs of ann.py, cnn.py or resnet_transfer.py; `--script cnn --last 5`
narrows the list. Only the hyperparameters that differ between the listed runs are shown.
"""

import json
import sys
from pathlib import Path

import common

# --- Settings: each one is also a flag (LAST -> --last).
OUT_DIR = ""  # folder holding the run folders ("" = runs/ beside this script)
SCRIPT = ""  # only runs of this script: ann, cnn or resnet_transfer ("" = all)
LAST = 0  # only the N most recent runs (0 = all)

NOT_COMPARED = {"OUT_DIR", "DATA_DIR", "CACHE_DIR", "SHOW"}  # not how the model was trained


def load_runs(out_dir):
    """(folder, record) of every readable run, oldest first; unreadable ones are skipped with a warning."""
    runs = []
    for folder in sorted(p for p in out_dir.iterdir() if p.is_dir()):
        path = folder / "metrics.json"
        try:
            record = json.loads(path.read_text())
            if not isinstance(record, dict) or not isinstance(record.get("hparams"), dict):
                raise ValueError("not a run record")
            record.setdefault("history", [])
            runs.append((folder, record))
        except FileNotFoundError:
            print(f"warning: skipping {folder.name}: no metrics.json", file=sys.stderr)
        except (OSError, ValueError) as error:  # json.JSONDecodeError is a ValueError
            print(f"warning: skipping {folder.name}: unreadable metrics.json ({error})", file=sys.stderr)
    return sorted(runs, key=lambda run: run[1].get("started", ""))


def differing_hparams(records):
    names = sorted({name for record in records for name in record["hparams"]} - NOT_COMPARED)
    return [name for name in names if len({repr(r["hparams"].get(name)) for r in records}) > 1]


def describe(record, names):
    return " ".join(f"{name.lower()}={record['hparams'][name]}" for name in names if name in record["hparams"])


def percent(value):
    return "-" if value is None else f"{value:.2%}"


def table(runs, names):
    rows = [("run", "script", "status", "settings", "best val", "test", "seconds", "device")]
    for folder, record in runs:
        vals = [h.get("val_acc") for h in record["history"] if h.get("val_acc") is not None]
        final = record.get("final") or {}
        seconds = final.get("seconds")
        rows.append(
            (
                folder.name,
                record.get("script", "?"),
                record.get("status", "?"),
                describe(record, names) or "-",
                percent(max(vals) if vals else None),
                percent(final.get("test_acc")),
                "-" if seconds is None else f"{seconds:.0f}",
                record.get("device", "?"),
            )
        )
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)) for row in rows)


def plot(runs, names, path):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 6), dpi=100)
    ax = fig.add_subplot()
    for folder, record in runs:
        points = [(h["epoch"], h["val_acc"]) for h in record["history"] if h.get("val_acc") is not None]
        if points:
            label = f"{record.get('script', '?')} {describe(record, names)}".strip()
            ax.plot(*zip(*points, strict=True), "o-", markersize=3, label=f"{label} ({folder.name[-15:]})")
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation accuracy")
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)


def main(argv=None):
    hp = common.parse_hparams(globals(), argv)
    out_dir = Path(hp.out_dir or common.HERE / "runs")
    if not out_dir.is_dir():
        raise common.UserError(f"--out-dir {out_dir} does not exist; run a training script first or pass --out-dir")
    runs = [run for run in load_runs(out_dir) if not hp.script or run[1].get("script") == hp.script]
    runs = runs[-hp.last :] if hp.last else runs
    if not runs:
        print(f"no runs found in {out_dir}")
        return runs
    names = differing_hparams([record for _, record in runs])
    print(table(runs, names))
    plot(runs, names, out_dir / "compare.png")
    print(f"validation curves: {out_dir / 'compare.png'}")
    return runs


if __name__ == "__main__":
    raise SystemExit(common.run_main(main))
