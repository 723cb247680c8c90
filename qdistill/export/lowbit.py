"""qdistill's own 2- and 4-bit matmul for x86-64 CPUs with AVX2 and FMA (`lowbit.c`): compiled with the
system's C compiler at first use into the cache (`QDISTILL_CACHE`/kernels, keyed by the source, the flags
and the CPU), checked on a small case, and loaded with ctypes. Where any of that cannot be done
(`library()` is None) the runtime uses torch's int4 kernel instead. The source is qdistill's own: nothing
from a model file is compiled or loaded."""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

from qdistill.files import cache_dir

SOURCE = Path(__file__).with_name("lowbit.c")
FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC")
ARGS = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_int] + [ctypes.c_void_p] * 4 + [ctypes.c_int]
BUILDING = threading.Lock()


def cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    return next((set(line.split(":", 1)[1].split()) for line in text.splitlines() if line.startswith("flags")), set())


@functools.cache
def library():
    """The compiled `lowbit_linear` (a ctypes function), or None: not an x86-64 CPU with AVX2 and FMA, no C
    compiler, a cache that cannot be written, or a build or a self-check that failed."""
    flags = cpu_flags()
    compiler = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if platform.machine() not in ("x86_64", "AMD64") or not {"avx2", "fma"} <= flags or compiler is None:
        return None
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join((compiler, *FLAGS, *sorted(flags))).encode()).hexdigest()[:16]
    target = cache_dir() / "kernels" / f"lowbit-{key}.so"
    with BUILDING:
        try:
            if not target.exists():
                target.parent.mkdir(parents=True, exist_ok=True)
                fd, partial = tempfile.mkstemp(dir=target.parent, suffix=".partial")
                os.close(fd)
                if subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", partial], capture_output=True).returncode:
                    os.unlink(partial)
                    return None
                os.replace(partial, target)  # whole or absent, also with other processes building at once
            mode = target.stat()
            if mode.st_uid != os.getuid() or mode.st_mode & 0o022:  # a library someone else could have put there
                return None
            fn = ctypes.CDLL(str(target)).lowbit_linear
        except (OSError, AttributeError):
            return None
    fn.argtypes, fn.restype = ARGS, None
    return fn if _agrees(fn) else None


def kernel_bits(bits: int) -> int:
    """The code width a b-bit level is held in: 1 and 2 bits as 2, 3 and 4 bits as 4 (same level, same step)."""
    return 2 if bits <= 2 else 4


def fits(length: int, group: int, bits: int) -> bool:
    """Whether rows of `length` inputs in groups of `group` run on the kernel: whole groups, 8-byte planes."""
    return bits <= 4 and length % group == 0 and group % (64 // kernel_bits(bits)) == 0


def pack_codes(codes: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """[out, in] levels as the kernel reads them: per group, byte i holds code i of each plane, lowest bits first."""
    out, length = codes.shape
    b = kernel_bits(bits)
    planes = codes.to(torch.uint8).view(out, length // group, 8 // b, group * b // 8)
    packed = torch.zeros(out, length // group, group * b // 8, dtype=torch.uint8)
    for j in range(8 // b):
        packed |= planes[:, :, j] << (b * j)
    return packed.view(out, -1)


def unpack_codes(packed: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """`pack_codes` undone: the [out, in] levels, for the decoding path."""
    out = packed.shape[0]
    b = kernel_bits(bits)
    planes = packed.view(out, -1, 1, group * b // 8) >> (b * torch.arange(8 // b, dtype=torch.uint8)).view(1, 1, -1, 1)
    return (planes & (2**b - 1)).view(out, -1)


def matmul(x: torch.Tensor, codes: torch.Tensor, bits: int, group: int, scale: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """x [rows, in] times the weights code * scale + offset ([out, in / group] each, float32) transposed, in
    float32: [rows, out]. On the kernel where it is built; else (a model pickled to a process without it)
    the weights are decoded for the call."""
    x = x.to(torch.float32).contiguous()
    rows, length = x.shape
    fn = library()
    if fn is None:
        weight = unpack_codes(codes, bits, group).view(codes.shape[0], -1, group) * scale[..., None] + offset[..., None]
        return x @ weight.view(codes.shape[0], length).T
    return run(fn, x, codes, bits, group, scale, offset, torch.get_num_threads())


def run(fn, x: torch.Tensor, codes: torch.Tensor, bits: int, group: int, scale: torch.Tensor, offset: torch.Tensor, threads: int) -> torch.Tensor:
    """One call of the compiled `fn` on contiguous float32 `x` (the group sums of x computed here)."""
    rows, length = x.shape
    y = torch.empty(rows, codes.shape[0], dtype=torch.float32)
    if rows:
        xsum = x.view(rows, length // group, group).sum(-1)
        fn(x.data_ptr(), rows, length, codes.data_ptr(), codes.shape[0], kernel_bits(bits), group, scale.data_ptr(), offset.data_ptr(), xsum.data_ptr(), y.data_ptr(), threads)
    return y


def _agrees(fn) -> bool:
    """The built kernel against float32 arithmetic on a small case of each width, 1 and 9 input rows."""
    g = torch.Generator().manual_seed(0)
    for bits, group in ((2, 32), (4, 16)):
        codes = torch.randint(0, 2**bits, (5, 64), generator=g)
        scale, offset = torch.rand(5, 64 // group, generator=g, dtype=torch.float32), torch.randn(5, 64 // group, generator=g, dtype=torch.float32)
        weight = (codes.view(5, -1, group) * scale[..., None] + offset[..., None]).view(5, 64)
        for rows in (1, 9):
            x = torch.randn(rows, 64, generator=g, dtype=torch.float32)
            if not torch.allclose(run(fn, x, pack_codes(codes, bits, group), bits, group, scale, offset, 1), x @ weight.T, rtol=1e-4, atol=1e-4):
                return False
    return True
