"""Fashion-MNIST by transfer learning: a frozen ImageNet ResNet extracts features, a small MLP head classifies.

The backbone never changes, so its features are computed once, cached on disk, and every epoch (and
every later run with the same settings) trains only the head on the cached tensors: seconds, not hours.
Run `python resnet_transfer.py`, or override any constant below (`python resnet_transfer.py --epochs 5`).
"""

import hashlib
import math
import sys
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from tqdm import tqdm

import common

# --- Hyperparameters: each one is also a flag (EPOCHS -> --epochs); `python resnet_transfer.py --help` lists them.
BACKBONE = "resnet50"  # resnet18 or resnet34 (512 features) or resnet50 (2048 features)
WEIGHTS = "DEFAULT"  # DEFAULT (torchvision's ImageNet weights), a path to a state-dict file, or none (random)
# Extracting ResNet-50 features of all 70,000 images on 2 AVX2 cores takes 2 min at 32 px (where the last
# feature map is a single pixel), 7 min at 64 px, 37 min at 128 px and 2 h at 224 px: 64 is the compromise.
IMAGE_SIZE = 64  # pixels the 28x28 images are resized to, >= 32 (see the measurements above)
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
PRECISION = "auto"  # auto (bf16 where the hardware has fast bf16), bf16 or fp32
DATA_DIR = ""  # folder with the Fashion-MNIST files ("" = $FASHION_MNIST_DIR, ./data, the Debian package, download)
OUT_DIR = ""  # where run folders go ("" = runs/ beside this script)
SHOW = False  # at the end, open the plots in windows (needs a display; they are always saved as PNGs)

FEATURES = {"resnet18": 512, "resnet34": 512, "resnet50": 2048}
CHECKS = {
    "BACKBONE": (lambda v: v in FEATURES, " or ".join(FEATURES)),
    "IMAGE_SIZE": (lambda v: 32 <= v <= 512, "an integer in [32, 512]: ResNets downsample 32x"),
    "WEIGHTS": (
        lambda v: v in ("DEFAULT", "none") or Path(v).expanduser().is_file(),
        "DEFAULT, none, or the path of an existing state-dict file",
    ),
    "WARMUP": (lambda v: 0 < v < 1, "a number in (0, 1)"),
    "EXTRACT_BATCH": (lambda v: v >= 1, "an integer >= 1"),
}


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
    def __init__(self, in_features, dropout=DROPOUT):
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
    """(frozen backbone without its classifier, weights identity, normalisation mean, std)."""
    imagenet = torchvision.models.get_model_weights(name).DEFAULT
    mean, std = imagenet.transforms().mean, imagenet.transforms().std
    if weights == "DEFAULT":
        expected = Path(torch.hub.get_dir()) / "checkpoints" / Path(imagenet.url).name
        try:
            model = torchvision.models.get_model(name, weights=imagenet)
        except (OSError, RuntimeError) as error:  # no network (URLError is an OSError) or a bad download
            raise common.UserError(
                f"cannot load the ImageNet weights for {name} ({type(error).__name__}): put {expected.name} "
                f"(from {imagenet.url}) into {expected.parent}, or pass --weights PATH to a state-dict file, "
                "or --weights none for random weights"
            ) from None
        return freeze(model), expected.name, mean, std
    model = torchvision.models.get_model(name, weights=None)
    if weights == "none":
        return freeze(model), f"none-seed{seed}", mean, std
    path = Path(weights).expanduser()
    try:
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    except (OSError, RuntimeError, KeyError, TypeError) as error:
        reason = error.strerror if isinstance(error, OSError) else str(error).splitlines()[0]
        raise common.UserError(f"--weights {path}: not a {name} state dict ({reason})") from None
    return freeze(model), hashlib.sha256(path.read_bytes()).hexdigest()[:16], mean, std


def freeze(model):
    model.fc = nn.Identity()  # the backbone ends at the pooled features
    return model.requires_grad_(False).eval()


@torch.inference_mode()
def extract_features(preprocess, backbone, images, run, batch_size):
    chunks = []
    for xb in tqdm(images.split(batch_size), desc="features", disable=not sys.stdout.isatty()):
        with run.autocast():
            chunks.append(backbone(preprocess(xb.to(run.device))).float())
    return torch.cat(chunks)


def cached_features(hp, run, preprocess, backbone, weights_id, x_train, x_test):
    """Features of the train and test images, from the cache when one matches these settings exactly."""
    images_hash = hashlib.sha256(x_train.numpy().tobytes() + x_test.numpy().tobytes()).hexdigest()[:16]
    key = f"{hp['BACKBONE']}-{weights_id}-{hp['IMAGE_SIZE']}px-{run.precision}-{images_hash}"
    path = Path(hp["CACHE_DIR"] or common.HERE / "data" / "cache") / f"{key}.pt"
    run.record["feature_cache"] = str(path)
    cached = common.load_cached_tensors(path, key)
    if cached is None:
        print(f"extracting {hp['BACKBONE']} features of {len(x_train) + len(x_test)} images (once) ...", flush=True)
        both = extract_features(preprocess, backbone, torch.cat([x_train, x_test]), run, hp["EXTRACT_BATCH"])
        cached = {"key": key, "train": both[: len(x_train)], "test": both[len(x_train) :]}
        common.save_tensors(path, cached)
    return cached["train"], cached["test"]


def main(argv=None):
    hp = common.parse_hparams(globals(), argv, CHECKS)
    with common.Run("resnet_transfer", hp) as run:
        torch.manual_seed(hp["SEED"])
        run.print_header()
        backbone, weights_id, mean, std = load_backbone(hp["BACKBONE"], hp["WEIGHTS"], hp["SEED"])
        if hp["WEIGHTS"] == "none":
            print("NOTE: --weights none: the backbone is randomly initialised, so accuracy is not transfer learning")
        run.record.update(backbone=hp["BACKBONE"], weights=weights_id, image_size=hp["IMAGE_SIZE"])
        backbone = backbone.to(run.device, memory_format=torch.channels_last)
        preprocess = Preprocess(hp["IMAGE_SIZE"], mean, std).to(run.device)
        head = Head(FEATURES[hp["BACKBONE"]], hp["DROPOUT"]).to(run.device)
        x_train, y_train, x_test, y_test = common.take_subset(
            hp["SUBSET"], *common.load_fashion_mnist(hp["DATA_DIR"] or None)
        )

        if hp["FINETUNE"]:
            model = FineTuned(preprocess, backbone, head)
            data = common.split_data(hp, x_train.to(run.device), y_train, x_test.to(run.device), y_test)
            params = [
                {"params": head.parameters()},
                {"params": backbone.layer4.parameters(), "lr": hp["LR"] / 10},  # pretrained: move it gently
            ]

            def augment(x, generator):
                return common.random_flip_and_shift(x.float(), hp["MAX_SHIFT"], generator, flip=hp["FLIP"])

        else:
            model, augment, params = head, None, head.parameters()
            features = cached_features(hp, run, preprocess, backbone, weights_id, x_train, x_test)
            data = common.split_data(hp, features[0], y_train, features[1], y_test)
        data = {name: (x.to(run.device), y.to(run.device)) for name, (x, y) in data.items()}

        optimizer = torch.optim.AdamW(params, lr=hp["LR"], weight_decay=hp["WEIGHT_DECAY"], fused=True)
        total_steps = hp["EPOCHS"] * math.ceil(len(data["train"][0]) / hp["BATCH_SIZE"])
        scheduler = common.warmup_cosine(optimizer, total_steps, hp["WARMUP"])
        return common.train(
            run,
            model,
            data,
            optimizer=optimizer,
            scheduler=scheduler,
            loss_fn=nn.CrossEntropyLoss(label_smoothing=hp["LABEL_SMOOTHING"]),
            epochs=hp["EPOCHS"],
            batch_size=hp["BATCH_SIZE"],
            augment=augment,
            test_images=x_test,
        )


if __name__ == "__main__":
    raise SystemExit(common.run_main(main))
