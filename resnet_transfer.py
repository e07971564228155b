"""Fashion-MNIST by transfer learning: a frozen ImageNet ResNet extracts features, a small MLP head classifies.

The backbone never changes, so its features are computed once, cached on disk, and every epoch (and
every later run with the same settings) trains only the head on the cached tensors: seconds, not hours.
Run `python resnet_transfer.py`, or override any constant below (`python resnet_transfer.py --epochs 5`).
"""

import common  # first: from here on a Ctrl-C, even while torch loads, ends the program in one line
from plumbing import files  # weights files and feature caches: written atomically, read within bounds

import hashlib
import re
import sys
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

torchvision = common.import_torchvision()  # one line, not a traceback, where it was built for another torch

# --- Hyperparameters: each one is also a flag (EPOCHS -> --epochs); `python resnet_transfer.py --help` lists them.
BACKBONE = "resnet50"  # resnet18 or resnet34 (512 features) or resnet50 (2048 features)
# V1 rather than torchvision's DEFAULT (V2): V2 was trained with label smoothing, mixup and cutmix, which make
# frozen features transfer worse (Kornblith et al. 2019); not measured here.
WEIGHTS = "IMAGENET1K_V1"  # IMAGENET1K_V1, IMAGENET1K_V2 (resnet50), DEFAULT (the newest), a state-dict file, none
IMAGE_SIZE = "auto"  # pixels the images are resized to, 32-512; auto: 64 on CPUs without bf16 units, 96 with, 128 GPU
EPOCHS = 30  # passes over the training split (the head alone, on cached features, unless FINETUNE)
BATCH_SIZE = 256  # images per optimizer step
LR = 0.002  # peak learning rate of AdamW (linear warm-up, then cosine decay to 0)
WEIGHT_DECAY = 0.01  # AdamW's decoupled weight decay, >= 0
WARMUP = 0.1  # fraction of the steps spent warming the learning rate up, in (0, 1)
DROPOUT = 0.3  # dropout after each hidden layer of the head, in [0, 1)
LABEL_SMOOTHING = 0.1  # share of each target spread over the other classes, in [0, 1)
FINETUNE = False  # also train the backbone's last residual stage (no feature cache: the backbone runs every batch)
MAX_SHIFT = 2  # with FINETUNE: random translation of training images, in pixels (0 = off)
FLIP = True  # with FINETUNE: mirror training images left-right at random
EXTRACT_BATCH = 256  # images per backbone forward pass when extracting features
CACHE_DIR = ""  # where extracted features are kept ("" = data/cache beside this script)
VAL_SIZE = 5000  # training images held out for validation, class-balanced (0 = train on all 60,000)
SUBSET = 0  # use only the first N training and N test images, for quick dry runs (0 = all)
SEED = 0  # seeds initialisation, the validation split, batch order and augmentation
DEVICE = "auto"  # auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps
PRECISION = "auto"  # auto (bf16 on Ampere+ GPUs and bf16 CPUs, fp16 on a T4 or V100, else fp32), bf16, fp16, fp32
DATA_DIR = ""  # folder with the Fashion-MNIST files ("" = $FASHION_MNIST_DIR, ./data, the Debian package, download)
OUT_DIR = ""  # where run folders go ("" = runs/ beside this script)
SHOW = False  # at the end, open the plots in windows (needs a display; they are always saved as PNGs)

FEATURES = {"resnet18": 512, "resnet34": 512, "resnet50": 2048}


class Preprocess(nn.Module):
    """uint8 grey 28x28 -> the input the ImageNet weights expect: 3 channels, IMAGE_SIZE, their mean and std."""

    def __init__(self, image_size, mean, std):
        super().__init__()
        self.image_size = image_size
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1))

    def forward(self, x):
        x = F.interpolate(x.float() / 255, size=self.image_size, mode="bilinear", align_corners=False)
        return ((x.expand(-1, 3, -1, -1) - self.mean) / self.std).contiguous(memory_format=torch.channels_last)


class Head(nn.Module):
    def __init__(self, in_features, dropout):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(in_features, 128),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(128, 64),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(64, 10),
        )

    def forward(self, x):
        return self.net(x)


class FineTuned(nn.Module):
    """Preprocess -> backbone -> head, with only the last residual stage (layer4) and the head trainable."""

    def __init__(self, preprocess, backbone, head):
        super().__init__()
        self.preprocess, self.backbone, self.head = preprocess, backbone, head
        backbone.layer4.requires_grad_(True)

    def train(self, mode=True):
        super().train(mode)
        self.backbone.eval()  # the frozen stages' BatchNorm statistics must not move
        self.backbone.layer4.train(mode)
        return self

    def forward(self, x):
        return self.head(self.backbone(self.preprocess(x)))


def load_backbone(name, weights, seed):
    """(frozen backbone without its classifier, weights identity, normalisation mean, std).

    `weights` names one of torchvision's ImageNet weight sets (DEFAULT, IMAGENET1K_V1, ...), a state-dict file or
    "none". A named set is loaded from torch's cache, downloaded there first if missing, as a plain state dict."""
    sets = torchvision.models.get_model_weights(name)
    named = weights != "none" and not Path(weights).is_file()
    if named and weights not in sets.__members__:
        choices = ", ".join(["DEFAULT", *sets.__members__])
        raise common.UserError(f"--weights {weights}: {name} has no such ImageNet weights; use {choices} or none")
    imagenet = sets[weights] if named else sets.DEFAULT
    mean, std = imagenet.transforms().mean, imagenet.transforms().std
    model = torchvision.models.get_model(name, weights=None)
    if weights == "none":
        return freeze(model), f"none-seed{seed}", mean, std
    if named:
        path = Path(torch.hub.get_dir()) / "checkpoints" / Path(imagenet.url).name
        what, identity = "the cached ImageNet weights (delete the file to download them again)", path.name
        if not path.exists():
            download(imagenet.url, path)
    else:
        path, what, identity = Path(weights), "--weights", None
    state = files.load_tensors(path, what, files.state_bytes(model))
    files.check_state_dict(state, model, f"{what} {path}", name)
    model.load_state_dict(state)
    return freeze(model), identity or hashlib.sha256(path.read_bytes()).hexdigest()[:16], mean, std


def download(url, path):
    """torch's downloader (checking the hash in the file's name, as torchvision does), with every failure (no
    network, a full disk, a damaged download) as one line saying what to do instead."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        hash_prefix = re.search(torch.hub.HASH_REGEX, path.name)
        torch.hub.download_url_to_file(url, str(path), hash_prefix=hash_prefix and hash_prefix.group(1))
    except Exception as error:  # URLError, HTTPError, OSError, RuntimeError: the advice is the same
        raise common.UserError(
            f"cannot download {path.name} ({type(error).__name__}): put it (from {url}) into {path.parent}, "
            "or pass --weights PATH to a state-dict file, or --weights none for random weights"
        ) from None


def freeze(model):
    model.fc = nn.Identity()  # the backbone ends at the pooled features
    return model.requires_grad_(False).eval()


@torch.inference_mode()
def extract_features(preprocess, backbone, images, device, amp, batch_size):
    """The backbone's pooled features of uint8 images, computed on the device batch by batch."""
    chunks = []
    for xb in tqdm(images.split(batch_size), desc="features", disable=not sys.stdout.isatty()):
        with amp:
            chunks.append(backbone(preprocess(xb.to(device))).float())
    return torch.cat(chunks)


def cached_features(cache_dir, settings, extract, x_train, x_test, width):
    """(train features, test features, cache file): read from the file named after the settings and the images
    when it holds what they would give, else computed with extract(images) and saved there. A cache that cannot
    be saved is said in one line, and the features computed are used all the same."""
    images_hash = hashlib.sha256(x_train.numpy().tobytes() + x_test.numpy().tobytes()).hexdigest()[:16]
    path = cache_dir / f"{settings}-{images_hash}.pt"
    if path.exists():
        try:
            cached = files.load_tensors(path, "feature cache", 4 * width * (len(x_train) + len(x_test)))
            if all(usable(cached.get(k), (len(x), width)) for k, x in (("train", x_train), ("test", x_test))):
                return cached["train"], cached["test"], path
            print(f"cache {path} is damaged (its tensors have the wrong shape, type or values); extracting again")
        except common.UserError as error:
            print(f"{error}; extracting the features again")
    print(f"extracting features of {len(x_train) + len(x_test)} images (once) ...", flush=True)
    both = extract(torch.cat([x_train, x_test]))
    cached = {"train": both[: len(x_train)], "test": both[len(x_train) :]}
    try:
        files.save_tensors(path, cached)
    except common.UserError as error:  # a full disk must not throw the extraction away
        print(f"warning: the features are not cached ({error}); this run uses them, the next extracts again")
    return cached["train"], cached["test"], path


def usable(tensor, shape):
    """Whether a cached tensor can stand in for fresh features of that shape: float32, and numbers only (no NaN)."""
    ok = torch.is_tensor(tensor) and tensor.shape == shape and tensor.dtype == torch.float32
    return ok and bool(torch.isfinite(tensor).all())


def train_one_epoch(model, batches, optimizer, scheduler, loss_fn, amp, scaler):
    """One pass over the batches: one optimizer step per batch. Returns the batches' mean loss and accuracy."""
    model.train()
    tally = common.Tally()  # running loss and accuracy, and a check that the loss stays finite
    for inputs, labels in batches:
        with amp:  # the forward pass in 16 bits where the hardware is fast at it (PRECISION)
            logits = model(inputs)
            loss = loss_fn(logits.float(), labels)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()  # fp16 only: the loss is scaled up so that small gradients do not round to 0
        scaler.step(optimizer)  # unscales the gradients, and skips the step if they overflowed
        scaler.update()  # the scale adapts: down after an overflow, up after a long run without one
        scheduler.step()  # the learning rate changes every step
        tally.add(loss, logits, labels)
    return tally.result()


def main(argv=None):
    hp = common.parse_hparams(globals(), argv)
    cache_dir = Path(hp.cache_dir or files.HERE / "data" / "cache")
    if not hp.finetune:  # the features are cached there: better to learn now than after extracting them
        files.writable_folder(cache_dir, "--cache-dir")
    device = common.pick_device(hp.device)  # auto: CUDA, then Apple's MPS, then the CPU
    precision = common.pick_precision(hp.precision, device)  # auto: 16 bits where the device has the units for it
    amp = common.autocast(device, precision)  # the context the forward passes run in
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")  # a no-op unless fp16
    image_size = hp.image_size  # auto: extraction time grows with the square of the size, so what the device affords
    if image_size == "auto":
        image_size = 128 if device.type == "cuda" else 96 if precision == "bf16" else 64
    with common.Run("resnet_transfer", hp, device, precision) as run:
        torch.manual_seed(hp.seed)
        backbone, weights_id, mean, std = load_backbone(hp.backbone, hp.weights, hp.seed)
        if hp.weights == "none":
            print("NOTE: --weights none: the backbone is random, so this is not transfer learning.")
            if hp.backbone == "resnet50":  # its random features are nearly useless: say so, and what to run instead
                print(
                    "  A random ResNet-50 gives its head little to learn from (about 26% test in fp32, chance in "
                    "bf16). An offline dry run that learns something (73.5%, seconds on 2 cores): "
                    "--weights none --backbone resnet18 --image-size 32 --subset 10000 --epochs 10"
                )
        run.record.update(backbone=hp.backbone, weights=weights_id, image_size=image_size)  # what ran
        backbone = backbone.to(device, memory_format=torch.channels_last)
        preprocess = Preprocess(image_size, mean, std).to(device)
        model_args = dict(in_features=FEATURES[hp.backbone], dropout=hp.dropout)
        head = Head(**model_args).to(device)
        run.record["model_args"] = model_args  # predict.py rebuilds the head from them
        data_dir = common.find_fashion_mnist(hp.data_dir)
        x_train, y_train, x_test, y_test = common.take_subset(hp.subset, *common.read_fashion_mnist(data_dir))
        run.record["data_dir"] = str(data_dir)

        if hp.finetune:  # the backbone runs on every batch, so the model's inputs are the images
            model, inputs = FineTuned(preprocess, backbone, head), (x_train, x_test)
            params = [
                {"params": head.parameters()},
                {"params": backbone.layer4.parameters(), "lr": hp.lr / 10},  # pretrained: move it gently
            ]
        else:  # only the head trains, on features computed once
            model, params = head, head.parameters()
            settings = f"{hp.backbone}-{weights_id}-{image_size}px-{precision}"  # what the features depend on

            def extract(images):
                return extract_features(preprocess, backbone, images, device, amp, hp.extract_batch)

            *inputs, cache = cached_features(cache_dir, settings, extract, x_train, x_test, FEATURES[hp.backbone])
            run.record["feature_cache"] = str(cache)
        splits = common.split_validation(inputs[0], y_train, inputs[1], y_test, hp.val_size, hp.seed)
        data = common.Splits(*[(x.to(device), y.to(device)) for x, y in splits])

        optimizer = torch.optim.AdamW(params, lr=hp.lr, weight_decay=hp.weight_decay, fused=True)
        steps = hp.epochs * common.steps_per_epoch(len(data.train[0]), hp.batch_size)
        scheduler = common.warmup_cosine(optimizer, steps, hp.warmup)
        loss_fn = nn.CrossEntropyLoss(label_smoothing=hp.label_smoothing)
        generator = torch.Generator(device).manual_seed(hp.seed)  # batch order and augmentation

        def augment(images):
            return common.random_flip_and_shift(images.float(), hp.max_shift, generator, hp.flip)

        # Evaluation runs BATCH_SIZE inputs at a time, as training does: with FINETUNE the backbone runs on every
        # image evaluated, and a batch that fits a training step fits here too (at 512 px an image takes 30-55 MB).
        trained = {"augmented": hp.finetune and (hp.flip or hp.max_shift), "dropout on": hp.dropout}
        trained["label smoothing in the loss"] = hp.label_smoothing
        run.start_training(data, model, model, hp.epochs, 1, trained)
        for epoch in range(1, hp.epochs + 1):
            batches = common.shuffled_batches(*data.train, hp.batch_size, generator, augment if hp.finetune else None)
            train_loss, train_acc = train_one_epoch(model, batches, optimizer, scheduler, loss_fn, amp, scaler)
            val_loss, val_acc = common.evaluate(model, *data.val, amp, chunk=hp.batch_size)
            run.log_epoch(epoch, train_loss, train_acc, val_loss, val_acc, scheduler.get_last_lr()[0])

        sample = [x[: common.TRAIN_SAMPLE] for x in data.train]  # a fixed sample: all of it would cost far more
        train_acc = common.evaluate(model, *sample, amp, chunk=hp.batch_size)[1]  # val_acc: the last epoch's
        # The test set, evaluated once, after training: every choice was made on validation.
        test_logits = common.compute_logits(model, data.test[0], amp, chunk=hp.batch_size)
        test_loss, test_acc = common.scores(test_logits, data.test[1])
        final = dict(train_acc=train_acc, val_acc=val_acc, test_acc=test_acc, test_loss=test_loss)
        run.finish(final, test_logits, x_test, y_test)  # recorded and printed, then the figures drawn
    if hp.show:
        common.show_plots(run.dir)
    return run.record["final"]


if __name__ == "__main__":
    memory = ["BATCH_SIZE", "EXTRACT_BATCH", "IMAGE_SIZE"]  # what to lower if memory runs out
    raise SystemExit(common.run_main(main, memory=memory))
