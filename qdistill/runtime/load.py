"""Loading a packed file (`qdistill.format`) into a runnable model: its weights decoded to float32 (dense), or
kept packed on low-bit kernels (`qdistill.runtime.kernels`)."""

from __future__ import annotations

import ctypes
import math
from pathlib import Path

from torch import nn

from qdistill.errors import QDistillError
from qdistill.format.packed import decode_entry, read_packed
from qdistill.models import build_model, load_state
from qdistill.models.hf import Held
from qdistill.quant.base import check_choice
from qdistill.runtime.kernels import fold_batch_norms, keep_packed

RUNTIMES = ("dense", "kernels")  # load_packed: float32 weights, or kept packed (qdistill.runtime.kernels)


def held(meta: dict) -> Held:
    """The tensors of a layout `check_layout` accepted, and their values (a tied use, an alias, holds none of its own)."""
    entries = meta["quantized"] + meta["kept"]
    return Held(len(entries), sum(math.prod(e["shape"]) for e in entries))


def load_packed(
    path: str | Path, model: nn.Module | None = None, trust_code: bool = False, runtime: str = "dense", dense_below: int = 0, tune_batch: int | None = None
) -> tuple[nn.Module, dict]:
    """Rebuild a runnable float model whose weights equal the quantized model's, bit for bit.

    The architecture is `model` when given (the caller's own), else the file's spec: a qdistill
    preset, rebuilt from data alone, or, only with `trust_code`, a factory the file names.
    `runtime="kernels"` keeps the quantized tensors packed in memory and runs them on low-bit kernels
    where they fit, decoding the others at each call (CPU, float32: `qdistill.runtime.kernels`); tensors
    of fewer than `dense_below` values are decoded once instead. With `tune_batch`, each kernel layer's
    shape runs the way that was fastest at that many rows when timed on this machine (once, kept in the
    cache: `kernels.fastest`): on a kernel, or decoded once
    (more memory for those, less time).
    Heap memory freed while loading is handed back to the system (`release_freed_memory`)."""
    check_choice("runtime", runtime, RUNTIMES)
    if tune_batch is not None and (runtime != "kernels" or type(tune_batch) is not int or tune_batch < 1):
        raise QDistillError(f"tune_batch (--tune-batch) is a number of rows, 1 or more, for the kernels runtime (--runtime kernels); got {tune_batch!r} with runtime {runtime}")
    meta, tensors = read_packed(path)
    if model is None:
        model = build_model(meta.get("spec"), trust_code=trust_code, source=str(path), held=held(meta))
    expected = model.state_dict()
    shapes = {e["name"]: e["shape"] for e in meta["quantized"] + meta["kept"]}
    shapes |= {alias: shapes[name] for alias, name in meta.get("aliases", {}).items()}  # a tied use has its tensor's shape
    for name, shape in shapes.items():  # before decoding: the file's shapes must be the model's
        if name in expected and list(expected[name].shape) != shape:
            raise QDistillError(f"weights in {path} do not fit the model {type(model).__name__}: {name} is {shape}, the model's {list(expected[name].shape)}")
    for e in meta["kept"]:  # kept as stored, never cast: float weights in an integer blob are a crafted file
        if e["name"] in expected and tensors[e["blob"]].dtype != expected[e["name"]].dtype:
            raise QDistillError(f"{path}: {e['name']!r} is stored as {tensors[e['blob']].dtype}, the model's is {expected[e['name']].dtype}: a damaged or crafted file")
    dense = meta["quantized"]
    if runtime == "kernels":
        dense = keep_packed(model, meta, tensors, dense_below, tune_batch)
        model.requires_grad_(False)  # an inference model: plain calls need no torch.no_grad()
    state = {e["name"]: decode_entry(e, tensors) for e in dense}
    for e in meta["kept"]:
        state[e["name"]] = tensors[e["blob"]][e["offset"] : e["offset"] + math.prod(e["shape"])].view(e["shape"])
    for alias, name in meta.get("aliases", {}).items():  # tied tensors: loaded twice into one Parameter, same values
        if name in state:  # else kept packed, with its aliases
            state[alias] = state[name]
    model = load_state(model, state, path, f"the model {type(model).__name__}").eval()
    if runtime == "kernels":
        fold_batch_norms(model)
    del state, tensors, expected
    release_freed_memory()
    return model, meta


def release_freed_memory() -> None:
    """Hand the heap memory freed while loading (the file's blobs, decoding's temporaries, the weights the
    model was built with) back to the system: glibc keeps it resident otherwise, up to twice a kernel
    model's own memory. Nothing where the C library has no malloc_trim."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (AttributeError, OSError):
        pass
