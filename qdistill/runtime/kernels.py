"""The low-bit inference runtime (`load_packed(path, runtime="kernels")`): quantized weights stay packed in memory.

Each quantized tensor runs one of these ways (docs/inference.md):
  lowbit  an nn.Linear, uniform levels at 1 to 8 bits or learned points (dq: by table lookup) at 1 to 4,
          of an even number of inputs in row groups of an even size (the last one may be shorter): `LowBitLinear`, qdistill's own kernel (`lowbit`,
          float32, codes at 2, 4 or 8 bits in memory), within float rounding of the dense layer, where that
          kernel builds here; and an nn.LSTM's or nn.GRU's weights (one direction) in that layout: `LowBitRNN`,
          the input projections on the kernel, the recurrence in one C call;
  int4    else such a layer (uniform, 1 to 4 bits) in groups of 32 to 256: `Int4Linear`, torch's int4 weight-only CPU
          kernel (bf16 activations), within a stated tolerance;
  lookup  an nn.Embedding whose weight that kernel's layout holds: `LowBitEmbedding`, which decodes only the
          rows it looks up; tied to a lowbit layer (an output layer), it shares that layer's codes;
  packed  any other tensor of 2 or more dimensions in row groups (a convolution's weight): held in that
          kernel's layout and decoded whole by one C call before each forward call of its module (`LowBitRows`;
          a batch norm right after such a convolution is folded into it); everything else: its bytes as in
          the file (`PackedTensor`), decoded for each forward call, bit for bit the dense loader's weight;
  dense   tensors of fewer than `dense_below` values, and, with `tune_batch`, kernel layers of the shapes
          that ran faster dense when timed at that batch while loading: decoded once, as by the dense loader.
The runtime model runs in float32 on the CPU.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from qdistill.errors import QDistillError
from qdistill.files import cache_dir, check_cache_entry
from qdistill.format.packed import checked_indices, decode_entry, entry_indices, entry_params, entry_spans, group_step, row_group, within_rows_group
from qdistill.models import replace_module
from qdistill.runtime import lowbit

INT4_OPS = ("_convert_weight_to_int4pack_for_cpu", "_weight_int4pack_mm_for_cpu")
INT4_GROUPS = (32, 64, 128, 256)  # what _weight_int4pack_mm_for_cpu accepts (torch 2.13)
INT4_ROWS = 16  # _convert_weight_to_int4pack_for_cpu wants out_features divisible by 16: the rest are padded
BITS = {2: torch.int16, 4: torch.int32}  # float buffers are kept as their bits, which model.to(dtype) leaves alone


def as_bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(BITS[t.element_size()]) if t.is_floating_point() else t


@functools.cache
def int4_kernel():
    """The int4 CPU ops (convert, matmul), or None where this torch lacks them or they fail on a small case."""
    try:
        convert, matmul = (getattr(torch.ops.aten, op) for op in INT4_OPS)
        weight = convert(torch.full((INT4_ROWS, 32), 9, dtype=torch.int32), 2)
        scales_and_zeros = torch.tensor([1.0, 0.0], dtype=torch.bfloat16).expand(1, INT4_ROWS, 2).contiguous()
        y = matmul(torch.ones(1, 32, dtype=torch.bfloat16), weight, 32, scales_and_zeros)  # each weight (9 - 8) * 1 + 0
        return (convert, matmul) if torch.equal(y.float(), torch.full((1, INT4_ROWS), 32.0)) else None
    except Exception:  # missing op, or a build that cannot run it
        return None


def int4_ready(entry: dict) -> bool:
    """Whether the int4 kernel can run this tensor (as the weight of an nn.Linear)."""
    return entry["kind"] == "uniform" and entry["index_bits"] <= 4 and len(entry["shape"]) == 2 and row_group(entry) in INT4_GROUPS and int4_kernel() is not None


def int4_weights(entry: dict, tensors: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The kernel's packed weight, its bf16 scales_and_zeros [groups, out, 2], and the group size.

    The kernel computes w = (q4 - 8) * scale + zero in float32 from bf16 scale and zero. A b-bit level q
    becomes the 4-bit level q4 = q + 8 - h (h = 2**(b - 1)) with the same step, so 1- to 3-bit tensors use
    the 4-bit kernel; scale is the step rounded to bf16, zero the value of level h with that step
    (lo + h * scale, or (h - zp) * scale) rounded to bf16. A bf16 step is exact and only zero rounds, by at
    most 2**-8 |zero|; a float16 or float32 step rounds too, level q moving by at most |q - h| * 2**-8 * step.
    Range groups (float32 min and max, `lerp`) take step = (max - min) / (2**b - 1) (`group_step`). Each weight is thus
    within 3 * 2**-8 of its group's largest |w| (2**-8 for bf16 steps): docs/inference.md.
    """
    out, length = entry["shape"]
    group, h = row_group(entry), 2 ** (entry["index_bits"] - 1)
    q = entry_indices(entry, tensors).view(out, length).to(torch.int32).add_(8 - h)
    p = entry_params(entry, tensors)
    scale = group_step(entry, p).bfloat16().float()
    zero = (h - p["zero"]) * scale if "zero" in p else p["lo"] + h * scale
    scales_and_zeros = torch.stack([scale, zero], -1).bfloat16().view(out, length // group, 2).transpose(0, 1)
    pad = -out % INT4_ROWS  # rows of level 8 and scale 0: zeros, cut from the output
    q, scales_and_zeros = F.pad(q, (0, 0, 0, pad), value=8), F.pad(scales_and_zeros, (0, 0, 0, pad))
    return int4_kernel()[0](q.contiguous(), 2), scales_and_zeros.contiguous(), group


class Int4Linear(nn.Module):
    """An nn.Linear whose weight stays 4-bit in memory: torch's int4 weight-only CPU kernel, the input rounded
    to bf16 for it (its float32 path was 9 to 45 times slower than a dense matmul in a quick check), the
    output back in the input's dtype, the bias added in that dtype."""

    def __init__(self, linear: nn.Linear, entry: dict, tensors: dict[str, torch.Tensor]):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight, scales_and_zeros, self.group = int4_weights(entry, tensors)
        self.register_buffer("weight_int4", weight, persistent=False)
        self.register_buffer("scales_and_zeros", as_bits(scales_and_zeros), persistent=False)
        self.register_parameter("bias", linear.bias)  # a kept tensor: loaded with the others

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, group={self.group}, bias={self.bias is not None}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).to(torch.bfloat16).contiguous()
        y = int4_kernel()[1](flat, self.weight_int4, self.group, self.scales_and_zeros.view(torch.bfloat16))
        y = y[:, : self.out_features].to(x.dtype).reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias


def lowbit_layout(entry: dict) -> bool:
    """Whether qdistill's kernel layout holds this tensor, viewed [out, in*...]: row groups (the last one in a row
    may be shorter), uniform levels at 1 to 8 bits or learned points at 1 to 4."""
    learned = entry["kind"] == "learned"
    return entry["kind"] in ("uniform", "learned") and within_rows_group(entry) is not None and entry["index_bits"] <= (4 if learned else 8)


def lowbit_fits(entry: dict) -> bool:
    """Whether qdistill's kernel multiplies by this tensor: in its layout (`lowbit_layout`), 2-D, an even
    number of inputs in groups of an even size."""
    return lowbit_layout(entry) and len(entry["shape"]) == 2 and lowbit.fits(entry["shape"][1], within_rows_group(entry), entry["index_bits"], entry["kind"] == "learned")


def lowbit_ready(entry: dict) -> bool:
    """Whether qdistill's own kernel can run this tensor (as the weight of an nn.Linear)."""
    return lowbit_fits(entry) and lowbit.library() is not None


def lowbit_rows_ready(entry: dict) -> bool:
    """Whether this tensor (2-D or more) can be held in qdistill's kernel layout and decoded by its C row lookup."""
    return lowbit_layout(entry) and len(entry["shape"]) >= 2 and lowbit.library() is not None


def lowbit_weights(entry: dict, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The kernel's codes, each group's scale and offset, and for learned points their table, as it holds them
    (w = level * scale + offset in float32, the level being the code or its point): the file's step and
    minimum, -zero point * step, or a range's max - min over the top level (2**b - 1, or 1 for points: `group_step`)
    and min."""
    out, length = entry["shape"][0], math.prod(entry["shape"][1:])
    bits, group, learned = entry["index_bits"], within_rows_group(entry), entry["kind"] == "learned"
    p = entry_params(entry, tensors)
    scale = group_step(entry, p)
    offset = -p["zero"] * scale if "zero" in p else p["lo"]
    weights = {
        "codes": lowbit.pack_codes(checked_indices(entry, tensors).view(out, length), bits),
        "scale": lowbit.pack_params(scale.view(out, lowbit.groups_of(length, group))),
        "offset": lowbit.pack_params(offset.view(out, lowbit.groups_of(length, group))),
    }
    if learned:
        weights["points"] = lowbit.table(tensors["points"][entry["points"] : entry["points"] + entry["n_points"]])
    return weights


class LowBitWeights(nn.Module):
    """A quantized tensor as qdistill's kernel holds it (`lowbit_weights`), possibly shared by a layer and the
    embeddings tied to it: float buffers are kept as their bits, which model.to(dtype) leaves alone. `matmul`:
    checked for the kernel's matmul (else only decoded by rows)."""

    def __init__(self, entry: dict, tensors: dict[str, torch.Tensor], matmul: bool = True):
        super().__init__()
        self.rows, self.bits, self.group, self.for_matmul = entry["shape"][0], entry["index_bits"], within_rows_group(entry), matmul
        weights = lowbit_weights(entry, tensors)
        for key, value in weights.items():
            self.register_buffer(key, as_bits(value), persistent=False)
        self.learned = "points" in weights
        self.kernel_args()  # checked once: each call checks its input

    def float_buffers(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        points = self.points.view(torch.float32) if self.learned else None
        return self.scale.view(torch.float32), self.offset.view(torch.float32), points

    def kernel_args(self) -> tuple:
        """`lowbit.weight_args` of the buffers, checked, kept while the buffers are these same tensors at the same
        addresses (a plain attribute: a model moved, converted or put in shared memory gets new storage, whose
        arguments are taken and checked again)."""
        held, buffers = self.__dict__.get("_kernel_args", ((), ())), [(b, b.data_ptr()) for b in self._buffers.values()]
        if len(held[0]) != len(buffers) or any(a is not b or p != q for (a, p), (b, q) in zip(held[0], buffers)):
            if not self.codes.is_cpu:
                raise QDistillError(REFUSED)
            operands = (self.codes, self.bits, self.group, *self.float_buffers())
            lowbit.check_weights(*operands, matmul=self.for_matmul)
            self.__dict__["_kernel_args"] = held = (buffers, lowbit.weight_args(*operands))
        return held[1]

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "_kernel_args"}  # pointers of this process

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """x [rows, in] (float32 on the kernel, any float dtype decoded) times the weight, transposed, plus
        `bias`: [rows, out] float32."""
        lib = lowbit.library()
        if lib is None or x.dtype != torch.float32:
            scale, offset, points = self.float_buffers()
            return lowbit.matmul(x, self.codes, self.bits, self.group, scale, offset, self.rows, points, bias, weights_checked=True)
        x = x.contiguous()
        lowbit.check_input(x, self._buffers["codes"], 1)
        return lowbit.call(lib.linear, x, self.kernel_args(), self.rows, bias, lowbit.threads_for(x.shape[0] * x.shape[1] * self.rows))

    def rows_of(self, ids: torch.Tensor) -> torch.Tensor:
        """The weight's rows `ids` (flat, in range) decoded to float32: only those rows are read."""
        self.kernel_args()  # the buffers still on the CPU, as checked
        return lowbit.rows(self.codes, self.bits, self.group, *self.float_buffers(), ids)

    def recurrent(self, gx: torch.Tensor, h: torch.Tensor, c: torch.Tensor | None = None, bias_hh: torch.Tensor | None = None) -> torch.Tensor:
        """An LSTM layer's (c its cell state) or a GRU layer's (c None) outputs [B, T, H] for its input projections
        gx [B, T, G·H] (`lowbit.recurrent`), this weight its recurrent one [G·H, H]; h (and c) [B, H], the
        initial state, end as the last."""
        lib = lowbit.library()
        self.kernel_args()
        if lib is not None:
            return lowbit.recurrent(lib.recurrent, gx.contiguous(), self.codes, self.bits, self.group, *self.float_buffers(), h, c, bias_hh, weights_checked=True)
        weight, outputs = self.rows_of(torch.arange(self.rows)), []  # a process where the kernel does not build
        for t in range(gx.shape[1]):
            hidden = h @ weight.T + (0 if bias_hh is None else bias_hh)
            if c is not None:
                i, f, u, o = (gx[:, t] + hidden).chunk(4, 1)
                c.copy_(f.sigmoid() * c + i.sigmoid() * u.tanh())
                h.copy_(o.sigmoid() * c.tanh())
            else:
                (xr, xz, xn), (hr, hz, hn) = gx[:, t].chunk(3, 1), hidden.chunk(3, 1)
                r, z = (xr + hr).sigmoid(), (xz + hz).sigmoid()
                h.copy_((1 - z) * (xn + r * hn).tanh() + z * h)
            outputs.append(h.clone())
        return torch.stack(outputs, 1)


REFUSED = "the kernels runtime runs inference on the CPU: keep the model on the CPU, under torch.no_grad(), or load it dense to train or move it"


def refuse_training(x: torch.Tensor) -> None:
    if not x.is_cpu or (x.requires_grad and torch.is_grad_enabled()):
        raise QDistillError(REFUSED)


class LowBitLinear(nn.Module):
    """An nn.Linear whose weight stays as its 2-, 4- or 8-bit codes in memory (other widths in the next one up;
    learned points by table lookup), multiplied by qdistill's own kernel in float32 (`lowbit`), the bias
    added in the input's dtype."""

    def __init__(self, linear: nn.Linear, entry: dict, tensors: dict[str, torch.Tensor]):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight_lowbit = LowBitWeights(entry, tensors)
        self.register_parameter("bias", linear.bias)  # a kept tensor: loaded with the others

    def extra_repr(self) -> str:
        w = self.weight_lowbit
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={w.bits}, group={w.group}, learned={w.learned}, bias={self.bias is not None}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        refuse_training(x)
        weights, bias = self._modules["weight_lowbit"], self._parameters["bias"]  # the plain dicts: this runs per call
        if x.dtype == torch.float32 and (bias is None or bias.dtype == torch.float32):  # the bias added by the kernel
            y = weights.matmul(x.reshape(-1, self.in_features), bias)
            return y if x.dim() == 2 else y.view(*x.shape[:-1], self.out_features)
        y = weights.matmul(x.reshape(-1, self.in_features).float())
        y = y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
        return y if bias is None else y + bias


class LowBitEmbedding(nn.Module):
    """An nn.Embedding whose weight stays in qdistill's kernel layout (shared with the output layer it is tied
    to, if any): a lookup decodes only the rows it reads."""

    def __init__(self, embedding: nn.Embedding, weights: LowBitWeights):
        super().__init__()
        self.num_embeddings, self.embedding_dim = embedding.num_embeddings, embedding.embedding_dim
        self.weight_lowbit = weights

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, bits={self.weight_lowbit.bits}, group={self.weight_lowbit.group}"

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        refuse_training(ids)
        flat = ids.reshape(-1)
        if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= self.num_embeddings):
            raise IndexError("index out of range in self")  # as nn.Embedding says it
        return self.weight_lowbit.rows_of(flat).view(*ids.shape, self.embedding_dim)


RECURRENT = (nn.LSTM, nn.GRU)


class LowBitRNN(nn.Module):
    """An nn.LSTM or nn.GRU (one direction, no projection) whose weights stay as their codes: each layer's input
    projection for all steps is one kernel call (with the input bias, and an LSTM's recurrent bias), its
    recurrence one call of `lowbit_recurrent`, which multiplies the hidden state by the recurrent weights at
    each step. Inference only, on tensors (not PackedSequence)."""

    def __init__(self, rnn: nn.LSTM | nn.GRU, entries: dict[str, dict], tensors: dict[str, torch.Tensor]):
        super().__init__()
        self.mode, self.input_size, self.hidden_size, self.num_layers = type(rnn).__name__, rnn.input_size, rnn.hidden_size, rnn.num_layers
        self.batch_first = rnn.batch_first
        self.input_weights = nn.ModuleList(LowBitWeights(entries[f"weight_ih_l{k}"], tensors) for k in range(self.num_layers))
        self.recurrent_weights = nn.ModuleList(LowBitWeights(entries[f"weight_hh_l{k}"], tensors) for k in range(self.num_layers))
        for k in range(self.num_layers):  # kept tensors: loaded with the others, under their own names
            for name in (f"bias_ih_l{k}", f"bias_hh_l{k}"):
                self.register_parameter(name, getattr(rnn, name, None))

    def extra_repr(self) -> str:
        w = self.input_weights[0]
        return f"{self.mode}, {self.input_size}, {self.hidden_size}, num_layers={self.num_layers}, batch_first={self.batch_first}, bits={w.bits}, group={w.group}"

    @staticmethod
    def ready(rnn: nn.Module, entries: dict[str, dict]) -> bool:
        """Whether `rnn` is a plain nn.LSTM or nn.GRU, one direction, no projection, whose weights are all in
        `entries` (quantized, each used once) on qdistill's kernel."""
        if type(rnn) not in RECURRENT or rnn.bidirectional or getattr(rnn, "proj_size", 0):
            return False
        names = [f"weight_{kind}_l{k}" for k in range(rnn.num_layers) for kind in ("ih", "hh")]
        return all(name in entries and lowbit_ready(entries[name]) for name in names)

    def forward(self, input: torch.Tensor, hx: torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None = None):
        if not isinstance(input, torch.Tensor):
            raise QDistillError("the kernels runtime runs an LSTM or GRU on padded tensors, not a PackedSequence: load the model dense (--runtime dense) to run packed sequences")
        refuse_training(input)
        lstm, unbatched = self.mode == "LSTM", input.dim() == 2
        x = input.unsqueeze(0) if unbatched else input if self.batch_first else input.transpose(0, 1)
        batch, steps = x.shape[:2]
        if hx is None:
            states = [torch.zeros(self.num_layers, batch, self.hidden_size)] * (2 if lstm else 1)
        else:
            states = [t.unsqueeze(1) if unbatched else t for t in (hx if lstm else (hx,))]
        x, finals = x.float(), []
        for k in range(self.num_layers):
            b_ih, b_hh = getattr(self, f"bias_ih_l{k}"), getattr(self, f"bias_hh_l{k}")
            bias = (b_ih + b_hh if lstm else b_ih) if b_ih is not None else None
            gx = self.input_weights[k].matmul(x.reshape(batch * steps, -1).float(), None if bias is None else bias.float())
            state = [t[k].float().contiguous().clone() for t in states]
            x = self.recurrent_weights[k].recurrent(gx.view(batch, steps, -1), *state, bias_hh=None if lstm or b_hh is None else b_hh.float())
            finals.append(state)
        out = x.to(input.dtype)
        last = [torch.stack([f[i] for f in finals]).to(input.dtype) for i in range(len(states))]
        if unbatched:
            out, last = out.squeeze(0), [t.squeeze(1) for t in last]
        elif not self.batch_first:
            out = out.transpose(0, 1)
        return out, (tuple(last) if lstm else last[0])


KERNELS = {"lowbit": LowBitLinear, "int4": Int4Linear}


class DecodedPerCall(nn.Module):
    """A quantized tensor held packed, decoded when called (`forward`): attached to the modules that use it."""

    def attach(self, module: nn.Module, name: str) -> None:
        """Replace `module`'s parameter `name`: decoded before each call of the module, None between calls
        (so memory stays small). Modules whose weight another module's code reads (nn.MultiheadAttention's
        out_proj) would see None: load those with the dense runtime."""
        del module._parameters[name]
        module.add_module(f"{name}_packed", self)
        setattr(module, name, None)  # via the module's __setattr__: an LSTM's flat weight list follows
        module.register_forward_pre_hook(functools.partial(self.decode_into, name))  # partials of methods: the model pickles
        module.register_forward_hook(functools.partial(self.release, name))

    def decode_into(self, name: str, module: nn.Module, args) -> None:
        setattr(module, name, self())

    def release(self, name: str, module: nn.Module, args, out) -> None:
        setattr(module, name, None)


class LowBitRows(DecodedPerCall):
    """A quantized tensor (a convolution's weight, say) in qdistill's kernel layout, decoded whole by its C
    row lookup at each call: within float rounding of the dense loader's values, many times faster than
    `PackedTensor`'s decoding. `scale_rows` folds a per-output factor in (a following batch norm's)."""

    def __init__(self, entry: dict, tensors: dict[str, torch.Tensor]):
        super().__init__()
        self.shape = tuple(entry["shape"])
        self.weight_lowbit = LowBitWeights(entry, tensors, matmul=False)

    def forward(self) -> torch.Tensor:
        w = self.weight_lowbit
        w.kernel_args()  # the buffers still on the CPU, as checked
        return lowbit.decoded(w.codes, w.bits, w.group, *w.float_buffers(), w.rows).view(self.shape)

    def scale_rows(self, factor: torch.Tensor) -> None:
        """Multiply output row n of the tensor by factor[n] (in its scales and offsets, in place)."""
        packed = lowbit.pack_params(factor.float()[:, None])  # [panels, 1, 8]: one value a row, laid out as the scales are
        for t in self.weight_lowbit.float_buffers()[:2]:
            t.mul_(packed)


class PackedTensor(DecodedPerCall):
    """One quantized tensor as the file stores it (bit-packed indices, group values in their own dtype);
    calling it decodes it exactly as the dense loader does (`decode_entry`)."""

    def __init__(self, entry: dict, tensors: dict[str, torch.Tensor]):
        super().__init__()
        self.entry, self.blobs = dict(entry), {}
        for key, blob, span in entry_spans(entry):
            if span:  # a copy: the file's blobs are freed after loading
                self.register_buffer(key, as_bits(tensors[blob][entry[key] : entry[key] + span].clone()), persistent=False)
                self.entry[key], self.blobs[key] = 0, (blob, tensors[blob].dtype)
        self()  # decoded once here, so a crafted file fails while loading, as with the dense loader

    def forward(self) -> torch.Tensor:
        return decode_entry(self.entry, {blob: getattr(self, key).view(dtype) for key, (blob, dtype) in self.blobs.items()})


def keep_packed(model: nn.Module, meta: dict, tensors: dict[str, torch.Tensor], dense_below: int = 0, tune_batch: int | None = None) -> list[dict]:
    """Make `model` hold its quantized tensors packed (low-bit kernels, else `PackedTensor`); return the entries
    left to decode dense: those under `dense_below` values, the kernel-ready layers of shapes that run faster
    dense at `tune_batch` rows (`fastest`: more memory, less time), and names the model lacks (the loader reports them).

    An embedding in the kernel layout looks up its rows (`LowBitEmbedding`); tied to an nn.Linear on qdistill's
    kernel, it shares that layer's codes. Any other tensor tied to other names is one `PackedTensor` for all."""
    owners = {}
    for alias, name in meta.get("aliases", {}).items():
        owners.setdefault(name, []).append(alias)
    params = dict(model.named_parameters(remove_duplicate=False))
    uses_of = {e["name"]: [e["name"], *owners.get(e["name"], [])] for e in meta["quantized"]}
    dense, rest, done = [], [], set()
    for path, module in [(p, m) for p, m in model.named_modules() if p and type(m) in RECURRENT]:
        prefix = f"{path}."
        entries = {e["name"][len(prefix) :]: e for e in meta["quantized"] if e["name"].startswith(prefix) and uses_of[e["name"]] == [e["name"]] and math.prod(e["shape"]) >= dense_below}
        if LowBitRNN.ready(module, entries):
            replace_module(model, module, LowBitRNN(module, entries, tensors))
            done |= {f"{prefix}weight_{kind}_l{k}" for k in range(module.num_layers) for kind in ("ih", "hh")}
    for e in meta["quantized"]:
        uses = uses_of[e["name"]]
        if e["name"] in done:
            continue
        if math.prod(e["shape"]) < dense_below or not all(u in params for u in uses):
            dense.append(e)
            continue
        linears = [m for m in (weight_of(model, use, nn.Linear) for use in uses) if m is not None]
        embeddings = [m for m in (weight_of(model, use, nn.Embedding) for use in uses) if m is not None and m.max_norm is None]
        as_layers = len(linears) + len(embeddings) == len(uses) and len(linears) <= 1
        ways = tuple(k for k, ready in (("lowbit", lowbit_ready), ("int4", int4_ready)) if ready(e) and (k == "lowbit" or not embeddings)) if linears and as_layers else ()
        if ways:
            way = fastest(tuple(e["shape"]), within_rows_group(e), e["index_bits"], e["kind"] == "learned", tune_batch, ways) if tune_batch else ways[0]
            if way == "dense":
                dense.append(e)
                continue
            replace_module(model, linears[0], layer := KERNELS[way](linears[0], e, tensors))
            for embedding in embeddings:
                replace_module(model, embedding, LowBitEmbedding(embedding, layer.weight_lowbit))
        elif as_layers and not linears and lowbit_fits(e):
            weights = LowBitWeights(e, tensors)
            for embedding in embeddings:
                replace_module(model, embedding, LowBitEmbedding(embedding, weights))
        else:
            rest.append(e)
    for e in rest:  # after every kernel replacement: a quantized bias is attached to the module that runs it
        store = LowBitRows(e, tensors) if lowbit_rows_ready(e) else PackedTensor(e, tensors)
        for use in uses_of[e["name"]]:
            store.attach(model.get_submodule(use.rpartition(".")[0]), use.rpartition(".")[2])
    return dense


CONVS, NORMS = (nn.Conv1d, nn.Conv2d, nn.Conv3d), (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def fold_batch_norms(model: nn.Module) -> None:
    """In each nn.Sequential, fold a batch norm (eval mode, running statistics) into the convolution before it
    whose weight is a `LowBitRows` of its own: the norm's per-channel scale goes into the weight's scales and
    offsets, its shift into the convolution's bias, and the norm becomes nn.Identity (one pass over the
    activations less; outputs within float rounding). Run after the model's tensors are loaded."""
    owners = {}  # how many places hold each module (a module repeated in one Sequential counts each time)
    for module in model.modules():
        for child in module._modules.values():
            owners[id(child)] = owners.get(id(child), 0) + 1
    for sequence in [m for m in model.modules() if type(m) is nn.Sequential]:  # a subclass may run its children otherwise
        children = list(sequence._modules.items())
        for (_, conv), (name, norm) in zip(children, children[1:]):
            store = conv._modules.get("weight_packed") if type(conv) in CONVS else None
            if not isinstance(store, LowBitRows) or "bias_packed" in conv._modules or any(owners.get(id(m)) != 1 for m in (store, conv, norm)):
                continue
            if type(norm) not in NORMS or norm.training or norm.running_mean is None or norm.num_features != conv.out_channels:
                continue
            factor = torch.rsqrt(norm.running_var.float() + norm.eps) * (norm.weight.float() if norm.affine else 1)
            shift = (norm.bias.float() if norm.affine else 0) - norm.running_mean.float() * factor
            store.scale_rows(factor)
            bias = shift if conv.bias is None else conv.bias.float() * factor + shift
            conv.bias = nn.Parameter(bias.detach().to(norm.running_mean.dtype), requires_grad=False)
            setattr(sequence, name, nn.Identity())


def fastest(shape: tuple[int, int], group: int, bits: int, learned: bool, batch: int, ways: tuple[str, ...]) -> str:
    """The fastest of the kernels `ways` and a dense float32 matmul ("dense") for this layer shape at `batch`
    rows on this machine (small layers at large batches can lose on a kernel): timed once per machine, shape,
    group, width, kind of levels and batch on random weights, and kept in the cache's table of choices."""
    path = choices_path()
    table = choices(path)
    key = f"{shape[0]}x{shape[1]} group {group} bits {bits}{' learned' if learned else ''} rows {batch} ways {'+'.join(ways)}"
    if table.get(key) not in ("dense", *ways):
        table[key] = time_ways(tuple(shape), group, bits, learned, batch, ways)
        save_choices(table, path)
    return table[key]


@functools.cache
def choices(path: Path) -> dict[str, str]:
    """This machine's table of timed choices (`fastest`) at `path` (`choices_path`), or empty where it is absent,
    damaged, or not this user's own; entries are only ever compared with the names of ways."""
    try:
        check_cache_entry(path)
        table = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError, QDistillError):
        return {}
    return {k: v for k, v in table.items() if isinstance(k, str) and isinstance(v, str)} if isinstance(table, dict) else {}


def choices_path() -> Path:
    """kernels/choices-<machine>.json in the cache, keyed by the kernel's source, torch's version, the CPU and the thread count."""
    machine = " ".join((torch.__version__, platform.machine(), str(torch.get_num_threads()), *sorted(lowbit.cpu_flags())))
    return cache_dir() / "kernels" / f"choices-{hashlib.sha256(lowbit.SOURCE.read_bytes() + machine.encode()).hexdigest()[:16]}.json"


def save_choices(table: dict[str, str], path: Path) -> None:
    """Write the table whole (a temporary file renamed over the old one); a cache that cannot be written keeps it for this process only."""
    partial = None
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd, partial = tempfile.mkstemp(dir=path.parent, suffix=".partial")
        with os.fdopen(fd, "w") as f:
            json.dump(table, f, indent=0, sort_keys=True)
        os.replace(partial, path)
    except OSError:
        if partial is not None and os.path.exists(partial):
            os.unlink(partial)


def time_ways(shape: tuple[int, int], group: int, bits: int, learned: bool, batch: int, ways: tuple[str, ...]) -> str:
    """`fastest`, timed here."""
    out, length = shape
    x = torch.randn(batch, length)
    runs = {"dense": functools.partial(F.linear, x, torch.randn(out, length))}
    if "lowbit" in ways:
        codes = lowbit.pack_codes(torch.randint(0, 2**bits, (out, length)), bits)
        scale, offset = (lowbit.pack_params(torch.rand(out, lowbit.groups_of(length, group))) for _ in range(2))
        points = lowbit.table(torch.rand(2**bits)) if learned else None
        runs["lowbit"] = functools.partial(lowbit.matmul, x, codes, bits, group, scale, offset, out, points)
    if "int4" in ways:
        rows = out + -out % INT4_ROWS
        kernel_weight = int4_kernel()[0](torch.full((rows, length), 8, dtype=torch.int32), 2)
        scales_and_zeros = torch.ones(length // group, rows, 2, dtype=torch.bfloat16)
        runs["int4"] = lambda: int4_kernel()[1](x.bfloat16(), kernel_weight, group, scales_and_zeros)[:, :out].float()
    return min(runs, key=lambda way: median_s(runs[way]))


def median_s(fn, calls: int = 7) -> float:
    """The median time of `calls` calls after a warm-up, under inference mode (as a model runs)."""
    with torch.inference_mode():
        fn()
        times = []
        for _ in range(calls):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def weight_of(model: nn.Module, name: str, kind: type) -> nn.Module | None:
    """The module of exactly type `kind` whose weight `name` is (not the model itself: not replaceable), else None."""
    path, _, param = name.rpartition(".")
    module = model.get_submodule(path)
    return module if path and type(module) is kind and param == "weight" else None


def runtime_of(model: nn.Module) -> dict[str, int]:
    """How many quantized tensors run each way: on qdistill's kernel (lowbit: Linear layers and the two matrices
    of each LSTM or GRU layer), on torch's (int4), packed (decoded per call, in C or by torch ops); and how many
    embeddings look up their rows in the kernel layout (lookup; a tied one shares a lowbit layer's codes)."""
    modules = list(model.modules())
    kinds = [type(m) for m in modules]
    recurrent = sum(2 * m.num_layers for m in modules if isinstance(m, LowBitRNN))
    return {"lowbit": kinds.count(LowBitLinear) + recurrent, "int4": kinds.count(Int4Linear), "lookup": kinds.count(LowBitEmbedding), "packed": kinds.count(PackedTensor) + kinds.count(LowBitRows)}
