"""Uniform quantizer: bucketed min-max scaling to 2**bits evenly spaced levels (method.md, "Uniform quantizer Q")."""

from __future__ import annotations

import torch

from qdistill.quant.base import (
    FORMS,
    GROUPS,
    MIN_RANGE,
    SCALE_DTYPES,
    Encoded,
    Quantizer,
    bucket_range,
    check_bits,
    check_bucket,
    check_choice,
    dequantize,
    form,
    from_buckets,
    guarded,
    to_buckets,
    to_scale_dtype,
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
ZERO_POINTS = ("float", "int")
# Shrink factors tried by scale="mse", 1 first so that a tie keeps the paper's min-max range.
CLIP_FACTORS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6, 0.55, 0.5, 0.45, 0.4)


def clipped_range(b: torch.Tensor, bits: int, factors=CLIP_FACTORS, max_elements: int = 1 << 24, fake=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per bucket, the min-max range shrunk about its midpoint by the factor with the least squared error.

    With few levels the extremes of a bucket waste most of them (at 2 bits, min-max puts the inner
    levels near +-0.9 sigma of a Gaussian, the optimum is near +-0.5 sigma); values outside the
    shrunk range go to the end levels. All factors are tried in one batch of kernels (a GPU step
    of a small model is bound by kernel launches), in chunks of at most `max_elements` values.
    `fake(b, lo, hi)` gives the quantized values on the grid a range makes (default: the range form's).
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
        if fake is None:
            q = torch.lerp(l, h, (b - l).mul_(top / (h - l).clamp_min(MIN_RANGE)).round_().clamp_(0, top).div_(top))
        else:
            q = fake(b, l, h)
        errors.append(q.sub_(b).square_().sum(-1, keepdim=True))
    best = torch.cat(errors).argmin(0, keepdim=True)  # the first of equal errors: factor 1 wins ties
    lo, hi = c_lo.gather(0, best)[0], c_hi.gather(0, best)[0]
    return lo, hi, guarded(hi - lo)


class UniformQuantizer(Quantizer):
    """``b`` bits, buckets of ``bucket`` consecutive values (None: one per tensor), nearest or stochastic rounding.

    Stochastic rounding is used only in training mode; evaluation and export round to nearest,
    so the shipped model is deterministic. ``scale="minmax"`` is the paper's per-bucket range;
    ``scale="mse"`` clips it to the range of least squared error (`clipped_range`), stored the same way.
    The kernel-ready options (docs/quantizer-options.md): ``groups="row"`` cuts each row of the weight
    viewed [out, in*...] on its own (None: one group per row); ``zero_point="int"`` stores a step and
    an integer zero point, the range widened to hold 0; ``scale_dtype`` rounds the stored values to
    that dtype while training, so the forward pass uses exactly what is stored (`FORMS`).
    """

    def __init__(
        self, bits: int = 4, bucket: int | None = 256, stochastic: bool = False, scale: str = "minmax",
        groups: str = "flat", zero_point: str = "float", scale_dtype: str = "float32",
    ):  # fmt: skip
        super().__init__()
        self.bits = check_bits(bits)
        self.bucket = check_bucket(bucket)
        self.stochastic = stochastic
        self.scale = check_choice("scale", scale, SCALES)
        self.groups = check_choice("groups", groups, GROUPS)
        self.zero_point = check_choice("zero_point", zero_point, ZERO_POINTS)
        self.scale_dtype = check_choice("scale_dtype", scale_dtype, tuple(SCALE_DTYPES))
        self.form = form("uniform", zero_point, scale_dtype)
        self.register_buffer("points", torch.arange(2**bits, dtype=torch.float32) / (2**bits - 1), persistent=False)
        self.fused: torch.Tensor | None = None

    def extra_repr(self) -> str:
        return (
            f"bits={self.bits}, bucket={self.bucket}, stochastic={self.stochastic}, scale={self.scale}, "
            f"groups={self.groups}, zero_point={self.zero_point}, scale_dtype={self.scale_dtype}"
        )

    def levels(self, b: torch.Tensor, stochastic: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Level of every value of the buckets `b` (one per row) as a float in {0, ..., s - 1}, and each
        bucket's two stored values (`FORMS[self.form]`: for the default range form its lowest and highest level).

        All three are at least float32 (`upcast`)."""
        b = upcast(b)
        if self.scale == "minmax":
            lo, hi, alpha = bucket_range(b)
        else:
            lo, hi, alpha = clipped_range(b, self.bits, fake=None if self.form == "range" else self.fake_quantize)
        return self.snap(b, lo, hi, alpha, stochastic)

    def grid(self, lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The stored values of the min-step and int-zero grids over [lo, hi], rounded to the scale dtype.

        int-zero widens the range to hold 0 (torchao's and ONNX Runtime's quantizers do), so zero is exact
        and the zero point round(-min / step) lies in [0, 2**bits - 1] before its clamp."""
        top = 2**self.bits - 1
        if self.form == "int-zero":
            lo, hi = lo.clamp(max=0), hi.clamp(min=0)
        step = to_scale_dtype(guarded(hi - lo) / top, self.scale_dtype, step=True)
        if self.form == "min-step":
            return to_scale_dtype(lo, self.scale_dtype), step
        return step, (-lo / step).round_().clamp_(0, top)

    def snap(self, b, lo, hi, alpha, stochastic: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`levels` of `b` on the grid of each bucket's range [lo, hi] (alpha: its guarded width)."""
        top = 2**self.bits - 1
        if self.form == "range":
            first, second = lo, hi
            x = (b - lo).mul_(top / alpha)  # (v - beta) / alpha * (s - 1), in place: this is the hot path
        else:
            first, second = self.grid(lo, hi)
            x = (b - first).div_(second) if self.form == "min-step" else b.div(first)
        if stochastic:
            floor = x.floor()
            x = floor.add_(torch.rand_like(x) < x.sub_(floor))
        else:
            x = x.round_()
        if self.form == "int-zero":
            x = x.add_(second)  # round(v / step) + zero: the zero point is added after rounding
        inside = self.form == "range" and self.scale == "minmax" and not stochastic  # v is inside its min-max range already
        return (x if inside else x.clamp_(0, top)), first, second

    def fake_quantize(self, b: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
        """Q(b) on the grid of the ranges [lo, hi]: what scale="mse" compares candidate ranges with."""
        x, first, second = self.snap(b, lo, hi, guarded(hi - lo))
        return self.values(x, first, second)

    def values(self, x: torch.Tensor, first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
        """The values of the levels `x` (used up), from each bucket's two stored values."""
        if self.form == "range":
            x = x.div_(2**self.bits - 1)  # level / (s - 1) is bit for bit the stored point self.points[level]
        return dequantize(x, **dict(zip(FORMS[self.form], (first, second))))

    def quantize_buckets(self, b: torch.Tensor) -> torch.Tensor:
        """Q of each row of `b`, rows being buckets (of one tensor, or of many: see `quant.fused`)."""
        x, first, second = self.levels(b.detach(), stochastic=self.stochastic and self.training)
        return self.values(x, first, second).to(b.dtype)

    def quantize(self, w: torch.Tensor) -> torch.Tensor:
        return from_buckets(self.quantize_buckets(to_buckets(w.detach(), self.bucket, self.groups)), w, self.groups)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if self.fused is not None:  # computed with the model's other tensors by quant.fused, for this forward
            return self.fused
        return StraightThrough.apply(w, self.quantize)

    def encode(self, w: torch.Tensor) -> Encoded:
        """The shipped form: always rounded to nearest, as in evaluation, whatever the module's mode."""
        x, first, second = self.levels(to_buckets(w.detach(), self.bucket, self.groups))
        params = {k: v.reshape(-1) for k, v in zip(FORMS[self.form], (first, second))}
        return Encoded(from_buckets(x.long(), w, self.groups), self.points.cpu(), self.bits, **params)
