import json
import urllib.error

import pytest
import torch
import torchvision

import common
import resnet_transfer as rt

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
    assert "randomly initialised" in capsys.readouterr().out
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
    amp = common.autocast(cpu, saved["key"].split("-")[-2])  # the precision the cache was made in
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


def test_wrong_checkpoint_is_refused(tmp_path, capsys):
    path = tmp_path / "not-a-resnet.pt"
    torch.save({"weight": torch.zeros(3)}, path)
    code = common.run_main(rt.main, TINY + ["--weights", str(path), "--out-dir", str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "not a resnet18 state dict" in err[0]


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
