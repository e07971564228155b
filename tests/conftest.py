"""Shared set-up: the real dataset, a small run's settings, and helpers to run a script as the command line does.

Fixtures: `real_data_dir` (the real Fashion-MNIST files), `extracted_dir` (them decompressed, in torchvision's
layout), `out_dir` (an empty place for run folders) and `ann_run` (one short ann.py run, shared by the tests that
read what a run leaves behind). Helpers: `run_cli`, `one_line`, `settings`, `png_size`.
"""

import argparse
import gzip
import json
import shutil
import struct
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import ann  # noqa: E402
import common  # noqa: E402
import plumbing  # noqa: E402

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
    for name in plumbing.FILES:
        source = plumbing.find_file(real_data_dir, name)
        opener = gzip.open if source.suffix == ".gz" else open
        with opener(source, "rb") as src, open(raw / name, "wb") as dst:
            shutil.copyfileobj(src, dst)
    return root


@pytest.fixture
def out_dir(tmp_path):
    """A folder for run folders, not created yet (a run creates it)."""
    return tmp_path / "runs"


@pytest.fixture(scope="session")
def ann_run(real_data_dir, tmp_path_factory):
    """A completed two-epoch ann.py run on 1,200 images: (its folder, its metrics.json record, its argv)."""
    out = tmp_path_factory.mktemp("ann-run")
    argv = SMALL + ["--epochs", "2", "--out-dir", str(out)]
    ann.main(argv)
    (run_dir,) = out.iterdir()
    return run_dir, json.loads((run_dir / "metrics.json").read_text()), argv
