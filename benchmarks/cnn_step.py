"""Throughput of cnn.py's training step (forward, backward, fused SGD step) in a few layouts and formulations,
side by side on one machine, and its FLOP rate against a 2048x2048 matmul of the same precision; then the
evaluation's (common.compute_logits, no test-time views) in chunks of 2048 and 256 images.

    python benchmarks/cnn_step.py                 # 30 timed steps per variant, 3 alternating repeats, medians
    python benchmarks/cnn_step.py --steps 2 --repeats 1    # smoke run for the test suite
    MALLOC_MMAP_THRESHOLD_=1073741824 MALLOC_TRIM_THRESHOLD_=1073741824 python benchmarks/cnn_step.py
                                                  # glibc keeping freed memory instead of returning it each step

Variants: the script's (channels_last, batch 256, max pooling, conv1 fixed), conv1 trained, batch 512, the NCHW
layout, and max pooling as a reshape + amax (which autograd differentiates without pooling indices).
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import common  # noqa: E402

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

import cnn  # noqa: E402


class AmaxPool(nn.Module):
    def forward(self, x):
        n, c, h, w = x.shape
        return x.unflatten(3, (w // 2, 2)).unflatten(2, (h // 2, 2)).amax((3, 5))


VARIANTS = {  # batch, layout, pooling as amax, conv1 trained
    "the script's: channels_last, batch 256, MaxPool2d, conv1 fixed": (256, torch.channels_last, False, False),
    "conv1 trained (--no-fixed-conv1)": (256, torch.channels_last, False, True),
    "batch 512": (512, torch.channels_last, False, False),
    "NCHW layout": (256, torch.contiguous_format, False, False),
    "pooling as reshape + amax": (256, torch.channels_last, True, False),
    "pooling as reshape + amax, NCHW": (256, torch.contiguous_format, True, False),
}
CHUNKS = (2048, 256)  # images per forward pass in evaluation


def images_per_second(batch, layout, amax, conv1_trained, steps, dtype):
    torch.manual_seed(0)
    model = cnn.CNN(cnn.FC_WIDTH, cnn.DROPOUT)
    if amax:
        model.features[1], model.features[5] = AmaxPool(), AmaxPool()
    model.features[0].weight.requires_grad_(conv1_trained)
    model = model.to(memory_format=layout)
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(trained, lr=0.01, momentum=0.9, nesterov=True, fused=True)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=cnn.LABEL_SMOOTHING)
    x, y = torch.randn(4 * batch, 1, 28, 28), torch.randint(0, 10, (4 * batch,))

    def step(i):
        xb, yb = x[i % 4 * batch : (i % 4 + 1) * batch], y[i % 4 * batch : (i % 4 + 1) * batch]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            loss = loss_fn(model(xb).float(), yb)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for i in range(min(3, steps)):  # oneDNN picks its kernels on the first steps
        step(i)
    start = time.perf_counter()
    for i in range(steps):
        step(i)
    return steps * batch / (time.perf_counter() - start)


def evaluated_per_second(chunk, images, dtype):
    """Images a second through common.compute_logits (evaluation mode, inference_mode), `chunk` per forward pass."""
    model = cnn.CNN(cnn.FC_WIDTH, cnn.DROPOUT).to(memory_format=torch.channels_last).eval()
    x = torch.randn(images, 1, 28, 28)
    amp = torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)
    common.compute_logits(model, x[:chunk], amp, chunk=chunk)  # oneDNN picks its kernels
    start = time.perf_counter()
    common.compute_logits(model, x, amp, chunk=chunk)
    return images / (time.perf_counter() - start)


def matmul_flops(dtype):
    a = torch.randn(2048, 2048, dtype=dtype)
    a @ a
    rates = []
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(5):
            a @ a
        rates.append(5 * 2 * 2048**3 / (time.perf_counter() - start))
    return statistics.median(rates)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.repeats < 1:
        raise common.UserError("--steps and --repeats take a count of at least 1")
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    rates = {name: [] for name in VARIANTS}
    evaluated = {chunk: [] for chunk in CHUNKS}
    for _ in range(args.repeats):
        for name, variant in VARIANTS.items():
            rates[name].append(images_per_second(*variant, args.steps, dtype))
        for chunk in CHUNKS:  # as many images as the timed steps train, at least two chunks of the largest
            evaluated[chunk].append(evaluated_per_second(chunk, max(2 * CHUNKS[0], args.steps * 256), dtype))
    model = cnn.CNN(cnn.FC_WIDTH, cnn.DROPOUT)
    macs = sum(m.weight.numel() * (28 * 28 if i == 0 else 14 * 14) for i, m in enumerate(model.features[::4]))
    macs += sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    peak = matmul_flops(dtype)
    print(f"{torch.get_num_threads()} threads, {args.precision}, 2048^2 matmul: {peak / 1e9:.0f} GFLOP/s")
    for name, values in rates.items():
        ips = statistics.median(values)
        flops = 3 * 2 * macs * ips  # forward and two backward products, 2 FLOP per multiply-add
        print(f"{name}: {ips:,.0f} img/s, {flops / 1e9:.0f} GFLOP/s, {flops / peak:.0%} of the matmul")
    for chunk, values in evaluated.items():
        print(f"evaluation in chunks of {chunk}: {statistics.median(values):,.0f} img/s")


if __name__ == "__main__":
    raise SystemExit(common.run_main(main))  # a user error is one line and exit code 2, Ctrl-C cleans up
