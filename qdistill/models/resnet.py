"""Pre-activation ResNet teachers (He et al. 2016), sized for 28x28 or 32x32 images."""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

TEACHER_PRESETS = {
    # name: (widths of the three stages, blocks per stage)
    "resnet-small": ((16, 32, 64), 1),  # ~78k, trains in minutes on a CPU
    "resnet": ((64, 128, 256), 2),  # ~2.8M, the reference teacher of method.md
}


class PreActBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = nn.Conv2d(cin, cout, 1, stride, bias=False) if stride != 1 or cin != cout else None

    def forward(self, x):
        out = F.relu(self.bn1(x))
        skip = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        return self.conv2(F.relu(self.bn2(out))) + skip


class PreActResNet(nn.Module):
    def __init__(self, widths=(16, 32, 64), blocks=1, in_channels=1, num_classes=10):
        super().__init__()
        self.stem = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)
        stages, cin = [], widths[0]
        for i, w in enumerate(widths):
            for j in range(blocks):
                stages.append(PreActBlock(cin, w, 2 if i > 0 and j == 0 else 1))
                cin = w
        self.stages = nn.Sequential(*stages)
        self.head = nn.Sequential(nn.BatchNorm2d(cin), nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        return self.fc(self.head(self.stages(self.stem(x))))


def resnet_teacher(size: str = "resnet-small", in_channels: int = 1, num_classes: int = 10) -> PreActResNet:
    widths, blocks = TEACHER_PRESETS[size]
    return PreActResNet(widths, blocks, in_channels, num_classes)
