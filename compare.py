"""Compare training runs: runs that differ only in their seed form a group, judged on validation accuracy.

Run `python compare.py` after a few runs of ann.py, cnn.py or resnet_transfer.py (several seeds of each
setting: see the README); `--script cnn --last 6` narrows the list and `--reference B` picks the group the
others are compared against (default: the first, A). The table gives each group's final validation and test
accuracy over its seeds (mean ± sd, in %); the settings that differ between groups are listed below it, and
`compare.png` shows each group's per-epoch validation accuracy (mean line, min-max band over seeds).

The verdict is on validation accuracy, the split settings are chosen on; test accuracy is shown beside it for
reporting only. Runs with the same settings and the same seed are repeats, not seed spread: they are averaged to
one value per seed first, so a copied run folder changes nothing. Groups that share two or more seeds are
compared seed by seed (the same seed gives the same split and initialisation, so much of the seed noise cancels):
a paired t-test on the per-seed differences. Other groups are compared unpaired, with Welch's t-test. Either way
the difference, in percentage points, comes with the half-width of its two-sided 95% interval from Student's t
with the right degrees of freedom, and is called beyond the seed noise when the interval excludes zero. A group
with a single seed has no measured spread, so no verdict is given for it.
"""

import json
import math
import statistics
import sys
import textwrap
from pathlib import Path
from typing import NamedTuple

import quiet_ctrl_c  # noqa: F401  (before torch: a Ctrl-C while it loads ends without a traceback)

import common

# --- Settings: each one is also a flag (LAST -> --last).
OUT_DIR = ""  # folder holding the run folders ("" = runs/ beside this script)
SCRIPT = ""  # only runs of this script: ann, cnn or resnet_transfer ("" = all)
LAST = 0  # only the N most recent runs (0 = all)
REFERENCE = ""  # the group the others are compared against, by its letter in the table ("" = the first, A)

# Not how the model was trained, or the seed; DEVICE and PRECISION as asked for ("auto") give way to what ran.
NOT_COMPARED = {"OUT_DIR", "DATA_DIR", "CACHE_DIR", "SHOW", "SEED", "DEVICE", "PRECISION"}


# ----------------------------------------------------------------------------------------------
# Reading the run folders: a bad one is named on stderr and skipped, never the end of the table.


def load_runs(out_dir):
    """(folder, record) of every readable run, oldest first; unreadable ones are skipped with a warning."""
    runs = []
    try:
        folders = sorted(p for p in out_dir.iterdir() if p.is_dir())
    except OSError as error:
        raise common.UserError(f"--out-dir {out_dir}: cannot list it ({error.strerror})") from None
    for folder in folders:
        path = folder / "metrics.json"
        try:
            record = json.loads(path.read_text())
            if isinstance(record, dict):
                record.setdefault("history", [])
            reason = problem(record)
            if reason:
                print(f"warning: skipping {folder.name}: {reason}", file=sys.stderr)
                continue
            runs.append((folder, record))
        except FileNotFoundError:
            print(f"warning: skipping {folder.name}: no metrics.json", file=sys.stderr)
        except RecursionError:  # json.loads gives up on absurdly nested arrays or objects
            print(f"warning: skipping {folder.name}: metrics.json is nested too deeply to be a run", file=sys.stderr)
        except (OSError, ValueError) as error:  # json.JSONDecodeError and UnicodeDecodeError are ValueErrors
            print(f"warning: skipping {folder.name}: unreadable metrics.json ({error})", file=sys.stderr)
    return sorted(runs, key=lambda run: run[1].get("started", ""))


def is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_finite(value):
    """A number that is not NaN or infinite (nor an integer too large for a float, which math.isfinite rejects
    with an OverflowError)."""
    return is_number(value) and abs(value) < 1e300


def is_accuracy(value):
    """A fraction of images: json.loads turns NaN and Infinity into floats, which would poison every mean."""
    return is_number(value) and 0 <= value <= 1


def problem(record):
    """Why a parsed metrics.json cannot be listed (None when it can): what compare.py reads must have its type."""
    if not isinstance(record, dict) or not isinstance(record.get("hparams"), dict):
        return "not a run record"
    if not isinstance(record["history"], list) or not all(isinstance(h, dict) for h in record["history"]):
        return "its history is not a list of epochs"
    for h in record["history"]:
        if not is_finite(h.get("epoch")) or not (h.get("val_acc") is None or is_number(h["val_acc"])):
            return "an epoch without a number for epoch or val_acc"
    final = record.get("final")
    if final is not None:
        if not isinstance(final, dict) or not all(v is None or is_number(v) for v in final.values()):
            return "its final results are not numbers"
        if final.get("val_acc") is None and is_accuracy(final.get("test_acc")):
            return "trained without a validation split (--val-size 0), so there is nothing to judge it on"
        for name in ("val_acc", "test_acc"):
            if not is_accuracy(final.get(name)):
                return f"final {name} is {final.get(name, 'missing')}, not an accuracy in [0, 1]"
    if not isinstance(record.get("started", ""), str) or not isinstance(record.get("script", ""), str):
        return "its start time or script name is not text"
    return None


# ----------------------------------------------------------------------------------------------
# Groups: the same script and settings; within a group, the runs of each seed.


class Group(NamedTuple):
    script: str
    settings: dict  # the hyperparameters but NOT_COMPARED
    records: list  # every completed run of the group, repeats included
    seeds: dict  # {seed (as JSON text): [record, ...]}: more than one record is a repeat of that seed


def group_runs(runs):
    """The groups of the completed runs, in order of first appearance."""
    groups = {}
    for _, record in runs:
        if record.get("status") == "completed" and record.get("final"):
            settings = {k: v for k, v in record["hparams"].items() if k not in NOT_COMPARED}
            # A seed gives the same numbers only on the same hardware in the same precision: pair only those.
            settings.update(device=record.get("device_name"), precision=record.get("precision"))
            key = (record.get("script") or "?", json.dumps(settings, sort_keys=True))
            group = groups.setdefault(key, Group(key[0], settings, [], {}))
            group.records.append(record)
            group.seeds.setdefault(json.dumps(record["hparams"].get("SEED"), sort_keys=True), []).append(record)
    return list(groups.values())


def per_seed(group, name):
    """{seed: final[name] averaged over that seed's repeats}: one value per seed, the unit of the statistics."""
    return {seed: statistics.mean(r["final"][name] for r in records) for seed, records in group.seeds.items()}


def differing_hparams(groups):
    names = sorted({name for group in groups for name in group.settings})
    return [name for name in names if len({repr(g.settings.get(name)) for g in groups}) > 1]


def label(index):
    return chr(ord("A") + index) if index < 26 else f"G{index + 1}"


def describe(group, names):
    """The group's script and the settings that differ between groups, as flags are written (lr=0.05)."""
    settings = " ".join(f"{n.lower()}={group.settings[n]}" for n in names if n in group.settings)
    return f"{group.script}, {settings}" if settings else group.script


def seed_list(group):
    """The group's seeds in order, with the number of runs where a seed was repeated: 1(×2),2,3."""
    seeds = sorted(group.seeds, key=lambda seed: (not seed.isdigit(), int(seed) if seed.isdigit() else 0, seed))
    return ",".join(seed + (f"(×{len(group.seeds[seed])})" if len(group.seeds[seed]) > 1 else "") for seed in seeds)


# ----------------------------------------------------------------------------------------------
# Statistics: Student's t from the regularized incomplete beta function (no scipy).


def _beta_fraction(a, b, x):
    """The continued fraction of the incomplete beta function (modified Lentz, as in Numerical Recipes)."""

    def nonzero(value):
        return value if abs(value) > 1e-300 else 1e-300

    c, d = 1.0, 1 / nonzero(1 - (a + b) * x / (a + 1))
    h = d
    for m in range(1, 300):
        even = m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m))
        d, c = 1 / nonzero(1 + even * d), nonzero(1 + even / c)
        h *= d * c
        odd = -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))
        d, c = 1 / nonzero(1 + odd * d), nonzero(1 + odd / c)
        h *= d * c
        if abs(d * c - 1) < 1e-15:
            break
    return h


def incomplete_beta(a, b, x):
    """The regularized incomplete beta function I_x(a, b), for a, b > 0 and x in [0, 1]."""
    if x <= 0 or x >= 1:
        return 0.0 if x <= 0 else 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1) / (a + b + 2):  # where the fraction converges fast; else by symmetry
        return front * _beta_fraction(a, b, x) / a
    return 1 - front * _beta_fraction(b, a, 1 - x) / b


def t_two_sided_p(t, df):
    """P(|T| >= |t|) for Student's t with df degrees of freedom (df need not be whole: Welch)."""
    return incomplete_beta(df / 2, 0.5, df / (df + t * t))


def t_critical(df, level=0.95):
    """The t with P(|T| >= t) = 1 - level: 12.71 for df 1, 4.30 for df 2, 1.96 as df grows."""
    low, high = 0.0, 1.0
    while t_two_sided_p(high, df) > 1 - level:
        low, high = high, 2 * high
    for _ in range(100):  # bisection: the p-value falls as t grows
        middle = (low + high) / 2
        low, high = (middle, high) if t_two_sided_p(middle, df) > 1 - level else (low, middle)
    return (low + high) / 2


class Comparison(NamedTuple):
    difference: float  # in points of validation accuracy, group minus reference
    half_width: float | None  # of the 95% interval, in points; None when there is no spread to judge by
    how: str  # the test and its n, or why there is no verdict


def compare(group, reference):
    """The validation-accuracy difference of `group` to `reference`: paired on 2+ shared seeds, else Welch."""
    a, b = per_seed(group, "val_acc"), per_seed(reference, "val_acc")
    shared = [seed for seed in a if seed in b]
    if len(shared) >= 2:
        differences = [100 * (a[s] - b[s]) for s in shared]
        n = len(differences)
        error = statistics.stdev(differences) / math.sqrt(n)
        return interval(statistics.mean(differences), error, n - 1, f"paired t, n={n}")
    difference = 100 * (statistics.mean(a.values()) - statistics.mean(b.values()))
    if len(a) < 2 or len(b) < 2:
        return Comparison(difference, None, "no verdict (n=1: one seed has no spread)")
    va, vb = (statistics.variance([100 * v for v in x.values()]) / len(x) for x in (a, b))
    error = math.sqrt(va + vb)
    # Welch–Satterthwaite degrees of freedom; with no spread at all, the pooled ones (the value does not matter)
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1)) if error > 0 else len(a) + len(b) - 2
    return interval(difference, error, df, f"Welch t, n={len(a)}+{len(b)}")


def interval(difference, error, df, how):
    return Comparison(difference, t_critical(df) * error, how)


def verdict(comparison):
    """The comparison as a table cell: +0.35 ± 0.21 pt (paired t, n=3): beyond seed noise."""
    if comparison.half_width is None:
        return f"{comparison.difference:+.2f} pt, {comparison.how}"
    beyond = abs(comparison.difference) > comparison.half_width
    words = "beyond seed noise" if beyond else "within seed noise"
    return f"{comparison.difference:+.2f} ± {comparison.half_width:.2f} pt ({comparison.how}): {words}"


def spread(values):
    """Mean ± sd of accuracies, in % (the sd only where there are two or more values)."""
    values = [100 * v for v in values]
    mean = statistics.mean(values)
    return f"{mean:.2f}" + (f" ± {statistics.stdev(values):.2f}" if len(values) > 1 else "")


# ----------------------------------------------------------------------------------------------
# Output: the table, its legend and notes, and the figure.


def table(groups, reference):
    """One row per group: n (seeds), validation and test accuracy, seconds per run, and the verdict against
    the group numbered `reference`."""
    header = f"val acc vs {label(reference)} (95% interval)"
    rows = [("group", "script", "n", "val acc %", "test acc %", "seconds", header)]
    for index, group in enumerate(groups):
        seconds = [r["final"]["seconds"] for r in group.records if is_number(r["final"].get("seconds"))]
        rows.append(
            (
                label(index),
                group.script,
                str(len(group.seeds)),
                spread(per_seed(group, "val_acc").values()),
                spread(per_seed(group, "test_acc").values()),
                f"{statistics.mean(seconds):.0f}" if seconds else "-",
                "reference" if index == reference else verdict(compare(group, groups[reference])),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows
    )


def legend(groups, names):
    """One wrapped line per group below the table: its seeds and the settings that differ between groups."""
    lines = []
    for index, group in enumerate(groups):
        text = f"{label(index)}  {describe(group, names)}; seeds {seed_list(group)}"
        lines.append(wrap(text, indent=len(label(index)) + 2))
    return "\n".join(lines)


def notes(reference_label):
    text = (
        "n: seeds (repeats of a seed are averaged first); accuracy: mean ± sd over seeds, in %. "
        f"vs {reference_label}: the difference in mean validation accuracy in percentage points (pt), ± the "
        "half-width of its two-sided 95% interval (Student's t: paired on shared seeds, else Welch); beyond seed "
        "noise when the interval excludes 0. Test accuracy is for reporting only."
    )
    return wrap(text)


def wrap(text, indent=0):
    """Lines of at most 120 columns, so the legend and notes fit a terminal as wide as the table is kept."""
    return textwrap.fill(text, 120, subsequent_indent=" " * indent)


def curve(records):
    """{epoch: validation accuracy in %} averaged over `records` (one seed's repeats), where all have it."""
    curves = [{h["epoch"]: 100 * h["val_acc"] for h in r["history"] if is_finite(h.get("val_acc"))} for r in records]
    epochs = set.intersection(*(set(c) for c in curves))
    return {e: statistics.mean(c[e] for c in curves) for e in epochs}


def plot(groups, names, path):
    """Per-epoch validation accuracy of each group: the mean over its seeds, and a band from min to max."""
    from matplotlib import rc_context
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    with rc_context({"text.usetex": False}):  # a "$" or "_" in a name is text, not TeX
        fig = Figure(figsize=(11, 5), dpi=100)
        ax = fig.add_subplot()
        for index, group in enumerate(groups):
            curves = [curve(records) for records in group.seeds.values()]
            epochs = sorted(set.intersection(*(set(c) for c in curves)))
            if not epochs:
                continue
            values = [[c[e] for c in curves] for e in epochs]
            line = ax.plot(epochs, [statistics.mean(v) for v in values], "o-", markersize=3)[0]
            text = f"{label(index)}: {describe(group, names)}, n={len(group.seeds)}"
            line.set_label(textwrap.fill(text, 40, subsequent_indent="    "))
            if len(curves) > 1:
                ax.fill_between(epochs, [min(v) for v in values], [max(v) for v in values], alpha=0.2)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
        ax.set_xlabel("epoch")
        ax.set_ylabel("validation accuracy per epoch (%)")
        ax.set_title("groups as in the table; band: min to max over seeds")
        ax.grid(alpha=0.3)
        if ax.lines:
            box = ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1), borderaxespad=0)
            for text in box.get_texts():
                text.set_parse_math(False)  # a script name or setting from a record is never mathtext
        fig.tight_layout()
        fig.savefig(path)
    return fig


def pick_reference(groups, letter):
    """The number of the group named by --reference (A, B, ... as printed), or 0, the first one."""
    letters = [label(i) for i in range(len(groups))]
    if not letter:
        return 0
    if letter.upper() not in letters:
        raise common.UserError(f"--reference {letter} is not a group here: use one of {', '.join(letters)}")
    return letters.index(letter.upper())


def main(argv=None):
    hp = common.parse_hparams(globals(), argv)
    out_dir = Path(hp.out_dir or common.HERE / "runs")
    if out_dir.exists() and not out_dir.is_dir():
        raise common.UserError(f"--out-dir {out_dir} is a file, not a folder; point it at the folder of run folders")
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
    reference = pick_reference(groups, hp.reference)
    names = differing_hparams(groups)
    print(table(groups, reference))
    print()
    print(legend(groups, names))
    print(notes(label(reference)))
    if unfinished:
        print(f"not completed, so not in the table: {', '.join(unfinished)}")
    try:
        plot(groups, names, out_dir / "compare.png")
    except OSError as error:
        print(f"compare.png not saved: cannot write in {out_dir} ({error.strerror})", file=sys.stderr)
    else:
        print(f"validation curves: {out_dir / 'compare.png'}")
    return groups


if __name__ == "__main__":
    raise SystemExit(common.run_main(main))
