"""resnet_transfer.py: the frozen backbone and its weights (torchvision's ImageNet sets, a file, or none), the
feature cache, fine-tuning, its settings and bad weights files; and transfer with real ImageNet features, through
the stand-in backbone of benchmarks/standin.py (ResNet weights cannot be downloaded where this is developed).
"""

import common
from plumbing import files

import json
import os
import pickle
import subprocess
import sys
import urllib.error

import pytest
import torch
import torchvision

import resnet_transfer as rt
from conftest import ROOT, one_line, run_cli

sys.path.insert(0, str(ROOT / "benchmarks"))
import standin  # noqa: E402

TINY = ["--backbone", "resnet18", "--weights", "none", "--image-size", "32", "--subset", "600", "--val-size", "100"]
TINY += ["--batch-size", "100", "--epochs", "2"]


def tiny_args(tmp_path, *extra):
    return TINY + ["--out-dir", str(tmp_path / "runs"), "--cache-dir", str(tmp_path / "cache"), *extra]


def run_record(tmp_path):
    (metrics,) = sorted((tmp_path / "runs").glob("*/metrics.json"))[-1:]
    return json.loads(metrics.read_text())


def test_main_end_to_end_trains_only_the_head_and_caches_features(real_data_dir, tmp_path, capsys):
    final = rt.main(tiny_args(tmp_path))
    record = run_record(tmp_path)
    assert record["status"] == "completed" and record["final"] == final
    assert record["backbone"] == "resnet18" and record["weights"] == "none-seed0"
    assert record["trainable_params"] == sum(p.numel() for p in rt.Head(512, dropout=0.3).parameters())
    note = capsys.readouterr().out
    assert "the backbone is random, so this is not transfer learning" in note
    assert "A random ResNet-50" not in note  # the resnet50-only advice: resnet18 is already the dry run it suggests
    (cache,) = (tmp_path / "cache").iterdir()
    saved = torch.load(cache, weights_only=True)
    assert saved["train"].shape == (600, 512) and saved["test"].shape == (600, 512)
    head = rt.Head(512, dropout=0.3)
    head.load_state_dict(torch.load(next((tmp_path / "runs").glob("*/model.pt")), weights_only=True))


def test_backbone_stays_bitwise_unchanged_and_optimizer_holds_only_the_head(real_data_dir, tmp_path, monkeypatch):
    """Fine-tuning mode touches layer4 only; the frozen stages' weights and BatchNorm buffers never move."""
    backbones, optimizers = [], []
    load_backbone, adamw = rt.load_backbone, torch.optim.AdamW

    def recording_load(*args):
        result = load_backbone(*args)
        backbones.append((result[0], {k: v.clone() for k, v in result[0].state_dict().items()}))
        return result

    def recording_adamw(params, **kwargs):
        optimizers.append(adamw(params, **kwargs))
        return optimizers[-1]

    monkeypatch.setattr(rt, "load_backbone", recording_load)
    monkeypatch.setattr(torch.optim, "AdamW", recording_adamw)
    rt.main(tiny_args(tmp_path))
    ((backbone, before),), (optimizer,) = backbones, optimizers
    assert all(torch.equal(before[k], v) for k, v in backbone.state_dict().items())
    head_ids = {id(p) for p in optimizer.param_groups[0]["params"]}
    assert head_ids.isdisjoint(id(p) for p in backbone.parameters()) and len(optimizer.param_groups) == 1

    backbones.clear()
    optimizers.clear()
    rt.main(tiny_args(tmp_path, "--finetune", "--epochs", "1"))
    ((backbone, before),), (optimizer,) = backbones, optimizers
    after = backbone.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k].cpu())}
    assert changed and all(k.startswith("layer4.") for k in changed)
    trained = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert trained.isdisjoint(id(p) for name, p in backbone.named_parameters() if not name.startswith("layer4."))


def test_cached_features_equal_fresh_ones(real_data_dir, tmp_path):
    rt.main(tiny_args(tmp_path))
    (cache,) = (tmp_path / "cache").iterdir()
    saved = torch.load(cache, weights_only=True)
    torch.manual_seed(0)  # the seed main() gave the random backbone
    backbone, _, mean, std = rt.load_backbone("resnet18", "none", 0)
    x_train, _, x_test, _ = common.take_subset(600, *common.load_fashion_mnist())
    cpu = torch.device("cpu")
    amp = common.autocast(cpu, cache.stem.split("-")[-2])  # the precision the cache was made in (in its name)
    fresh = rt.extract_features(rt.Preprocess(32, mean, std), backbone, x_test, cpu, amp, 128)
    assert torch.allclose(saved["test"], fresh, rtol=1e-3, atol=1e-3)


def test_new_settings_make_a_new_cache_entry_and_a_corrupt_one_is_rebuilt(real_data_dir, tmp_path, capsys):
    rt.main(tiny_args(tmp_path, "--epochs", "1"))
    rt.main(tiny_args(tmp_path, "--epochs", "1", "--image-size", "40"))
    rt.main(tiny_args(tmp_path, "--epochs", "1", "--backbone", "resnet34"))
    entries = sorted((tmp_path / "cache").iterdir())
    assert len(entries) == 3
    entries[0].write_bytes(entries[0].read_bytes()[:1000])
    capsys.readouterr()
    rt.main(tiny_args(tmp_path, "--epochs", "1"))
    assert "corrupt" in capsys.readouterr().out
    assert torch.load(entries[0], weights_only=True)["train"].shape == (600, 512)


def test_offline_default_weights_exit_2_naming_the_file_and_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))

    def offline(url, *args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    code = common.run_main(rt.main, ["--backbone", "resnet18", "--out-dir", str(tmp_path / "runs")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    folder = tmp_path / "torch" / "hub" / "checkpoints"
    assert "resnet18-f37072fd.pth" in err[0] and str(folder) in err[0]
    assert "--weights PATH" in err[0] and "--weights none" in err[0]


def test_checkpoint_file_loads_by_path(tmp_path):
    torch.manual_seed(123)
    reference = torchvision.models.resnet18()
    path = tmp_path / "my-resnet18.pt"
    torch.save(reference.state_dict(), path)
    backbone, identity, _, _ = rt.load_backbone("resnet18", str(path), seed=0)
    assert torch.equal(backbone.conv1.weight, reference.conv1.weight) and len(identity) == 16
    assert not any(p.requires_grad for p in backbone.parameters()) and not backbone.training


@pytest.mark.parametrize(
    "argv, flag",
    [
        (["--backbone", "vgg16"], "--backbone"),
        (["--image-size", "16"], "--image-size"),
        (["--weights", "/no/such/file.pt"], "--weights"),
    ],
)
def test_bad_transfer_settings_are_refused(argv, flag, tmp_path, capsys):
    code = common.run_main(rt.main, argv + ["--out-dir", str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and flag in err[0]
    assert not any(tmp_path.iterdir())


def test_ctrl_c_during_extraction_leaves_no_cache_and_marks_the_run(real_data_dir, tmp_path, monkeypatch):
    load_backbone, batches = rt.load_backbone, []

    def interrupting_load(*args):
        backbone, *rest = load_backbone(*args)
        forward = backbone.forward

        def forward_until_ctrl_c(x):
            batches.append(len(x))
            if len(batches) == 2:  # Ctrl-C in the middle of extraction
                raise KeyboardInterrupt
            return forward(x)

        backbone.forward = forward_until_ctrl_c
        return (backbone, *rest)

    monkeypatch.setattr(rt, "load_backbone", interrupting_load)
    assert common.run_main(rt.main, tiny_args(tmp_path)) == 130
    assert len(batches) == 2 and not any((tmp_path / "cache").glob("*"))
    assert run_record(tmp_path)["status"] == "interrupted"


# ----------------------------------------------------------------------------------------------
# Folders, weights files and caches, checked before the long work

TINY_RT = ["--backbone", "resnet18", "--weights", "none", "--image-size", "32", "--subset", "600", "--val-size", "100"]
TINY_RT += ["--batch-size", "100", "--epochs", "1"]


def never_extract(*args):
    pytest.fail("the backbone was loaded although the cache folder is unusable")


def test_a_cache_dir_that_is_a_file_is_refused_before_extraction(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(rt, "load_backbone", never_extract)
    blocker = tmp_path / "cache"
    blocker.write_text("a file")
    code, err = run_cli(rt, TINY_RT + ["--cache-dir", str(blocker), "--out-dir", str(tmp_path / "runs")], capsys)
    assert code == 2
    one_line(err, "--cache-dir", "is a file")
    assert not (tmp_path / "runs").exists()


def test_a_read_only_cache_dir_is_refused_before_extraction(tmp_path, capsys, monkeypatch):
    def read_only(*args, **kwargs):  # as root, chmod cannot make a folder read-only: the file system says so
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(rt, "load_backbone", never_extract)
    monkeypatch.setattr(files.tempfile, "TemporaryFile", read_only)
    code, err = run_cli(rt, TINY_RT + ["--cache-dir", str(tmp_path / "c"), "--out-dir", str(tmp_path / "r")], capsys)
    assert code == 2
    one_line(err, "--cache-dir", "not writable", "Read-only file system")


class RunsCode:
    """A pickle that would create a file if it were ever unpickled."""

    marker = None

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def bad_weight_files(tmp_path):
    torch.manual_seed(0)
    resnet18, resnet34 = torchvision.models.resnet18(), torchvision.models.resnet34()
    ten_classes = resnet18.state_dict()
    ten_classes["fc.weight"], ten_classes["fc.bias"] = torch.zeros(10, 512), torch.zeros(10)
    complex_var = resnet18.bn1.running_var.to(torch.complex64)
    RunsCode.marker = tmp_path / "code-ran"
    files = {
        "whole-model.pt": (lambda p: torch.save(resnet18, p), "pickled Python objects"),
        "code.pkl": (lambda p: p.write_bytes(pickle.dumps(RunsCode())), "pickled Python objects"),
        "code-in-torch-format.pt": (lambda p: torch.save({"x": RunsCode()}, p), "pickled Python objects"),
        "empty.pt": (lambda p: p.write_bytes(b""), "the file is empty"),
        "notes.txt": (lambda p: p.write_text("these are not weights\n"), "not a file written by torch.save"),
        "resnet34.pt": (lambda p: torch.save(resnet34.state_dict(), p), "the weights of another model"),
        "ten-classes.pt": (lambda p: torch.save(ten_classes, p), "fc.weight has shape (10, 512)"),
        "a-list.pt": (lambda p: torch.save([torch.zeros(1)], p), "holds no state dict"),
        "complex.pt": (lambda p: torch.save({**resnet18.state_dict(), "bn1.running_var": complex_var}, p), "complex64"),
    }
    for name, (write, _) in files.items():
        write(tmp_path / name)
    return {name: reason for name, (_, reason) in files.items()}


def test_every_bad_weights_file_is_one_line_and_no_code_runs(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(rt, "cached_features", lambda *a: pytest.fail("went on past bad weights"))
    for name, reason in bad_weight_files(tmp_path).items():
        out = tmp_path / "runs" / name
        argv = ["--weights", str(tmp_path / name), "--out-dir", str(out), "--cache-dir", str(tmp_path / "cache")]
        code, err = run_cli(rt, TINY_RT + argv, capsys)
        assert code == 2, name
        one_line(err, "--weights", name, reason)
        assert "weights_only" not in err[0]
        assert not any(out.iterdir())  # failed before the first epoch: no run folder left behind
    assert not RunsCode.marker.exists()


def test_a_state_dict_wrapped_as_training_frameworks_save_it_is_accepted(tmp_path):
    torch.manual_seed(1)
    reference = torchvision.models.resnet18()
    torch.save({"state_dict": reference.state_dict(), "epoch": 3}, tmp_path / "wrapped.pt")
    backbone, _, _, _ = rt.load_backbone("resnet18", str(tmp_path / "wrapped.pt"), seed=0)
    assert torch.equal(backbone.conv1.weight, reference.conv1.weight)


def test_a_corrupt_file_in_the_torch_hub_cache_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    checkpoints = tmp_path / "torch" / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    (checkpoints / "resnet18-f37072fd.pth").write_bytes(b"PK\x03\x04 half a download")
    argv = ["--backbone", "resnet18", "--out-dir", str(tmp_path / "runs"), "--cache-dir", str(tmp_path / "c")]
    code, err = run_cli(rt, argv, capsys)
    assert code == 2
    one_line(err, "cached ImageNet weights", "resnet18-f37072fd.pth", "delete the file")


def test_a_feature_cache_with_the_right_key_but_the_wrong_shape_is_rebuilt(real_data_dir, tmp_path, capsys):
    args = TINY_RT + ["--out-dir", str(tmp_path / "runs"), "--cache-dir", str(tmp_path / "cache")]
    rt.main(args)
    (cache,) = (tmp_path / "cache").iterdir()
    saved = torch.load(cache, weights_only=True)
    torch.save({**saved, "train": saved["train"][:10]}, cache)
    capsys.readouterr()
    rt.main(args)
    assert "wrong shape" in capsys.readouterr().out
    assert torch.load(cache, weights_only=True)["train"].shape == (600, 512)


# ----------------------------------------------------------------------------------------------
# Which ImageNet weights, and transfer with real ImageNet features


@pytest.mark.parametrize(
    "backbone, weights, file",
    [
        ("resnet50", "IMAGENET1K_V1", "resnet50-0676ba61.pth"),
        ("resnet50", "IMAGENET1K_V2", "resnet50-11ad3fa6.pth"),
        ("resnet50", "DEFAULT", "resnet50-11ad3fa6.pth"),
        ("resnet18", "IMAGENET1K_V1", "resnet18-f37072fd.pth"),
    ],
)
def test_each_named_weight_set_is_looked_for_in_its_own_file_offline(backbone, weights, file, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    asked = []

    def offline(url, *args, **kwargs):
        asked.append(url)
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(common.UserError, match=rf"cannot download {file} .*--weights none"):
        rt.load_backbone(backbone, weights, seed=0)
    assert [url.rsplit("/", 1)[1] for url in asked] == [file]


def test_a_weight_set_the_backbone_lacks_is_refused_naming_those_it_has(tmp_path, capsys):
    code, err = run_cli(
        rt, ["--backbone", "resnet18", "--weights", "IMAGENET1K_V2", "--out-dir", str(tmp_path)], capsys
    )
    assert code == 2
    one_line(err, "--weights IMAGENET1K_V2: resnet18 has no such ImageNet weights", "IMAGENET1K_V1", "none")


def test_real_imagenet_features_transfer(real_data_dir, tmp_path):
    """The whole pipeline (grey to three channels, resizing, ImageNet normalisation, the cache, the head and its
    recipe) on real ImageNet features: the stand-in, on 2,000 training images at 64 px, measured 84.0% test
    (fp32, the same on a bf16 CPU and with AVX2 emulated); with random weights it gives chance (10.3%), so only
    working transfer passes."""
    argv = ["--subset", "3000", "--val-size", "1000", "--image-size", "64", "--precision", "fp32"]
    argv += ["--device", "cpu", "--out-dir", str(tmp_path / "runs"), "--cache-dir", str(tmp_path / "cache")]
    with standin.swapped_in(rt):
        final = rt.main(argv)
    assert final["test_acc"] >= 0.75
    (cache,) = (tmp_path / "cache").iterdir()
    assert "efficientnet-lite0-imagenet-64px-fp32" in cache.name
    assert rt.load_backbone is not standin.load_standin and rt.FEATURES["resnet50"] == 2048  # swapped back


@pytest.mark.parametrize("argv", [["resnet_transfer.py", "--help"], ["cnn.py", "--data-dir", "{empty}"]])
def test_a_torchvision_built_for_another_torch_is_one_line_naming_the_pair_to_install(argv, tmp_path):
    """As pip can install it where the CPU-wheel index is out of reach: `import torchvision` raises this very error.
    At resnet_transfer.py's first lines, and where cnn.py downloads the data into an empty --data-dir."""
    fake = tmp_path / "fake" / "torchvision"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text('raise RuntimeError("operator torchvision::nms does not exist")\n')
    (tmp_path / "empty").mkdir()
    argv = [a.format(empty=tmp_path / "empty") for a in argv]
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "fake")}
    done = subprocess.run([sys.executable, *argv], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    err = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(err) == 1 and "Traceback" not in done.stderr, done.stderr
    for words in ("torchvision::nms", "torch==2.14.1 torchvision==0.29.1", 'python -c "import torch, torchvision"'):
        assert words in err[0]
