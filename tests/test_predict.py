"""predict.py: a run folder is reused exactly, photos are prepared as Fashion-MNIST was, bad input is named."""

import common
from plumbing import figures, files
from plumbing import runs as runs_module

import contextlib
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch
from PIL import EpsImagePlugin, Image, ImageOps, PngImagePlugin

import ann
import predict
from conftest import ROOT, TRAIN, as_nobody, one_line, run_cli


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


def test_photos_get_the_same_answer_facing_either_way(runs, test_images, tmp_path):
    """All of Fashion-MNIST's footwear faces left. A photo is prepared alike when mirrored, and the CNN averages each
    image with its mirror, so a shoe photographed facing right gets the answer it gets facing left: the same class,
    each probability within 1.1 points (measured, seeds 0-4, on AVX2, AVX-512 and bf16 CPUs). Without the mirror
    averaging 192-197 of the 200 keep their class and a probability moves by 18-31 points; with the preparation of
    9e61f5c (an odd margin's extra pixel all on one side) 199-200 keep it and a probability moves by 3.7-5.6."""
    photos = sorted(save_photos(test_images, tmp_path / "photos").iterdir())
    (tmp_path / "mirrored").mkdir()
    for photo in photos:  # the same photos the other way round, as PNG: nothing added by compressing them again
        ImageOps.mirror(Image.open(photo)).save(tmp_path / "mirrored" / f"{photo.stem}.png")
    mirrored = sorted((tmp_path / "mirrored").iterdir())
    run = predict.load(runs["cnn"], torch.device("cpu"))
    as_they_are, other_way = (
        run.logits(predict.load_images(paths, raw=False)[1]).softmax(1) for paths in (photos, mirrored)
    )
    assert len(as_they_are) == len(other_way) == 200
    assert torch.equal(as_they_are.argmax(1), other_way.argmax(1))
    assert (as_they_are - other_way).abs().max() < 0.025


@pytest.mark.figures
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
    expected = common.compute_logits(model, data.test[0][:20], amp, hp.tta_flip).softmax(1)
    assert torch.allclose(probabilities, expected, atol=1e-6)
    lines = capsys.readouterr().out.splitlines()
    assert re.fullmatch(r".*000\.png: [\w/ -]+ \d+%, [\w/ -]+ \d+%, [\w/ -]+ \d+%", lines[1])  # after the run's
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"


def test_bad_images_are_named_and_the_others_predicted(runs, test_images, tmp_path, capsys):
    folder = save_raw(test_images[:2], tmp_path / "images")
    (folder / "notes.png").write_text("not an image")
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(folder / "cut.jpg")
    (folder / "cut.jpg").write_bytes((folder / "cut.jpg").read_bytes()[:300])
    argv = [str(runs["cnn"]), str(folder), str(tmp_path / "missing.jpg"), "--out", str(tmp_path / "p.png")]
    code = common.run_main(predict.main, argv)
    out, err = capsys.readouterr()
    assert code == 2
    assert len(out.strip().splitlines()) == 4  # the run, two predictions and the figure
    err = [line for line in err.strip().splitlines() if ": warning: " not in line]  # a 28x28 item fills its frame
    assert len(err) == 4 and "Traceback" not in "".join(err)
    assert "notes.png: not an image" in err[1] and "cut.jpg: is cut short" in err[0]
    assert "missing.jpg: no such file" in err[2] and "3 of 5 images could not be used" in err[3]


def test_what_was_passed_over_and_each_warning_are_said_where_they_belong(runs, test_images, tmp_path, monkeypatch,
                                                                          capsys):  # fmt: skip
    """A folder's other files (a phone's HEIC photos, a subfolder) are named in one line; an empty file and one cut
    short are said to be so; a warning follows its own image's answer, not the whole list."""
    folder = save_photos(test_images[:2], tmp_path / "photos")
    Image.new("RGB", (300, 200), "white").save(folder / "001b_blank.png")  # sorted between the two photos
    (folder / "IMG_1.heic").write_bytes(b"\0" * 16)
    (folder / "older").mkdir()
    (folder / "zero.png").touch()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64), np.uint8)).save(folder / "short.png")
    (folder / "short.png").write_bytes((folder / "short.png").read_bytes()[:2000])  # of 4 KB
    monkeypatch.setattr(sys, "stderr", sys.stdout)  # both streams in the order they were written
    code = common.run_main(predict.main, [str(runs["cnn"]), str(folder), "--out", str(tmp_path / "p.png")])
    lines = capsys.readouterr().out.splitlines()
    assert code == 2
    assert lines[0].endswith("photos: passed over 2 not PNG, JPEG, BMP or WebP: IMG_1.heic, older/"), lines
    named = {line.split(": ")[0].rsplit("/", 1)[-1]: line for line in lines[1:]}
    assert "is empty (0 bytes)" in named["zero.png"] and "is cut short" in named["short.png"]
    answers = [line for line in lines if re.search(r"\d+%,|: warning: ", line)]
    order = [line.split(": ")[0].rsplit("/", 1)[-1] for line in answers]
    assert order == ["000.jpg", "001.jpg", "001b_blank.png", "001b_blank.png"]
    assert "warning: the image is blank" in answers[3]


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
        (set_record(status="interrupted", model_pt=None), "status is 'interrupted' and it saved no weights"),
        (set_record(script="mlp"), "not the record of a run"),
        (set_record(script=["cnn"]), "not the record of a run"),
        (set_record(final=5), "no final test accuracy"),
        (set_record(final={"test_acc": "high"}), "test_acc is 'high'"),
        (lambda f: (f / "model.pt").unlink(), "it saved no weights"),
        (lambda f: (f / "model.pt").write_bytes(b"PK\x03\x04 cut"), "model.pt: not a file written by torch.save"),
        (lambda f: set_record(model_args={"fc_width": 64, "dropout": 0.1})(f), "has shape"),
        (lambda f: set_record(model_args={"fc_width": 64, "depth": 3})(f), "arguments of its model are damaged"),
        (lambda f: set_record(model_args={"dropout": 0.1})(f), "do not fit the model"),
    ],
)
def test_a_run_folder_that_is_not_a_completed_run_is_one_line(change, words, runs, tmp_path, capsys):
    folder = broken(runs["cnn"], tmp_path, change)
    code, err = run_cli(predict, [str(folder), "--test"], capsys)
    assert code == 2 and len(err) == 1 and words in err[0] and "Traceback" not in err[0]


@pytest.mark.parametrize("final", [None, {"val_acc": 0.5}, 5])  # no final accuracies, or a hand-edited one
def test_a_stopped_run_is_used_with_the_weights_of_its_last_epoch_and_says_so(final, runs, tmp_path, capsys):
    stopped = set_record(status="interrupted", final=final)
    folder = broken(runs["ann"], tmp_path, stopped)
    last = json.loads((folder / "metrics.json").read_text())["history"][-1]["epoch"]
    code = common.run_main(predict.main, [str(folder), "--test"])
    out, err = capsys.readouterr()
    assert code == 0 and "the run recorded none: it did not end" in out
    one_line(err.strip().splitlines(), "'interrupted'", f"weights after epoch {last}")


def test_a_run_still_training_is_answered_with_the_epoch_saved_while_predict_read_it(runs, tmp_path, test_images):
    """predict.py reads the record, and while it builds the model the run saves its next epoch: the weights are then
    of an epoch the record it read does not name. The healthy run was refused as replaced or damaged."""
    record = json.loads((runs["ann"] / "metrics.json").read_text())
    at_epoch_1 = {**record, "history": record["history"][:1], "status": "running", "final": None}
    folder = broken(runs["ann"], tmp_path, lambda f: (f / "metrics.json").write_text(json.dumps(at_epoch_1)))
    run = runs_module.load_run(folder)  # the record of epoch 1
    (folder / "metrics.json").write_text(json.dumps(record))  # epoch 2 saved: its record, then its weights
    logits = predict.rebuilt(run, torch.device("cpu"), "")(test_images[:4])
    assert logits.shape == (4, 10) and run.weights == "final weights, as evaluated after epoch 2"
    assert run.final["test_acc"] == record["final"]["test_acc"]


def test_a_run_is_not_rebuilt_from_code_edited_since_it_trained(runs, tmp_path, test_images):
    """The model trained with ReLU, and today's ann.py has Tanh (or a learner's copy trained the Tanh model, then
    the edit was undone): the weights fit, and the answers, even --test, were another network's, silently. Here
    the edit is real: a copy of the project whose ANN has Tanh, asked about a run trained by the project's."""
    copy = tmp_path / "edited"
    copy.mkdir()
    for name in ("ann.py", "common.py", "predict.py", "photo_prep.py"):
        shutil.copy(ROOT / name, copy / name)
    shutil.copytree(ROOT / "plumbing", copy / "plumbing", ignore=shutil.ignore_patterns("__pycache__"))
    (copy / "ann.py").write_text((ROOT / "ann.py").read_text().replace("nn.ReLU(inplace=True)", "nn.Tanh()"))
    save_raw(test_images[:1], tmp_path / "raw")
    argv = [sys.executable, "predict.py", str(runs["ann"]), str(tmp_path / "raw"), "--raw", "--out", "p.png"]
    done = subprocess.run(argv, cwd=copy, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and done.stdout == ""
    one_line(done.stderr.strip().splitlines(), "trained with other code than there is now", "train again")


def damaged_weights(change):
    """A change to model.pt for broken(): change(state) is saved in its place."""

    def damage(folder):
        state = torch.load(folder / "model.pt", weights_only=True)
        torch.save(change(state), folder / "model.pt")

    return damage


def with_tensor(key, make):
    return damaged_weights(lambda state: {**state, key: make(state[key])})


@pytest.mark.parametrize(
    "change, words",
    [
        (with_tensor("features.2.running_var", lambda t: t.to(torch.complex64)), "complex64"),
        (with_tensor("features.2.running_var", lambda t: t.to(torch.float8_e4m3fn)), "float8_e4m3fn"),
        (with_tensor("features.0.weight", lambda t: torch.quantize_per_tensor(t, 0.01, 0, torch.qint8)), "qint8"),
        (with_tensor("features.0.weight", lambda t: t.to_sparse()), "sparse"),
        (with_tensor("features.0.weight", lambda t: t.to("meta")), "meta"),  # right name, shape, type; no values
        (with_tensor("features.2.running_var", lambda t: torch.nested.nested_tensor([t, t])), "nested"),
        (damaged_weights(lambda state: {**state, 7: torch.zeros(1)}), "holds no state dict"),
    ],
    ids=["complex", "float8", "qint8", "sparse", "meta", "nested", "a key that is a number"],
)
@pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor")  # deprecated, but a file may still hold one
@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")  # a prototype, but a file may hold one
def test_weights_of_a_type_no_check_can_take_are_refused_in_one_line(change, words, runs, tmp_path, capsys):
    folder = broken(runs["cnn"], tmp_path, change)
    code, err = run_cli(predict, [str(folder), "--test"], capsys)
    assert code == 2
    one_line(err, "model.pt", words)


@pytest.mark.figures
def test_unusable_outputs_and_inputs_are_one_line(runs, test_images, tmp_path, capsys, monkeypatch):
    folder = save_raw(test_images[:2], tmp_path / "images")
    (tmp_path / "empty").mkdir()
    cases = [
        ([str(folder), "--out", str(tmp_path / "no" / "such" / "folder.png")], "cannot write"),
        ([str(tmp_path / "empty")], "no PNG, JPEG, BMP or WebP files"),
        ([str(folder), "--figure-images", "0"], "--figure-images"),
    ]
    for argv, words in cases:
        code, err = run_cli(predict, [str(runs["cnn"]), *argv], capsys)
        err = [line for line in err if ": warning: " not in line]
        assert code == 2 and len(err) == 1 and words in err[0] and "Traceback" not in err[0], err


def test_an_image_with_too_many_pixels_is_named_not_opened(runs, tmp_path, capsys, monkeypatch):
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(tmp_path / "huge.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 4,096 pixels: over twice the limit, as a bomb would be
    code, err = run_cli(
        predict, [str(runs["cnn"]), str(tmp_path / "huge.png"), "--out", str(tmp_path / "p.png")], capsys
    )
    assert code == 2 and "huge.png: too many pixels" in err[0] and "Traceback" not in "".join(err)


def test_only_the_named_formats_are_read_so_postscript_named_png_runs_no_ghostscript(
    runs, tmp_path, capsys, monkeypatch
):
    """Pillow picks its reader from the content: a PostScript file called shirt.png must not reach the EPS reader,
    which hands the file to Ghostscript."""
    used = []

    def eps_reader(*args, **kwargs):
        used.append(args)
        raise SyntaxError("the EPS reader was used")  # Pillow then tries its other readers

    monkeypatch.setattr(EpsImagePlugin.EpsImageFile, "_open", eps_reader)
    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", eps_reader)
    (tmp_path / "shirt.png").write_text("%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 28 28\nshowpage\n")
    argv = [str(runs["cnn"]), str(tmp_path / "shirt.png"), "--out", str(tmp_path / "p.png")]
    code, err = run_cli(predict, argv, capsys)
    assert not used, "the EPS reader was tried"
    assert code == 2 and len(err) == 2 and "Traceback" not in "".join(err)
    assert "shirt.png: not an image in a format read here (PNG, JPEG, BMP or WebP)" in err[0]
    assert not (tmp_path / "p.png").exists()


def test_a_reader_that_stops_early_ends_predict_quietly(runs, test_images, tmp_path):
    """`python predict.py RUN IMAGES | head -1`: the closed pipe ends predict.py as it ends cat, no traceback."""
    folder = save_raw(test_images[:20], tmp_path / "raw")
    process = subprocess.Popen(
        [sys.executable, "predict.py", str(runs["ann"]), str(folder), "--raw", "--out", str(tmp_path / "p.png")],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    process.stdout.close()  # the reader is gone before the first line
    _, stderr = process.communicate(timeout=600)
    assert process.returncode == 141 and stderr == "", stderr  # 128 + SIGPIPE, as a shell reports `cat`


def test_a_stop_while_the_figure_is_drawn_leaves_no_empty_figure(run_copy, test_images, tmp_path):
    """SIGTERM once predictions.png has claimed its name, before it is drawn: the empty file stayed for good (no
    viewer opens it, and later calls pass its name over)."""
    run, folder = run_copy("ann"), save_raw(test_images[:16], tmp_path / "raw")
    argv = [sys.executable, "predict.py", str(run), str(folder), "--raw"]
    process = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (run / "predictions.png").exists() and time.monotonic() < deadline:
        time.sleep(0.005)
    process.send_signal(signal.SIGTERM)  # matplotlib is still being imported: the figure is not drawn yet
    _, err = process.communicate(timeout=120)
    assert process.returncode == 143
    one_line(err.strip().splitlines(), "stopped by SIGTERM")
    assert not list(run.glob("predictions*"))


def test_a_16_bit_image_is_scaled_not_clipped(runs, test_images, tmp_path):
    """convert("L") clips 16-bit levels at 255: the item would vanish. Scaled, the prediction is the 8-bit one's."""
    image = test_images[0, 0].numpy()
    Image.fromarray(image).save(tmp_path / "8-bit.png")
    Image.fromarray(image.astype(np.uint16) * 257).save(tmp_path / "16-bit.png")
    with Image.open(tmp_path / "16-bit.png") as sixteen:
        assert sixteen.mode == "I;16"
    out = ["--out", str(tmp_path / "p.png")]
    for flags in (["--raw"], []):
        eight = predict.main([str(runs["cnn"]), str(tmp_path / "8-bit.png"), *flags, *out])
        sixteen = predict.main([str(runs["cnn"]), str(tmp_path / "16-bit.png"), *flags, *out])
        assert torch.equal(eight, sixteen), flags


def test_out_that_is_an_input_image_is_refused_before_anything_is_written(runs, test_images, tmp_path, capsys):
    folder = save_raw(test_images[:2], tmp_path / "images")
    before = {name: (folder / name).read_bytes() for name in ("000.png", "001.png")}
    for argv in (
        [str(folder / "000.png"), "--out", str(folder / "000.png")],
        [str(folder), "--out", str(folder / ".." / "images" / "001.png")],  # the same file, spelt otherwise
    ):
        code, err = run_cli(predict, [str(runs["cnn"]), *argv], capsys)
        assert code == 2
        one_line(err, "is one of the input images")
    assert {name: (folder / name).read_bytes() for name in before} == before


def test_a_file_pillow_chokes_on_is_named_not_a_traceback(runs, test_images, tmp_path, capsys, monkeypatch):
    """Pillow raises more than OSError on damaged files: each is a file named as unusable."""
    folder = save_raw(test_images[:1], tmp_path / "images")
    data = bytearray((folder / "000.png").read_bytes())
    at = data.index(b"IDAT") - 4
    data[at : at + 4] = struct.pack(">I", 1)  # the IDAT chunk's length is wrong: Pillow raises SyntaxError
    (folder / "idat.png").write_bytes(data)
    code, err = run_cli(predict, [str(runs["cnn"]), str(folder), "--out", str(tmp_path / "p.png")], capsys)
    assert code == 2 and len(err) == 2 and "idat.png: cannot be used" in err[0], err
    for error in (SyntaxError, NotImplementedError, struct.error, IndexError, TypeError, ValueError, EOFError):

        def load(self, error=error):
            raise error("damaged")

        monkeypatch.setattr(PngImagePlugin.PngImageFile, "load", load)
        assert predict.load_images([folder / "000.png"], raw=True)[0] == []
        words = "is cut short" if error is EOFError else "cannot be used (damaged)"  # Pillow's end of a short file
        assert f"000.png: {words}" in capsys.readouterr().err, error


@pytest.mark.figures
@pytest.mark.skipif(sys.platform != "linux", reason="a name that is not UTF-8 needs a Linux file system")
def test_any_file_name_is_printed_and_drawn(runs, test_images, tmp_path):
    """A "$" in a name is no formula in the figure; a name that is not UTF-8, or holds a newline, is printed
    (and drawn) escaped, whatever the output's encoding."""
    folder = save_raw(test_images[:1], tmp_path / "images")
    for name in (b"price $^$.png", b"\xff.png", b"line\nbreak.png"):
        (folder / os.fsdecode(name)).write_bytes((folder / "000.png").read_bytes())
    result = subprocess.run(
        [sys.executable, "predict.py", str(runs["cnn"]), str(folder), "--raw", "--out", str(tmp_path / "p.png")],
        cwd=ROOT,
        capture_output=True,
        env={**os.environ, "PYTHONIOENCODING": "utf-8"},
    )
    assert result.returncode == 0 and b"Traceback" not in result.stderr, result.stderr.decode(errors="replace")
    out = result.stdout.decode().splitlines()
    assert len(out) == 6 and out[-1].startswith("figure: ")  # the run, four predictions and the figure
    assert {line.split(": ")[0].removeprefix(str(folder) + "/") for line in out[1:-1]} == {
        "000.png",
        "price $^$.png",
        "\\xff.png",
        "line\\nbreak.png",
    }
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"


def set_setting(name, value=None, section="hparams"):
    """A change to a record's setting (or, with no value, its removal) for broken()."""

    def change(folder):
        record = json.loads((folder / "metrics.json").read_text())
        if value is None:
            del record[section][name]
        else:
            record[section][name] = value
        (folder / "metrics.json").write_text(json.dumps(record))

    return change


@pytest.mark.parametrize(
    "name, change, words",
    [
        ("cnn", set_setting("DROPOUT", 5), "DROPOUT = 5 is not allowed"),
        ("cnn", set_setting("FC_WIDTH", -3), "FC_WIDTH = -3 is not allowed"),
        ("cnn", set_setting("TTA_SHIFT", "a"), "TTA_SHIFT = 'a' is not allowed"),
        ("cnn", set_setting("TTA_FLIP"), "TTA_FLIP is missing"),
        ("rt", set_setting("IMAGE_SIZE", -1), "IMAGE_SIZE = -1 is not allowed"),
        ("rt", set_record(image_size="auto"), "image_size 'auto' is damaged"),  # a record holds the size that ran
        ("cnn", set_setting("FC_WIDTH", 10**9), "FC_WIDTH = 1000000000 is not allowed"),
        ("rt", set_setting("SEED", "x"), "SEED = 'x' is not allowed"),
        ("rt", set_setting("WEIGHTS", 5), "WEIGHTS = 5 is not allowed"),
        ("ann", set_setting("std", 0, section="normalization"), "normalization.std = 0"),
    ],
)
def test_a_record_with_a_bad_setting_is_refused_naming_it(name, change, words, runs, test_images, tmp_path, capsys):
    folder = broken(runs[name], tmp_path, change)
    images = save_raw(test_images[:1], tmp_path / "images")
    code, err = run_cli(predict, [str(folder), str(images), "--out", str(tmp_path / "p.png")], capsys)
    assert code == 2
    one_line(err, str(folder), words)


def test_a_record_nested_too_deeply_is_refused_as_damaged(runs, tmp_path, capsys):
    folder = broken(runs["cnn"], tmp_path, lambda f: (f / "metrics.json").write_text("[" * 200_000 + "]" * 200_000))
    code, err = run_cli(predict, [str(folder), "--test"], capsys)
    assert code == 2
    one_line(err, "metrics.json is damaged")


def writer_that_comes_and_goes(fifo, done):
    """Opening a named pipe to read waits for a writer: one that comes and goes ends the wait, so that a test
    fails where predict.py opens the pipe, instead of hanging."""
    while not done.wait(1):
        with contextlib.suppress(OSError):  # ENXIO: no reader is waiting yet
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no named pipes here")
def test_a_named_pipe_among_the_images_is_named_not_opened(runs, test_images, tmp_path, capsys):
    folder = save_raw(test_images[:1], tmp_path / "images")
    os.mkfifo(folder / "x.png")
    done = threading.Event()
    threading.Thread(target=writer_that_comes_and_goes, args=(folder / "x.png", done), daemon=True).start()
    try:
        code, err = run_cli(predict, [str(runs["cnn"]), str(folder), "--out", str(tmp_path / "p.png")], capsys)
    finally:
        done.set()
    assert code == 2 and len(err) == 2 and "x.png: not a regular file" in err[0], err
    assert "1 of 2 images could not be used" in err[1]


def test_flags_may_come_before_between_or_after_the_images(runs, test_images, tmp_path, capsys):
    folder = save_raw(test_images[:3], tmp_path / "raw")
    run, out = str(runs["ann"]), str(tmp_path / "p.png")
    after = predict.main([run, str(folder), "--raw", "--out", out])
    before = predict.main([run, "--raw", str(folder), "--out", out])
    between = predict.main(
        [run, str(folder / "000.png"), "--raw", str(folder / "001.png"), "--out", out, str(folder / "002.png")]
    )
    assert after.shape == (3, 10) and torch.equal(before, after) and torch.equal(between, after)


@pytest.mark.figures
def test_the_figure_and_the_mistakes_grid_show_images_alike(test_images, tmp_path, monkeypatch):
    """predictions.png and a run's misclassified.png draw the 28x28 images in one way: light on black, 0-255."""
    from matplotlib.axes import Axes

    styles, imshow = [], Axes.imshow

    def recording(self, *args, **kwargs):
        image = imshow(self, *args, **kwargs)
        styles.append((image.get_cmap().name, image.get_clim()))
        return image

    monkeypatch.setattr(Axes, "imshow", recording)
    images = test_images[:4]
    files.write_figure(
        predict.plot_predictions,
        tmp_path / "p.png",
        [f"{i}.png" for i in range(4)],
        images,
        torch.full((4, 10), 0.1),
        [None] * 4,
        [None] * 4,
    )
    logits = torch.zeros(4, 10)
    logits[:, 0] = 5  # all four called class 0, and all four labelled 1: four mistakes
    files.write_figure(figures.plot_misclassified, tmp_path / "m.png", images, torch.ones(4, dtype=torch.long), logits)
    assert len(styles) == 8 and set(styles) == {("gray", (0, 255))}, styles


@pytest.mark.figures
def test_the_figure_goes_into_the_run_folder_unless_out_says_otherwise(run_copy, test_images, tmp_path, capsys):
    """By default predictions.png lands beside the model, so predicting a folder twice never reads the last figure
    as one of the photos."""
    folder, run = save_raw(test_images[:3], tmp_path / "images"), run_copy("cnn")
    probabilities = predict.main([str(run), str(folder), "--raw"])
    assert len(probabilities) == 3
    assert (run / "predictions.png").read_bytes()[:4] == b"\x89PNG" and len(list(folder.iterdir())) == 3
    assert capsys.readouterr().out.splitlines()[-1] == f"figure: {run / 'predictions.png'}"


def test_each_call_adds_a_figure_and_replaces_none_nor_writes_through_a_link(run_copy, test_images, tmp_path, capsys):
    """The README's two calls in a row: the second figure goes beside the first, named on the last line; a link
    planted at a free name is passed over, never written through; --out names the one file it replaces."""
    folder, run = save_raw(test_images[:2], tmp_path / "images"), run_copy("cnn")
    (run / "predictions.png").write_bytes(b"the first call's figure")
    (run / "predictions-2.png").symlink_to(tmp_path / "target.png")
    figures = []
    for argv in ([], [], ["--out", str(tmp_path / "named.png")]):
        predict.main([str(run), str(folder), "--raw", *argv])
        figures.append(capsys.readouterr().out.splitlines()[-1])
    assert figures == [f"figure: {run / 'predictions-3.png'}", f"figure: {run / 'predictions-4.png'}"] + [
        f"figure: {tmp_path / 'named.png'}"
    ]
    assert (run / "predictions.png").read_bytes() == b"the first call's figure"
    assert not (tmp_path / "target.png").exists()


def test_each_warning_is_drawn_under_its_image():
    images = torch.zeros(2, 1, 28, 28, dtype=torch.uint8)
    warnings = [None, "the image is blank or of one colour: there is no item to classify"]
    fig = predict.plot_predictions(["a.png", "b.png"], images, torch.full((2, 10), 0.1), [None, None], warnings)
    image_axes = fig.axes[::2]  # image, bars, image, bars
    drawn = [" ".join(t.get_text().replace("\n", " ").split()) for t in image_axes[1].texts]
    assert len(image_axes[0].texts) == 0 and drawn == [f"warning: {warnings[1]}"]


def test_the_test_figure_shows_the_mistakes_first(runs, tmp_path, monkeypatch):
    drawn = []
    monkeypatch.setattr(files, "write_figure", lambda plot, path, *args: drawn.append(args))
    accuracy = predict.main([str(runs["cnn"]), "--test", "--out", str(tmp_path / "p.png"), "--figure-images", "5000"])
    names, _, probabilities, truths, _ = drawn[0]
    right = [p.argmax().item() == truth for p, truth in zip(probabilities, truths, strict=True)]
    mistakes = round((1 - accuracy) * 10_000)  # all of them among the first 5,000 drawn
    assert 0 < mistakes < len(right) and right == [False] * mistakes + [True] * (len(right) - mistakes)


def test_a_cnn_prediction_imports_neither_the_other_scripts_nor_torchvision(runs, tmp_path):
    """A broken torchvision used to end a CNN prediction in a traceback: predict.py imported every script."""
    code = (
        "import sys\nimport common, predict\n"
        f"common.run_main(predict.main, [{str(runs['cnn'])!r}, '--raw', {str(tmp_path / 'image.png')!r}, "
        f"'--out', {str(tmp_path / 'p.png')!r}])\n"
        "print(sorted(m for m in ('torchvision', 'resnet_transfer', 'ann') if m in sys.modules))\n"
    )
    Image.new("L", (28, 28)).save(tmp_path / "image.png")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip().splitlines()[-1] == "[]", done.stderr


def test_a_scripts_name_stands_for_its_latest_completed_run(runs, tmp_path, monkeypatch, capsys):
    """`python predict.py cnn ...`: the newest completed cnn.py run in runs/, named on the first line."""
    from plumbing import files

    import shutil

    older, newer = (shutil.copytree(runs["cnn"], tmp_path / "runs" / name) for name in ("cnn-1", "cnn-2"))
    for folder, started in ((older, "2026-01-01T00:00:00"), (newer, "2026-01-02T00:00:00")):
        record = json.loads((folder / "metrics.json").read_text())
        (folder / "metrics.json").write_text(json.dumps({**record, "started": started}))
    monkeypatch.setattr(files, "HERE", tmp_path)
    Image.new("L", (28, 28)).save(tmp_path / "image.png")
    assert (
        common.run_main(predict.main, ["cnn", "--raw", str(tmp_path / "image.png"), "--out", str(tmp_path / "p.png")])
        == 0
    )
    assert capsys.readouterr().out.splitlines()[0].startswith(f"run: {newer} (")
    monkeypatch.setattr(files, "HERE", tmp_path / "empty")
    assert common.run_main(predict.main, ["ann", "--test"]) == 2
    one_line(capsys.readouterr().err.strip().splitlines(), "no completed run of ann.py", "python ann.py")


def test_cnn_best_is_the_completed_run_with_the_highest_validation_accuracy(runs, tmp_path, monkeypatch, capsys):
    """Not the newest, nor one that did not complete or has no validation split, however it ranks."""
    import shutil

    made = {}
    for name, started, status, val_acc in [
        ("cnn-a", "2026-01-01T00:00:00", "completed", 0.91),  # the best
        ("cnn-b", "2026-01-03T00:00:00", "completed", 0.50),  # the newest
        ("cnn-c", "2026-01-04T00:00:00", "interrupted", 0.99),
        ("cnn-d", "2026-01-05T00:00:00", "completed", None),  # --val-size 0
    ]:
        made[name] = folder = shutil.copytree(runs["cnn"], tmp_path / "runs" / name)
        record = json.loads((folder / "metrics.json").read_text())
        record.update(started=started, status=status, final={**record["final"], "val_acc": val_acc})
        (folder / "metrics.json").write_text(json.dumps(record))
    monkeypatch.setattr(files, "HERE", tmp_path)
    Image.new("L", (28, 28)).save(tmp_path / "image.png")  # one image to answer: the pick is all this test reads
    for pick, expected in (("cnn:best", "cnn-a"), ("cnn.py:best", "cnn-a"), ("cnn", "cnn-d")):
        assert (
            common.run_main(
                predict.main, [pick, "--raw", str(tmp_path / "image.png"), "--out", str(tmp_path / "p.png")]
            )
            == 0
        )
        assert capsys.readouterr().out.splitlines()[0].startswith(f"run: {made[expected]} ("), pick
    shutil.rmtree(made["cnn-a"]), shutil.rmtree(made["cnn-b"])
    assert common.run_main(predict.main, ["cnn:best", "--test"]) == 2
    one_line(capsys.readouterr().err.strip().splitlines(), "no completed run with a validation accuracy of cnn.py")


@pytest.mark.parametrize(
    "change, words",
    [
        ({}, "(2 epochs; val_size=2000 subset=12000, not cnn.py's defaults; test accuracy {test})"),
        ({"LABEL_SMOOTHING": 0.0, "SEED": 3}, "label_smoothing=0.0 val_size=2000 subset=12000 seed=3, not"),
        ({"EPOCHS": 18, "status": "interrupted"}, "(2 of 18 epochs, interrupted; val_size=2000 subset=12000, not"),
        ({"SUBSET": 0, "VAL_SIZE": 5000, "OUT_DIR": "elsewhere"}, "(2 epochs; cnn.py's defaults; test accuracy"),
    ],
)
def test_the_run_used_is_named_with_its_epochs_settings_and_test_accuracy(
    change, words, run_copy, test_images, tmp_path, capsys
):
    """What differs from the script's defaults (as its constants now say) is named; where files went is not."""
    folder, images = run_copy("cnn"), save_raw(test_images[:1], tmp_path / "images")
    record = json.loads((folder / "metrics.json").read_text())
    record["hparams"].update({k: v for k, v in change.items() if k.isupper()})
    record.update({k: v for k, v in change.items() if k.islower()})
    (folder / "metrics.json").write_text(json.dumps(record))
    assert common.run_main(predict.main, [str(folder), str(images), "--raw"]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith(f"run: {folder} (") and words.format(test=f"{record['final']['test_acc']:.2%}") in first


def test_a_shared_records_words_cannot_forge_the_first_line(run_copy, test_images, tmp_path, capsys):
    """A record from someone else whose setting and status hold a carriage return and escape sequences: printed raw,
    they erased the first line and wrote their own ("test accuracy 99.90%"). Shown, they are visible and inert."""
    folder, images = run_copy("cnn"), save_raw(test_images[:1], tmp_path / "images")
    record = json.loads((folder / "metrics.json").read_text())
    record["hparams"]["LABEL_SMOOTHING"] = "0\r\x1b[2Krun: cnn (18 epochs; test accuracy 99.90%)\x1b[8m"
    record["status"] = "interrupted\x1b]0;title\x07"
    (folder / "metrics.json").write_text(json.dumps(record))
    assert common.run_main(predict.main, [str(folder), str(images), "--raw"]) == 0
    out, err = capsys.readouterr()
    assert not any(c in out + err for c in "\x1b\x07\r"), (out, err)
    assert "label_smoothing=0\\r\\x1b[2Krun: cnn" in out.splitlines()[0]


def test_a_record_holding_nan_as_older_records_could_is_read_with_the_loss_missing(run_copy, capsys):
    """ "test_loss": NaN (records were not strict JSON before 2026-12-02): the run loads; an accuracy of NaN would
    be damage, a loss of NaN is only a number that is missing."""
    folder = run_copy("cnn")
    record = json.loads((folder / "metrics.json").read_text())
    record["final"]["test_loss"] = float("nan")
    (folder / "metrics.json").write_text(json.dumps(record))  # json.dumps writes NaN, as the older writer did
    assert "NaN" in (folder / "metrics.json").read_text()
    assert common.run_main(predict.main, [str(folder), "--test"]) == 0
    assert "recorded in the run" in capsys.readouterr().out


@pytest.mark.parametrize(
    "name, truth",
    [
        ("t-shirt.png", "T-shirt/top"),
        ("T-shirt_top.jpg", "T-shirt/top"),
        ("tshirt.png", "T-shirt/top"),
        ("t_shirt.png", "T-shirt/top"),
        ("shirt.png", "Shirt"),
        ("my shirts.webp", "Shirt"),
        ("3_Trouser.png", "Trouser"),
        ("ankle_boot_2.png", "Ankle boot"),
        ("Ankle boot.png", "Ankle boot"),
        ("AnkleBoot.png", "Ankle boot"),
        ("sneakers.png", "Sneaker"),
        ("shirt-and-trouser.png", None),  # two classes named: no true label
        ("t-shirt-or-shirt.png", None),
        ("bagel.png", None),  # a word that only begins with a class's name
        ("IMG_0042.jpg", None),
    ],
)
def test_a_class_named_in_a_file_name_is_matched_whole_the_longest_first(name, truth):
    assert predict.named_class(name) == (None if truth is None else common.CLASSES.index(truth))


def test_photos_in_a_folder_we_may_not_look_into_are_named_and_the_others_answered(runs, test_images, public_dir):
    """pathlib's is_dir raises PermissionError under a locked folder: one such photo ended predict.py."""
    run = shutil.copytree(runs["cnn"], public_dir / "run")
    images = save_raw(test_images[:1], public_dir / "images")
    locked = save_raw(test_images[1:2], public_dir / "locked")
    locked.chmod(0o700)  # root's alone
    argv = [str(run), str(images / "000.png"), str(locked / "000.png"), str(locked), "--raw"]
    done = as_nobody([sys.executable, "predict.py", *argv, "--out", str(public_dir / "p.png")], public_dir)
    err = done.stderr.strip().splitlines()
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert f"\n{images / '000.png'}: " in done.stdout  # the photo that can be read is answered
    assert f"{locked}: passed over: cannot list the folder (Permission denied)" in err
    assert f"{locked / '000.png'}: cannot be read (permission denied); make it readable" in err
    assert err[-1].endswith("1 of 2 images could not be used (named above)")
