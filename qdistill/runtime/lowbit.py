"""qdistill's own 2-, 4- and 8-bit matmul for x86-64 CPUs with AVX2 and FMA (`lowbit.c`): compiled with the
system's C compiler at first use into the cache (`QDISTILL_CACHE`/kernels, keyed by the source, the flags
and the CPU), checked on a small case, and loaded with ctypes (only a file of this user's own, through the
descriptor that was checked). Where any of that cannot be done (`library()` is None) the runtime runs those
layers on torch's int4 kernel (uniform, 1 to 4 bits) or decodes them per call; an embedding not tied to such
a layer is looked up in this layout either way. The source is qdistill's own: nothing from a model file is
compiled or loaded."""

from __future__ import annotations

import ctypes
import errno
import functools
import hashlib
import logging
import os
import platform
import shutil
import stat
import subprocess
import tempfile
import threading
from pathlib import Path

import torch
import torch.nn.functional as F

from qdistill.files import cache_dir

SOURCE = Path(__file__).with_name("lowbit.c")
FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC")
ARGS = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_int] + [ctypes.c_void_p] * 4 + [ctypes.c_int]
BUILDING = threading.Lock()
log = logging.getLogger(__name__)
SERIAL_WORK = 2**19  # multiply-adds per thread below which extra threads cost more than they save (a few tens of µs)


def cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    return next((set(line.split(":", 1)[1].split()) for line in text.splitlines() if line.startswith("flags")), set())


@functools.cache
def library():
    """The compiled `lowbit_linear` (a ctypes function), or None: not an x86-64 CPU with AVX2 and FMA, no C
    compiler, a cache that cannot be written, a library that is not this user's own, or a build or a
    self-check that failed."""
    flags = cpu_flags()
    compiler = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if platform.machine() not in ("x86_64", "AMD64") or not {"avx2", "fma"} <= flags or compiler is None:
        return None
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join((compiler, *FLAGS, *sorted(flags))).encode()).hexdigest()[:16]
    target = cache_dir() / "kernels" / f"lowbit-{key}.so"
    with BUILDING:
        try:
            target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            folder = os.open(target.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            fd = _open_own(target, folder, compiler)
        finally:
            os.close(folder)
        if fd is None:
            return None
        try:
            # The descriptor's file is the one checked, whatever the path names by now. It stays open: glibc
            # knows a loaded library by the name it was opened with, so a later dlopen of this fd number
            # would be handed this library if the number were reused.
            fn = ctypes.CDLL(f"/proc/self/fd/{fd}").lowbit_linear
        except (OSError, AttributeError):
            os.close(fd)
            return None
    fn.argtypes, fn.restype = ARGS, None
    return fn if _agrees(fn) else None


def _open_own(target: Path, folder: int, compiler: str) -> int | None:
    """A read-only descriptor of the library `target` in the open kernels `folder` (built there if absent), or
    None where it cannot be built or opened or could be someone else's: a symbolic link (to a system library,
    say), a file not this user's or writable by others, or a folder others can write to.

    The folder must be this user's (or root's) and writable by no one else, sticky or not: qdistill makes it
    0700, and where others may add names, a name not built yet can be taken first (by a hard link to another
    of this user's libraries where links are not protected)."""
    st = os.fstat(folder)
    if st.st_uid not in (os.getuid(), 0) or st.st_mode & 0o022:
        log.warning("not loading qdistill's kernel: %s is not this user's folder or others can write to it; remove it or set QDISTILL_CACHE to a folder of your own", target.parent)
        return None
    try:
        if not target.exists():
            fd, partial = tempfile.mkstemp(dir=target.parent, suffix=".partial")
            os.close(fd)
            if subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", partial], capture_output=True).returncode:
                os.unlink(partial)
                return None
            os.replace(partial, target)  # whole or absent, also with other processes building at once
        fd = os.open(target.name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=folder)
    except OSError as e:
        if e.errno == errno.ELOOP:
            log.warning("not loading qdistill's kernel: %s is a symbolic link; remove it", target)
        return None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o022:
        log.warning("not loading qdistill's kernel: %s is not this user's file or others can write to it; remove it", target)
        os.close(fd)
        return None
    return fd


def kernel_bits(bits: int) -> int:
    """The code width a b-bit level is held in: 1 and 2 bits as 2, 3 and 4 bits as 4, 5 to 8 as 8 (same level, same step)."""
    return 2 if bits <= 2 else 4 if bits <= 4 else 8


def fits(length: int, group: int, bits: int, learned: bool = False) -> bool:
    """Whether rows of `length` inputs in groups of `group` (the last one may be shorter) run on the kernel:
    an even length and group size, at most 8 bits (learned points: 4, the size of its table)."""
    return bits <= (4 if learned else 8) and length % 2 == 0 and group % 2 == 0


def groups_of(length: int, group: int) -> int:
    """Groups in a row of `length` inputs: the last one holds what is left."""
    return -(-length // group)


def padded(out: int) -> int:
    """Output rows as the kernel holds them: panels of 8 in pairs, so a multiple of 16 (the rest are zeros)."""
    return out + -out % 16


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """[out, in] levels as the kernel reads them, [padded(out) / 8, in, b] bytes (b = kernel_bits(bits)): for
    each panel of 8 output rows and each input, lane l's code in byte l * b / 8 from bit (l * b) % 8 up."""
    out, length = codes.shape
    b = kernel_bits(bits)
    lanes = F.pad(codes.to(torch.uint8), (0, 0, 0, padded(out) - out)).view(-1, 8, length).transpose(1, 2)
    lanes = lanes.reshape(-1, length, b, 8 // b)
    packed = torch.zeros(lanes.shape[:3], dtype=torch.uint8)
    for j in range(8 // b):
        packed |= lanes[..., j] << (b * j)
    return packed


def pack_params(values: torch.Tensor) -> torch.Tensor:
    """[out, groups] float32 scales or offsets as the kernel reads them: [padded(out) / 8, groups, 8]."""
    out, groups = values.shape
    return F.pad(values.float(), (0, 0, 0, padded(out) - out)).view(-1, 8, groups).transpose(1, 2).contiguous()


def decode_rows(codes: torch.Tensor, bits: int, group: int, scale: torch.Tensor, offset: torch.Tensor, points: torch.Tensor | None, ids: torch.Tensor) -> torch.Tensor:
    """Rows `ids` (flat, in range) of the weights level * scale + offset, as `pack_codes`, `pack_params` and
    `table` hold them, in float32 [len(ids), in]: only those rows are read."""
    b = kernel_bits(bits)
    panel, lane = ids // 8, ids % 8
    levels = (codes[panel, :, lane * b // 8] >> ((lane * b) % 8)[:, None].to(torch.uint8)) & (2**b - 1)
    levels = levels.float() if points is None else points[levels.long()]
    at = torch.arange(codes.shape[1]) // group  # each input's group
    return levels * scale[panel[:, None], at, lane[:, None]] + offset[panel[:, None], at, lane[:, None]]


def table(points: torch.Tensor) -> torch.Tensor:
    """Learned points (at most 16) as the kernel reads them: 16 float32, the unused ones 0."""
    return F.pad(points.float(), (0, 16 - len(points)))


def matmul(x: torch.Tensor, codes: torch.Tensor, bits: int, group: int, scale: torch.Tensor, offset: torch.Tensor, out: int, points: torch.Tensor | None = None,
           weights_checked: bool = False) -> torch.Tensor:
    """x [rows, in] times the `out` rows of weights level * scale + offset (as `pack_codes` and `pack_params`
    hold them; the level is the code, or `points[code]` with a `table` of learned points) transposed, in
    float32: [rows, out]. On the kernel where it is built; else (a model pickled to a process without it)
    the weights are decoded for the call."""
    x = x.to(torch.float32).contiguous()
    if codes.dim() != 3 or padded(out) != codes.shape[0] * 8:
        raise ValueError(f"codes of shape {list(codes.shape)} do not hold {out} output rows in panels of 8 (padded to 16)")
    rows, length = x.shape
    fn = library()
    if fn is None:
        return x @ decode_rows(codes, bits, group, scale, offset, points, torch.arange(out)).T
    threads = max(1, min(torch.get_num_threads(), rows * out * length // SERIAL_WORK))
    return run(fn, x, codes, bits, group, scale, offset, points, threads, weights_checked)[:, :out]


def check_weights(codes: torch.Tensor, bits: int, group: int, scale: torch.Tensor, offset: torch.Tensor, points: torch.Tensor | None) -> None:
    """Raise ValueError unless the weights are what `lowbit_linear` reads through raw pointers, which it cannot
    check: contiguous CPU tensors, codes uint8 [N / 8, K, kernel_bits(bits)] with N a multiple of 16, scale and
    offset float32 [N / 8, K / group, 8] with an even group dividing K, points None or 16 float32 (bits at most
    4), sizes that fit a C int. A layer checks its weights once (`LowBitWeights`); `check_input` each call."""
    if codes.dim() != 3:
        raise ValueError(f"the lowbit kernel needs codes [panels, in, bytes], got {list(codes.shape)}")
    panels, length = codes.shape[:2]
    if bits not in range(1, 5 if points is not None else 9):
        raise ValueError(f"the lowbit kernel runs 1 to 8 bits (learned points: 1 to 4), got {bits!r}")
    if not isinstance(group, int) or group <= 0 or group % 2 or length % 2:
        raise ValueError(f"the lowbit kernel needs an even group size and an even number of inputs, got groups of {group!r} for {length}")
    if panels % 2 or max(length, panels * 8) >= 2**31:
        raise ValueError(f"the lowbit kernel needs output rows in pairs of panels of 8 and sizes under 2**31, got {panels} panels of {length} inputs")
    wanted = [("codes", codes, torch.uint8, (panels, length, kernel_bits(bits)))]
    wanted += [(name, t, torch.float32, (panels, groups_of(length, group), 8)) for name, t in (("scale", scale), ("offset", offset))]
    wanted += [] if points is None else [("points", points, torch.float32, (16,))]
    for name, t, dtype, shape in wanted:
        if t.dtype != dtype or t.shape != shape or t.device.type != "cpu" or not t.is_contiguous():
            got = f"{'' if t.is_contiguous() else 'non-contiguous '}{t.device.type} {t.dtype} {list(t.shape)}"
            raise ValueError(f"the lowbit kernel needs {name} as a contiguous cpu {dtype} {list(shape)}, got {got}")


def check_input(x: torch.Tensor, codes: torch.Tensor, threads: int) -> None:
    """What changes from call to call: x a contiguous CPU float32 [rows, K] for codes of K inputs, still on the CPU."""
    if x.dim() != 2 or x.shape[1] != codes.shape[1] or x.dtype != torch.float32 or not x.is_cpu or not x.is_contiguous() or x.shape[0] >= 2**31:
        raise ValueError(f"the lowbit kernel needs x as a contiguous cpu float32 [rows, {codes.shape[1]}], got {x.device.type} {x.dtype} {list(x.shape)}")
    if not codes.is_cpu or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"the lowbit kernel needs its weights on the cpu (they are on {codes.device.type}) and threads >= 1, got {threads!r}")


def run(fn, x: torch.Tensor, codes: torch.Tensor, bits: int, group: int, scale: torch.Tensor, offset: torch.Tensor, points: torch.Tensor | None, threads: int,
        weights_checked: bool = False) -> torch.Tensor:
    """One call of the compiled `fn` on contiguous float32 `x`: [rows, padded(out)], the operands checked first
    (the weights too, unless their layer checked them when it was built)."""
    if not weights_checked:
        check_weights(codes, bits, group, scale, offset, points)
    check_input(x, codes, threads)
    rows, length = x.shape
    y = torch.empty(rows, codes.shape[0] * 8, dtype=torch.float32)
    if rows:
        lut = None if points is None else points.data_ptr()
        fn(x.data_ptr(), rows, length, codes.data_ptr(), y.shape[1], kernel_bits(bits), group, scale.data_ptr(), offset.data_ptr(), lut, y.data_ptr(), threads)
    return y


def _agrees(fn) -> bool:
    """The built kernel against float32 arithmetic on a small case of each width, with uniform levels and (2 and
    4 bits) with learned points: 40 outputs (whole and partial sets of panels, padding), 320 inputs (two blocks of k), groups
    of whole and partial vectors and a short last group, 1, 3 and 9 input rows (both paths)."""
    g = torch.Generator().manual_seed(0)
    out, length = 40, 320
    for bits, group in ((2, 32), (4, 64), (4, 10), (4, 96), (8, 32)):
        codes = torch.randint(0, 2**bits, (out, length), generator=g)
        scale = torch.rand(out, groups_of(length, group), generator=g, dtype=torch.float32)
        offset = torch.randn(out, groups_of(length, group), generator=g, dtype=torch.float32)
        at = torch.arange(length) // group
        for points in (None, torch.rand(2**bits, generator=g, dtype=torch.float32))[: 1 if bits == 8 else 2]:
            levels = codes.float() if points is None else points[codes]
            weight = levels * scale[:, at] + offset[:, at]
            for rows in (1, 3, 9):
                x = torch.randn(rows, length, generator=g, dtype=torch.float32)
                lut = None if points is None else table(points)
                y = run(fn, x, pack_codes(codes, bits), bits, group, pack_params(scale), pack_params(offset), lut, 2)[:, :out]
                if not torch.allclose(y, x @ weight.T, rtol=1e-4, atol=1e-4):
                    return False
    return True
