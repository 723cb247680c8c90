"""Export a packed model to ONNX for ONNX Runtime, with the trained levels kept low-bit.

Each quantized nn.Linear whose groups tile its rows in blocks of a power of two (16 or more) becomes one
`com.microsoft.MatMulNBits` node (ONNX Runtime's block-wise weight-only matmul) holding the file's own
levels, steps and zero points: w = (q - zero_point) * scale per block of `block_size` inputs of each
output. 2-, 4- and 8-bit levels keep their width (8 bits with integer zero points only); 1- and 3-bit levels sit unchanged on the 2- and
4-bit grids (same step, same zero point). Groups with an integer zero point (`--zero-point int`) get
uint8 zero points, ONNX Runtime's fast path; min-max groups get float zero points (-min / step), which
ONNX Runtime computes exactly but slowly. Every other tensor is a float32 initializer holding the dense
loader's value. Each quantized nn.Embedding of such blocks with integer zero points becomes one
`com.microsoft.GatherBlockQuantized` node (its 4- or 8-bit table, looked up and dequantized per token),
unless it is tied to an output layer. `accuracy_level` 4 lets ONNX Runtime quantize the activations to
int8 (faster, less exact: docs/inference.md).

The graph is traced by torch.onnx's TorchScript exporter from the dense model with those Linear layers
swapped for `NBitsLinear`, whose symbolic emits the MatMulNBits node, and its adaptive pooling for
`SlicedAdaptivePool` (the exporter refuses an output size that does not divide the input's: a conv student's).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.utils import _pair

from qdistill.errors import QDistillError
from qdistill.format.packed import entry_indices, entry_params, group_step, options, read_packed, row_group
from qdistill.models import replace_module
from qdistill.runtime.load import load_packed

NBITS = {1: 2, 2: 2, 3: 4, 4: 4, 5: 8, 6: 8, 7: 8, 8: 8}  # the MatMulNBits width a b-bit level sits on
GATHER_BITS = {1: 4, 2: 4, 3: 4, 4: 4, 5: 8, 6: 8, 7: 8, 8: 8}  # GatherBlockQuantized's: 4 or 8 bits
OPSET = 17


def nbits_ready(entry: dict) -> bool:
    """Whether this tensor can be a MatMulNBits weight: uniform levels of a 2-d tensor in row blocks of 2**k >= 16
    (at 5 to 8 bits with integer zero points only: ONNX Runtime's CPU kernel has no 8-bit float zero points)."""
    return power_of_two_block(entry) is not None and (NBITS[entry["index_bits"]] < 8 or options(entry)["zero_point"] == "int")


def power_of_two_block(entry: dict) -> int | None:
    """The row block of a uniform 2-d tensor where it is a power of two of 16 or more (what both contrib ops take)."""
    block = row_group(entry) if entry["kind"] == "uniform" and len(entry["shape"]) == 2 else None
    return block if block is not None and block >= 16 and block & (block - 1) == 0 else None


def gather_ready(entry: dict) -> bool:
    """Whether this tensor can be a GatherBlockQuantized table: blocks of `power_of_two_block` with integer zero
    points (the op's zero points are integers of the data's type)."""
    return power_of_two_block(entry) is not None and options(entry)["zero_point"] == "int"


def pack_rows(q: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 bytes of each row of q, 8 // bits values a byte, the first in the lowest bits (MatMulNBits' order)."""
    per = 8 // bits
    q = F.pad(q, (0, -q.shape[-1] % per)).to(torch.uint8).view(*q.shape[:-1], -1, per)
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8)
    return (q << shifts).sum(-1, dtype=torch.uint8)


def nbits_weights(entry: dict, tensors: dict[str, torch.Tensor]) -> dict:
    """MatMulNBits' inputs and attributes for one `nbits_ready` weight [N, K]."""
    n, k = entry["shape"]
    block, bits = row_group(entry), NBITS[entry["index_bits"]]
    q = entry_indices(entry, tensors).view(n, k)
    p = entry_params(entry, tensors)
    blocks = k // block
    if "zero" in p:  # integer zero points: exact, and ONNX Runtime's fast path
        scale, zero = p["step"], p["zero"].to(torch.uint8).view(n, blocks)
        zero_points = pack_rows(zero, bits).reshape(-1)
    else:  # a minimum and a step (or a maximum): w = lo + q * step = (q - (-lo / step)) * step
        step = group_step(entry, p)
        flat = step == 0  # a constant group: level 1 times its value
        scale = torch.where(flat, p["lo"], step)
        zero_points = torch.where(flat, torch.zeros_like(step), -p["lo"] / torch.where(flat, torch.ones_like(step), step))
        q = torch.where(flat.view(n, blocks).repeat_interleave(block, 1), torch.ones_like(q), q)
    packed = pack_rows(q.view(n, blocks, block), bits)
    return {"packed": packed, "scales": scale.float().reshape(-1), "zero_points": zero_points, "N": n, "K": k, "bits": bits, "block_size": block}


def gather_weights(entry: dict, tensors: dict[str, torch.Tensor]) -> dict:
    """GatherBlockQuantized's inputs and attributes for one `gather_ready` table [V, D]: w = (q - zero) * step per block."""
    rows, dim = entry["shape"]
    block, bits = row_group(entry), GATHER_BITS[entry["index_bits"]]
    p = entry_params(entry, tensors)
    zero = p["zero"].to(torch.uint8).view(rows, dim // block)
    data = pack_rows(entry_indices(entry, tensors).view(rows, dim), bits)
    return {"data": data, "scales": p["step"].float().view(rows, dim // block), "zero_points": pack_rows(zero, bits), "dim": dim, "bits": bits, "block_size": block}


class _GatherBlockQuantized(torch.autograd.Function):
    """Rows `ids` of a block-quantized table as ONNX Runtime's GatherBlockQuantized node; traced only (zeros)."""

    @staticmethod
    def forward(ctx, ids, data, scales, zero_points, dim, bits, block_size):
        return scales.new_zeros(*ids.shape, dim)

    @staticmethod
    def symbolic(g, ids, data, scales, zero_points, dim, bits, block_size):
        return g.op("com.microsoft::GatherBlockQuantized", data, ids, scales, zero_points, bits_i=bits, block_size_i=block_size, gather_axis_i=0, quantize_axis_i=1)


class BlockQuantizedEmbedding(nn.Module):
    """An nn.Embedding exported as GatherBlockQuantized (for torch.onnx.export only: its forward gives zeros)."""

    def __init__(self, weights: dict):
        super().__init__()
        self.attrs = (weights["dim"], weights["bits"], weights["block_size"])
        for name in ("data", "scales", "zero_points"):
            self.register_buffer(name, weights[name])

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return _GatherBlockQuantized.apply(ids, self.data, self.scales, self.zero_points, *self.attrs)


class _MatMulNBits(torch.autograd.Function):
    """x @ W.T as ONNX Runtime's MatMulNBits node; traced only (the values seen while tracing are zeros)."""

    @staticmethod
    def forward(ctx, x, packed, scales, zero_points, n, k, bits, block_size, accuracy_level):
        return x.new_zeros(*x.shape[:-1], n)

    @staticmethod
    def symbolic(g, x, packed, scales, zero_points, n, k, bits, block_size, accuracy_level):
        return g.op("com.microsoft::MatMulNBits", x, packed, scales, zero_points, K_i=k, N_i=n, bits_i=bits, block_size_i=block_size, accuracy_level_i=accuracy_level)


class NBitsLinear(nn.Module):
    """An nn.Linear exported as MatMulNBits (for torch.onnx.export only: its forward gives zeros)."""

    def __init__(self, linear: nn.Linear, weights: dict, accuracy_level: int):
        super().__init__()
        self.attrs = (weights["N"], weights["K"], weights["bits"], weights["block_size"], accuracy_level)
        for name in ("packed", "scales", "zero_points"):
            self.register_buffer(name, weights[name])
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _MatMulNBits.apply(x, self.packed, self.scales, self.zero_points, *self.attrs)
        return y if self.bias is None else y + self.bias


class SlicedAdaptivePool(nn.Module):
    """nn.AdaptiveMaxPool2d or AdaptiveAvgPool2d as slices of its input, each reduced: torch.onnx's exporter
    refuses adaptive pooling whose output size does not divide the input's (a conv student's 3x3 from 7x7 at 28
    pixels). Exact; the windows are those of the traced input's size, as the exporter's own pooling nodes are."""

    def __init__(self, pool: nn.Module):
        super().__init__()
        self.output_size = pool.output_size
        self.pool, self.reduce = (F.adaptive_max_pool2d, torch.amax) if isinstance(pool, nn.AdaptiveMaxPool2d) else (F.adaptive_avg_pool2d, torch.mean)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sizes = [(dim, x.shape[dim], x.shape[dim] if out is None else out) for dim, out in zip((-2, -1), _pair(self.output_size))]
        if all(n % out == 0 for _, n, out in sizes):
            return self.pool(x, self.output_size)  # the exporter's own nodes
        for dim, n, out in sizes:  # torch's windows [floor(i n / out), ceil((i + 1) n / out)); a rectangle's max or mean is separable
            starts = [i * n // out for i in range(out)]
            ends = [((i + 1) * n + out - 1) // out for i in range(out)]  # ceil without a negative //, which the exporter truncates
            x = torch.cat([self.reduce(x.narrow(dim, start, end - start), dim, keepdim=True) for start, end in zip(starts, ends)], dim)
        return x


class Exported(nn.Module):
    """What the ONNX graph computes from its inputs: `head(model(*inputs))` (logits, pooled embeddings)."""

    def __init__(self, model: nn.Module, head):
        super().__init__()
        self.model, self.head = model, head

    def forward(self, *inputs):
        return self.head(self.model, *inputs)


def export_onnx(path: str | Path, out: str | Path, sample: tuple[torch.Tensor, ...], head=None, input_names=("x",), output_name: str = "y",
                dynamic: dict | None = None, model: nn.Module | None = None, trust_code: bool = False, accuracy_level: int = 0) -> dict:
    """Write the packed model at `path` as an ONNX graph at `out`; `sample` is one input (tuple) to trace with,
    `head(model, *inputs)` what the graph returns (default: the model's output), `dynamic` ONNX's dynamic axes
    by input name. Returns how many weights became MatMulNBits and GatherBlockQuantized nodes and how many stayed float32."""
    if accuracy_level not in (0, 1, 2, 3, 4):
        raise QDistillError(f"accuracy_level must be 0 to 4 (ONNX Runtime's MatMulNBits: 4 computes with int8 activations), got {accuracy_level!r}")
    dense, meta = load_packed(path, model=model, trust_code=trust_code)
    _, tensors = read_packed(path)
    aliases = set(meta.get("aliases", {})) | set(meta.get("aliases", {}).values())
    low_bit = gathered = 0
    for entry in meta["quantized"]:
        module_path, _, name = entry["name"].rpartition(".")
        module = dense.get_submodule(module_path) if module_path else None
        if name != "weight" or entry["name"] in aliases:  # a tied table stays float32: its output layer reads it whole
            continue
        if type(module) is nn.Linear and nbits_ready(entry):
            replace_module(dense, module, NBitsLinear(module, nbits_weights(entry, tensors), accuracy_level))
            low_bit += 1
        elif type(module) is nn.Embedding and module.max_norm is None and gather_ready(entry):
            replace_module(dense, module, BlockQuantizedEmbedding(gather_weights(entry, tensors)))
            gathered += 1
    for module in list(dense.modules()):
        if type(module) in (nn.AdaptiveMaxPool2d, nn.AdaptiveAvgPool2d) and not getattr(module, "return_indices", False):
            replace_module(dense, module, SlicedAdaptivePool(module))
    graph = Exported(dense, head or (lambda m, *inputs: m(*inputs))).eval()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice and tracer warnings: the graph is checked below, by running it
            torch.onnx.export(graph, sample, str(out), dynamo=False, opset_version=OPSET, input_names=list(input_names), output_names=[output_name],
                              dynamic_axes=dynamic or {}, custom_opsets={"com.microsoft": 1} if low_bit or gathered else None)
    except Exception as e:  # the tracer's own errors: a model it cannot follow
        raise QDistillError(f"torch.onnx could not export {path}: {type(e).__name__}: {str(e).splitlines()[0][:300]}") from None
    return {"matmul_nbits": low_bit, "gather_block_quantized": gathered, "float32": len(meta["quantized"]) - low_bit - gathered, "bytes": out.stat().st_size}


def signature(task: dict, spec: dict, image_size: int = 28) -> dict:
    """export_onnx's sample (zeros, to trace), probe (random, to check), head, names and dynamic axes for a
    model trained on `task` (a file's task description): token ids -> logits (lm), token ids and mask ->
    unit sentence embeddings (embedding), images -> logits (classification, `image_size` pixels square)."""
    from qdistill.tasks.embedding import mean_pool
    from qdistill.tasks.language import logits_of

    name = task.get("task", "classification")
    g = torch.Generator().manual_seed(0)
    if name in ("lm", "embedding"):
        vocab = task.get("vocab_size") or spec.get("kwargs", {}).get("config", {}).get("vocab_size") or spec.get("kwargs", {}).get("vocab_size") or 2
        ids = torch.randint(0, vocab, (2, 16), generator=g)
    if name == "lm":
        return {"sample": (torch.zeros(1, 16, dtype=torch.long),), "probe": (ids,), "head": lambda m, ids: logits_of(m(ids)), "input_names": ("input_ids",),
                "output_name": "logits", "dynamic": {"input_ids": {0: "batch", 1: "tokens"}}}
    if name == "embedding":
        mask = torch.ones_like(ids)
        mask[1, 10:] = 0  # a shorter second sentence: padding masked out
        return {"sample": (torch.zeros(1, 16, dtype=torch.long), torch.ones(1, 16, dtype=torch.long)), "probe": (ids, mask),
                "head": lambda m, ids, mask: mean_pool(m(input_ids=ids, attention_mask=mask).last_hidden_state, mask),
                "input_names": ("input_ids", "attention_mask"), "output_name": "embedding",
                "dynamic": {"input_ids": {0: "batch", 1: "tokens"}, "attention_mask": {0: "batch", 1: "tokens"}}}
    channels = spec.get("kwargs", {}).get("in_channels", 1)
    return {"sample": (torch.zeros(1, channels, image_size, image_size),), "probe": (torch.randn(2, channels, image_size, image_size, generator=g),),
            "head": None, "input_names": ("images",), "output_name": "logits", "dynamic": {"images": {0: "batch"}}}


def check_with_onnxruntime(out: str | Path, sample: tuple[torch.Tensor, ...], input_names=("x",)) -> torch.Tensor:
    """The exported graph's output for `sample`, computed by ONNX Runtime on the CPU."""
    onnxruntime = require_onnxruntime()
    try:
        session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        return torch.from_numpy(session.run(None, {name: t.numpy() for name, t in zip(input_names, sample)})[0])
    except Exception as e:  # ONNX Runtime's own exception types: a graph it refuses
        raise QDistillError(f"ONNX Runtime cannot run {out}: {str(e).splitlines()[0][:300]}") from None


def require_onnxruntime():
    try:
        import onnxruntime
    except ImportError:
        raise QDistillError("ONNX Runtime is not installed: pip install 'qdistill[export]' (onnxruntime from PyPI)") from None
    return onnxruntime
