"""A small Fashion-MNIST classifier: the demo's offline stand-in for Inception in FID.

Input: RGB images of 64x64 in [-1, 1] (the demo's pixels: grey 28x28 -> RGB -> bicubic 64 px).
`features(x)` is the global-average-pooled output of the last conv stage (like Inception's pool3),
`forward(x)` is a linear layer on top of it (logits over the 10 Fashion-MNIST classes).

The weights ship in `assets/demo_classifier.safetensors`; the architecture's settings are stored
in the file's metadata, so `load_demo_classifier()` needs no training code.
tools/train_demo_classifier.py builds the file.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

DEMO_CLASSIFIER_PATH = Path(__file__).resolve().parent / "assets" / "demo_classifier.safetensors"


def _conv_bn_relu(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class DemoClassifier(nn.Module):
    """Stride-2 stem (64 -> 32 px; the 28 px source holds no finer detail), then stages of two
    3x3 conv-BN-ReLU blocks, each later stage halving the resolution: 32 -> 16 -> 8 px."""

    def __init__(self, in_channels: int = 3, widths: tuple[int, ...] = (32, 64, 128),
                 num_classes: int = 10, dropout: float = 0.2):
        super().__init__()
        self.config = {"in_channels": in_channels, "widths": list(widths),
                       "num_classes": num_classes, "dropout": dropout}
        layers = [_conv_bn_relu(in_channels, widths[0], stride=2)]
        cin = widths[0]
        for i, w in enumerate(widths):
            layers += [_conv_bn_relu(cin, w, stride=1 if i == 0 else 2), _conv_bn_relu(w, w)]
            cin = w
        self.body = nn.Sequential(*layers)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(cin, num_classes)
        self.feature_dim = cin
        self.num_classes = num_classes

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> (B, feature_dim) float32 penultimate features."""
        return self.body(x.float()).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> (B, num_classes) logits."""
        return self.head(self.dropout(self.features(x)))


def save_classifier(model: DemoClassifier, path: str | Path) -> None:
    from safetensors.torch import save_file

    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, str(path), metadata={"format": "pt", "config": json.dumps(model.config)})


def load_classifier(path: str | Path, device: str | torch.device = "cpu") -> DemoClassifier:
    """Build a DemoClassifier from a safetensors file written by `save_classifier` (no pickle)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as f:
        config = json.loads((f.metadata() or {}).get("config", "{}"))
    if "widths" in config:
        config["widths"] = tuple(config["widths"])
    model = DemoClassifier(**config)
    model.load_state_dict(load_file(str(path)))
    return model.to(device).eval()


def load_demo_classifier(device: str | torch.device = "cpu") -> DemoClassifier:
    """The shipped demo classifier, in eval mode, on `device`."""
    if not DEMO_CLASSIFIER_PATH.is_file():
        raise FileNotFoundError(f"{DEMO_CLASSIFIER_PATH} is missing: run tools/train_demo_classifier.py")
    return load_classifier(DEMO_CLASSIFIER_PATH, device)
