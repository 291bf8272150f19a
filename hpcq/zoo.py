"""Model factories shipped with hpcq (referenced as ``hpcq.zoo:NAME`` in run specs)."""

from __future__ import annotations

from torch import nn


def _conv_block(c_in: int, c_out: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=True), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]


class FashionVGG(nn.Module):
    """A small VGG-style CNN for 28x28 gray images.

    Like VGG-16, most of its weights sit in the first fully connected layers (about 95%), so the
    quickstart exercises the same trade-off as the paper's VGG-16 plan (quantize layers 5-6 hard).
    Layers in forward order: 4 convolutions (1-4), then 3 fully connected layers (5-7).
    """

    def __init__(self, num_classes: int = 10, width: int = 16, hidden: int = 512, in_channels: int = 1) -> None:
        super().__init__()
        self.features = nn.Sequential(
            *_conv_block(in_channels, width), *_conv_block(width, width), nn.MaxPool2d(2),
            *_conv_block(width, 2 * width), *_conv_block(2 * width, 2 * width), nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(2 * width * 7 * 7, hidden), nn.ReLU(inplace=True), nn.Dropout(0.3),
            nn.Linear(hidden, hidden), nn.ReLU(inplace=True), nn.Dropout(0.3),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x):  # noqa: D102 - standard nn.Module forward
        return self.classifier(self.features(x))


def fashion_vgg(num_classes: int = 10, width: int = 16, hidden: int = 512, in_channels: int = 1) -> FashionVGG:
    """The quickstart teacher architecture (untrained)."""
    return FashionVGG(num_classes=num_classes, width=width, hidden=hidden, in_channels=in_channels)
