"""Learned-points quantizer: differentiable quantization (method.md, "Differentiable quantization").

Per tensor a sorted vector of points in the bucket-scaled [0, 1] space, shared by all buckets.
Each scaled weight goes to its nearest point; the assignment is constant within a step, so autograd
through ``points[idx]`` gives exactly ``dL/dp_j = sum_{i -> j} alpha_bucket(i) * dL/dQ_i``.
Everything is vectorized on the tensor's device (``torch.bucketize`` on the midpoints).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from qdistill.errors import QDistillError
from qdistill.quant.base import (
    GROUPS,
    SCALE_DTYPES,
    Encoded,
    Quantizer,
    bucket_range,
    check_bits,
    check_bucket,
    check_choice,
    dequantize,
    from_buckets,
    guarded,
    to_buckets,
    to_scale_dtype,
    upcast,
)

QUANTILE_SAMPLE = 1 << 22  # torch.quantile's input limit is 2**24; sample above this


class LearnedPointsQuantizer(Quantizer):
    """Points in each group's [min, max]; ``groups`` and ``scale_dtype`` as for `UniformQuantizer` (the min and
    max are rounded to the scale dtype); there is no integer zero point: each group stores its float range."""

    def __init__(
        self, bits: int = 4, bucket: int | None = 256, init: str = "quantile", n_points: int | None = None,
        groups: str = "flat", scale_dtype: str = "float32",
    ):  # fmt: skip
        super().__init__()
        self.bits = check_bits(bits)
        self.bucket = check_bucket(bucket)
        self.groups = check_choice("groups", groups, GROUPS)
        self.scale_dtype = check_choice("scale_dtype", scale_dtype, tuple(SCALE_DTYPES))
        if init not in ("quantile", "uniform"):
            raise QDistillError(f"points init must be 'quantile' or 'uniform', got {init!r}")
        self.init = init
        n = 2**bits if n_points is None else n_points
        if n < 2:
            raise QDistillError(f"a learned-points quantizer needs at least 2 points, got {n}")
        self.points = nn.Parameter(torch.linspace(0, 1, n))

    def extra_repr(self) -> str:
        return f"points={self.points.numel()}, bucket={self.bucket}, init={self.init}, groups={self.groups}, scale_dtype={self.scale_dtype}"

    @property
    def index_bits(self) -> int:
        return max(1, math.ceil(math.log2(self.points.numel())))

    def codebook_bits(self) -> int:
        return 32 * self.points.numel()

    def scaled(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Weights in [0, 1] per bucket, and the buckets' min and max; at least float32, as the points are."""
        b = upcast(to_buckets(w.detach(), self.bucket, self.groups))
        lo, hi, alpha = bucket_range(b)
        if self.scale_dtype != "float32":  # (float32: the weights' own min and max, as before)
            lo, hi = to_scale_dtype(lo, self.scale_dtype), to_scale_dtype(hi, self.scale_dtype)
            alpha = guarded(hi - lo)
        return (b - lo) / alpha, lo, hi

    @torch.no_grad()
    def init_points(self, w: torch.Tensor, n_points: int | None = None) -> None:
        """Set the points to quantiles of the scaled weights (or evenly spaced), optionally changing their count."""
        n = self.points.numel() if n_points is None else n_points
        if n < 2:
            raise QDistillError(f"a learned-points quantizer needs at least 2 points, got {n}")
        if self.init == "uniform":
            p = torch.linspace(0, 1, n, device=w.device)
        else:
            x = self.scaled(w)[0].reshape(-1).float()
            if x.numel() > QUANTILE_SAMPLE:
                x = x[torch.randint(x.numel(), (QUANTILE_SAMPLE,), device=x.device)]
            p = torch.quantile(x, torch.linspace(0, 1, n, device=x.device))
        # clamped as after_step clamps: a 16-bit scale dtype's rounded min and max can leave a weight just outside them
        self.points = nn.Parameter(p.clamp(0, 1).sort().values.contiguous(), requires_grad=self.points.requires_grad)

    def assign(self, x: torch.Tensor) -> torch.Tensor:
        p = self.points.detach().to(x.dtype)
        return torch.bucketize(x, (p[1:] + p[:-1]) / 2)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        x, lo, hi = self.scaled(w)
        # model.half() converts the points too: they are used in the weights' float32 working precision
        q = from_buckets(dequantize(self.points.to(x.dtype)[self.assign(x)], lo, hi).to(w.dtype), w, self.groups)
        if w.requires_grad:  # straight-through to the shadow weights; adding an exact zero keeps q bit-identical
            q = q + (w - w.detach())
        return q

    @torch.no_grad()
    def after_step(self, optimizer: torch.optim.Optimizer | None) -> None:
        """Clamp and re-sort the points; the `optimizer`'s per-point state (momenta) is permuted with them,
        else two points that cross would swap momenta and the next steps would pull them back."""
        self.points.clamp_(0, 1)
        values, order = self.points.sort(stable=True)
        self.points.copy_(values)
        state = optimizer.state.get(self.points, {}) if optimizer is not None else {}
        for v in state.values():
            if torch.is_tensor(v) and v.shape == values.shape:
                v.copy_(v[order])

    def encode(self, w: torch.Tensor) -> Encoded:
        x, lo, hi = self.scaled(w)
        idx = from_buckets(self.assign(x), w, self.groups)
        return Encoded(idx, self.points.detach().cpu().clone(), self.index_bits, lo=lo.view(-1), hi=hi.view(-1))


MAX_POINTS = 256


def redistribute_points(grad_norms: list[float], total: int) -> list[int]:
    """Share `total` points among tensors: each keeps half its even share, the rest goes by gradient norm.

    n_t = floor(n/2) + share of R proportional to g_t (largest-remainder rounding, so the total is kept exactly),
    at most MAX_POINTS each (what a packed file's 8-bit indices address; the total is then short of `total`).
    """
    count = len(grad_norms)
    if count == 0:
        return []
    n = total // count
    if n < 2:
        raise QDistillError(f"{total} points cannot be shared among {count} tensors (at least 2 each)")
    base = max(n // 2, 2)
    rest = total - base * count
    g = torch.tensor(grad_norms, dtype=torch.float64)
    share = g / g.sum() * rest if g.sum() > 0 else torch.full_like(g, rest / count)
    extra = share.floor().long()
    left = rest - int(extra.sum())
    order = torch.argsort(share - extra, descending=True)
    extra[order[:left]] += 1
    return [min(base + int(e), MAX_POINTS) for e in extra]
