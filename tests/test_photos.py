"""predict.py on photos as phones take them: noisy, unevenly lit, and some with nothing to classify (issue #27)."""

import sys

import common
from plumbing import photos

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

import predict
from conftest import ROOT, run_cli

sys.path.insert(0, str(ROOT / "benchmarks"))
import photos as photos_benchmark  # noqa: E402


@pytest.fixture(scope="module")
def run(runs):
    """The shared CNN run, the model users take to their photos."""
    return runs["cnn"]


@pytest.fixture(scope="module")
def test_images(real_data_dir):
    _, _, x_test, _ = common.load_fashion_mnist(real_data_dir)
    return x_test[:100]


def as_photo(image, rng, noise=6.0, gradient=50.0, light_item=False):
    """A 28x28 test image as a phone might photograph it: 200 px at a random place on a 340x300 background, dark on
    light (light on dark if light_item), brighter towards a random side by `gradient` grey levels, with sensor
    noise of sigma `noise` (drawn here, not by benchmarks/photos.py, whose renderer the preparation was tried on)."""
    item = np.asarray(Image.fromarray(image).resize((200, 200), Image.Resampling.BILINEAR), dtype=np.float32) / 255
    ink = np.zeros((300, 340), dtype=np.float32)
    top, left = rng.integers(0, 300 - 200), rng.integers(0, 340 - 200)
    ink[top : top + 200, left : left + 200] = item
    y, x = np.mgrid[0:300, 0:340] / 340
    angle = rng.uniform(0, 2 * np.pi)
    along = x * np.cos(angle) + y * np.sin(angle)
    background = (40 if light_item else 205) + gradient * ((along - along.min()) / np.ptp(along) - 0.5)
    grey = background + ink * (170 if light_item else -0.85 * background) + rng.normal(0, noise, ink.shape)
    return Image.fromarray(grey.clip(0, 255).round().astype(np.uint8))


@pytest.mark.parametrize("noise, gradient", [(0, 0), (6, 50)], ids=["clean", "noisy, unevenly lit"])
def test_photos_get_the_class_the_original_images_get(run, test_images, noise, gradient):
    """Before issue #27 the trim stopped at noise pixels, so the item shrank to half the frame: 30% agreed."""
    model = predict.build_model(predict.load_run(run), torch.device("cpu"))
    rng = np.random.default_rng(6)
    renderings = [as_photo(image[0].numpy(), rng, noise, gradient) for image in test_images]
    prepared = np.stack([photos.prepare_photo(photo) for photo in renderings])
    from_photos = model(torch.from_numpy(prepared).unsqueeze(1)).argmax(1)
    agreement = (from_photos == model(test_images).argmax(1)).float().mean().item()
    print(f"photo agreement: {agreement:.0%}")
    assert agreement >= 0.85


def test_a_photo_is_prepared_light_on_black_filling_the_frame(test_images):
    canvas = Image.new("L", (300, 200), 230)
    canvas.paste(Image.new("L", (60, 120), 40), (100, 40))  # a dark upright item on a light background
    prepared = photos.prepare_photo(canvas)
    assert prepared.shape == (28, 28) and prepared.dtype == np.uint8
    rows, cols = np.flatnonzero(prepared.max(1) > 128), np.flatnonzero(prepared.max(0) > 128)
    assert (rows[0], rows[-1]) == (0, 27) and 13 <= cols[-1] - cols[0] + 1 <= 15  # 120 px -> 28, 60 -> 14
    assert prepared[0, 0] == 0 and prepared[14, 14] == 255
    rng = np.random.default_rng(1)
    for light_item in (False, True):  # noisy, unevenly lit; dark on light and light on dark
        for image in test_images[:20]:
            prepared = photos.prepare_photo(as_photo(image[0].numpy(), rng, noise=8, light_item=light_item))
            rows, cols = np.flatnonzero(prepared.max(1) > 40), np.flatnonzero(prepared.max(0) > 40)
            assert max(rows[-1] - rows[0], cols[-1] - cols[0]) + 1 >= 20  # the long side; the originals' span 27-28
            assert prepared[[0, 0, -1, -1], [0, -1, 0, -1]].max() < 40  # corners: background, black
            assert prepared.max() == 255


def plain(width, height, level):
    return Image.new("L", (width, height), level)


def with_item(canvas, box, level=30):
    """canvas with a rectangle of the given level pasted over box (left, top, right, bottom)."""
    canvas.paste(Image.new("L", (box[2] - box[0], box[3] - box[1]), level), box[:2])
    return canvas


def disc(canvas, box, level=30):
    ImageDraw.Draw(canvas).ellipse(box, fill=level)
    return canvas


@pytest.mark.parametrize(
    "image, words",
    [
        (Image.new("RGB", (640, 480), "white"), "blank"),
        (as_photo(np.zeros((28, 28), dtype=np.uint8), np.random.default_rng(0), noise=8), "blank"),  # no item in it
        (with_item(plain(640, 480, 230), (300, 200, 320, 220)), "tiny"),  # 20 px of 640
        (with_item(plain(400, 300, 230), (0, 0, 400, 300)), "blank"),  # one colour edge to edge
        (disc(plain(400, 400, 230), (-60, -60, 460, 460)), "all four edges"),  # cut off: only the corners light
        (with_item(with_item(plain(400, 400, 230), (0, 150, 400, 250)), (150, 0, 250, 400)), "all four edges"),
    ],
    ids=["white", "noise and a gradient", "tiny item", "one colour", "cut off", "cross"],
)
def test_a_photo_with_nothing_to_classify_is_said_so(image, words):
    problem = photos.photo_problem(image)
    assert problem is not None and words in problem, problem


@pytest.mark.parametrize("noise, gradient", [(0, 0), (8, 60)], ids=["clean", "noisy, unevenly lit"])
def test_a_photo_of_an_item_is_not_warned_about(test_images, noise, gradient):
    rng = np.random.default_rng(2)
    for image in test_images[:10]:
        photo = as_photo(image[0].numpy(), rng, noise=noise, gradient=gradient)
        assert photos.photo_problem(photo) is None
        assert photos.photo_problem(photos.grey_levels(photo)) is None  # or its grey levels


def test_the_photos_benchmark_writes_its_table(run, tmp_path):
    results = photos_benchmark.main(["--run", str(run), "--images", "2", "--results", str(tmp_path)])
    assert set(results["conditions"]) == {*photos_benchmark.CONDITIONS, photos_benchmark.VARIED}
    assert all(0 <= scores["agreement"] <= 100 for scores in results["conditions"].values())
    table = (tmp_path / "photos.md").read_text()
    assert "| clean |" in table and "| noise 10 |" in table and (tmp_path / "photos.json").exists()


def test_the_photos_benchmark_refuses_a_bad_setting_in_one_line(tmp_path, capsys):
    code, err = run_cli(photos_benchmark, ["--run", str(tmp_path), "--images", "0"], capsys)
    assert code == 2 and len(err) == 1 and "--images 0" in err[0]
