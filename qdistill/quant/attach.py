"""Attach quantizers to any ``nn.Module`` as PyTorch parametrizations, and take them off again.

After ``attach``, reading ``layer.weight`` gives the quantized tensor and the full-precision shadow
lives at ``layer.parametrizations.weight.original``: the optimizer steps the shadow, the forward
sees ``Q(w)``. BatchNorm statistics are therefore gathered with the quantized weights.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
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


@dataclass
class QuantizedTensor:
    name: str  # e.g. "features.0.weight"
    module: nn.Module
    param: str
    quantizer: Quantizer

    @property
    def shadow(self) -> torch.Tensor:
        return self.module.parametrizations[self.param].original


def _weight_names(module: nn.Module) -> list[str]:
    if isinstance(module, nn.RNNBase):
        return [n for n, _ in module.named_parameters(recurse=False) if n.startswith("weight")]
    return ["weight"] if isinstance(getattr(module, "weight", None), nn.Parameter) else []


def select(
    model: nn.Module,
    types: tuple[type[nn.Module], ...] = DEFAULT_TYPES,
    include: list[str] | None = None,
    exclude: list[str] | None = None,
    keep_first_last: bool = False,
) -> list[tuple[str, nn.Module, str]]:
    """Tensors to quantize: weights of `types`, filtered by glob patterns on the tensor name
    ("features.*.weight"); with keep_first_last, the first and last selected *layers* stay full precision."""
    layers = []
    for mod_name, module in model.named_modules():
        if not isinstance(module, types):
            continue
        tensors = []
        for param in _weight_names(module):
            name = f"{mod_name}.{param}" if mod_name else param
            if include and not any(fnmatch(name, p) for p in include):
                continue
            if exclude and any(fnmatch(name, p) for p in exclude):
                continue
            tensors.append((name, module, param))
        if tensors:
            layers.append(tensors)
    if keep_first_last:
        layers = layers[1:-1]
    return [t for layer in layers for t in layer]


def attach(model: nn.Module, quantizer: Quantizer, **select_kwargs) -> list[QuantizedTensor]:
    """Give every selected tensor its own copy of `quantizer`; returns what was attached.

    Takes the same keyword arguments as `select`. A model can carry one set of quantizers at a time.
    """
    if quantized_tensors(model):
        raise QDistillError("the model already has quantizers attached; call qdistill.detach(model) first")
    chosen = select(model, **select_kwargs)
    if not chosen:
        raise QDistillError("no tensor matched: nothing to quantize (check the layer types and name patterns)")
    for _, module, param in chosen:
        q = copy.deepcopy(quantizer)
        weight = getattr(module, param)
        if isinstance(q, LearnedPointsQuantizer):
            q.init_points(weight)
        parametrize.register_parametrization(module, param, q.to(weight.device))
    return quantized_tensors(model)


def quantized_tensors(model: nn.Module) -> list[QuantizedTensor]:
    found = []
    for mod_name, module in model.named_modules():
        if not parametrize.is_parametrized(module):
            continue
        for param, plist in module.parametrizations.items():
            for q in plist:
                if isinstance(q, Quantizer):
                    found.append(QuantizedTensor(f"{mod_name}.{param}" if mod_name else param, module, param, q))
    return found


def detach(model: nn.Module, keep_quantized: bool = True) -> nn.Module:
    """Remove the quantizers; the weights become Q(w) (default) or the full-precision shadow."""
    for qt in quantized_tensors(model):
        # copy.deepcopy shares a parametrized module's generated class with the original, and removal edits
        # that class: give this module a private copy first, so detaching a copy leaves the original intact
        cls = type(qt.module)
        qt.module.__class__ = type(cls.__name__, cls.__bases__, dict(cls.__dict__))
        parametrize.remove_parametrizations(qt.module, qt.param, leave_parametrized=keep_quantized)
    return model
