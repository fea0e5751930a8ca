"""The models lotus_rt trains: a small AlexNet-style CNN and a CIFAR-style ResNet-20 (torch).

- ``small_alexnet(in_channels=1, image_size=28)``: conv 5x5 (32) - pool - conv 3x3 (64) - pool -
  conv 3x3 (64) - fc 256 - fc classes (the demo's model; 861 898 parameters on MNIST).
- ``resnet20(in_channels=3)``: He et al. 2016's CIFAR ResNet with 3 stages of 3 basic blocks
  (16, 32, 64 channels; stride 2 entering stages 2 and 3), batch norm after every convolution,
  identity shortcuts inside a stage and projection shortcuts (1x1 convolution + batch norm,
  option B) where the shape changes, global average pooling and one linear classifier.
  Convolution names: ``conv1``, ``layer{s}.{b}.conv{1,2}``, ``layer{s}.0.shortcut.0``, ``fc``.
"""
from __future__ import annotations

from torch import nn


def small_alexnet(in_channels: int = 1, num_classes: int = 10, image_size: int = 28) -> nn.Sequential:
    """The small AlexNet-style CNN of the demo; ``image_size`` must be divisible by 4."""
    if image_size % 4 or image_size < 4:
        raise ValueError(f"small_alexnet: image_size={image_size} must be a positive multiple of 4")
    side = image_size // 4
    return nn.Sequential(
        nn.Conv2d(in_channels, 32, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),   # 28 -> 14
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),            # 14 -> 7
        nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(),
        nn.Flatten(),
        nn.Linear(64 * side * side, 256), nn.ReLU(),
        nn.Linear(256, num_classes),
    )


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN plus the shortcut, then ReLU."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(out_channels))
        else:
            self.shortcut = nn.Identity()

    def forward(self, x):
        y = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(y)) + self.shortcut(x))


class ResNet(nn.Module):
    """CIFAR-style ResNet: a 3x3 stem, three stages of ``blocks`` basic blocks, pooling, linear."""

    def __init__(self, blocks: int = 3, in_channels: int = 3, num_classes: int = 10, widths=(16, 32, 64)):
        super().__init__()
        if blocks < 1:
            raise ValueError(f"ResNet: blocks={blocks} must be >= 1")
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU()
        stages, channels = [], widths[0]
        for s, width in enumerate(widths):
            layers = [BasicBlock(channels, width, stride=1 if s == 0 else 2)]
            layers += [BasicBlock(width, width) for _ in range(blocks - 1)]
            stages.append(nn.Sequential(*layers))
            channels = width
        self.layer1, self.layer2, self.layer3 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x):
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.layer3(self.layer2(self.layer1(y)))
        return self.fc(self.flatten(self.pool(y)))


def resnet20(in_channels: int = 3, num_classes: int = 10) -> ResNet:
    """ResNet-20 (6n + 2 layers with n = 3) for 32x32 (CIFAR-10) or 28x28 (MNIST) images."""
    return ResNet(3, in_channels, num_classes)


__all__ = ["small_alexnet", "resnet20", "ResNet", "BasicBlock"]
