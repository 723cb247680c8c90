"""Uniform quantizer: bucketed min-max scaling to 2**bits evenly spaced levels (method.md, "Uniform quantizer Q")."""

from __future__ import annotations

import torch

from qdistill.quant.base import (
    Encoded,
    Quantizer,
    bucket_range,
    check_bits,
    check_bucket,
    dequantize,
    from_buckets,
    to_buckets,
)


class _StraightThrough(torch.autograd.Function):
    """Forward returns Q(w) exactly; backward hands the gradient w.r.t. Q(w) to w unchanged."""

    @staticmethod
    def forward(ctx, w, quantizer):
        return quantizer.quantize(w)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class UniformQuantizer(Quantizer):
    """``b`` bits, buckets of ``bucket`` consecutive values (None: one per tensor), nearest or stochastic rounding.

    Stochastic rounding is used only in training mode; evaluation and export round to nearest,
    so the shipped model is deterministic.
    """

    def __init__(self, bits: int = 4, bucket: int | None = 256, stochastic: bool = False):
        super().__init__()
        self.bits = check_bits(bits)
        self.bucket = check_bucket(bucket)
        self.stochastic = stochastic
        self.register_buffer("points", torch.arange(2**bits, dtype=torch.float32) / (2**bits - 1), persistent=False)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, bucket={self.bucket}, stochastic={self.stochastic}"

    def levels(self, w: torch.Tensor, stochastic: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Level index of every value (bucketed layout) and each bucket's min and max."""
        b = to_buckets(w.detach(), self.bucket)
        lo, hi, alpha = bucket_range(b)
        top = 2**self.bits - 1
        x = (b - lo).mul_(top / alpha)  # (v - beta) / alpha * (s - 1), in place: this is the hot path
        if stochastic:
            floor = x.floor()
            x = floor.add_(torch.rand_like(x) < x.sub_(floor)).clamp_(0, top)
        else:
            x = x.round_()  # in [0, s - 1] already: v lies between its bucket's min and max
        return x.long(), lo, hi

    def quantize(self, w: torch.Tensor) -> torch.Tensor:
        idx, lo, hi = self.levels(w, stochastic=self.stochastic and self.training)
        return from_buckets(dequantize(self.points.to(w.device)[idx], lo, hi), w)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return _StraightThrough.apply(w, self)

    def encode(self, w: torch.Tensor) -> Encoded:
        """The shipped form: always rounded to nearest, as in evaluation, whatever the module's mode."""
        idx, lo, hi = self.levels(w)
        return Encoded(from_buckets(idx, w), lo.view(-1), hi.view(-1), self.points.cpu(), self.bits)
