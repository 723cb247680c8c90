"""qdistill's own 2-, 4- and 8-bit kernels for x86-64 CPUs with AVX2 and FMA (`lowbit.c`: matmul, LSTM and
GRU recurrences, decoding rows or whole weights): compiled with the system's C compiler at first use into the
cache (`QDISTILL_CACHE`/kernels, keyed by the source, the flags and the CPU), checked on small cases, and loaded with ctypes (only a file of this user's own, through the
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
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F

from qdistill.files import cache_dir

SOURCE = Path(__file__).with_name("lowbit.c")
FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC")
LIBS = ("-lm",)  # after the source, so that the library records libm
P, I = ctypes.c_void_p, ctypes.c_int
LINEAR_ARGS = [P, I, I, P, I, I, P, P, P, P, P, I, I]  # x, B, K, codes, bits, group, scale, offset, points, bias, y, M, threads
DECODE_ARGS = [P, I, I, I, I, P, P, P, P, I]  # codes, K, M, bits, group, scale, offset, points, out, threads
ROWS_ARGS = [P, I, I, I, P, P, P, P, I, P]  # codes, K, bits, group, scale, offset, points, ids, n, out
RECURRENT_ARGS = [I, P, I, I, I, P, I, I, P, P, P, P, P, P, P, P, P, I]  # gru, gx, B, T, H, codes, bits, group, scale, offset, points, bias_hh, h, c, y, gates, w, threads
BUILDING = threading.Lock()
log = logging.getLogger(__name__)
SERIAL_WORK = 2**19  # multiply-adds per thread below which extra threads cost more than they save (a few tens of µs)


def cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    return next((set(line.split(":", 1)[1].split()) for line in text.splitlines() if line.startswith("flags")), set())


class Library(NamedTuple):
    """The compiled functions (ctypes): `lowbit_linear`, `lowbit_recurrent`, `lowbit_rows` and `lowbit_decode`."""

    linear: Callable
    recurrent: Callable
    rows: Callable
    decode: Callable


@functools.cache
def library() -> Library | None:
    """The compiled kernels, or None: not an x86-64 CPU with AVX2 and FMA, no C compiler, a cache that cannot
    be written, a library that is not this user's own, or a build or a self-check that failed."""
    flags = cpu_flags()
    compiler = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if platform.machine() not in ("x86_64", "AMD64") or not {"avx2", "fma"} <= flags or compiler is None:
        return None
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join((compiler, *FLAGS, *LIBS, *sorted(flags))).encode()).hexdigest()[:16]
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
            compiled = ctypes.CDLL(f"/proc/self/fd/{fd}")
            lib = Library(compiled.lowbit_linear, compiled.lowbit_recurrent, compiled.lowbit_rows, compiled.lowbit_decode)
        except (OSError, AttributeError):
            os.close(fd)
            return None
    for fn, args in zip(lib, (LINEAR_ARGS, RECURRENT_ARGS, ROWS_ARGS, DECODE_ARGS)):
        fn.argtypes, fn.restype = args, None
    return lib if _agrees(lib) else None


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
            if subprocess.run([compiler, *FLAGS, str(SOURCE), *LIBS, "-o", partial], capture_output=True).returncode:
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


def rows(codes: torch.Tensor, bits: int, group: int, scale: torch.Tensor, offset: torch.Tensor, points: torch.Tensor | None, ids: torch.Tensor) -> torch.Tensor:
    """`decode_rows` by the compiled `lowbit_rows` where it is built, for weights `check_weights` accepted and
    ids (flat int64, each a row the codes hold) checked by the caller."""
    lib = library()
    return decode_rows(codes, bits, group, scale, offset, points, ids) if lib is None else call_rows(lib.rows, codes, bits, group, scale, offset, points, ids)


def check_ids(ids: torch.Tensor) -> torch.Tensor:
    """Row ids as the C lookups read them: a contiguous CPU int64 vector (their range is the caller's to check)."""
    if ids.dim() != 1 or not ids.is_cpu or ids.is_floating_point() or ids.is_complex():
        raise ValueError(f"the lowbit row lookup needs ids as a cpu integer vector, got {ids.device.type} {ids.dtype} {list(ids.shape)}")
    return ids.to(torch.int64).contiguous()


def call_rows(fn, codes: torch.Tensor, bits: int, group: int, scale: torch.Tensor, offset: torch.Tensor, points: torch.Tensor | None, ids: torch.Tensor) -> torch.Tensor:
    ids = check_ids(ids)
    out = torch.empty(len(ids), codes.shape[1], dtype=torch.float32)
    if len(ids):
        lut = None if points is None else points.data_ptr()
        fn(codes.data_ptr(), codes.shape[1], kernel_bits(bits), group, scale.data_ptr(), offset.data_ptr(), lut, ids.data_ptr(), len(ids), out.data_ptr())
    return out


def decoded(codes: torch.Tensor, bits: int, group: int, scale: torch.Tensor, offset: torch.Tensor, points: torch.Tensor | None, out: int) -> torch.Tensor:
    """The first `out` rows of weights `check_weights` accepted, decoded to float32 [out, K]: by the compiled
    `lowbit_decode` where it is built, else `decode_rows`."""
    lib = library()
    if lib is None:
        return decode_rows(codes, bits, group, scale, offset, points, torch.arange(out))
    return call_decode(lib.decode, codes, bits, group, scale, offset, points, out)


def call_decode(fn, codes: torch.Tensor, bits: int, group: int, scale: torch.Tensor, offset: torch.Tensor, points: torch.Tensor | None, out: int) -> torch.Tensor:
    if not 0 <= out <= codes.shape[0] * 8:
        raise ValueError(f"codes of {codes.shape[0]} panels of 8 rows do not hold {out} rows")
    length = codes.shape[1]
    y = torch.empty(out, length, dtype=torch.float32)
    if out and length:
        lut = None if points is None else points.data_ptr()
        fn(codes.data_ptr(), length, out, kernel_bits(bits), group, scale.data_ptr(), offset.data_ptr(), lut, y.data_ptr(), threads_for(out * length * 8))
    return y


def decode_rows(codes: torch.Tensor, bits: int, group: int, scale: torch.Tensor, offset: torch.Tensor, points: torch.Tensor | None, ids: torch.Tensor) -> torch.Tensor:
    """Rows `ids` (flat, in range) of the weights level * scale + offset, as `pack_codes`, `pack_params` and
    `table` hold them, in float32 [len(ids), in]: only those rows are read."""
    b = kernel_bits(bits)
    panel, lane = ids // 8, ids % 8
    levels = (codes[panel, :, lane * b // 8] >> ((lane * b) % 8)[:, None].to(torch.uint8)) & (2**b - 1)
    levels = levels.float() if points is None else points[levels.long()]
    length, groups = codes.shape[1], scale.shape[1]
    levels = F.pad(levels, (0, groups * group - length)).view(len(ids), groups, group)  # a short last group padded
    return (levels * scale[panel, :, lane][..., None] + offset[panel, :, lane][..., None]).view(len(ids), -1)[:, :length]


def table(points: torch.Tensor) -> torch.Tensor:
    """Learned points (at most 16) as the kernel reads them: 16 float32, the unused ones 0."""
    return F.pad(points.float(), (0, 16 - len(points)))


def matmul(x: torch.Tensor, codes: torch.Tensor, bits: int, group: int, scale: torch.Tensor, offset: torch.Tensor, out: int, points: torch.Tensor | None = None,
           bias: torch.Tensor | None = None, weights_checked: bool = False) -> torch.Tensor:
    """x [rows, in] times the `out` rows of weights level * scale + offset (as `pack_codes` and `pack_params`
    hold them; the level is the code, or `points[code]` with a `table` of learned points) transposed, plus
    `bias`, in float32: [rows, out]. On the kernel where it is built; else (a model pickled to a process
    without it) the weights are decoded for the call."""
    x = x.to(torch.float32).contiguous()
    lib = library()
    if lib is None:
        y = x @ decode_rows(codes, bits, group, scale, offset, points, torch.arange(out)).T
        return y if bias is None else y + bias
    return run(lib.linear, x, codes, bits, group, scale, offset, points, threads_for(x.shape[0] * out * x.shape[1]), weights_checked, out, bias)


def threads_for(work: int) -> int:
    """Threads for `work` multiply-adds: one per SERIAL_WORK, at most torch's."""
    return max(1, min(torch.get_num_threads(), work // SERIAL_WORK))


def check_weights(codes: torch.Tensor, bits: int, group: int, scale: torch.Tensor, offset: torch.Tensor, points: torch.Tensor | None, matmul: bool = True) -> None:
    """Raise ValueError unless the weights are what the kernels read through raw pointers, which they cannot
    check: contiguous CPU tensors, codes uint8 [N / 8, K, kernel_bits(bits)] with N a multiple of 16, scale and
    offset float32 [N / 8, groups_of(K, group), 8], points None or 16 float32 (bits at most 4), sizes that fit a
    C int; for `lowbit_linear` and `lowbit_recurrent` (`matmul`), K and the group size even. A layer checks its
    weights once (`LowBitWeights`); `check_input` each call."""
    if codes.dim() != 3:
        raise ValueError(f"the lowbit kernel needs codes [panels, in, bytes], got {list(codes.shape)}")
    panels, length = codes.shape[:2]
    if bits not in range(1, 5 if points is not None else 9):
        raise ValueError(f"the lowbit kernel runs 1 to 8 bits (learned points: 1 to 4), got {bits!r}")
    if not isinstance(group, int) or group <= 0 or (matmul and (group % 2 or length % 2)):
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
    shape = x.shape
    if len(shape) != 2 or shape[1] != codes.shape[1] or x.dtype != torch.float32 or not x.is_cpu or not x.is_contiguous() or shape[0] >= 2**31:
        raise ValueError(f"the lowbit kernel needs x as a contiguous cpu float32 [rows, {codes.shape[1]}], got {x.device.type} {x.dtype} {list(x.shape)}")
    if not codes.is_cpu or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"the lowbit kernel needs its weights on the cpu (they are on {codes.device.type}) and threads >= 1, got {threads!r}")


def check_vector(name: str, t: torch.Tensor | None, size: int) -> None:
    if t is not None and (t.shape != (size,) or t.dtype != torch.float32 or not t.is_cpu or not t.is_contiguous()):
        raise ValueError(f"the lowbit kernel needs {name} as a contiguous cpu float32 [{size}], got {t.device.type} {t.dtype} {list(t.shape)}")


def run(fn, x: torch.Tensor, codes: torch.Tensor, bits: int, group: int, scale: torch.Tensor, offset: torch.Tensor, points: torch.Tensor | None, threads: int,
        weights_checked: bool = False, out: int | None = None, bias: torch.Tensor | None = None) -> torch.Tensor:
    """One call of the compiled `lowbit_linear` (`fn`) on contiguous float32 `x`: [rows, out] (all the rows the
    codes hold when None) plus `bias`, the operands checked first (the weights too, unless their layer checked
    them when it was built)."""
    if not weights_checked:
        check_weights(codes, bits, group, scale, offset, points)
    check_input(x, codes, threads)
    out = codes.shape[0] * 8 if out is None else out
    if not isinstance(out, int) or padded(out) != codes.shape[0] * 8:
        raise ValueError(f"codes of shape {list(codes.shape)} do not hold {out!r} output rows in panels of 8 (padded to 16)")
    return call(fn, x, weight_args(codes, bits, group, scale, offset, points), out, bias, threads)


def weight_args(codes: torch.Tensor, bits: int, group: int, scale: torch.Tensor, offset: torch.Tensor, points: torch.Tensor | None) -> tuple:
    """The arguments `lowbit_linear` takes for checked weights (`check_weights`): codes, bits, group, scale,
    offset, points; valid while those tensors live unchanged."""
    return codes.data_ptr(), kernel_bits(bits), group, scale.data_ptr(), offset.data_ptr(), None if points is None else points.data_ptr()


def call(fn, x: torch.Tensor, weights: tuple, out: int, bias: torch.Tensor | None, threads: int) -> torch.Tensor:
    """`lowbit_linear` (`fn`) on x, checked by `check_input`, and the `weight_args` of checked weights."""
    check_vector("bias", bias, out)
    rows, length = x.shape
    y = torch.empty(rows, out, dtype=torch.float32)
    if rows:
        fn(x.data_ptr(), rows, length, *weights, None if bias is None else bias.data_ptr(), y.data_ptr(), out, threads)
    return y


def recurrent(fn, gx: torch.Tensor, codes: torch.Tensor, bits: int, group: int, scale: torch.Tensor, offset: torch.Tensor, points: torch.Tensor | None,
              h: torch.Tensor, c: torch.Tensor | None = None, bias_hh: torch.Tensor | None = None, weights_checked: bool = False) -> torch.Tensor:
    """One LSTM (`c` its cell state) or GRU (`c` None) layer over all steps by the compiled `lowbit_recurrent`
    (`fn`): gx [B, T, G·H] the input projections (G = 4 gates i, f, g, o with both biases; G = 3 gates r, z,
    n with the input bias), the recurrent weights [G·H, H] as `pack_codes` and `pack_params` hold them, the
    GRU's recurrent bias (`bias_hh`), h (and c) [B, H] the initial state, replaced by the last in place;
    returns the outputs [B, T, H]. Operands checked first. The recurrent weights are decoded to float32 for
    the call (G·H x H floats, freed after it): every step reads them, and a decoded matrix multiplies faster
    than codes decoded at each step."""
    if not weights_checked:
        check_weights(codes, bits, group, scale, offset, points)
    hidden, gates = codes.shape[1], 4 if c is not None else 3
    if gx.dim() != 3 or gx.shape[2] != gates * hidden or padded(gates * hidden) != codes.shape[0] * 8:
        raise ValueError(f"the lowbit recurrence needs inputs [batch, steps, {gates * hidden}] and recurrent codes of {padded(gates * hidden) // 8} panels, got {list(gx.shape)} and {list(codes.shape)}")
    batch, steps = gx.shape[:2]
    states = [("gx", gx, gx.shape), ("h", h, (batch, hidden))] + ([("c", c, (batch, hidden))] if c is not None else [])
    for name, t, shape in states:
        if t.shape != shape or t.dtype != torch.float32 or not t.is_cpu or not t.is_contiguous() or t.numel() >= 2**31:
            raise ValueError(f"the lowbit recurrence needs {name} as a contiguous cpu float32 {list(shape)}, got {t.device.type} {t.dtype} {list(t.shape)}")
    check_vector("bias_hh", bias_hh, gates * hidden)
    if bias_hh is not None and c is not None:
        raise ValueError("an LSTM's recurrent bias goes into its input projections (gx), not bias_hh")
    y = torch.empty(batch, steps, hidden, dtype=torch.float32)
    if batch and steps:
        scratch, weights = torch.empty(batch, gates * hidden, dtype=torch.float32), torch.empty(padded(gates * hidden) * hidden, dtype=torch.float32)
        if weights.data_ptr() % 32:
            raise ValueError("the lowbit recurrence needs its scratch memory 32-byte aligned")
        lut, bias, cell = (None if t is None else t.data_ptr() for t in (points, bias_hh, c))
        fn(int(c is None), gx.data_ptr(), batch, steps, hidden, codes.data_ptr(), kernel_bits(bits), group, scale.data_ptr(), offset.data_ptr(), lut, bias,
           h.data_ptr(), cell, y.data_ptr(), scratch.data_ptr(), weights.data_ptr(), threads_for(batch * gates * hidden * hidden))
    return y


def _agrees(lib: Library) -> bool:
    """The built kernels against float32 arithmetic on small cases. Matmul: each width, with uniform levels and
    (2 and 4 bits) with learned points: 40 outputs (whole and partial sets of panels, padding), 320 inputs (two
    blocks of k), groups of whole and partial vectors and a short last group, 1, 3 and 9 input rows (both
    paths), with and without a bias; rows looked up and decoded; an LSTM and a GRU layer."""
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
            lut = None if points is None else table(points)
            for n_rows, bias in ((1, None), (3, torch.randn(out, generator=g)), (9, None), (9, torch.randn(out, generator=g))):
                x = torch.randn(n_rows, length, generator=g, dtype=torch.float32)
                y = run(lib.linear, x, pack_codes(codes, bits), bits, group, pack_params(scale), pack_params(offset), lut, 2, out=out, bias=bias)
                if not close(y, x @ weight.T + (0 if bias is None else bias)):
                    return False
            ids = torch.tensor([0, 39, 7, 7, 8])
            if not close(call_rows(lib.rows, pack_codes(codes, bits), bits, group, pack_params(scale), pack_params(offset), lut, ids), weight[ids]):
                return False
            if not close(call_decode(lib.decode, pack_codes(codes, bits), bits, group, pack_params(scale), pack_params(offset), lut, out), weight):
                return False
    return _odd_rows_agree(lib, g) and _recurrences_agree(lib, g)


def _odd_rows_agree(lib: Library, g: torch.Generator) -> bool:
    """Decoding rows of 9 inputs in one group (no whole block of 8), 37 of them (a partial panel), at 4 bits."""
    codes, scale, offset = torch.randint(0, 16, (37, 9), generator=g), torch.rand(37, 1, generator=g), torch.randn(37, 1, generator=g)
    got = call_decode(lib.decode, pack_codes(codes, 4), 4, 9, pack_params(scale), pack_params(offset), None, 37)
    return close(got, codes.float() * scale + offset)


def _recurrences_agree(lib: Library, g: torch.Generator) -> bool:
    """An LSTM and a GRU layer, 3 steps of 2 rows, 4 bits, 18 hidden units (16 on vectors, 2 on the scalar
    tail), against the same recurrences in float32 torch ops."""
    batch, steps, hidden, group = 2, 3, 18, 6
    for gates in (4, 3):
        codes = torch.randint(0, 16, (gates * hidden, hidden), generator=g)
        scale, offset = torch.rand(gates * hidden, hidden // group, generator=g) / 8, torch.randn(gates * hidden, hidden // group, generator=g) / 8
        weight = codes.float() * scale.repeat_interleave(group, 1) + offset.repeat_interleave(group, 1)
        gx, h, c = torch.randn(batch, steps, gates * hidden, generator=g), torch.randn(batch, hidden, generator=g), torch.randn(batch, hidden, generator=g)
        bias = torch.randn(gates * hidden, generator=g) if gates == 3 else None
        want, state = [], (h.clone(), c.clone())
        for t in range(steps):
            if gates == 4:
                i, f, u, o = (gx[:, t] + state[0] @ weight.T).chunk(4, 1)
                cell = f.sigmoid() * state[1] + i.sigmoid() * u.tanh()
                state = (o.sigmoid() * cell.tanh(), cell)
            else:
                (xr, xz, xn), (hr, hz, hn) = gx[:, t].chunk(3, 1), (state[0] @ weight.T + bias).chunk(3, 1)
                r, z = (xr + hr).sigmoid(), (xz + hz).sigmoid()
                state = ((1 - z) * (xn + r * hn).tanh() + z * state[0], None)
            want.append(state[0])
        y = recurrent(lib.recurrent, gx, pack_codes(codes, 4), 4, group, pack_params(scale), pack_params(offset), None, h, c if gates == 4 else None, bias)
        if not (close(y, torch.stack(want, 1)) and close(h, state[0]) and (gates == 3 or close(c, state[1]))):
            return False
    return True


def close(got: torch.Tensor, want: torch.Tensor) -> bool:
    """Within float32 rounding of sums of a few hundred terms: 1e-5 of the largest value."""
    return bool((got - want).abs().max() <= 1e-5 * want.abs().max())
