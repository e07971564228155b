"""Shared set-up: the real dataset, a small run's settings, runs trained once for the whole suite, and helpers to run
a script as the command line does.

Fixtures: `real_data_dir` (the real Fashion-MNIST files), `extracted_dir` (them decompressed, in torchvision's
layout), `out_dir` (an empty place for run folders), `runs` (one run of each script, trained once) and `run_copy`
(a copy of one of them, to damage). Figures take most of a small run's time: they are drawn only in tests marked
`figures` (and in `runs`, which the figure tests read). Helpers: `run_cli`, `one_line`, `settings`, `png_size`,
`as_nobody` (in `public_dir`).
"""

import argparse
import gzip
import os
import shutil
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import common  # noqa: E402
from plumbing import data, files  # noqa: E402

import ann  # noqa: E402
import cnn  # noqa: E402
import resnet_transfer as rt  # noqa: E402

# A run of a few seconds: 1,000 training images, 200 for validation, 10 batches, one epoch.
SMALL = ["--subset", "1200", "--val-size", "200", "--batch-size", "100", "--epochs", "1"]


def run_cli(script, argv, capsys):
    """common.run_main as the command line uses it: (exit code, stderr lines)."""
    code = common.run_main(script.main, argv)
    return code, capsys.readouterr().err.strip().splitlines()


def one_line(err, *words):
    """stderr is a single line, no traceback, naming each of `words`."""
    assert len(err) == 1 and "Traceback" not in err[0], err
    for word in words:
        assert word in err[0], err[0]


def settings(**values):
    """The settings a helper reads by name (hp.device, ...), as parse_hparams returns them."""
    return argparse.Namespace(**{"device": "cpu", "precision": "fp32", "seed": 0, **values})


def png_size(path):
    """(width, height) of a PNG file, checked to be a real, non-trivial PNG."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
    return struct.unpack(">II", data[16:24])


@pytest.fixture
def public_dir():
    """An empty folder that the user nobody may use (pytest's own are root's alone), for `as_nobody`."""
    folder = Path(tempfile.mkdtemp())
    folder.chmod(0o777)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def as_nobody(argv, home):
    """argv run in a subprocess (in the project's folder) as the user nobody, for whom a chmod'ed folder is locked:
    root, as the tests run here, reads whatever it likes. Skipped where privileges cannot be dropped."""
    drop = []
    if os.geteuid() == 0:  # else permissions already hold
        if not shutil.which("setpriv"):
            pytest.skip("running as root, without setpriv to drop privileges: permissions would not hold")
        drop = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    env = {**os.environ, "HOME": str(home), "MPLCONFIGDIR": str(home)}
    probe = [sys.executable, "-c", "import torch; open('common.py').close()"]
    if drop and subprocess.run(drop + probe, cwd=ROOT, env=env, capture_output=True, timeout=300).returncode:
        pytest.skip("the user nobody cannot read the project or its Python here (a folder above it is root's alone)")
    return subprocess.run(drop + argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="session")
def real_data_dir():
    """The folder with the real Fashion-MNIST files (Debian package, ./data, or downloaded)."""
    return common.find_fashion_mnist()


@pytest.fixture(scope="session")
def extracted_dir(real_data_dir, tmp_path_factory):
    """The four files decompressed, in torchvision's layout root/FashionMNIST/raw."""
    root = tmp_path_factory.mktemp("tv")
    raw = root / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for name in data.FILES:
        source = data.find_file(real_data_dir, name)
        opener = gzip.open if source.suffix == ".gz" else open
        with opener(source, "rb") as src, open(raw / name, "wb") as dst:
            shutil.copyfileobj(src, dst)
    return root


@pytest.fixture
def out_dir(tmp_path):
    """A folder for run folders, not created yet (a run creates it)."""
    return tmp_path / "runs"


# The shared runs: 10,000 training images, 2,000 for validation, two epochs: the CNN then gets nine in ten photos
# of test images right, as the photo tests need. Transfer: a random ResNet-18 at 32 px, on 500 images.
TRAIN = ["--subset", "12000", "--val-size", "2000", "--epochs", "2"]
TINY_RT = ["--backbone", "resnet18", "--weights", "none", "--image-size", "32", "--subset", "600", "--val-size", "100"]


@pytest.fixture(scope="session")
def runs(real_data_dir, tmp_path_factory):
    """{ann, cnn, rt, finetune: run folder}: a completed run of each, with its figures, trained once."""
    out = tmp_path_factory.mktemp("runs")
    ann.main(TRAIN + ["--out-dir", str(out / "ann")])
    cnn.main(TRAIN + ["--out-dir", str(out / "cnn")])
    rt.main(TINY_RT + ["--epochs", "2", "--out-dir", str(out / "rt"), "--cache-dir", str(out / "cache")])
    rt.main(TINY_RT + ["--epochs", "1", "--finetune", "--out-dir", str(out / "finetune")])
    return {name: next(p for p in (out / name).iterdir() if p.is_dir()) for name in ("ann", "cnn", "rt", "finetune")}


@pytest.fixture
def run_copy(runs, tmp_path):
    """copy(name): a copy of the shared run `name`, in runs/ under the test's own folder, free to be damaged."""

    def copy(name):
        # Without the predictions figures other tests added (empty where figures are not drawn): as trained.
        copied = shutil.copytree(runs[name], tmp_path / "runs" / runs[name].name, ignore=shutil.ignore_patterns("pre*"))
        return Path(copied)

    return copy


@pytest.fixture(autouse=True)
def no_figures(request, monkeypatch):
    """Figures are drawn only in the tests marked `figures`: elsewhere drawing them would take most of the time."""
    if "figures" not in request.keywords:
        monkeypatch.setattr(files, "write_figure", lambda plot, path, *args: None)
