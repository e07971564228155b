"""Compare training runs: runs that differ only in their seed form a group, judged on validation accuracy.

Run `python compare.py` after a few runs of ann.py, cnn.py or resnet_transfer.py (several seeds of each
setting: see the README); `--script cnn --last 6` narrows the list and `--reference B` picks the group the
others are compared against. The table gives each group's final validation and test accuracy over its seeds
(mean ± sd, in %); the settings that differ between groups are listed below it, and `compare.png` shows each
group's per-epoch validation accuracy (mean line, min-max band over seeds).

Groups are judged only against a reference trained alike: the same script, SUBSET, VAL_SIZE and EPOCHS (other
data or another schedule moves accuracy by more than any setting, so such a group's cell says "not comparable"
and which of these differ, instead of a verdict). Unless --reference names one, the reference is the first group
with two or more seeds among those trained alike with the most such groups (else the first group), and a line
below the table says why it was chosen: a one-seed dry run is never the reference, and a folder of old runs on
another schedule does not leave the new ones unjudged.

The verdict is on validation accuracy, the split settings are chosen on; test accuracy is shown beside it for
reporting only. Runs with the same settings and the same seed are repeats, not seed spread: they are averaged to
one value per seed first, so a copied run folder changes nothing. Groups that share two or more seeds are
compared seed by seed (the same seed gives the same split and initialisation, so much of the seed noise cancels):
a paired t-test on the per-seed differences; seeds only one of the two has are left out of that verdict (not of
the table's means), marked with "*" and named in a note below the table. Other groups are compared unpaired, with
Welch's t-test. Either way the difference, in percentage points, comes with the half-width of its two-sided 95%
interval from Student's t with the right degrees of freedom, and is called beyond the seed noise when the interval
excludes zero. No verdict is given without a measured spread: for a group with a single seed, nor when the
standard error is zero (paired differences all equal, or no seed moved either group), which says only that too
few seeds were run, not that the difference is certain.
"""

import json
import math
import statistics
import sys
import textwrap
from typing import NamedTuple

import common
import plumbing
from plumbing import reading

# --- Settings: each one is also a flag (LAST -> --last).
OUT_DIR = ""  # folder holding the run folders ("" = runs/ beside this script)
SCRIPT = ""  # only runs of this script: ann, cnn or resnet_transfer ("" = all)
LAST = 0  # only the N most recent runs (0 = all)
REFERENCE = ""  # the group the others are compared against, by its letter ("" = chosen as the table says)

# Not how the model was trained, or the seed; DEVICE and PRECISION as asked for ("auto") give way to what ran.
NOT_COMPARED = {"OUT_DIR", "DATA_DIR", "CACHE_DIR", "SHOW", "SEED", "DEVICE", "PRECISION"}
# What each setting above allows, checked as the flags are.
CHECKS = {
    "SCRIPT": (str, lambda v: v in ("", "ann", "cnn", "resnet_transfer"), "ann, cnn, resnet_transfer or empty"),
    "LAST": (int, lambda v: v >= 0, "an integer >= 0 (0 = all)"),
}


# ----------------------------------------------------------------------------------------------
# Reading the run folders: a bad one is named on stderr and skipped, never the end of the table.


def load_runs(out_dir):
    """(folder, record) of every readable run, oldest first; unreadable ones are skipped with a warning."""
    runs = []
    try:
        folders = sorted(p for p in out_dir.iterdir() if p.is_dir())
    except OSError as error:
        raise plumbing.UserError(f"--out-dir {out_dir}: cannot list it ({error.strerror})") from None
    for folder in folders:
        path = folder / "metrics.json"
        if not path.is_file():  # a folder without a record, or with a pipe or a device in its place
            print(f"warning: skipping {folder.name}: no metrics.json file", file=sys.stderr)
            continue
        try:
            record = reading.read_record(path)
        except plumbing.UserError as error:
            print(f"warning: skipping {folder.name}: {error}", file=sys.stderr)
            continue
        record.setdefault("history", [])
        reason = problem(record)
        if reason:
            print(f"warning: skipping {folder.name}: {reason}", file=sys.stderr)
            continue
        runs.append((folder, record))
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
        if not isinstance(final, dict):
            return "its final results are not a table of numbers"
        if not (final.get("seconds") is None or is_finite(final["seconds"])):  # only the fields read are checked
            return f"final seconds is {final['seconds']!r}, not a number"
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


# The data and schedule a group was trained on: groups that differ in these are not judged against each other.
TRAINED_ON = ("SUBSET", "VAL_SIZE", "EPOCHS")


def trained_alike(group):
    """What two groups must share to be compared: the script, and the data and schedule (TRAINED_ON)."""
    return (group.script, *(repr(group.settings.get(name)) for name in TRAINED_ON))


def not_comparable(group, reference):
    """Why `group` cannot be judged against `reference` ("script", "subset, epochs", ...), or "" when it can."""
    names = ["script", *(name.lower() for name in TRAINED_ON)]
    return ", ".join(n for n, a, b in zip(names, trained_alike(group), trained_alike(reference), strict=True) if a != b)


def per_seed(group, name):
    """{seed: final[name] averaged over that seed's repeats}: one value per seed, the unit of the statistics."""
    return {seed: statistics.mean(r["final"][name] for r in records) for seed, records in group.seeds.items()}


def differing_hparams(groups):
    names = sorted({name for group in groups for name in group.settings})
    return [name for name in names if len({repr(g.settings.get(name)) for g in groups}) > 1]


def label(index):
    return chr(ord("A") + index) if index < 26 else f"G{index + 1}"


def describe(group, names):
    """The group's script and the settings that differ between groups, as flags are written (lr=0.05, teacher="")."""
    shown = {name: group.settings[name] for name in names if name in group.settings}
    settings = " ".join(
        f"{name.lower()}={value}" if value != "" else f'{name.lower()}=""' for name, value in shown.items()
    )
    return f"{group.script}, {settings}" if settings else group.script


def in_order(seeds):
    """Seeds (as JSON text) in numeric order, any that are not whole numbers after them."""
    return sorted(seeds, key=lambda seed: (not seed.isdigit(), int(seed) if seed.isdigit() else 0, seed))


def seed_list(group):
    """The group's seeds in order, with the number of runs where a seed was repeated: 1(×2),2,3."""
    seeds = in_order(group.seeds)
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
    how: str  # the test and its n ("*" when seeds were left out of a paired test), or why there is no verdict
    paired: tuple = ()  # the seeds a paired test used
    left_out: tuple = ((), ())  # the seeds of `group`, and of the reference, that a paired test left out


def compare(group, reference):
    """The validation-accuracy difference of `group` to `reference`: paired on 2+ shared seeds, else Welch."""
    a, b = per_seed(group, "val_acc"), per_seed(reference, "val_acc")
    shared = in_order(seed for seed in a if seed in b)
    if len(shared) >= 2:
        differences = [100 * (a[s] - b[s]) for s in shared]
        n = len(differences)
        error = statistics.stdev(differences) / math.sqrt(n)
        left_out = (in_order(set(a) - set(b)), in_order(set(b) - set(a)))
        how = f"paired t, n={n}" + ("*" if any(left_out) else "")
        return interval(statistics.mean(differences), error, n - 1, how)._replace(paired=shared, left_out=left_out)
    difference = 100 * (statistics.mean(a.values()) - statistics.mean(b.values()))
    if len(a) < 2 or len(b) < 2:
        return Comparison(difference, None, "no verdict (n=1: one seed has no spread)")
    va, vb = (statistics.variance([100 * v for v in x.values()]) / len(x) for x in (a, b))
    error = math.sqrt(va + vb)
    # Welch–Satterthwaite degrees of freedom; with no spread, the pooled ones (unused: interval() gives no verdict)
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1)) if error > 0 else len(a) + len(b) - 2
    return interval(difference, error, df, f"Welch t, n={len(a)}+{len(b)}")


def interval(difference, error, df, how, no_spread=1e-6):
    """The comparison with its 95% interval; with no spread measured, none (an interval of zero width would
    call any difference beyond the seed noise). A standard error below `no_spread` points is float rounding:
    accuracies are fractions of images."""
    if error < no_spread:
        return Comparison(difference, None, f"no spread measured ({how}); add seeds")
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


def judge(groups, reference):
    """The verdict cell of each group against the group numbered `reference`, and a note for each paired
    verdict that left seeds out."""
    cells, left_out = [], []
    for index, group in enumerate(groups):
        if reference is None:  # no group has the seeds to judge by
            cells.append("no verdict: no group has 2+ seeds")
        elif index == reference:
            cells.append("reference")
        elif other := not_comparable(group, groups[reference]):
            cells.append(f"not comparable: other {other}")
        else:
            comparison = compare(group, groups[reference])
            cells.append(verdict(comparison))
            if any(comparison.left_out):
                left_out.append(left_out_note(label(index), label(reference), comparison))
    return cells, left_out


def left_out_note(name, reference_name, comparison):
    """The note below the table for a paired verdict that left seeds out: * B: paired t on seeds 1,2,3, those it
    shares with A; left out of the verdict, not of the table: B's seeds 4,5."""
    seeds = [
        f"{who}'s seed{'s' if len(unpaired) > 1 else ''} {','.join(unpaired)}"
        for who, unpaired in zip((name, reference_name), comparison.left_out, strict=True)
        if unpaired
    ]
    text = (
        f"* {name}: paired t on seeds {','.join(comparison.paired)}, those it shares with {reference_name}; "
        f"left out of the verdict, not of the table: {' and '.join(seeds)}"
    )
    return wrap(text, indent=2)


def table(groups, reference, cells):
    """One row per group: n (seeds), validation and test accuracy, seconds per run, and its verdict cell against
    the group numbered `reference`."""
    header = "val acc verdict" if reference is None else f"val acc vs {label(reference)} (95% interval)"
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
                cells[index],
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
        "noise when the interval excludes 0; no verdict without a measured spread. Only groups trained alike (script, "
        "subset, val_size, epochs) are compared. Test accuracy is for reporting only."
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


def plot(groups, names, reference=0, legend_entries=10):
    """Per-epoch validation accuracy of each group: the mean over its seeds, and a band from min to max; the
    legend names the first `legend_entries` groups, the reference among them (more do not fit beside the
    plot; the table lists them all)."""
    import warnings

    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 5), dpi=100)
    ax = fig.add_subplot()
    named = set(range(legend_entries))
    if reference is not None and reference not in named:
        named = set(range(legend_entries - 1)) | {reference}
    last = 1  # the last epoch drawn
    for index, group in enumerate(groups):
        curves = [curve(records) for records in group.seeds.values()]
        epochs = sorted(set.intersection(*(set(c) for c in curves)))
        if not epochs:
            continue
        values, last = [[c[e] for c in curves] for e in epochs], max(last, epochs[-1])
        line = ax.plot(epochs, [statistics.mean(v) for v in values], "o-", markersize=3)[0]
        if index in named:
            text = f"{label(index)}: {describe(group, names)}, n={len(group.seeds)}"
            line.set_label(textwrap.fill(text, 40, subsequent_indent="    "))
        if len(curves) > 1:
            ax.fill_between(epochs, [min(v) for v in values], [max(v) for v in values], alpha=0.2)
    common.epoch_axis(ax, last)
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation accuracy per epoch (%)")
    ax.set_title("groups as in the table; band: min to max over seeds")
    ax.grid(alpha=0.3)
    if ax.lines:
        box = ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1), borderaxespad=0)
        for text in box.get_texts():
            text.set_parse_math(False)  # a script name or setting from a record is never mathtext
        if len(groups) > len(named):
            box.set_title(f"{len(box.get_texts())} of {len(groups)} groups; all in the table", prop={"size": 8})
    with warnings.catch_warnings():  # decorations too large to fit: tight_layout keeps the layout, and warns
        warnings.simplefilter("ignore", UserWarning)
        fig.tight_layout()
    return fig


def pick_reference(groups, letter):
    """(number, why) of the reference: the group --reference names (A, B, ... as printed), else the first group
    with 2+ seeds among those trained alike with the most such groups, else none (None): one seed has no spread
    to judge by, so a one-seed dry run is never the reference."""
    letters = [label(i) for i in range(len(groups))]
    if letter:
        if letter.upper() not in letters:
            raise plumbing.UserError(f"--reference {letter} is not a group here: use one of {', '.join(letters)}")
        return letters.index(letter.upper()), "as --reference asked"
    seeded = [index for index, group in enumerate(groups) if len(group.seeds) >= 2]
    if not seeded:
        return None, "none: no group has 2+ seeds yet (run more seeds of a setting, or name one with --reference)"
    alike = {index: trained_alike(groups[index]) for index in seeded}
    most = max(seeded, key=lambda index: list(alike.values()).count(alike[index]))  # max takes the first of ties
    return most, "the first group with 2+ seeds, on the script, subset, val_size and epochs most such groups share"


def main(argv=None):
    hp = common.parse_hparams(globals(), argv, checks=CHECKS)
    out_dir = plumbing.runs_folder(hp.out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise plumbing.UserError(f"--out-dir {out_dir} is a file, not a folder; point it at the folder of run folders")
    if not out_dir.is_dir():
        raise plumbing.UserError(f"--out-dir {out_dir} does not exist; run a training script first or pass --out-dir")
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
    reference, why = pick_reference(groups, hp.reference)
    names = differing_hparams(groups)
    cells, left_out = judge(groups, reference)
    print(table(groups, reference, cells))
    print()
    print(legend(groups, names))
    print(wrap(f"reference {'' if reference is None else label(reference) + ': '}{why}", indent=2))
    for note in left_out:
        print(note)
    print(notes("the reference" if reference is None else label(reference)))
    if unfinished:
        print(f"not completed, so not in the table: {', '.join(unfinished)}")
    try:
        common.draw(plot, out_dir / "compare.png", groups, names, reference)
    except plumbing.UserError as error:  # the table above stands
        print(f"compare.py: {error}", file=sys.stderr)
    else:
        print(f"validation curves: {out_dir / 'compare.png'}")
    return groups


if __name__ == "__main__":
    raise SystemExit(common.run_main(main))
