"""Eval mode for the length of a block, the model's own mode put back however the block ends."""

from __future__ import annotations

import contextlib

from torch import nn


@contextlib.contextmanager
def evaluating(*models: nn.Module):
    """Dropout off and BatchNorm on its running statistics while scoring, caching or probing a model."""
    modes = [m.training for m in models]
    for m in models:
        m.eval()
    try:
        yield
    finally:
        for m, mode in zip(models, modes):
            m.train(mode)
