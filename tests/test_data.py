"""The Fashion-MNIST files: where they are found, how they are verified and loaded, and the validation split.

Finding: a folder the user names (--data-dir or $FASHION_MNIST_DIR) is used even when it lacks the files (they
are downloaded into it), and a missing, unreadable or looping folder is named in one line. Verifying: a file
that is truncated, corrupt, another dataset, huge or a gzip bomb is refused, without reading more than the
official file's size. Loading: the same arrays as torchvision's reader, from .gz or decompressed files.
Augmentation and test-time views are in test_augmentation.py.
"""

import common
from plumbing import data, files

import builtins
import gzip
import io
import json
import os
import shutil
import subprocess
import sys
import time
import zlib

import pytest
import torch

import ann
from conftest import ROOT, SMALL, as_nobody, one_line, run_cli


@pytest.fixture
def copied_dir(real_data_dir, tmp_path):
    """A writable copy of the real files as .gz, to damage one of them."""
    folder = tmp_path / "data"
    folder.mkdir()
    for name in data.FILES:
        source = data.find_file(real_data_dir, name)
        content = source.read_bytes()
        (folder / (name + ".gz")).write_bytes(content if source.suffix == ".gz" else gzip.compress(content))
    return folder


def offline(monkeypatch):
    """torchvision's downloads go nowhere: nothing listens on port 9."""
    from torchvision.datasets import FashionMNIST

    monkeypatch.setattr(FashionMNIST, "mirrors", ["http://127.0.0.1:9/"])


# ----------------------------------------------------------------------------------------------
# Loading


def test_loader_matches_torchvision_reader(extracted_dir):
    from torchvision.datasets import FashionMNIST

    x_train, y_train, x_test, y_test = common.load_fashion_mnist(extracted_dir)
    reference_train = FashionMNIST(str(extracted_dir), train=True, download=False)
    reference_test = FashionMNIST(str(extracted_dir), train=False, download=False)
    assert x_train.shape == (60_000, 1, 28, 28) and x_train.dtype == torch.uint8
    assert x_test.shape == (10_000, 1, 28, 28) and y_test.dtype == torch.int64
    assert torch.equal(x_train[:, 0], reference_train.data)
    assert torch.equal(y_train, reference_train.targets)
    assert torch.equal(x_test[:, 0], reference_test.data)
    assert torch.equal(y_test, reference_test.targets)


def test_gz_and_extracted_files_give_the_same_arrays(real_data_dir, extracted_dir):
    for a, b in zip(common.load_fashion_mnist(real_data_dir), common.load_fashion_mnist(extracted_dir), strict=True):
        assert torch.equal(a, b)


def test_the_data_folder_used_is_printed_and_recorded(real_data_dir, tmp_path, capsys):
    ann.main(SMALL + ["--out-dir", str(tmp_path)])
    assert f"data: {real_data_dir}" in capsys.readouterr().out
    (metrics,) = tmp_path.glob("*/metrics.json")
    assert json.loads(metrics.read_text())["data_dir"] == str(real_data_dir)


def test_stratified_split_is_balanced_disjoint_and_seeded():
    labels = torch.arange(10).repeat_interleave(600)[torch.randperm(6000, generator=torch.Generator().manual_seed(1))]
    train, val = common.stratified_split(labels, 503, seed=7)
    assert len(val) == 503 and len(train) == 6000 - 503
    assert torch.equal(torch.cat([train, val]).sort().values, torch.arange(6000))
    counts = torch.bincount(labels[val], minlength=10)
    assert counts.max() - counts.min() <= 1
    again_train, again_val = common.stratified_split(labels, 503, seed=7)
    assert torch.equal(val, again_val) and torch.equal(train, again_train)
    assert not torch.equal(val, common.stratified_split(labels, 503, seed=8)[1])


# ----------------------------------------------------------------------------------------------
# Verifying: a file that is not the official one is refused, without reading more than the official size


def test_truncated_file_is_refused(copied_dir):
    path = copied_dir / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:100_000])
    with pytest.raises(common.UserError, match=r"train-images-idx3-ubyte\.gz.*truncated"):
        common.load_fashion_mnist(copied_dir)


def test_corrupted_content_is_refused(copied_dir):
    path = copied_dir / "t10k-labels-idx1-ubyte.gz"
    raw = bytearray(gzip.decompress(path.read_bytes()))
    raw[500] = (raw[500] + 1) % 10  # one label changed, the gzip itself is valid
    path.write_bytes(gzip.compress(bytes(raw)))
    with pytest.raises(common.UserError, match=r"t10k-labels-idx1-ubyte\.gz.*SHA-256 mismatch"):
        common.load_fashion_mnist(copied_dir)


def test_damage_inside_the_compressed_data_is_one_line_naming_the_file(copied_dir, tmp_path, capsys):
    """A bad sector or a cut download that kept its size: bytes flipped in the middle of the deflate stream, which
    zlib itself refuses (its own error, not an OSError)."""
    path = copied_dir / "train-labels-idx1-ubyte.gz"
    damaged = bytearray(path.read_bytes())
    middle = len(damaged) // 2
    damaged[middle : middle + 64] = bytes(b ^ 0xFF for b in damaged[middle : middle + 64])
    path.write_bytes(bytes(damaged))
    with pytest.raises(zlib.error):  # the fault, for real
        gzip.decompress(bytes(damaged))
    code, err = run_cli(ann, ["--data-dir", str(copied_dir), "--out-dir", str(tmp_path / "runs")], capsys)
    assert code == 2
    one_line(err, str(path), "damaged", "re-download")


def test_other_dataset_with_the_same_shape_is_refused(copied_dir):
    """A file with a valid IDX header and size but other images (as MNIST digits would be)."""
    path = copied_dir / "t10k-images-idx3-ubyte.gz"
    header = gzip.decompress(path.read_bytes())[:16]
    digits = torch.randint(0, 256, (10_000 * 28 * 28,), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    path.write_bytes(gzip.compress(header + digits.numpy().tobytes()))
    with pytest.raises(common.UserError, match=r"t10k-images-idx3-ubyte\.gz.*not the official Fashion-MNIST"):
        common.load_fashion_mnist(copied_dir)


def test_a_huge_data_file_is_refused_without_reading_it(copied_dir, monkeypatch):
    (copied_dir / "t10k-images-idx3-ubyte.gz").unlink()
    huge = copied_dir / "t10k-images-idx3-ubyte"
    with open(huge, "wb") as f:
        f.truncate(4 * 2**30)  # 4 GiB, sparse: costs no disk, and reading it whole would cost 4 GiB of memory
    opened, real_open = [], builtins.open

    def recording_open(file, *args, **kwargs):
        opened.append(os.fspath(file) if isinstance(file, str | os.PathLike) else file)
        return real_open(file, *args, **kwargs)

    for module, name in ((builtins, "open"), (io, "open"), (data, "open")):
        monkeypatch.setattr(module, name, recording_open, raising=False)
    started = time.perf_counter()
    with pytest.raises(common.UserError, match=r"t10k-images-idx3-ubyte: 4,294,967,296 bytes, but the official"):
        common.load_fashion_mnist(copied_dir)
    assert time.perf_counter() - started < 10
    assert str(huge) not in opened  # refused by its size alone: never opened


def test_a_gzip_bomb_is_refused_after_inflating_no_more_than_the_real_file(copied_dir, monkeypatch):
    bomb = gzip.compress(bytes(200 * 2**20), compresslevel=9)  # 200 MiB of zeros in about 200 KB
    (copied_dir / "train-images-idx3-ubyte.gz").write_bytes(bomb)
    reads = []
    real_open = gzip.open

    def counting_open(*args, **kwargs):
        f = real_open(*args, **kwargs)
        read = f.read
        f.read = lambda size=-1: reads.append(size) or read(size)
        return f

    monkeypatch.setattr(data.gzip, "open", counting_open)
    with pytest.raises(common.UserError, match=r"train-images-idx3-ubyte\.gz: holds more than the 47,040,016 bytes"):
        common.load_fashion_mnist(copied_dir)
    assert reads == [47_040_017]  # one read, capped at one byte past the official size: never the 200 MiB


def test_a_small_file_claiming_a_huge_gzip_is_refused_by_its_size(copied_dir):
    (copied_dir / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(bytes(50 * 2**20)))
    with pytest.raises(common.UserError, match=r"t10k-labels-idx1-ubyte\.gz: [\d,]+ bytes, but the official"):
        common.load_fashion_mnist(copied_dir)


def test_bad_data_files_exit_2_with_one_line_naming_one_and_leave_no_run_folder(tmp_path):
    """As a user sees it: `python ann.py` on files that are not gzip at all."""
    for name in data.FILES:
        (tmp_path / (name + ".gz")).write_bytes(b"\x1f\x8b not really gzip")
    result = subprocess.run(
        [sys.executable, "ann.py", "--data-dir", str(tmp_path), "--out-dir", str(tmp_path / "runs")],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    err = result.stderr.strip().splitlines()
    assert len(err) == 1 and "train-images-idx3-ubyte.gz" in err[0] and "Traceback" not in result.stderr
    assert not any((tmp_path / "runs").iterdir())


# ----------------------------------------------------------------------------------------------
# Finding: the folder the user named, or ./data, the Debian package's folder, or a download


def naming_data_dir(folder, from_env, tmp_path, monkeypatch):
    """ann.py's arguments with the data folder named by $FASHION_MNIST_DIR or by --data-dir."""
    argv = ["--out-dir", str(tmp_path / "runs")]
    if from_env:
        monkeypatch.setenv("FASHION_MNIST_DIR", str(folder))
        return argv
    return argv + ["--data-dir", str(folder)]


@pytest.mark.parametrize("from_env", [False, True])
def test_a_missing_data_folder_a_file_or_a_symlink_loop_is_named_as_such(from_env, tmp_path, monkeypatch, capsys):
    a_file, loop = tmp_path / "a-file", tmp_path / "loop"
    a_file.write_text("not a folder")
    loop.symlink_to(loop)
    flag = "$FASHION_MNIST_DIR" if from_env else "--data-dir"
    for folder, words in ((tmp_path / "nowhere", "does not exist"), (a_file, "is a file"), (loop, "symlink loop")):
        code, err = run_cli(ann, naming_data_dir(folder, from_env, tmp_path, monkeypatch), capsys)
        assert code == 2
        one_line(err, flag, str(folder), words)
        assert not any((tmp_path / "runs").iterdir())


def test_unreadable_data_folder_is_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(os, "access", lambda *a: False)  # tests run as root, where chmod does not stop reads
    code, err = run_cli(ann, ["--data-dir", str(tmp_path), "--out-dir", str(tmp_path / "runs")], capsys)
    assert code == 2 and len(err) == 1 and "not readable" in err[0]


def test_a_data_folder_we_may_not_look_into_is_one_line(public_dir):
    """./data locked (another user's, or chmod'ed): pathlib's is_file raised PermissionError, a traceback."""
    project = public_dir / "project"
    project.mkdir()
    for name in ("ann.py", "common.py"):
        shutil.copy(ROOT / name, project)
    shutil.copytree(ROOT / "plumbing", project / "plumbing", ignore=shutil.ignore_patterns("__pycache__"))
    (project / "data").mkdir(mode=0o700)  # root's alone
    argv = [sys.executable, str(project / "ann.py"), "--out-dir", str(public_dir / "runs")]
    done = as_nobody(argv, public_dir)
    assert done.returncode == 2
    one_line(done.stderr.strip().splitlines(), str(project / "data"), "cannot look at it", "--data-dir")


@pytest.mark.parametrize("holds", ["nothing", "one of the four files"])
@pytest.mark.parametrize("from_env", [False, True])
def test_a_named_data_folder_without_the_files_is_used_not_passed_over(
    from_env, holds, real_data_dir, tmp_path, monkeypatch, capsys
):
    """The download goes into the folder the user named; no other folder's files are used silently."""
    offline(monkeypatch)
    named = tmp_path / "named"
    named.mkdir()
    if holds != "nothing":
        shutil.copy(data.find_file(real_data_dir, "t10k-labels-idx1-ubyte"), named)
    code, err = run_cli(ann, naming_data_dir(named, from_env, tmp_path, monkeypatch), capsys)
    assert code == 2
    one_line(err, f"could not download Fashion-MNIST into {named}")
    assert not any((tmp_path / "runs").iterdir())


def test_failed_download_says_where_data_can_come_from(tmp_path, monkeypatch, capsys):
    offline(monkeypatch)
    monkeypatch.setattr(files, "HERE", tmp_path)
    monkeypatch.setattr(data, "DEBIAN_DIR", tmp_path / "no-debian-package")
    monkeypatch.delenv("FASHION_MNIST_DIR", raising=False)
    code, err = run_cli(ann, ["--out-dir", str(tmp_path / "runs")], capsys)
    assert code == 2 and len(err) == 1
    assert data.DOWNLOAD_URL in err[0] and "dataset-fashion-mnist" in err[0] and "--data-dir" in err[0]
