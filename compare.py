"""Compare training runs: runs that differ only in their seed form a group, judged on validation accuracy.

Run `python compare.py` after a few runs of ann.py, cnn.py or resnet_transfer.py (several seeds of each setting:
see the README); `--script cnn --last 6` narrows the list and `--reference B` picks the group the others are
compared against. The table gives each group's final validation and test accuracy over its seeds (mean ± sd, in
%) and its verdict against the reference: a paired t-test on shared seeds, else Welch's, with the difference's
95% interval, "beyond seed noise" when it excludes 0. Only groups trained alike (script, SUBSET, VAL_SIZE,
EPOCHS) are judged; no verdict is given without a measured spread. The figure draws what the table judges.
How groups, the reference and the verdict are formed, and what a verdict means: docs/compare.md.
"""

import common
from plumbing import files, runs
from plumbing.stops import shown

import json
import math
import statistics
import sys
import textwrap
from typing import NamedTuple

import numpy as np

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
    found = []
    try:
        folders = sorted(p for p in out_dir.iterdir() if p.is_dir())
    except OSError as error:
        raise common.UserError(f"--out-dir {out_dir}: cannot list it ({error.strerror})") from None
    for folder in folders:
        path = folder / "metrics.json"
        try:  # a folder we may not look into, or a damaged record: the others are still compared
            record = runs.read_record(path) if files.kind(path, "run record") == "file" else None
        except common.UserError as error:
            print(f"warning: skipping {shown(folder.name)}: {shown(error)}", file=sys.stderr)
            continue
        if record is None:  # a folder without a record, or with a pipe or a device in its place
            print(f"warning: skipping {shown(folder.name)}: no metrics.json file", file=sys.stderr)
            continue
        if (record.get("final") or {}).get("test_acc") is not None and record["final"].get("val_acc") is None:
            reason = "trained without a validation split (--val-size 0), so there is nothing to judge it on"
            print(f"warning: skipping {shown(folder.name)}: {reason}", file=sys.stderr)
            continue
        found.append((folder, record))
    return sorted(found, key=lambda run: runs.started_at(run[1]))


# ----------------------------------------------------------------------------------------------
# Groups: the same script and settings; within a group, the runs of each seed.


class Group(NamedTuple):
    name: str  # its letter: A, B, ... in order of first appearance among all the folder's runs
    script: str
    settings: dict  # the hyperparameters but NOT_COMPARED
    records: list  # every completed run of the group, repeats included
    seeds: dict  # {seed (as JSON text): [record, ...]}: more than one record is a repeat of that seed


def group_key(record):
    settings = {k: v for k, v in record["hparams"].items() if k not in NOT_COMPARED}
    # A seed gives the same numbers only on the same hardware in the same precision: pair only those.
    settings.update(device=record.get("device_name"), precision=record.get("precision"))
    if record.get("code"):  # runs of different code are never repeats of one seed (records from before it: none)
        settings["CODE"] = record["code"]
    if isinstance(record.get("image_size"), int):  # IMAGE_SIZE "auto" gives way to the size that ran, as above
        settings["IMAGE_SIZE"] = record["image_size"]
    return record.get("script") or "?", json.dumps(settings, sort_keys=True)


def group_runs(chosen, every):
    """The groups of the completed runs `chosen`, in order of first appearance. Each is named by its place among
    the groups of `every` run in the folder, so that a group keeps its letter whatever --script and --last pick."""
    completed = [record for _, record in every if record.get("status") == "completed" and record.get("final")]
    names = {key: label(i) for i, key in enumerate(dict.fromkeys(map(group_key, completed)))}
    groups = {}
    for _, record in chosen:
        if record.get("status") == "completed" and record.get("final"):
            key = group_key(record)
            group = groups.setdefault(key, Group(names[key], key[0], json.loads(key[1]), [], {}))
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
    """The group's script and the settings that differ between groups, as flags are written (lr=0.05, teacher=""),
    shown as text from a file is."""
    differ = {name: group.settings[name] for name in names if name in group.settings}
    settings = " ".join(f"{shown(name.lower())}=" + (shown(value) or '""') for name, value in differ.items())
    return f"{shown(group.script)}, {settings}" if settings else shown(group.script)


def in_order(seeds):
    """Seeds (as JSON text) in numeric order, any that are not whole numbers after them."""
    return sorted(seeds, key=lambda seed: (not seed.isdigit(), int(seed) if seed.isdigit() else 0, seed))


def seed_list(group):
    """The group's seeds in order, with the number of runs where a seed was repeated: 1(×2),2,3."""
    seeds = in_order(group.seeds)
    return ",".join(seed + (f"(×{len(group.seeds[seed])})" if len(group.seeds[seed]) > 1 else "") for seed in seeds)


# ----------------------------------------------------------------------------------------------
# Statistics: Student's t without scipy.

NODES, WEIGHTS = np.polynomial.legendre.leggauss(32)  # Gauss-Legendre on [-1, 1]: exact for smooth integrands


def t_critical(df, level=0.95):
    """The t with P(|T| <= t) = level for Student's t with df degrees of freedom (df need not be whole: Welch):
    12.71 for df 1, 4.30 for df 2, 1.96 as df grows. With t = sqrt(df) tan(a), P(|T| <= t) is c times the integral
    of cos(x)^(df - 1) from 0 to a, which rises ever more slowly: Newton's method from a = 0 closes in on its root."""
    c = 2 * math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(math.pi)
    a = 0.0
    for _ in range(50):
        covered = c * a / 2 * math.fsum(WEIGHTS * np.cos(a * (NODES + 1) / 2) ** (df - 1))
        a -= (covered - level) / (c * math.cos(a) ** (df - 1))
    return math.sqrt(df) * math.tan(a)


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


code_note = (
    "code: a fingerprint of the script, common.py and plumbing/ as they ran (the settings' values apart). Runs of "
    "different code are never pooled as repeats of a seed: an edited step, or a git pull, makes another group."
)
no_spread_note = (
    "no spread measured: the 95% interval is measured from how the per-seed differences vary (their sd, over n-1 "
    "degrees of freedom); equal differences show none, which says too few seeds were run, not that the difference "
    "is certain."
)


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
    words = "beyond seed noise" if abs(comparison.difference) > comparison.half_width else "within seed noise"
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
                left_out.append(left_out_note(group.name, groups[reference].name, comparison))
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
    header = "val acc verdict" if reference is None else f"val acc vs {groups[reference].name} (95% interval)"
    rows = [("group", "script", "n", "val acc %", "test acc %", "seconds", header)]
    for group, cell in zip(groups, cells, strict=True):
        seconds = [r["final"]["seconds"] for r in group.records if runs.is_number(r["final"].get("seconds"))]
        val, test = (spread(per_seed(group, name).values()) for name in ("val_acc", "test_acc"))
        mean_seconds = f"{statistics.mean(seconds):.0f}" if seconds else "-"
        rows.append((group.name, shown(group.script), str(len(group.seeds)), val, test, mean_seconds, cell))
    widths = [max(map(len, column)) for column in zip(*rows, strict=True)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows)


def legend(groups, names):
    """One wrapped line per group below the table: its seeds and the settings that differ between groups."""
    return "\n".join(
        wrap(f"{g.name}  {describe(g, names)}; seeds {seed_list(g)}", indent=len(g.name) + 2) for g in groups
    )


def notes(reference_label):
    return wrap(
        "n: seeds (repeats of a seed are averaged first); accuracy: mean ± sd over seeds, in %. "
        f"vs {reference_label}: the difference in mean validation accuracy in percentage points (pt), ± the "
        "half-width of its two-sided 95% interval (Student's t: paired on shared seeds, else Welch); beyond seed "
        "noise when the interval excludes 0; no verdict without a measured spread. Only groups trained alike (script, "
        "subset, val_size, epochs) are compared. Test accuracy is for reporting only."
    )


def wrap(text, indent=0):
    """Lines of at most 120 columns, so the legend and notes fit a terminal as wide as the table is kept."""
    return textwrap.fill(text, 120, subsequent_indent=" " * indent)


def plot(groups, names, reference, most=20):
    """compare.png: what the table judges, for the groups it judges against the reference (with no reference, those
    trained like the first group; at most `most`). Left: each group's final validation accuracy, one dot per seed,
    and its mean. Right: its difference from the reference in points, with the table's 95% interval: beyond seed
    noise where the interval misses 0; below it, for a paired test, each seed's own difference: seeds may spread
    far wider than the difference, which is judged seed by seed."""
    from matplotlib.figure import Figure

    base = groups[0 if reference is None else reference]
    drawn = [group for group in groups if not not_comparable(group, base)][:most]
    fig = Figure(figsize=(12, 1.8 + 0.55 * len(drawn)), dpi=100)
    left, right = fig.subplots(1, 2, sharey=True, gridspec_kw={"width_ratios": (3, 2)})
    for row, group in enumerate(drawn):
        values = [100 * v for v in per_seed(group, "val_acc").values()]
        left.plot(values, [row] * len(values), "o", color="tab:blue", alpha=0.6, markersize=6)
        left.plot([statistics.mean(values)], [row], "|", color="black", markersize=18, markeredgewidth=2)
        if reference is None or group is groups[reference]:
            words = "no verdict" if reference is None else "reference"
            right.text(0.5, row, words, ha="center", va="center", transform=right.get_yaxis_transform())
            continue
        comparison = compare(group, groups[reference])
        if comparison.paired:  # what a paired test judges: each seed's own difference, however far apart seeds lie
            a, b = per_seed(group, "val_acc"), per_seed(groups[reference], "val_acc")
            for seed in comparison.paired:
                point = (100 * (a[seed] - b[seed]), row + 0.22)
                right.plot(*point, "d", color="tab:purple", alpha=0.6, markersize=5)
                right.annotate(str(seed), point, (0, -9), textcoords="offset points", fontsize=6, ha="center")
        if comparison.half_width is None:
            right.plot([comparison.difference], [row], "x", color="grey")
        else:
            beyond = abs(comparison.difference) > comparison.half_width
            colour = "tab:green" if beyond and comparison.difference > 0 else "tab:red" if beyond else "grey"
            right.errorbar(comparison.difference, row, xerr=comparison.half_width, fmt="o", color=colour, capsize=4)
    labels = [textwrap.fill(f"{g.name}: {describe(g, names)}, n={len(g.seeds)}", 45) for g in drawn]
    left.set_yticks(range(len(drawn)), labels, fontsize=8)
    left.set_ylim(len(drawn) - 0.5, -0.5)  # top to bottom, as in the table, with room around each row
    left.set_xlabel("final validation accuracy (%): dots are seeds, | their mean")
    right.axvline(0, color="black", linewidth=0.8)
    right.set_xlabel(
        f"difference from {'the reference' if reference is None else groups[reference].name} (points), 95% interval"
        "\ndiamonds: each seed's own difference (paired tests)"
    )
    for ax in (left, right):
        ax.grid(alpha=0.3, axis="x")
    letters = ", ".join(group.name for group in drawn)
    letters += f" ({len(drawn)} of {len(groups)})" if len(drawn) < len(groups) else ""
    fig.suptitle(f"groups {letters}, as the table judges them (final validation, test-time views)", fontsize=10)
    for text in left.get_yticklabels():
        text.set_parse_math(False)  # a script name or setting from a record is never mathtext
    fig.tight_layout()
    return fig


def pick_reference(groups, letter):
    """(number, why) of the reference: the group --reference names (A, B, ... as printed), else the first group
    with 2+ seeds among those trained alike with the most such groups, else none (None): one seed has no spread
    to judge by, so a one-seed dry run is never the reference."""
    letters = [group.name for group in groups]
    if letter:
        if letter.upper() not in letters:
            raise common.UserError(f"--reference {letter} is not a group here: use one of {', '.join(letters)}")
        return letters.index(letter.upper()), "as --reference asked"
    seeded = [index for index, group in enumerate(groups) if len(group.seeds) >= 2]
    if not seeded:
        return None, "none: no group has 2+ seeds yet (run more seeds of a setting, or name one with --reference)"
    alike = {index: trained_alike(groups[index]) for index in seeded}
    most = max(seeded, key=lambda index: list(alike.values()).count(alike[index]))  # max takes the first of ties
    return most, "the first group with 2+ seeds, on the script, subset, val_size and epochs most such groups share"


def main(argv=None):
    hp = common.parse_hparams(globals(), argv, checks=CHECKS)
    out_dir = runs.runs_folder(hp.out_dir)
    found = files.kind(out_dir, "--out-dir")
    if found != "folder":
        problem = "is a file, not a folder; point" if found else "does not exist; run a training script first or pass"
        raise common.UserError(f"--out-dir {out_dir} {problem} --out-dir at the folder of run folders")
    every = load_runs(out_dir)
    found = [run for run in every if not hp.script or run[1].get("script") == hp.script]
    found = found[-hp.last :] if hp.last else found
    groups = group_runs(found, every)
    unfinished = [
        f"{shown(folder.name)} ({shown(record.get('status', '?'))})"
        for folder, record in found
        if record.get("status") != "completed" or not record.get("final")
    ]
    if not groups:
        print(f"no completed runs in {out_dir}" + (f"; not completed: {', '.join(unfinished)}" if unfinished else ""))
        return groups
    reference, why = pick_reference(groups, hp.reference)
    names = differing_hparams(groups)
    cells, left_out = judge(groups, reference)
    print(table(groups, reference, cells), legend(groups, names), sep="\n\n")
    if "CODE" in names:
        print(wrap(code_note))
    print(wrap(f"reference {'' if reference is None else groups[reference].name + ': '}{why}", indent=2))
    for note in left_out:
        print(note)
    print(notes("the reference" if reference is None else groups[reference].name))
    if unfinished:
        print(f"not completed, so not in the table: {', '.join(unfinished)}")
    if any(cell.startswith(("+", "-")) and "no spread" in cell for cell in cells):
        print(wrap(no_spread_note))
    # One figure per selection (compare.png, compare-cnn-last6.png): another selection does not overwrite it.
    figure = out_dir / f"compare{f'-{hp.script}' if hp.script else ''}{f'-last{hp.last}' if hp.last else ''}.png"
    try:
        files.write_figure(plot, figure, groups, names, reference)
    except common.UserError as error:  # the table above stands
        print(f"compare.py: {error}", file=sys.stderr)
    else:
        print(f"figure of what the table judges: {figure}")
    return groups


if __name__ == "__main__":
    raise SystemExit(common.run_main(main))
