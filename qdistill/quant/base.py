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


GROUPS = ("flat", "row")
SCALE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# What each group stores, by quantizer settings (`form`), and how a level index becomes a value:
#   range     lo, hi      value = lerp(lo, hi, point): exact min and max (the paper; learned points)
#   min-step  lo, step    value = lo + index * step: a 16-bit min and scale, as GGUF Q4_1 stores them
#   int-zero  step, zero  value = (index - zero) * step: an integer zero point (ONNX Runtime, torchao)
FORMS = {"range": ("lo", "hi"), "min-step": ("lo", "step"), "int-zero": ("step", "zero")}


def check_choice(name: str, value, allowed) -> str:
    if value not in allowed:
        raise QDistillError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")
    return value


def form(kind: str, zero_point: str, scale_dtype: str) -> str:
    """The stored form (FORMS) of a quantizer's groups. A float zero point keeps the paper's exact min and max
    in float32; in a 16-bit dtype a kernel multiplies by the step, so the step itself is what is rounded and stored."""
    if zero_point == "int":
        return "int-zero"
    return "range" if kind == "learned" or scale_dtype == "float32" else "min-step"


def group_bits(stored: str, scale_dtype: str) -> int:
    """Bits stored per group of form `stored`: two values of the scale dtype, or one and an 8-bit zero point."""
    f = torch.finfo(SCALE_DTYPES[scale_dtype]).bits
    return f + 8 if stored == "int-zero" else 2 * f


def to_scale_dtype(t: torch.Tensor, scale_dtype: str, step: bool = False) -> torch.Tensor:
    """`t` rounded to `scale_dtype` (kept in its own dtype), so that training uses exactly the stored values.

    Clamped into the dtype's finite range first, a step to its smallest positive value, so that no
    group gets an infinite or zero step (float16 steps of groups narrower than about 1e-6 are subnormal)."""
    info = torch.finfo(SCALE_DTYPES[scale_dtype])
    low = info.smallest_normal * info.eps if step else -info.max
    return t.clamp(low, info.max).to(SCALE_DTYPES[scale_dtype]).to(t.dtype)


def row_view(shape, groups: str) -> tuple[int, int]:
    """(rows, values per row) that groups are cut from: row groups, the tensor viewed [out, in*...] (a Linear
    [out, in], a conv [out, in*kh*kw], a 1-d tensor one row); flat buckets, one row of everything."""
    shape = tuple(shape)
    if groups == "row" and len(shape) > 1:
        return shape[0], math.prod(shape[1:])
    return 1, math.prod(shape)


def n_groups(shape, bucket: int | None, groups: str = "flat") -> int:
    """Groups of a tensor of `shape` (a count: a 1-d tensor); the last group of each row is padded."""
    rows, length = row_view((shape,) if isinstance(shape, int) else shape, groups)
    return rows * (1 if bucket is None else math.ceil(length / bucket))


def row_group_size(shape, bucket: int | None, groups: str) -> int | None:
    """The size of the groups along each row of the tensor viewed [out, in*...] when they tile every row
    exactly, as low-bit matmul kernels need (the group size divides in_features); else None."""
    rows, length = row_view(shape, "row")
    if groups == "row" and (bucket is None or bucket >= length):
        return length  # one group a row
    size = bucket or rows * length  # flat, bucket None: one group for the whole tensor
    return size if length % size == 0 else None


def kernel_ready(shape, bucket: int | None, groups: str) -> bool:
    """Whether the groups tile every row (`row_group_size`); a loader for kernels falls back to dense weights otherwise."""
    return row_group_size(shape, bucket, groups) is not None


def to_buckets(w: torch.Tensor, bucket: int | None, groups: str = "flat") -> torch.Tensor:
    """Cut into rows of `bucket` values: flat, over the row-major flattened tensor, the last bucket padded
    with the last value; row, within each row of `row_view`, each row's last group padded with its last value."""
    rows = w.reshape(row_view(w.shape, groups))
    length = rows.shape[1]
    k = length if bucket is None or (groups == "row" and bucket > length) else bucket  # a row shorter than its bucket: one unpadded group
    pad = (-length) % k
    if pad:
        rows = torch.cat([rows, rows[:, -1:].expand(-1, pad)], dim=1)
    return rows.reshape(-1, k)


def upcast(b: torch.Tensor) -> torch.Tensor:
    """`b` in at least float32, the precision quantization is computed in.

    In float16, top / alpha overflows for buckets narrower than (2**bits - 1) / 65504, hi - lo for ranges
    over 65504, and MIN_RANGE rounds to 0 (a constant bucket gives 0 * inf); bfloat16's 8-bit significand
    loses the bucket's max. Every float16 and bfloat16 value is exact in float32, so a half-precision
    tensor quantizes to its float32 result rounded to its dtype, which stays in each bucket's range
    (rounding is monotone and the range ends are representable). Float32 and float64 pass unchanged.
    """
    return b.to(torch.promote_types(b.dtype, torch.float32))


def unbucket(b: torch.Tensor, shape, groups: str = "flat") -> torch.Tensor:
    """Undo `to_buckets`: drop each row's padding, back to `shape`, contiguous (a copy only where rows were padded)."""
    rows, length = row_view(shape, groups)
    return b.reshape(rows, -1)[:, :length].contiguous().view(shape)


def from_buckets(b: torch.Tensor, like: torch.Tensor, groups: str = "flat") -> torch.Tensor:
    """Undo `to_buckets`, in `like`'s memory layout: a channels-last shadow gives a channels-last Q(w),
    the layout the CPU conv kernels run fastest in (the buckets themselves always follow row-major order)."""
    out = unbucket(b, like.shape, groups)
    if out.stride() == like.stride():
        return out
    if like.is_contiguous():  # same order in memory, only the strides of size-1 dims differ (a 1-channel conv)
        return out.as_strided(like.shape, like.stride())
    return torch.empty_like(like, dtype=b.dtype).copy_(out)


def bucket_range(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-bucket min, max and scale alpha = max - min (1 where the range is degenerate)."""
    lo = b.amin(dim=1, keepdim=True)
    hi = b.amax(dim=1, keepdim=True)
    return lo, hi, guarded(hi - lo)


def guarded(alpha: torch.Tensor) -> torch.Tensor:
    """A group's range, 1 where it is degenerate (method.md: alpha = 1 if under MIN_RANGE)."""
    return torch.where(alpha < MIN_RANGE, torch.ones_like(alpha), alpha)


def dequantize(levels: torch.Tensor, lo=None, hi=None, step=None, zero=None) -> torch.Tensor:
    """Values of `levels` from each group's stored values (`FORMS`); training and the loader share this one function.

    Form range: `levels` are points in [0, 1], and ``torch.lerp`` is exact at both ends (0 -> min,
    1 -> max), so each bucket's min and max are reproduced bit for bit. The other forms: the level
    indices as floats.
    """
    if zero is not None:
        return (levels - zero) * step
    if step is not None:
        return levels * step + lo
    return torch.lerp(lo, hi, levels)


@dataclass
class Encoded:
    """The stored form of one tensor: level indices, each group's stored values (`FORMS`), the points in [0, 1]."""

    indices: torch.Tensor  # int64, shape of the tensor
    points: torch.Tensor  # float32 [n_points], sorted, in the bucket-scaled space (used by form range)
    index_bits: int
    lo: torch.Tensor | None = None  # float32 [n_groups], exact in the scale dtype, as are step and zero
    hi: torch.Tensor | None = None
    step: torch.Tensor | None = None
    zero: torch.Tensor | None = None  # integers in [0, 2**bits - 1]

    @property
    def params(self) -> dict[str, torch.Tensor]:
        return {k: getattr(self, k) for k in ("lo", "hi", "step", "zero") if getattr(self, k) is not None}

    def decode(self, shape, bucket: int | None, groups: str = "flat") -> torch.Tensor:
        idx = self.indices.reshape(shape)
        levels = self.points[idx] if self.hi is not None else idx.to(torch.float32)  # form range: points in [0, 1]
        values = dequantize(to_buckets(levels, bucket, groups), **{k: v.view(-1, 1) for k, v in self.params.items()})
        return unbucket(values, shape, groups)


class Quantizer(nn.Module):
    """Interface shared by the quantizers: quantize (forward), encode to indices, sizes."""

    bits: int
    bucket: int | None
    groups: str = "flat"
    scale_dtype: str = "float32"
    form: str = "range"

    def forward(self, w: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def encode(self, w: torch.Tensor) -> Encoded:  # pragma: no cover - interface
        raise NotImplementedError

    @property
    def index_bits(self) -> int:
        return self.bits

    def n_buckets(self, shape) -> int:
        """Groups of a tensor of `shape` (a count of values counts as a 1-d tensor)."""
        return n_groups(shape, self.bucket, self.groups)

    def size_bits(self, shape) -> int:
        """Paper's accounting: index bits per weight plus each group's stored values (plus the codebook)."""
        numel = shape if isinstance(shape, int) else math.prod(shape)
        return numel * self.index_bits + group_bits(self.form, self.scale_dtype) * self.n_buckets(shape) + self.codebook_bits()

    def codebook_bits(self) -> int:
        return 0

    def after_step(self, optimizer: torch.optim.Optimizer | None) -> None:
        """Hook run after each step of `optimizer` (learned points re-sort themselves and its state)."""


PACK_CHUNK = 1 << 16  # indices (un)packed at a time, a multiple of 8: bounds the temporaries to about 1 MiB


def pack_bits(indices: torch.Tensor, bits: int) -> np.ndarray:
    """Pack non-negative integers below 2**bits into bytes, `bits` bits each, little-endian bit order.

    Chunk by chunk, every 8 indices are shifted into one little-endian 64-bit word whose low `bits` bytes
    are theirs: a few bytes of temporaries per index of one chunk, not 8 bytes per bit of the whole input."""
    if not 1 <= bits <= 8:
        raise ValueError(f"pack_bits packs 1 to 8 bits per index, got {bits}")
    flat = indices.reshape(-1)
    out = np.zeros(packed_bytes(flat.numel(), bits), dtype=np.uint8)
    for start in range(0, flat.numel(), PACK_CHUNK):
        idx = flat[start : start + PACK_CHUNK].to(torch.int64).cpu().numpy()
        if idx.min() < 0 or idx.max() >= 1 << bits:
            raise ValueError(f"indices do not fit in {bits} bits")
        narrow = np.zeros(-(-idx.size // 8) * 8, dtype=np.uint8)  # the last chunk padded with zeros, as np.packbits pads
        narrow[: idx.size] = idx
        words = np.zeros(narrow.size // 8, dtype="<u8")
        for k in range(8):
            words |= narrow[k::8].astype("<u8") << np.uint64(k * bits)
        chunk = words.view(np.uint8).reshape(-1, 8)[:, :bits].reshape(-1)
        at = start * bits // 8
        out[at : at + chunk.size] = chunk[: out.size - at]
    return out


def unpack_bits(packed: np.ndarray, bits: int, count: int) -> torch.Tensor:
    """Inverse of `pack_bits`, chunk by chunk: each `bits` bytes widened to a 64-bit word that holds 8 indices."""
    if not 1 <= bits <= 8:
        raise ValueError(f"unpack_bits reads 1 to 8 bits per index, got {bits}")
    packed = np.asarray(packed, dtype=np.uint8)
    out = torch.empty(count, dtype=torch.int64)
    mask = np.uint64((1 << bits) - 1)
    for start in range(0, count, PACK_CHUNK):
        groups = -(-min(PACK_CHUNK, count - start) // 8)
        raw = packed[start * bits // 8 :][: groups * bits]
        words = np.zeros((groups, 8), dtype=np.uint8)
        words[:, :bits] = np.pad(raw, (0, groups * bits - raw.size)).reshape(groups, bits)
        words = words.view("<u8")
        idx = np.empty((groups, 8), dtype=np.uint8)
        for k in range(8):
            idx[:, k] = (words[:, 0] >> np.uint64(k * bits)) & mask
        chunk = idx.reshape(-1)[: count - start]
        out[start : start + chunk.size] = torch.from_numpy(chunk)
    return out


def packed_bytes(count: int, bits: int) -> int:
    return math.ceil(count * bits / 8)
