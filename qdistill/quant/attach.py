"""Attach quantizers to any ``nn.Module`` as PyTorch parametrizations, and take them off again.

After ``attach``, reading ``layer.weight`` gives the quantized tensor and the full-precision shadow
lives at ``layer.parametrizations.weight.original``: the optimizer steps the shadow, the forward
sees ``Q(w)``. BatchNorm statistics are therefore gathered with the quantized weights.

A tensor shared by several modules (an embedding tied to the output layer, ``head.weight = emb.weight``)
is one quantized tensor: every module holding it gets the same quantizer instance on the same shadow
Parameter (a parametrization keeps the Parameter object as its ``original``), so all of them read one
Q(w) and the optimizer sees one shadow. With stochastic rounding each read draws its own rounding.
"""

from __future__ import annotations

import copy
import sys
import weakref
from dataclasses import dataclass, field
from fnmatch import fnmatch

import torch
from torch import nn
from torch.nn.utils import parametrize

from qdistill.errors import QDistillError
from qdistill.quant.base import Quantizer
from qdistill.quant.learned import LearnedPointsQuantizer

DEFAULT_TYPES: tuple[type[nn.Module], ...] = (
    nn.Linear,
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.Embedding,
    nn.RNNBase,  # LSTM, GRU, RNN: every weight_* tensor
)


def default_types() -> tuple[type[nn.Module], ...]:
    """DEFAULT_TYPES, and GPT-2's Conv1D (a Linear whose weight is stored [in, out]) once transformers has
    loaded it: a model holding one has. Its buckets run along the flattened weight, as every tensor's do."""
    conv1d = getattr(sys.modules.get("transformers.pytorch_utils"), "Conv1D", None)
    return DEFAULT_TYPES + ((conv1d,) if conv1d else ())


Use = tuple[str, nn.Module, str]  # a tensor's name, and the module and attribute holding it there


@dataclass
class QuantizedTensor:
    name: str  # e.g. "features.0.weight"; a tied tensor's first name
    module: nn.Module
    param: str
    quantizer: Quantizer
    tied: list[Use] = field(default_factory=list)  # the tensor's other uses: same shadow, same quantizer

    @property
    def shadow(self) -> torch.Tensor:
        return self.module.parametrizations[self.param].original


def _weight_names(module: nn.Module) -> list[str]:
    if isinstance(module, nn.RNNBase):
        return [n for n, _ in module.named_parameters(recurse=False) if n.startswith("weight")]
    return ["weight"] if isinstance(getattr(module, "weight", None), nn.Parameter) else []


def _uses(model: nn.Module) -> dict[int, list[Use]]:
    """Every use of each parameter, by the parameter's id, in module order: a tied tensor has several."""
    uses: dict[int, list[Use]] = {}
    for mod_name, module in model.named_modules():
        for param, t in module.named_parameters(recurse=False, remove_duplicate=False):
            uses.setdefault(id(t), []).append((f"{mod_name}.{param}" if mod_name else param, module, param))
    return uses


def select(
    model: nn.Module,
    types: tuple[type[nn.Module], ...] | None = None,
    include: list[str] | None = None,
    exclude: list[str] | None = None,
    keep_first_last: bool = False,
) -> list[Use]:
    """Tensors to quantize: weights of `types` (default: `default_types()`), filtered by glob patterns on the
    tensor name ("features.*.weight", "*embed*"); with keep_first_last, the first and last selected *layers* stay full precision.

    A tied tensor is one tensor with several names, selected once (under its first name) or not at all:
    it is selected if one of its names is included and none is excluded, and a kept first or last layer
    keeps it in full precision everywhere. Quantizing it in one module only is impossible: they share it.
    """
    types = types or default_types()
    uses = _uses(model)

    def wanted(t: torch.Tensor) -> bool:
        names = [name for name, _, _ in uses[id(t)]]
        if include and not any(fnmatch(n, p) for n in names for p in include):
            return False
        return not (exclude and any(fnmatch(n, p) for n in names for p in exclude))

    layers = []
    for module in model.modules():
        if isinstance(module, types):
            tensors = [t for t in (getattr(module, p) for p in _weight_names(module)) if wanted(t)]
            if tensors:
                layers.append(tensors)
    kept = {id(t) for layer in (layers[:1] + layers[-1:] if keep_first_last else []) for t in layer}
    chosen = {id(t): uses[id(t)][0] for layer in layers for t in layer if id(t) not in kept}
    return list(chosen.values())


def attach(model: nn.Module, quantizer: Quantizer, by_name: dict[str, Quantizer] | None = None, **select_kwargs) -> list[QuantizedTensor]:
    """Give every selected tensor its own copy of `quantizer` (shared by the modules that share the tensor), or
    of the quantizer of the first `by_name` glob pattern that one of its names matches; returns what was attached.

    Takes the same keyword arguments as `select`. A model can carry one set of quantizers at a time.
    """
    if quantized_tensors(model):
        raise QDistillError("the model already has quantizers attached; call qdistill.detach(model) first")
    chosen = select(model, **select_kwargs)
    if not chosen:
        raise QDistillError("no tensor matched: nothing to quantize (check the layer types and name patterns)")
    uses = _uses(model)
    weights = [getattr(module, param) for _, module, param in chosen]
    names = {id(w): [name for name, _, _ in uses[id(w)]] for w in weights}
    by_name = by_name or {}
    unmatched = [p for p in by_name if not any(fnmatch(n, p) for tensor_names in names.values() for n in tensor_names)]
    if unmatched:
        raise QDistillError(f"no quantized tensor is named like {', '.join(map(repr, unmatched))} (bucket_by_name): check the pattern against the tensor names")
    for _, module, param in chosen:
        weight = getattr(module, param)
        q = copy.deepcopy(next((q for p, q in by_name.items() if any(fnmatch(n, p) for n in names[id(weight)])), quantizer))
        if isinstance(q, LearnedPointsQuantizer):
            q.init_points(weight)
        q.to(weight.device)
        for _, holder, name in uses[id(weight)]:  # every module sharing the tensor, whatever its type
            parametrize.register_parametrization(holder, name, q)
            if isinstance(holder, nn.RNNBase) and "_parametrize_deepcopy" not in vars(type(holder)):
                cls = type(holder)  # the class parametrize made for this module alone
                cls._parametrize_deepcopy, cls.__deepcopy__ = cls.__deepcopy__, _deepcopy_rnn
    return quantized_tensors(model)


def _deepcopy_rnn(self: nn.RNNBase, memo: dict) -> nn.RNNBase:
    """Deepcopy of a quantized RNN, which keeps the last forward's Q(w) (with autograd history, which
    deepcopy refuses) in `_flat_weights`: they become detached copies first. Each forward still rebuilds
    the list, from fresh reads of the weights: the weak references it checks point to those copies."""
    self._flat_weights = [None if w is None else w.detach() for w in self._flat_weights]
    self._flat_weight_refs = [None if w is None else weakref.ref(w) for w in self._flat_weights]
    return type(self)._parametrize_deepcopy(self, memo)


def quantized_tensors(model: nn.Module) -> list[QuantizedTensor]:
    """The quantized tensors, each once: a tied tensor under its first name, its other uses in `tied`."""
    found: dict[int, QuantizedTensor] = {}
    for mod_name, module in model.named_modules():
        if not parametrize.is_parametrized(module):
            continue
        for param, plist in module.parametrizations.items():
            q = next((m for m in plist if isinstance(m, Quantizer)), None)
            if q is None:
                continue
            name = f"{mod_name}.{param}" if mod_name else param
            if id(plist.original) in found:
                found[id(plist.original)].tied.append((name, module, param))
            else:
                found[id(plist.original)] = QuantizedTensor(name, module, param, q)
    return list(found.values())


def _remove(module: nn.Module, param: str, leave_parametrized: bool) -> None:
    # copy.deepcopy shares a parametrized module's generated class with the original, and removal edits
    # that class: give this module a private copy first, so detaching a copy leaves the original intact
    cls = type(module)
    module.__class__ = type(cls.__name__, cls.__bases__, dict(cls.__dict__))
    parametrize.remove_parametrizations(module, param, leave_parametrized=leave_parametrized)
    if isinstance(module, nn.RNNBase):
        module._init_flat_weights()  # drop the last forward's Q(w): the plain module's deepcopy refuses them


def detach(model: nn.Module, keep_quantized: bool = True) -> nn.Module:
    """Remove the quantizers; the weights become Q(w) (default) or the full-precision shadow.

    Each shadow Parameter stays in place (only its data becomes Q(w)), so tied modules stay tied.
    """
    for qt in quantized_tensors(model):
        qt.quantizer.eval()  # bake the shipped rounding (to nearest), never a stochastic draw of training mode
        for _, module, param in qt.tied:  # to the shadow first: leaving these quantized would quantize Q(w) a second time
            _remove(module, param, leave_parametrized=False)
        _remove(qt.module, qt.param, keep_quantized)
    return model
