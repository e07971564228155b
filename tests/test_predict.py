"""predict.py: a run folder is reused exactly, photos are prepared as Fashion-MNIST was, bad input is named."""

import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

import ann
import cnn
import common
import predict
import resnet_transfer as rt
from conftest import run_cli

TRAIN = ["--subset", "12000", "--val-size", "2000", "--epochs", "2"]


@pytest.fixture(scope="module")
def runs(real_data_dir, tmp_path_factory):
    """A short ANN, CNN and transfer run (random ResNet-18), each in its own folder."""
    out = tmp_path_factory.mktemp("runs")
    ann.main(TRAIN + ["--out-dir", str(out / "ann")])
    cnn.main(TRAIN + ["--out-dir", str(out / "cnn")])
    tiny = ["--backbone", "resnet18", "--weights", "none", "--image-size", "32", "--subset", "600", "--val-size", "100"]
    rt.main(tiny + ["--epochs", "2", "--out-dir", str(out / "rt"), "--cache-dir", str(out / "cache")])
    rt.main(tiny + ["--epochs", "1", "--finetune", "--out-dir", str(out / "finetune")])
    return {name: next((out / name).iterdir()) for name in ("ann", "cnn", "rt", "finetune")}


@pytest.fixture(scope="module")
def test_images(real_data_dir):
    _, _, x_test, _ = common.load_fashion_mnist(real_data_dir)
    return x_test[:200]


@pytest.mark.parametrize("name", ["ann", "cnn", "rt", "finetune"])
def test_test_flag_reproduces_the_recorded_accuracy(name, runs, capsys):
    accuracy = predict.main([str(runs[name]), "--test"])
    recorded = json.loads((runs[name] / "metrics.json").read_text())["final"]["test_acc"]
    assert accuracy == recorded
    assert f"{recorded:.2%} (recorded in the run: {recorded:.2%})" in capsys.readouterr().out


def save_raw(images, folder):
    folder.mkdir()
    for i, image in enumerate(images):
        Image.fromarray(image[0].numpy()).save(folder / f"{i:03d}.png")
    return folder


def save_photos(images, folder):
    """Each image as a photo would show it: dark item on a light background, upscaled, off centre, JPEG."""
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i, image in enumerate(images):
        item = Image.fromarray(255 - image[0].numpy()).resize((224, 224), Image.Resampling.BICUBIC)
        canvas = Image.new("L", (320, 270), 245)
        canvas.paste(item, (int(rng.integers(5, 90)), int(rng.integers(5, 40))))
        canvas.convert("RGB").save(folder / f"{i:03d}.jpg", quality=90)
    return folder


def predicted_classes(output):
    return [re.match(r".*?: (.+?) \d+%", line).group(1) for line in output.splitlines() if re.search(r"\d+%,", line)]


def test_photos_get_the_class_the_original_images_get(runs, test_images, tmp_path, capsys):
    out = ["--out", str(tmp_path / "predictions.png")]
    raw = predict.main([str(runs["cnn"]), str(save_raw(test_images, tmp_path / "raw")), "--raw", *out])
    from_raw = predicted_classes(capsys.readouterr().out)
    photos = predict.main([str(runs["cnn"]), str(save_photos(test_images, tmp_path / "photos")), *out])
    from_photos = predicted_classes(capsys.readouterr().out)
    assert len(from_raw) == len(from_photos) == 200 and raw.shape == photos.shape == (200, 10)
    agreement = sum(a == b for a, b in zip(from_raw, from_photos, strict=True)) / 200
    print(f"photo agreement: {agreement:.1%}")
    assert agreement >= 0.90


def test_raw_images_are_predicted_as_in_training(runs, test_images, real_data_dir, tmp_path, capsys):
    """--raw on the test images saved as PNGs gives the probabilities the trained model gives those images as
    its run evaluated them: its script's model and model.pt, on the test split normalised as in training."""
    folder = save_raw(test_images[:20], tmp_path / "raw")
    probabilities = predict.main([str(runs["ann"]), str(folder), "--raw", "--out", str(tmp_path / "p.png")])
    hp = common.parse_hparams(vars(ann), TRAIN)
    model = ann.ANN(hp.dropout)
    model.load_state_dict(torch.load(runs["ann"] / "model.pt", weights_only=True))
    splits = common.load_splits(real_data_dir, hp.subset, hp.val_size, hp.seed)
    data, _ = common.to_device_normalized(splits, torch.device("cpu"))
    amp = common.autocast(torch.device("cpu"), hp.precision)
    expected = common.predict(model, data.test[0][:20], amp, hp.tta_flip).softmax(1)
    assert torch.allclose(probabilities, expected, atol=1e-6)
    lines = capsys.readouterr().out.splitlines()
    assert re.fullmatch(r".*000\.png: [\w/ -]+ \d+%, [\w/ -]+ \d+%, [\w/ -]+ \d+%", lines[0])
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"


def test_prepared_photo_is_light_on_black_and_fills_the_frame():
    canvas = Image.new("L", (300, 200), 230)
    canvas.paste(Image.new("L", (60, 120), 40), (100, 40))  # a dark upright item on a light background
    prepared = predict.prepare_photo(canvas)
    assert prepared.shape == (28, 28) and prepared.dtype == np.uint8
    rows, cols = np.flatnonzero(prepared.max(1) > 128), np.flatnonzero(prepared.max(0) > 128)
    assert (rows[0], rows[-1]) == (0, 27) and 13 <= cols[-1] - cols[0] + 1 <= 15  # 120 px -> 28, 60 -> 14
    assert prepared[0, 0] == 0 and prepared[14, 14] == 255


def test_bad_images_are_named_and_the_others_predicted(runs, test_images, tmp_path, capsys):
    folder = save_raw(test_images[:2], tmp_path / "images")
    (folder / "notes.png").write_text("not an image")
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(folder / "cut.jpg")
    (folder / "cut.jpg").write_bytes((folder / "cut.jpg").read_bytes()[:300])
    argv = [str(runs["cnn"]), str(folder), str(tmp_path / "missing.jpg"), "--out", str(tmp_path / "p.png")]
    code = common.run_main(predict.main, argv)
    out, err = capsys.readouterr()
    assert code == 2
    assert len(out.strip().splitlines()) == 3  # two predictions and the figure
    err = err.strip().splitlines()
    assert len(err) == 4 and "Traceback" not in "".join(err)
    assert "notes.png: not an image" in err[1] and "cut.jpg: cannot be used" in err[0]
    assert "missing.jpg: no such file" in err[2] and "3 of 5 images could not be used" in err[3]


def broken(run_dir, tmp_path, change):
    """A copy of a run folder, damaged by change(folder)."""
    folder = tmp_path / "broken"
    folder.mkdir()
    for name in ("metrics.json", "model.pt"):
        (folder / name).write_bytes((run_dir / name).read_bytes())
    change(folder)
    return folder


def set_record(**changes):
    def change(folder):
        record = json.loads((folder / "metrics.json").read_text())
        (folder / "metrics.json").write_text(json.dumps({**record, **changes}))

    return change


@pytest.mark.parametrize(
    "change, words",
    [
        (lambda f: (f / "metrics.json").unlink(), "no metrics.json"),
        (lambda f: (f / "metrics.json").write_text('{"script": "cnn", "hist'), "metrics.json is unreadable"),
        (set_record(hparams={"SEED": 0}), "settings are incomplete or damaged"),
        (set_record(final=None), "no final test accuracy"),
        (set_record(normalization=None), "normalisation"),
        (set_record(status="interrupted"), "status is 'interrupted'"),
        (set_record(script="mlp"), "not the record of a run"),
        (lambda f: (f / "model.pt").unlink(), "model.pt: cannot read it"),
        (lambda f: (f / "model.pt").write_bytes(b"PK\x03\x04 cut"), "model.pt: not a file written by torch.save"),
        (
            lambda f: set_record(hparams={**json.loads((f / "metrics.json").read_text())["hparams"], "FC_WIDTH": 64})(
                f
            ),
            "has shape",
        ),
    ],
)
def test_a_run_folder_that_is_not_a_completed_run_is_one_line(change, words, runs, tmp_path, capsys):
    folder = broken(runs["cnn"], tmp_path, change)
    code, err = run_cli(predict, [str(folder), "--test"], capsys)
    assert code == 2 and len(err) == 1 and words in err[0] and "Traceback" not in err[0]


def test_unusable_outputs_and_inputs_are_one_line(runs, test_images, tmp_path, capsys, monkeypatch):
    folder = save_raw(test_images[:2], tmp_path / "images")
    (tmp_path / "empty").mkdir()
    cases = [
        ([str(folder), "--out", str(tmp_path / "no" / "such" / "folder.png")], "cannot write the figure"),
        ([str(tmp_path / "empty")], "no PNG, JPEG, BMP or WebP files"),
        ([str(folder), "--figure-images", "0"], "--figure-images"),
    ]
    for argv, words in cases:
        code, err = run_cli(predict, [str(runs["cnn"]), *argv], capsys)
        assert code == 2 and len(err) == 1 and words in err[0] and "Traceback" not in err[0], err


def test_an_image_with_too_many_pixels_is_named_not_opened(runs, tmp_path, capsys, monkeypatch):
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(tmp_path / "huge.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 4,096 pixels: over twice the limit, as a bomb would be
    code, err = run_cli(
        predict, [str(runs["cnn"]), str(tmp_path / "huge.png"), "--out", str(tmp_path / "p.png")], capsys
    )
    assert code == 2 and "huge.png: too many pixels" in err[0] and "Traceback" not in "".join(err)
