"""The paper's family of plain conv students: conv-BN-ReLU pairs with max pooling, then two linear layers."""

from __future__ import annotations

from torch import nn

STUDENT_PRESETS = {
    # name: (conv channels, hidden units); parameter counts for 1x28x28 inputs and 10 classes
    "tiny": ((8, 16, 32, 32), 32),  # ~25k
    "small": ((16, 32, 64, 64), 64),  # ~100k
    "medium": ((32, 64, 128, 128), 128),  # ~400k
    "large": ((48, 96, 192, 192), 256),  # ~1M
}


class ConvStudent(nn.Module):
    def __init__(self, channels=(8, 16, 32, 32), hidden=32, in_channels=1, num_classes=10):
        super().__init__()
        layers, cin = [], in_channels
        for i, c in enumerate(channels):
            layers += [nn.Conv2d(cin, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(inplace=True)]
            if i % 2 == 1:
                layers.append(nn.MaxPool2d(2))
            cin = c
        self.features = nn.Sequential(*layers, nn.AdaptiveMaxPool2d(3), nn.Flatten())
        self.classifier = nn.Sequential(nn.Linear(9 * cin, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, num_classes))

    def forward(self, x):
        return self.classifier(self.features(x))


def conv_student(size: str = "tiny", in_channels: int = 1, num_classes: int = 10) -> ConvStudent:
    channels, hidden = STUDENT_PRESETS[size]
    return ConvStudent(channels, hidden, in_channels, num_classes)
