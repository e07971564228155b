import argparse
import gzip
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import common  # noqa: E402

# A run of a few seconds: 1,000 training images, 200 for validation, 10 batches, one epoch.
SMALL = ["--subset", "1200", "--val-size", "200", "--batch-size", "100", "--epochs", "1"]


def run_cli(script, argv, capsys):
    """common.run_main as the command line uses it: (exit code, stderr lines)."""
    code = common.run_main(script.main, argv)
    return code, capsys.readouterr().err.strip().splitlines()


def settings(**values):
    """The settings a helper reads by name (hp.device, ...), as parse_hparams returns them."""
    return argparse.Namespace(**{"device": "cpu", "precision": "fp32", "seed": 0, **values})


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
    for name in common.FILES:
        source = common.find_file(real_data_dir, name)
        opener = gzip.open if source.suffix == ".gz" else open
        with opener(source, "rb") as src, open(raw / name, "wb") as dst:
            shutil.copyfileobj(src, dst)
    return root


@pytest.fixture
def out_dir(tmp_path):
    return tmp_path / "runs"
