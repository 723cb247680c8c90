"""Image classification with the data in memory: the task the paper's CNN experiments are."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize

from qdistill.data import Dataset, batches, epoch_order, random_shift_flip
from qdistill.distill import CachedTeacher, LiveTeacher, distillation_loss
from qdistill.distill.teacher import tensor_digest
from qdistill.errors import QDistillError
from qdistill.modes import evaluating


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 512) -> float:
    """Top-1 accuracy in percent, with the quantized weights computed once (parametrize.cached)."""
    device = next(model.parameters()).device
    correct = 0
    with evaluating(model), parametrize.cached():
        for xb, yb, _ in batches(x, y, batch_size):
            correct += (model(xb.to(device)).argmax(-1).cpu() == yb).sum().item()
    return 100.0 * correct / len(x)


class ImageClassification:
    name = "classification"
    metric = "acc"

    def __init__(self, data: Dataset):
        self.data = data

    def train_size(self) -> int:
        return len(self.data.train_x)

    def describe(self) -> dict:
        return {"task": self.name, "num_classes": self.data.num_classes}

    def data_key(self) -> str:
        return tensor_digest(self.data.train_x, self.data.train_y)

    def spec_args(self) -> dict:
        return {"in_channels": self.data.train_x.shape[1], "num_classes": self.data.num_classes}

    def train_batch(self, epoch: int, position: int, cfg) -> dict:
        """Step `position` of `epoch`; augmentation is seeded by the step too."""
        idx = epoch_order(len(self.data.train_x), cfg.seed, epoch)[position * cfg.batch_size : (position + 1) * cfg.batch_size]
        x = self.data.train_x[idx]
        if cfg.augment:
            step = epoch * -(-self.train_size() // cfg.batch_size) + position
            x = random_shift_flip(x, pad=2, flip=True, generator=torch.Generator().manual_seed(cfg.seed * 1_000_003 + step))
        return {"x": x, "y": self.data.train_y[idx], "index": idx}

    def ordered_batches(self, split: str, batch_size: int):
        x, y = getattr(self.data, f"{split}_x"), getattr(self.data, f"{split}_y")
        for xb, yb, idx in batches(x, y, batch_size):
            yield {"x": xb, "y": yb, "index": idx}

    def forward(self, model: nn.Module, batch: dict) -> torch.Tensor:
        return model(batch["x"])

    def loss(self, out: torch.Tensor, target, batch: dict, cfg) -> torch.Tensor:
        return distillation_loss(out, batch["y"], target, cfg.temperature, cfg.alpha)

    def has_split(self, split: str) -> bool:
        return getattr(self.data, f"{split}_x", None) is not None

    def evaluate(self, model: nn.Module, split: str) -> dict[str, float]:
        if not self.has_split(split):
            raise QDistillError(f"dataset {self.data.name!r} has no {split} split")
        return {"acc": accuracy(model, getattr(self.data, f"{split}_x"), getattr(self.data, f"{split}_y"))}

    def sample(self) -> dict:
        return {"x": self.data.train_x[:2], "y": self.data.train_y[:2], "index": torch.arange(2)}

    def teacher(self, model: nn.Module, cfg, cache_dir, progress=None):
        """Cached logits when the inputs are the same every epoch, else the live model."""
        if cfg.augment or cfg.teacher_logits == "live":
            return LiveTeacher(model, self.forward)
        device = next(model.parameters()).device
        return CachedTeacher.build(model, self.data.train_x, cache_dir, device=device, progress=progress).to(device)
