"""The figures a run writes beside its record (plumbing/runs.py draws them): plain functions, each returning a
matplotlib Figure on the Agg canvas, which never blocks and needs no display."""

from plumbing.data import CLASSES

import os
import sys

import numpy as np
import torch


def confusion_matrix(logits, labels):
    """10x10 counts: rows are the true classes, columns the predicted ones."""
    return torch.bincount(10 * labels + logits.argmax(1), minlength=100).view(10, 10)


def plot_curves(history, labels, title, ended=""):
    """Loss and accuracy per epoch: the training batches as they were trained, beside the validation evaluation.
    `labels` are (training batches, validation), from what the run did; `ended` says how a run that did not
    complete ended, under the title."""
    from matplotlib.figure import Figure

    epochs = [h["epoch"] for h in history]
    fig = Figure(figsize=(10, 4.6), dpi=100)
    for i, (key, label, scale) in enumerate((("loss", "cross-entropy loss", 1), ("acc", "accuracy (%)", 100))):
        ax = fig.add_subplot(1, 2, i + 1)
        ax.plot(epochs, [scale * h[f"train_batch_{key}"] for h in history], "o-", markersize=3, label=labels[0])
        if history[0][f"val_{key}"] is not None:
            ax.plot(epochs, [scale * h[f"val_{key}"] for h in history], "o-", markersize=3, label=labels[1])
        ax.set(xlabel="epoch", ylabel=label)
        ax.grid(alpha=0.3)
        epoch_axis(ax, epochs[-1])
    fig.suptitle(title + (f"\n{ended}" if ended else ""), parse_math=False)
    fig.legend(*ax.get_legend_handles_labels(), loc="lower center", ncol=2, fontsize=8, frameon=False)  # below
    fig.tight_layout(rect=(0, 0.08, 1, 1))  # the plots, above the legend: it covers no point
    return fig


def epoch_axis(ax, last):
    """An x axis of whole epochs: 1 to `last`, with a little room either side (one epoch is no range of 0.96-1.04)."""
    from matplotlib.ticker import MaxNLocator

    ax.set_xlim(0.5, last + 0.5)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))


def plot_confusion(confusion, title):
    """The confusion matrix normalised per true class (rows sum to 1), with per-class accuracy."""
    from matplotlib.figure import Figure

    rates = (confusion / confusion.sum(1, keepdim=True).clamp(min=1)).numpy()
    fig = Figure(figsize=(9, 8), dpi=100)
    ax = fig.add_subplot()
    ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    for (i, j), rate in np.ndenumerate(rates):
        if rate >= 0.005:
            ax.text(j, i, f"{rate:.2f}", ha="center", va="center", fontsize=8, color="white" if rate > 0.5 else "black")
    ax.set_xticks(range(10), CLASSES, rotation=45, ha="right")
    ax.set_yticks(range(10), [f"{name} ({rates[i, i]:.1%})" for i, name in enumerate(CLASSES)])
    ax.set(xlabel="predicted class", ylabel="true class (per-class accuracy)", title=title)
    fig.tight_layout()
    return fig


def plot_training_images(images, labels):
    """The first training images with their labels, as the model sees them (light item on black)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 7.5), dpi=100)
    for k, (image, label) in enumerate(zip(images, labels, strict=True)):
        ax = fig.add_subplot(5, 6, k + 1)
        ax.imshow(image.mean(0).numpy(), cmap="gray")
        ax.set_title(CLASSES[label], fontsize=9)
        ax.axis("off")
    fig.suptitle(f"the first {len(images)} training images and their labels")
    fig.subplots_adjust(left=0.02, right=0.98, bottom=0.02, top=0.9, wspace=0.15, hspace=0.4)
    return fig


def plot_misclassified(images, labels, logits, count=24):
    """A grid of the test images the model was most confident about and got wrong."""
    from matplotlib.figure import Figure

    confidence, predicted = logits.softmax(1).max(1)
    mistakes = (predicted != labels).nonzero().flatten()
    wrong = mistakes[confidence[mistakes].argsort(descending=True)][:count]
    fig = Figure(figsize=(12, 9), dpi=100)
    for k, i in enumerate(wrong.tolist()):
        ax = fig.add_subplot(4, 6, k + 1)
        # Light on black over the full 0-255 range: as the model sees it, and as predict.py's figure shows it.
        ax.imshow(images[i].float().mean(0).numpy(), cmap="gray", vmin=0, vmax=255)
        ax.set_title(f"true: {CLASSES[labels[i]]}\npred: {CLASSES[predicted[i]]} ({confidence[i]:.0%})", fontsize=8)
        ax.axis("off")
    fig.suptitle(f"the {len(wrong)} most confident of {len(mistakes):,} mistakes among the {len(labels):,} test images")
    fig.subplots_adjust(left=0.02, right=0.98, bottom=0.02, top=0.9, wspace=0.15, hspace=0.55)  # titles clear of images
    return fig


def show_plots(folder):
    """Open the run's figures in windows and wait until they are closed; without a display, say where they are."""
    if sys.platform.startswith("linux") and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        print(f"--show: no display here; the plots are in {folder}", file=sys.stderr)
        return
    import matplotlib.pyplot as plt

    for path in sorted(folder.glob("*.png")):
        plt.figure(path.name, figsize=(10, 7))
        plt.imshow(plt.imread(path))
        plt.axis("off")
    plt.show()
