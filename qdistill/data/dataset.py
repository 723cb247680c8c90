"""In-memory datasets and the batch iterator.

Small image datasets fit in memory as tensors; iterating over index permutations is several times
faster on a CPU than a DataLoader, and the example index is what the teacher-logit cache looks up.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from qdistill.errors import QDistillError
from qdistill.user_code import load_object


@dataclass
class Dataset:
    """Train, test and optionally validation tensors; x is float (normalized), y holds class indices (or token ids).

    Options are chosen on the validation split (the loop reports it every epoch); the test split is
    for final tables only."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int
    name: str = "custom"
    val_x: torch.Tensor | None = None
    val_y: torch.Tensor | None = None

    def __post_init__(self):
        if (self.val_x is None) != (self.val_y is None):
            raise QDistillError(f"dataset {self.name!r}: give both validation inputs and labels, or neither")
        for split in ("train", "test") + (("val",) if self.val_x is not None else ()):
            x, y = getattr(self, f"{split}_x"), getattr(self, f"{split}_y")
            if len(x) != len(y):
                raise QDistillError(f"dataset {self.name!r}: {split} has {len(x)} inputs but {len(y)} labels")
            if len(x) == 0:
                raise QDistillError(f"dataset {self.name!r}: the {split} split is empty")

    def subset(self, train: int | None = None, test: int | None = None) -> "Dataset":
        """The first `train` training examples, and the first `test` test and validation examples (quick runs, tests)."""
        for n, what in ((train, "train"), (test, "test")):
            if n is not None and n <= 0:
                raise QDistillError(f"{what} subset size must be positive, got {n}")
        val = (self.val_x[:test], self.val_y[:test]) if self.val_x is not None else (None, None)
        return Dataset(self.train_x[:train], self.train_y[:train], self.test_x[:test], self.test_y[:test], self.num_classes, self.name, *val)

    def holdout(self, n: int) -> "Dataset":
        """The last `n` training examples become the validation split (deterministic); 0 leaves the data as they are."""
        if n == 0:
            return self
        if self.val_x is not None:
            raise QDistillError(f"dataset {self.name!r} already has a validation split")
        if not 0 < n < len(self.train_x):
            raise QDistillError(f"validation size must be from 0 to {len(self.train_x) - 1} (the training examples), got {n}")
        k = len(self.train_x) - n
        return Dataset(self.train_x[:k], self.train_y[:k], self.test_x, self.test_y, self.num_classes, self.name, self.train_x[k:], self.train_y[k:])


def load_user_dataset(spec: str, **kwargs) -> Dataset:
    """The Python hook for user data: ``package.module:function`` returning a `Dataset` (or a dict of its fields)."""
    fn = load_object(spec, "dataset")
    data = fn(**kwargs)
    if isinstance(data, dict):
        data = Dataset(**data)
    if not isinstance(data, Dataset):
        raise QDistillError(f"dataset hook {spec} must return qdistill.data.Dataset or a dict of its fields, got {type(data).__name__}")
    return data


def random_shift_flip(x: torch.Tensor, pad: int, flip: bool, generator: torch.Generator | None = None) -> torch.Tensor:
    """Per-example random translation by up to `pad` pixels (zero fill) and optional horizontal flip."""
    n, c, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad)).permute(0, 2, 3, 1)
    dy = torch.randint(0, 2 * pad + 1, (n, 1, 1), generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (n, 1, 1), generator=generator)
    rows = torch.arange(h).view(1, h, 1) + dy
    cols = torch.arange(w).view(1, 1, w) + dx
    if flip:
        mirror = torch.rand(n, 1, 1, generator=generator) < 0.5
        cols = torch.where(mirror, cols.flip(-1), cols)
    return padded[torch.arange(n).view(n, 1, 1), rows, cols].permute(0, 3, 1, 2).contiguous()


@functools.lru_cache(maxsize=2)
def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The shuffled order of one epoch, a function of (seed, epoch) alone: a resumed run needs no saved order."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))


def batches(x, y, batch_size: int, shuffle: bool = False, generator: torch.Generator | None = None, augment: bool = False):
    """Yield (inputs, labels, example indices); the last short batch is kept."""
    order = torch.randperm(len(x), generator=generator) if shuffle else torch.arange(len(x))
    for i in range(0, len(x), batch_size):
        idx = order[i : i + batch_size]
        xb = x[idx]
        if augment:
            xb = random_shift_flip(xb, pad=2, flip=True, generator=generator)
        yield xb, y[idx], idx
