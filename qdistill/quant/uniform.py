"""Uniform quantizer: bucketed min-max scaling to 2**bits evenly spaced levels (method.md, "Uniform quantizer Q")."""

from __future__ import annotations

import torch

from qdistill.errors import QDistillError
from qdistill.quant.base import (
    MIN_RANGE,
    Encoded,
    Quantizer,
    bucket_range,
    check_bits,
    check_bucket,
    dequantize,
    from_buckets,
    to_buckets,
    upcast,
)


class StraightThrough(torch.autograd.Function):
    """Forward returns quantize(w) exactly; backward hands the gradient w.r.t. Q(w) to w unchanged."""

    @staticmethod
    def forward(ctx, w, quantize):
        return quantize(w)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


SCALES = ("minmax", "mse")
# Shrink factors tried by scale="mse", 1 first so that a tie keeps the paper's min-max range.
CLIP_FACTORS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6, 0.55, 0.5, 0.45, 0.4)


def clipped_range(b: torch.Tensor, bits: int, factors=CLIP_FACTORS, max_elements: int = 1 << 24) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per bucket, the min-max range shrunk about its midpoint by the factor with the least squared error.

    With few levels the extremes of a bucket waste most of them (at 2 bits, min-max puts the inner
    levels near +-0.9 sigma of a Gaussian, the optimum is near +-0.5 sigma); values outside the
    shrunk range go to the end levels. All factors are tried in one batch of kernels (a GPU step
    of a small model is bound by kernel launches), in chunks of at most `max_elements` values.
    """
    lo, hi, _ = bucket_range(b)
    mid, half = (lo + hi) / 2, (hi - lo) / 2
    c = torch.tensor(factors, dtype=b.dtype, device=b.device).view(-1, 1, 1)
    c_lo = torch.where(c == 1, lo, mid - c * half)  # [factors, buckets, 1]; exact min-max at 1
    c_hi = torch.where(c == 1, hi, mid + c * half)
    top = 2**bits - 1
    chunk = max(1, max_elements // max(1, b.numel()))
    errors = []
    for i in range(0, len(factors), chunk):
        l, h = c_lo[i : i + chunk], c_hi[i : i + chunk]
        x = (b - l).mul_(top / (h - l).clamp_min(MIN_RANGE)).round_().clamp_(0, top).div_(top)
        errors.append(torch.lerp(l, h, x).sub_(b).square_().sum(-1, keepdim=True))
    best = torch.cat(errors).argmin(0, keepdim=True)  # the first of equal errors: factor 1 wins ties
    lo, hi = c_lo.gather(0, best)[0], c_hi.gather(0, best)[0]
    alpha = hi - lo
    return lo, hi, torch.where(alpha < MIN_RANGE, torch.ones_like(alpha), alpha)


class UniformQuantizer(Quantizer):
    """``b`` bits, buckets of ``bucket`` consecutive values (None: one per tensor), nearest or stochastic rounding.

    Stochastic rounding is used only in training mode; evaluation and export round to nearest,
    so the shipped model is deterministic. ``scale="minmax"`` is the paper's per-bucket range;
    ``scale="mse"`` clips it to the range of least squared error (`clipped_range`), stored the same way.
    """

    def __init__(self, bits: int = 4, bucket: int | None = 256, stochastic: bool = False, scale: str = "minmax"):
        super().__init__()
        self.bits = check_bits(bits)
        self.bucket = check_bucket(bucket)
        if scale not in SCALES:
            raise QDistillError(f"scale must be one of {', '.join(SCALES)}, got {scale!r}")
        self.stochastic = stochastic
        self.scale = scale
        self.register_buffer("points", torch.arange(2**bits, dtype=torch.float32) / (2**bits - 1), persistent=False)
        self.fused: torch.Tensor | None = None

    def extra_repr(self) -> str:
        return f"bits={self.bits}, bucket={self.bucket}, stochastic={self.stochastic}, scale={self.scale}"

    def levels(self, b: torch.Tensor, stochastic: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Level of every value of the buckets `b` (one per row) as a float in {0, ..., s - 1}, and each bucket's lowest and highest level.

        All three are at least float32 (`upcast`)."""
        b = upcast(b)
        lo, hi, alpha = bucket_range(b) if self.scale == "minmax" else clipped_range(b, self.bits)
        top = 2**self.bits - 1
        x = (b - lo).mul_(top / alpha)  # (v - beta) / alpha * (s - 1), in place: this is the hot path
        if stochastic:
            floor = x.floor()
            return floor.add_(torch.rand_like(x) < x.sub_(floor)).clamp_(0, top), lo, hi
        x = x.round_()
        return (x if self.scale == "minmax" else x.clamp_(0, top)), lo, hi  # min-max: v is inside its range already

    def quantize_buckets(self, b: torch.Tensor) -> torch.Tensor:
        """Q of each row of `b`, rows being buckets (of one tensor, or of many: see `quant.fused`)."""
        x, lo, hi = self.levels(b.detach(), stochastic=self.stochastic and self.training)
        # level / (s - 1) is bit for bit the stored point self.points[level]: no integer gather in the hot path
        return dequantize(x.div_(2**self.bits - 1), lo, hi).to(b.dtype)

    def quantize(self, w: torch.Tensor) -> torch.Tensor:
        return from_buckets(self.quantize_buckets(to_buckets(w.detach(), self.bucket)), w)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if self.fused is not None:  # computed with the model's other tensors by quant.fused, for this forward
            return self.fused
        return StraightThrough.apply(w, self.quantize)

    def encode(self, w: torch.Tensor) -> Encoded:
        """The shipped form: always rounded to nearest, as in evaluation, whatever the module's mode."""
        x, lo, hi = self.levels(to_buckets(w.detach(), self.bucket))
        return Encoded(from_buckets(x.long(), w), lo.view(-1), hi.view(-1), self.points.cpu(), self.bits)
