"""Speed benchmark: our pipeline against the PyTorch Quickstart way of training, measured side by side.

1. Training throughput (images/s) of the ANN and the CNN: ours (data on the device, randperm batches,
   vectorised augmentation, bf16 where fast, channels_last, EMA) against a reference written like the
   official Quickstart (torchvision FashionMNIST + ToTensor + DataLoader, batch 64, fp32, same network).
   The two alternate, several repeats; we report medians and the ratio.
2. Time to accuracy: a short run of our default recipe against the reference recipe (Adam 1e-3,
   batch 64, test accuracy after every epoch) capped at a time budget.
3. Transfer: one head epoch on cached ResNet features against one epoch that runs the backbone on
   every batch (timed on a few batches and scaled to the epoch), as a ratio.
4. Profile of CNN training steps: where the time goes, and the FLOP rate against a measured matmul.

    python benchmarks/speed.py            # everything (--budget 240: 9 minutes on a 2-core Zen 5, 11 on a Zen 3)
    python benchmarks/speed.py --quick    # tiny smoke run for the test suite; its numbers mean nothing

Writes speed.json and speed.md into benchmarks/latest/ (or --results DIR; the tracked tables in
benchmarks/results/ change only with --results benchmarks/results).
"""

import argparse
import contextlib
import gzip
import io
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import common  # noqa: E402
from plumbing import data, files  # noqa: E402

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
from accuracy import machine, measured_on  # noqa: E402

import ann  # noqa: E402
import cnn  # noqa: E402
import resnet_transfer  # noqa: E402

SCRIPTS = {"ann": ann, "cnn": cnn}
MODELS = {"ann": lambda: ann.ANN(ann.DROPOUT), "cnn": lambda: cnn.CNN(cnn.FC_WIDTH, cnn.DROPOUT)}
TARGETS = {"ann": 0.89, "cnn": 0.93}
# Epochs of our recipe (its schedule compressed) for the time-to-accuracy run, chosen to stay within 90 s of
# training on 2 cores with bf16 units (AMD EPYC Zen 5: a CNN epoch takes 5.5 s). On 2 AVX2-only cores a CNN
# epoch takes 17-25 s in fp32 and 4 epochs are what fit (91.7% test).
SHORT_EPOCHS = {"ann": 15, "cnn": 12}


def torchvision_root(tmp):
    """A copy of the data in torchvision's layout (root/FashionMNIST/raw, extracted) for the reference."""
    folder = common.find_fashion_mnist()
    raw = Path(tmp) / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for name in data.FILES:
        source = data.find_file(folder, name)
        with (gzip.open if source.suffix == ".gz" else open)(source, "rb") as src, open(raw / name, "wb") as dst:
            shutil.copyfileobj(src, dst)
    return tmp


def reference_loader(root, train, n, batch_size=64):
    from torchvision import datasets
    from torchvision.transforms import ToTensor

    dataset = datasets.FashionMNIST(root, train=train, download=False, transform=ToTensor())
    dataset = torch.utils.data.Subset(dataset, range(min(n, len(dataset))))
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=train)


def reference_epoch(model, loader, optimizer, device):
    """The Quickstart training loop, verbatim in spirit: fp32, one DataLoader batch at a time."""
    model.train()
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def reference_accuracy(model, loader, device):
    model.eval()
    correct = 0
    with torch.no_grad():
        for x, y in loader:
            correct += (model(x.to(device)).argmax(1) == y.to(device)).sum().item()
    return correct / len(loader.dataset)


def our_pipeline(name, n, device, tmp):
    """A closure training one epoch over n images exactly as the script does (its recipe's defaults)."""
    script = SCRIPTS[name]
    hp = common.parse_hparams(vars(script), ["--subset", str(n), "--val-size", "0", "--out-dir", tmp])
    precision = common.pick_precision(hp.precision, device)
    splits = common.load_splits(common.find_fashion_mnist(hp.data_dir), hp.subset, hp.val_size, hp.seed)
    data, _ = common.to_device_normalized(splits, device)
    model = MODELS[name]().to(device, memory_format=torch.channels_last if name == "cnn" else torch.preserve_format)
    if name == "cnn":  # the scripts' optimizers, at a small fixed learning rate
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True, fused=True)
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    ema = common.EMA(model, hp.ema_decay) if hp.ema_decay else None
    generator = torch.Generator(device).manual_seed(0)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=hp.label_smoothing)
    amp = common.autocast(device, precision)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")

    def augment(x):
        return common.random_flip_and_shift(x, hp.max_shift, generator, hp.flip, float(x.min()))

    def epoch():
        batches = common.shuffled_batches(*data.train, hp.batch_size, generator, augment)
        script.train_one_epoch(model, batches, optimizer, scheduler, loss_fn, ema, amp, scaler)

    return epoch, precision


def throughput(name, n, repeats, device, root, tmp):
    ours, precision = our_pipeline(name, n, device, tmp)
    model = MODELS[name]().to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    loader = reference_loader(root, True, n)
    ours()  # warm-up: oneDNN picks its kernels on the first pass
    reference_epoch(model, loader, optimizer, device)
    ours_ips, ref_ips = [], []
    for _ in range(repeats):  # alternate, so drifts of a noisy machine hit both alike
        start = time.perf_counter()
        ours()
        ours_ips.append(n / (time.perf_counter() - start))
        start = time.perf_counter()
        reference_epoch(model, loader, optimizer, device)
        ref_ips.append(n / (time.perf_counter() - start))
    ratios = [a / b for a, b in zip(ours_ips, ref_ips, strict=True)]
    return {
        "images": n,
        "repeats": repeats,
        "precision": precision,
        "ours_images_per_s": statistics.median(ours_ips),
        "reference_images_per_s": statistics.median(ref_ips),
        "ratio": statistics.median(ratios),
    }


def time_to_accuracy(name, budget, device, root, tmp, quick):
    target = TARGETS[name]
    argv = ["--epochs", str(1 if quick else SHORT_EPOCHS[name]), "--out-dir", tmp]
    argv += ["--subset", "600", "--val-size", "100", "--batch-size", "100"] if quick else []
    with contextlib.redirect_stdout(io.StringIO()):
        final = SCRIPTS[name].main(argv)
    record = json.loads(sorted(Path(tmp).glob(f"{name}-*/metrics.json"))[-1].read_text())
    ours = {
        "epochs": len(record["history"]),
        "epoch_seconds": sum(h["seconds"] for h in record["history"]),
        "wall_seconds": final["seconds"],
        "test_acc": final["test_acc"],
        "reached": final["test_acc"] >= target,
    }
    model = MODELS[name]().to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    n = 500 if quick else 60_000
    train_loader, test_loader = reference_loader(root, True, n), reference_loader(root, False, n, batch_size=1000)
    elapsed, history = 0.0, []
    while elapsed < budget:
        start = time.perf_counter()
        reference_epoch(model, train_loader, optimizer, device)
        elapsed += time.perf_counter() - start
        history.append((elapsed, reference_accuracy(model, test_loader, device)))
        if history[-1][1] >= target:
            break
    reached = [t for t, acc in history if acc >= target]
    reference = {
        "epochs": len(history),
        "train_seconds_to_target": reached[0] if reached else None,
        "best_test_acc": max(acc for _, acc in history),
        "budget_seconds": budget,
    }
    return {"target": target, "ours": ours, "reference": reference}


def transfer_ratio(device, quick):
    backbone_name, size = ("resnet18", 32) if quick else ("resnet50", resnet_transfer.IMAGE_SIZE)
    precision = common.pick_precision("auto", device)
    amp = common.autocast(device, precision)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    backbone, _, mean, std = resnet_transfer.load_backbone(backbone_name, "none", 0)
    backbone = backbone.to(device, memory_format=torch.channels_last)
    preprocess = resnet_transfer.Preprocess(size, mean, std).to(device)
    head = resnet_transfer.Head(resnet_transfer.FEATURES[backbone_name], resnet_transfer.DROPOUT).to(device)
    optimizer = torch.optim.AdamW(head.parameters(), lr=1e-3)
    n, batch = (400, 100) if quick else (55_000, resnet_transfer.BATCH_SIZE)
    features = torch.randn(n, resnet_transfer.FEATURES[backbone_name], device=device)
    labels = torch.randint(0, 10, (n,), device=device)
    images = torch.randint(0, 256, (batch, 1, 28, 28), dtype=torch.uint8, device=device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    loss_fn = nn.CrossEntropyLoss()

    def cached_epoch():
        batches = common.shuffled_batches(features, labels, batch, None)
        resnet_transfer.train_one_epoch(head, batches, optimizer, scheduler, loss_fn, amp, scaler)

    cached_epoch()  # warm-up
    start = time.perf_counter()
    cached_epoch()
    cached = time.perf_counter() - start
    sample_batches = 2 if quick else 5
    resnet_transfer.extract_features(preprocess, backbone, images, device, amp, batch)  # warm-up
    start = time.perf_counter()
    for _ in range(sample_batches):
        resnet_transfer.extract_features(preprocess, backbone, images, device, amp, batch)
    per_batch = (time.perf_counter() - start) / sample_batches
    uncached = per_batch * -(-n // batch) + cached
    return {
        "backbone": backbone_name,
        "image_size": size,
        "precision": precision,
        "images": n,
        "cached_epoch_seconds": cached,
        "uncached_epoch_seconds_estimated": uncached,
        "uncached_estimate_from_batches": sample_batches,
        "ratio": uncached / cached,
    }


def profile_cnn(device, quick):
    """Top operators of CNN training steps, and the achieved FLOP rate against a large bf16/fp32 matmul."""
    from torch.profiler import ProfilerActivity, profile

    with tempfile.TemporaryDirectory() as tmp:
        epoch, precision = our_pipeline("cnn", 512 if quick else 10_240, device, tmp)
        epoch()  # warm-up
        start = time.perf_counter()
        epoch()
        seconds = time.perf_counter() - start
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            epoch()
    images = 512 if quick else 10_240
    model = MODELS["cnn"]()
    forward_macs = sum(
        m.weight.numel() * (28 * 28 if i == 0 else 14 * 14)
        for i, m in enumerate(x for x in model.modules() if isinstance(x, nn.Conv2d))
    ) + sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    achieved = 3 * 2 * forward_macs * images / seconds  # forward + two backward matmuls, 2 FLOP per MAC
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    a = torch.randn(2048, 2048, device=device, dtype=dtype)
    a @ a
    start = time.perf_counter()
    for _ in range(5):
        a @ a
    matmul = 5 * 2 * 2048**3 / (time.perf_counter() - start)
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12)
    total = sum(e.self_cpu_time_total for e in prof.key_averages())
    top = [
        {"op": e.key, "share": e.self_cpu_time_total / total}
        for e in sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:10]
    ]
    return {
        "precision": precision,
        "images_per_s": images / seconds,
        "forward_mflop_per_image": 2 * forward_macs / 1e6,
        "achieved_gflops": achieved / 1e9,
        "matmul_gflops": matmul / 1e9,
        "fraction_of_matmul": achieved / matmul,
        "top_ops": top,
        "table": table,
    }


def markdown(results):
    lines = [measured_on(results["machine"]), ""]
    lines += ["| training throughput | ours (img/s) | Quickstart reference (img/s) | ratio |", "|---|---|---|---|"]
    for name, r in results["throughput"].items():
        ours = f"{r['ours_images_per_s']:,.0f} ({r['precision']})"
        lines.append(f"| {name} | {ours} | {r['reference_images_per_s']:,.0f} (fp32) | {r['ratio']:.1f}x |")
    lines += [
        "",
        "| time to accuracy | target | ours | Quickstart reference (Adam 1e-3, batch 64) |",
        "|---|---|---|---|",
    ]
    for name, r in results["time_to_accuracy"].items():
        o, ref = r["ours"], r["reference"]
        ours = f"{o['test_acc']:.2%} after {o['epochs']} epochs, {o['epoch_seconds']:.0f} s of epochs"
        if ref["train_seconds_to_target"] is None:
            reference = f"not reached in {ref['budget_seconds']:.0f} s (best {ref['best_test_acc']:.2%})"
        else:
            reference = f"{ref['train_seconds_to_target']:.0f} s ({ref['epochs']} epochs)"
        lines.append(f"| {name} | {r['target']:.0%} | {ours} | {reference} |")
    t = results["transfer"]
    lines += [
        "",
        f"Transfer ({t['backbone']}, {t['image_size']} px, {t['precision']}): head epoch on cached features "
        f"{t['cached_epoch_seconds']:.2f} s; epoch running the backbone on every batch "
        f"~{t['uncached_epoch_seconds_estimated']:.0f} s (from {t['uncached_estimate_from_batches']} batches): "
        f"{t['ratio']:,.0f}x.",
    ]
    p = results["profile"]
    lines += [
        "",
        f"CNN profile ({p['precision']}): {p['images_per_s']:,.0f} img/s, {p['achieved_gflops']:.0f} GFLOP/s achieved "
        f"= {p['fraction_of_matmul']:.0%} of a 2048x2048 matmul ({p['matmul_gflops']:.0f} GFLOP/s). Top operators "
        "by self CPU time: " + ", ".join(f"{op['op']} {op['share']:.0%}" for op in p["top_ops"][:6]) + ".",
    ]
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny runs: checks the pipeline, measures nothing")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--budget", type=float, default=300, help="seconds the reference may train per target")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "latest", help="tables go here")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        raise common.UserError("--repeats takes a count of at least 1")
    files.writable_folder(args.results, "--results")  # checked now, not after the measurements
    device = common.pick_device(args.device)
    results = {"machine": machine(), "quick": args.quick, "throughput": {}, "time_to_accuracy": {}}
    with tempfile.TemporaryDirectory() as tmp:
        root = torchvision_root(tmp + "/tv")
        for name, n in (("ann", 55_000), ("cnn", 10_240)):
            results["throughput"][name] = throughput(name, 512 if args.quick else n, args.repeats, device, root, tmp)
            print(name, "throughput", results["throughput"][name], flush=True)
        for name in ("ann", "cnn"):
            budget = 1 if args.quick else args.budget
            results["time_to_accuracy"][name] = time_to_accuracy(name, budget, device, root, tmp, args.quick)
            print(name, "time to accuracy", results["time_to_accuracy"][name], flush=True)
    results["transfer"] = transfer_ratio(device, args.quick)
    print("transfer", results["transfer"], flush=True)
    results["profile"] = profile_cnn(device, args.quick)
    print(results["profile"]["table"])
    args.results.mkdir(parents=True, exist_ok=True)
    stem = "speed-quick" if args.quick else "speed"
    (args.results / f"{stem}.json").write_text(json.dumps(results, indent=2))
    (args.results / f"{stem}.md").write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    raise SystemExit(common.run_main(main))  # a user error is one line and exit code 2, Ctrl-C cleans up
