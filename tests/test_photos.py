"""predict.py on photos as phones take them: noisy, unevenly lit, and some with nothing to classify (issue #27)."""

import common

import io
import json
import sys

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFilter

import photo_prep as photos
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
    model = predict.load(run, torch.device("cpu")).logits
    rng = np.random.default_rng(6)
    renderings = [as_photo(image[0].numpy(), rng, noise, gradient) for image in test_images]
    prepared = np.stack([photos.prepare_photo(photo) for photo in renderings])
    from_photos = model(torch.from_numpy(prepared).unsqueeze(1)).argmax(1)
    agreement = (from_photos == model(test_images).argmax(1)).float().mean().item()
    print(f"photo agreement: {agreement:.0%}")
    assert agreement >= 0.8  # measured 88-92%, seeds 0-4, on AVX2, AVX-512 and bf16 CPUs; 30% before issue #27


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


def lying(image, rng, surface, colour, tilt=0.0, bars=0, frame=0):
    """A 28x28 test image as a photo of the item lying on a surface (drawn here, not by benchmarks/photos.py): a
    480x360 RGB photo, the item 150-190 px high at a random place, tilted by `tilt` degrees, in `colour` where the
    image is light (its light levels say how much of each pixel the item covers), JPEG; then black bars `bars` px
    high at the top and bottom, or a dark frame `frame` px wide."""
    size = int(rng.integers(150, 190))
    cover = Image.fromarray(image).resize((size, size), Image.Resampling.BILINEAR).rotate(tilt, expand=True)
    cover = np.asarray(cover, dtype=np.float32)[..., None] / 255
    y, x = np.mgrid[0:360, 0:480]
    if surface == "wood":  # stripes across, their spacing wavering, in the surface's colour
        grain = np.sin(y / 3.0 + 2 * np.sin(x / 40.0))[..., None]
        ground = np.array(colour[1], dtype=np.float32) * (1 + 0.1 * grain)
    elif surface == "carpet":  # a coloured mottle, blurred to a few pixels
        mottle = Image.fromarray(rng.integers(0, 256, (360, 480, 3), dtype=np.uint8)).filter(ImageFilter.BoxBlur(1))
        ground = np.array(colour[1], dtype=np.float32) + 0.4 * (np.asarray(mottle, dtype=np.float32) - 128)
    elif surface == "checks":  # squares of the surface's colour and white
        ground = np.where((((y // 24) + (x // 24)) % 2 == 0)[..., None], colour[1], (250, 250, 250)).astype(np.float32)
    else:
        ground = np.broadcast_to(np.array(colour[1], dtype=np.float32), (360, 480, 3)).copy()
    top, left = int(rng.integers(10, 350 - cover.shape[0])), int(rng.integers(10, 470 - cover.shape[1]))
    window = ground[top : top + cover.shape[0], left : left + cover.shape[1]]
    window[:] = window * (1 - cover) + np.array(colour[0], dtype=np.float32) * cover
    if bars:
        ground[:bars], ground[-bars:] = 0, 0
    if frame:
        ground[:frame], ground[-frame:], ground[:, :frame], ground[:, -frame:] = 25, 25, 25, 25
    photo = Image.fromarray(ground.clip(0, 255).astype(np.uint8))
    buffer = io.BytesIO()
    photo.save(buffer, "JPEG", quality=80)
    return Image.open(buffer)


WHERE = {  # (item colour, surface colour), surface, extra settings
    "light item on dark wood": (((235, 230, 220), (90, 55, 30)), "wood", {}),
    "dark item on light carpet": (((30, 30, 35), (205, 195, 180)), "carpet", {}),
    "blue item on checks": (((35, 60, 160), (200, 40, 40)), "checks", {}),
    "red item on beige": (((185, 30, 40), (230, 210, 175)), "plain", {}),
    "tilted 12 degrees": (((40, 40, 40), (235, 235, 235)), "plain", {"tilt": 12}),
    "letterboxed": (((40, 40, 40), (235, 235, 235)), "plain", {"bars": 45}),
    "a dark frame": (((40, 40, 40), (235, 235, 235)), "plain", {"frame": 6}),
}


def test_items_are_found_where_people_photograph_them(run, test_images):
    """Each condition of issue #34, 16 items each: textured and patterned surfaces, colours, tilt, bars, a frame."""
    model = predict.load(run, torch.device("cpu")).logits
    originals = model(test_images[:16]).argmax(1)
    agreement = {}
    for k, (name, (colour, surface, extra)) in enumerate(WHERE.items()):
        rng = np.random.default_rng(k)
        tilts = rng.uniform(-12, 12, 16) if "tilt" not in extra else [extra["tilt"] * (-1) ** i for i in range(16)]
        settings = {key: value for key, value in extra.items() if key != "tilt"}
        prepared = [photos.prepare_photo(lying(image[0].numpy(), rng, surface, colour, tilt, **settings))
                    for image, tilt in zip(test_images[:16], tilts, strict=True)]  # fmt: skip
        answers = model(torch.from_numpy(np.stack(prepared)).unsqueeze(1)).argmax(1)
        agreement[name] = (answers == originals).float().mean().item()
    print(agreement)
    # Measured, seeds 0-4 on AVX2, AVX-512 and bf16 CPUs: the lowest condition 81-88%, their mean 82-93%.
    assert min(agreement.values()) >= 0.6 and sum(agreement.values()) / len(agreement) >= 0.75, agreement


def test_a_busy_pattern_or_several_items_are_said_so_in_fitting_words(test_images):
    rng = np.random.default_rng(3)
    empty_checks = lying(np.zeros((28, 28), dtype=np.uint8), rng, "checks", ((0, 0, 0), (200, 40, 40)))
    assert "busy pattern" in photos.photo_problem(empty_checks)
    two = Image.new("L", (640, 360), 235)
    for left in (40, 400):
        two.paste(Image.fromarray(255 - test_images[1, 0].numpy()).resize((180, 180)), (left, 90))
    assert "several items" in photos.photo_problem(two)


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
    conditions = {*photos_benchmark.CONDITIONS, photos_benchmark.VARIED, *photos_benchmark.SCENES}
    assert set(results["conditions"]) == conditions
    assert all(0 <= scores["agreement"] <= 100 for scores in results["conditions"].values())
    table = (tmp_path / "photos.md").read_text()
    assert "| clean |" in table and "| noise 10 |" in table and (tmp_path / "photos.json").exists()


def test_the_not_clothing_benchmark_sets_its_thresholds_on_test_photos_and_writes_its_table(run, tmp_path):
    import not_clothing

    not_clothing.main(["--run", str(run), "--images", "50", "--per-kind", "2", "--results", str(tmp_path)])
    result = json.loads((tmp_path / "not-clothing.json").read_text())
    assert set(result["rows"]) == {"test items as photos", *not_clothing.KINDS, "all that is not clothing"}
    assert all(row["top probability"] <= 0.04 for name, row in result["rows"].items() if name.startswith("test"))
    assert "| cup |" in (tmp_path / "not-clothing.md").read_text()


def test_the_photos_benchmark_refuses_a_bad_setting_in_one_line(tmp_path, capsys):
    code, err = run_cli(photos_benchmark, ["--run", str(tmp_path), "--images", "0"], capsys)
    assert code == 2 and len(err) == 1 and "--images 0" in err[0]


# ----------------------------------------------------------------------------------------------
# Round six: an item filling the photo, a light cut-out on transparency, a panorama, tilts near 20 degrees,
# files cut short (drawn here with PIL shapes, not by the benchmark's renderer)


def close(a, b):
    """The correlation of two 28x28 images: 1 for the same picture whatever its brightness."""
    return float(np.corrcoef(np.asarray(a, dtype=float).ravel(), np.asarray(b, dtype=float).ravel())[0, 1])


def test_an_item_filling_most_of_a_plain_photo_is_the_item_not_bars_around_nothing(test_images):
    """A folded navy item over 75% of the frame, and test images enlarged 10x (light on black, filling it): the
    margins are background, not letterbox bars, and the item comes out whole, not as an outline, unwarned."""
    folded = np.full((300, 400, 3), (236, 234, 230), np.uint8)
    folded[35:265, 50:350] = (30, 35, 70)
    prepared, warning = photos.prepare(Image.fromarray(folded))
    assert warning is None and (prepared > 128).mean() > 0.6
    letterboxed = np.full((300, 400, 3), 235, np.uint8)
    letterboxed[:40] = letterboxed[260:] = 0  # real bars round nothing: still blank
    assert "blank" in photos.prepare(Image.fromarray(letterboxed))[1]
    for image in test_images[:10, 0].numpy():
        prepared, warning = photos.prepare(Image.fromarray(image).resize((280, 280), Image.Resampling.NEAREST))
        assert warning is None and close(prepared, image) > 0.7


@pytest.mark.parametrize("mode", ["RGBA", "P"])
def test_a_white_cut_out_on_transparency_stays_visible(mode):
    """A shop's white shirt on a transparent background (RGBA, or a palette PNG with a transparent colour)."""
    cut_out = Image.new("RGBA", (240, 240), (0, 0, 0, 0))
    ImageDraw.Draw(cut_out).polygon(
        [(60, 40), (180, 40), (220, 90), (190, 110), (180, 210), (60, 210)], (250, 248, 244)
    )
    if mode == "P":
        buffer = io.BytesIO()
        cut_out.convert("P").save(buffer, "PNG", transparency=0)
        cut_out = Image.open(io.BytesIO(buffer.getvalue()))
        assert "transparency" in cut_out.info
    prepared, warning = photos.prepare(cut_out)
    assert warning is None and (prepared > 128).mean() > 0.4


def test_a_panorama_is_prepared_within_a_bounded_memory():
    """30000x40 pixels (under the pixel cap): its square was padded at full resolution, about 10 GiB."""
    import tracemalloc

    panorama = np.full((40, 30000, 3), 230, np.uint8)
    panorama[8:32, 13000:17000] = 25
    tracemalloc.start()
    try:
        photos.prepare(Image.fromarray(panorama))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 500 * 2**20


@pytest.mark.parametrize("degrees", [6, 12, 18])
def test_a_tilt_is_read_true_up_to_20_degrees(degrees):
    """A long dark shape (a trouser leg's outline) on a light floor: the angle that sets it upright was read about
    1.2 times too large, so that from 17 degrees it passed the 20-degree limit and was dropped."""
    photo = Image.new("L", (480, 400), 235)
    ImageDraw.Draw(photo).rectangle((200, 60, 280, 340), 30)
    found = photos.find_item(photos.colour_levels(photo.rotate(degrees, Image.Resampling.BILINEAR, fillcolor=235)))
    assert abs(abs(found.angle) - degrees) < 1.5


@pytest.mark.parametrize("kind", ["WEBP", "JPEG"])
def test_a_file_cut_short_is_said_in_our_words(kind, tmp_path):
    """A WebP cut in half, a JPEG cut inside its header: Pillow's own messages named neither as cut short."""
    buffer = io.BytesIO()
    Image.new("RGB", (300, 300), (200, 30, 30)).save(buffer, kind)
    data = buffer.getvalue()
    path = tmp_path / f"short.{kind.lower()}"
    path.write_bytes(data[: len(data) // 2] if kind == "WEBP" else data[:100])
    image, problem = photos.read_image(path)
    assert image is None and problem.startswith("is cut short")
