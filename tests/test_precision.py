"""Which precision each device computes in, and the fp16 path with its loss scaler.

GPUs and a Mac are simulated by patching torch's capability queries, so the choice is checked on every CI
run: a T4 (compute capability 7.5) gets fp16, never the bf16 it can only emulate; an A100 (8.0) gets bf16;
MPS gets fp32. The tests whose names end in `_on_cuda` need a real GPU: `benchmarks/gpu_check.py` runs them.
"""

import common
from plumbing import runs

import json

import pytest
import torch
import torch.nn as nn

import ann
import cnn
from conftest import SMALL, run_cli

CUDA = torch.device("cuda")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (benchmarks/gpu_check.py)")


@pytest.fixture
def gpus(monkeypatch):
    """Simulated CUDA devices: gpus["cuda:N"] = (capability, name, GiB) makes torch report them."""
    devices = {}

    def lookup(device=None):
        index = torch.device(device).index if device is not None else 0
        return devices[f"cuda:{index or 0}"]

    class Properties:
        def __init__(self, device):
            self.total_memory = lookup(device)[2] * 2**30

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: lookup(device)[0])
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: lookup(device)[1])
    monkeypatch.setattr(torch.cuda, "get_device_properties", Properties)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)  # as on a T4
    return devices


@pytest.mark.parametrize(
    "capability, expected",
    [((6, 0), "fp32"), ((7, 0), "fp16"), ((7, 5), "fp16"), ((8, 0), "bf16"), ((8, 9), "bf16"), ((9, 0), "bf16")],
)  # P100, V100, T4, A100, RTX 4090, H100
def test_auto_precision_follows_the_gpus_compute_capability(gpus, capability, expected):
    gpus["cuda:0"] = (capability, "simulated", 16)
    assert common.pick_precision("auto", CUDA) == expected


def test_the_device_asked_for_is_the_one_whose_capability_name_and_memory_are_read(gpus):
    gpus["cuda:0"] = ((7, 5), "Tesla T4", 15)
    gpus["cuda:1"] = ((8, 0), "NVIDIA A100-SXM4-40GB", 40)
    assert common.pick_precision("auto", torch.device("cuda:1")) == "bf16"
    assert common.pick_precision("auto", torch.device("cuda:0")) == "fp16"
    assert runs.device_name(torch.device("cuda:1")) == "NVIDIA A100-SXM4-40GB, compute capability 8.0, 40 GiB"


def test_bf16_asked_for_on_a_t4_runs_with_a_one_line_warning(gpus, capsys):
    gpus["cuda:0"] = ((7, 5), "Tesla T4", 15)
    assert common.pick_precision("bf16", CUDA) == "bf16"
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "without bf16 units is emulated" in line and "auto picks fp16" in line


def test_fp32_uses_tf32_tensor_cores_from_ampere_on_only(gpus, monkeypatch):
    monkeypatch.setattr(torch, "set_float32_matmul_precision", lambda level: calls.append(level))
    calls = []
    gpus["cuda:0"] = ((7, 5), "Tesla T4", 15)
    assert common.pick_precision("fp32", CUDA) == "fp32" and calls == []
    gpus["cuda:0"] = ((8, 0), "A100", 40)
    assert common.pick_precision("auto", CUDA) == "bf16" and calls == []
    assert common.pick_precision("fp32", CUDA) == "tf32" and calls == ["high"]
    assert common.pick_precision("fp32", torch.device("cpu")) == "fp32" and calls == ["high"]


def test_mps_gets_fp32_refuses_bf16_and_allows_fp16():
    mps = torch.device("mps")
    assert common.pick_precision("auto", mps) == "fp32"
    assert common.pick_precision("fp16", mps) == "fp16"
    with pytest.raises(common.UserError, match="bf16 is not supported on MPS"):
        common.pick_precision("bf16", mps)


def test_the_cpu_gets_bf16_exactly_when_it_has_bf16_units(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")  # its kernels not held back
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    for has_units in (False, True):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda v=has_units: v)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
        assert common.pick_precision("auto", cpu) == ("bf16" if has_units else "fp32")


@pytest.mark.parametrize("capability, isa", [("AVX2", "ALL"), ("AVX512", "AVX2"), ("AVX512", "AVX512_CORE")])
def test_a_cpu_held_below_its_bf16_units_computes_in_fp32_as_the_cpu_it_stands_in_for(capability, isa, monkeypatch):
    """ATEN_CPU_CAPABILITY (what torch.backends.cpu reports) or ONEDNN_MAX_CPU_ISA, as a newer CPU emulates an
    older one: auto picks fp32, as that CPU does, not bf16 emulated several times slower."""
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", isa)
    assert common.pick_precision("auto", torch.device("cpu")) == "fp32"
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16")
    assert common.pick_precision("auto", torch.device("cpu")) == ("fp32" if capability == "AVX2" else "bf16")


def test_16_bits_on_a_cpu_without_their_units_warns_in_one_line_and_runs(real_data_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(common, "has_fast", lambda dtype, device: False)
    for precision in ("bf16", "fp16"):
        argv = SMALL + ["--device", "cpu", "--precision", precision, "--out-dir", str(tmp_path)]
        code, err = run_cli(ann, argv, capsys)
        assert code == 0 and len(err) == 1 and f"without {precision} units" in err[0] and "slower" in err[0]


def test_fp16_is_refused_in_one_line_where_torch_has_no_autocast(real_data_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.amp, "is_autocast_available", lambda device_type: False)
    code, err = run_cli(cnn, SMALL + ["--device", "cpu", "--precision", "fp16", "--out-dir", str(tmp_path)], capsys)
    assert code == 2 and len(err) == 1
    assert err[0].endswith("error: --precision fp16: PyTorch has no autocast for cpu here; use fp32 or auto")
    assert not tmp_path.exists() or not any(tmp_path.iterdir())  # refused before the run folder was made


def test_an_fp16_run_trains_as_an_fp32_run_does_and_records_its_precision(real_data_dir, tmp_path):
    """The same seed in fp16 (through the loss scaler) and in fp32: the same accuracy, to a point or so."""
    finals = {}
    for precision in ("fp16", "fp32"):
        finals[precision] = ann.main(SMALL + ["--precision", precision, "--out-dir", str(tmp_path / precision)])
        (run_dir,) = (tmp_path / precision).iterdir()
        assert json.loads((run_dir / "metrics.json").read_text())["precision"] == precision
    assert finals["fp16"]["test_acc"] == pytest.approx(finals["fp32"]["test_acc"], abs=0.02)


def test_a_step_whose_scaled_gradients_overflow_is_skipped_and_the_scale_backs_off():
    """The script's step goes through the scaler: with a scale so large that the gradients overflow, the
    weights stay as they were and the scale halves, as torch's AMP recipe does for fp16."""
    torch.manual_seed(0)
    model = cnn.CNN(16, 0.1)
    before = {k: v.clone() for k, v in model.state_dict().items() if k.endswith("weight")}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**127)
    batches = [(torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,)))]
    amp = common.autocast(torch.device("cpu"), "fp16")
    with pytest.warns(UserWarning, match="lr_scheduler.step"):  # torch notes the skipped optimizer step
        cnn.train_one_epoch(model, batches, optimizer, scheduler, nn.CrossEntropyLoss(), None, amp, scaler)
    assert all(torch.equal(before[k], model.state_dict()[k]) for k in before)
    assert scaler.get_scale() == 2.0**126


@needs_cuda
def test_auto_precision_on_this_gpu_matches_its_capability_on_cuda():
    major, _ = torch.cuda.get_device_capability(CUDA)
    expected = "bf16" if major >= 8 else "fp16" if major == 7 else "fp32"
    assert common.pick_precision("auto", CUDA) == expected


@needs_cuda
@pytest.mark.parametrize("precision", ["bf16", "fp16", "fp32"])
def test_the_same_seed_gives_the_same_numbers_on_cuda(real_data_dir, tmp_path, precision):
    argv = SMALL + ["--epochs", "2", "--lr", "0.02", "--device", "cuda", "--precision", precision]
    finals = [cnn.main(argv + ["--out-dir", str(tmp_path / str(i))]) for i in range(2)]
    records = [json.loads(next((tmp_path / str(i)).iterdir()).joinpath("metrics.json").read_text()) for i in range(2)]
    strip = [[{k: v for k, v in h.items() if k != "seconds"} for h in r["history"]] for r in records]
    assert strip[0] == strip[1]
    assert {k: v for k, v in finals[0].items() if k != "seconds"} == {
        k: v for k, v in finals[1].items() if k != "seconds"
    }
    assert finals[0]["test_acc"] > 0.3
