"""What every quantizer shares: bucketing, the interface, and bit-packing of level indices.

A quantizer is an ``nn.Module`` used as a PyTorch parametrization: reading ``layer.weight`` returns
``Q(w)`` while the optimizer updates the full-precision ``w`` (the "shadow" weights).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from qdistill.errors import QDistillError

MIN_RANGE = 1e-10  # method.md: a bucket whose max - min is under this gets alpha = 1


def check_bits(bits: int) -> int:
    if not isinstance(bits, int) or isinstance(bits, bool) or not 1 <= bits <= 8:
        raise QDistillError(f"bits must be an integer from 1 to 8, got {bits!r}")
    return bits


def check_bucket(bucket: int | None) -> int | None:
    if bucket is not None and (not isinstance(bucket, int) or isinstance(bucket, bool) or bucket <= 0):
        raise QDistillError(f"bucket must be a positive integer or None (one bucket per tensor), got {bucket!r}")
    return bucket


def to_buckets(w: torch.Tensor, bucket: int | None) -> torch.Tensor:
    """Flatten row-major and cut into rows of `bucket` values; the last row is padded with the last value."""
    flat = w.reshape(-1)
    k = flat.numel() if bucket is None else bucket
    pad = (-flat.numel()) % k
    if pad:
        flat = torch.cat([flat, flat[-1:].expand(pad)])
    return flat.view(-1, k)


def upcast(b: torch.Tensor) -> torch.Tensor:
    """`b` in at least float32, the precision quantization is computed in.

    In float16, top / alpha overflows for buckets narrower than (2**bits - 1) / 65504, hi - lo for ranges
    over 65504, and MIN_RANGE rounds to 0 (a constant bucket gives 0 * inf); bfloat16's 8-bit significand
    loses the bucket's max. Every float16 and bfloat16 value is exact in float32, so a half-precision
    tensor quantizes to its float32 result rounded to its dtype, which stays in each bucket's range
    (rounding is monotone and the range ends are representable). Float32 and float64 pass unchanged.
    """
    return b.to(torch.promote_types(b.dtype, torch.float32))


def from_buckets(b: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Undo `to_buckets`, in `like`'s memory layout: a channels-last shadow gives a channels-last Q(w),
    the layout the CPU conv kernels run fastest in (the buckets themselves always follow row-major order)."""
    out = b.reshape(-1)[: like.numel()].view_as(like)
    if out.stride() == like.stride():
        return out
    if like.is_contiguous():  # same order in memory, only the strides of size-1 dims differ (a 1-channel conv)
        return out.as_strided(like.shape, like.stride())
    return torch.empty_like(like, dtype=b.dtype).copy_(out)


def bucket_range(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-bucket min, max and scale alpha = max - min (1 where the range is degenerate)."""
    lo = b.amin(dim=1, keepdim=True)
    hi = b.amax(dim=1, keepdim=True)
    alpha = hi - lo
    alpha = torch.where(alpha < MIN_RANGE, torch.ones_like(alpha), alpha)
    return lo, hi, alpha


def dequantize(levels: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """Map points in [0, 1] back to each bucket's range.

    ``torch.lerp`` is exact at both ends (0 -> min, 1 -> max), so each bucket's min and max are
    reproduced bit for bit, and training and the loader share this one function.
    """
    return torch.lerp(lo, hi, levels)


@dataclass
class Encoded:
    """The stored form of one tensor: level indices, per-bucket min/max and the points in [0, 1]."""

    indices: torch.Tensor  # int64, shape of the tensor
    lo: torch.Tensor  # float32 [n_buckets]
    hi: torch.Tensor  # float32 [n_buckets]
    points: torch.Tensor  # float32 [n_points], sorted, in the bucket-scaled space
    index_bits: int

    def decode(self, shape, bucket: int | None) -> torch.Tensor:
        flat = self.indices.reshape(-1)
        levels = to_buckets(self.points[flat], bucket)
        return dequantize(levels, self.lo.view(-1, 1), self.hi.view(-1, 1)).reshape(-1)[: flat.numel()].view(shape)


class Quantizer(nn.Module):
    """Interface shared by the quantizers: quantize (forward), encode to indices, sizes."""

    bits: int
    bucket: int | None

    def forward(self, w: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def encode(self, w: torch.Tensor) -> Encoded:  # pragma: no cover - interface
        raise NotImplementedError

    @property
    def index_bits(self) -> int:
        return self.bits

    def n_buckets(self, numel: int) -> int:
        return 1 if self.bucket is None else math.ceil(numel / self.bucket)

    def size_bits(self, numel: int, scale_bits: int = 32) -> int:
        """Paper's accounting: index bits per weight plus two scales per bucket (plus the codebook)."""
        return numel * self.index_bits + 2 * scale_bits * self.n_buckets(numel) + self.codebook_bits()

    def codebook_bits(self) -> int:
        return 0

    def after_step(self) -> None:
        """Hook run after each optimizer step (learned points re-sort themselves)."""


def pack_bits(indices: torch.Tensor, bits: int) -> np.ndarray:
    """Pack non-negative integers below 2**bits into bytes, `bits` bits each, little-endian bit order."""
    idx = indices.reshape(-1).to(torch.int64).cpu().numpy()
    if idx.size and (idx.min() < 0 or idx.max() >= 1 << bits):
        raise ValueError(f"indices do not fit in {bits} bits")
    planes = ((idx[:, None] >> np.arange(bits)) & 1).astype(np.uint8)
    return np.packbits(planes.reshape(-1), bitorder="little")


def unpack_bits(packed: np.ndarray, bits: int, count: int) -> torch.Tensor:
    """Inverse of `pack_bits`."""
    planes = np.unpackbits(np.asarray(packed, dtype=np.uint8), count=count * bits, bitorder="little")
    weights = (1 << np.arange(bits)).astype(np.int64)
    return torch.from_numpy(planes.reshape(count, bits).astype(np.int64) @ weights)


def packed_bytes(count: int, bits: int) -> int:
    return math.ceil(count * bits / 8)
