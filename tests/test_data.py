import gzip
import shutil

import pytest
import torch

import common
import plumbing


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


@pytest.fixture
def copied_dir(real_data_dir, tmp_path):
    """A writable copy of the real files as .gz, to damage one of them."""
    for name in common.FILES:
        source = common.find_file(real_data_dir, name)
        data = source.read_bytes()
        (tmp_path / (name + ".gz")).write_bytes(data if source.suffix == ".gz" else gzip.compress(data))
    return tmp_path


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


def test_other_dataset_with_the_same_shape_is_refused(copied_dir):
    """A file with a valid IDX header and size but other images (as MNIST digits would be)."""
    path = copied_dir / "t10k-images-idx3-ubyte.gz"
    header = gzip.decompress(path.read_bytes())[:16]
    digits = torch.randint(0, 256, (10_000 * 28 * 28,), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    path.write_bytes(gzip.compress(header + digits.numpy().tobytes()))
    with pytest.raises(common.UserError, match=r"t10k-images-idx3-ubyte\.gz.*not the official Fashion-MNIST"):
        common.load_fashion_mnist(copied_dir)


def test_missing_data_dir_is_refused(tmp_path):
    with pytest.raises(common.UserError, match=r"does not exist"):
        common.load_fashion_mnist(tmp_path / "nowhere")


def test_a_named_folder_is_used_even_when_incomplete(real_data_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("FASHION_MNIST_DIR", str(tmp_path))
    shutil.copy(common.find_file(real_data_dir, "t10k-labels-idx1-ubyte"), tmp_path)
    downloads = []
    monkeypatch.setattr(plumbing, "_download", lambda folder: downloads.append(folder) or folder)
    assert common.find_fashion_mnist() == tmp_path and downloads == [tmp_path]  # never other files silently


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


def test_flip_and_shift_move_pixels_without_changing_them():
    x = torch.randn(64, 1, 28, 28)
    generator = torch.Generator().manual_seed(0)
    flipped = common.random_flip_and_shift(x, 0, generator)
    same = (flipped == x).flatten(1).all(1)
    mirrored = (flipped == x.flip(3)).flatten(1).all(1)
    assert (same | mirrored).all() and same.any() and mirrored.any()
    shifted = common.random_flip_and_shift(x, 2, generator, flip=False)
    background = x.min()
    # every shifted image is a translated copy: its 24x24 centre appears in the original
    for original, moved in zip(x, shifted, strict=True):
        centre = moved[:, 2:26, 2:26]
        assert any(
            torch.equal(original[:, 2 + dy : 26 + dy, 2 + dx : 26 + dx], centre)
            for dy in range(-2, 3)
            for dx in range(-2, 3)
        )
    assert (shifted == background).any()


def test_tta_views_are_the_image_its_shifts_and_their_mirrors():
    x = torch.randn(3, 1, 28, 28)
    assert [v.data_ptr() for v in common.tta_views(x)] == [x.data_ptr()]
    views = common.tta_views(x, flip=True, max_shift=2, background=-5.0)
    assert len(views) == 2 * (1 + 4 * 2)
    unflipped, mirrored = views[:9], views[9:]
    for view, mirror in zip(unflipped, mirrored, strict=True):
        assert torch.equal(mirror, view.flip(3))
    assert torch.equal(unflipped[0], x)
    down, up, right, left = unflipped[1:5]  # moved by one pixel; the background fills the edge it leaves
    assert torch.equal(down[:, :, 1:], x[:, :, :-1]) and (down[:, :, 0] == -5).all()
    assert torch.equal(up[:, :, :-1], x[:, :, 1:]) and (up[:, :, -1] == -5).all()
    assert torch.equal(right[..., 1:], x[..., :-1]) and (right[..., 0] == -5).all()
    assert torch.equal(left[..., :-1], x[..., 1:]) and (left[..., -1] == -5).all()
    assert torch.equal(unflipped[5][:, :, 2:], x[:, :, :-2])  # then by two
