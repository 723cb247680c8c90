"""qdistill: make networks small by quantized distillation and differentiable quantization."""

from qdistill.errors import QDistillError
from qdistill.quant import LearnedPointsQuantizer, UniformQuantizer, attach, detach, quantized_tensors
from qdistill.distill import CachedTeacher, LiveTeacher, distillation_loss
from qdistill.train import METHODS, TrainConfig, train
from qdistill.format import inspect_packed, save_packed
from qdistill.runtime import load_packed

__all__ = [
    "QDistillError",
    "UniformQuantizer",
    "LearnedPointsQuantizer",
    "attach",
    "detach",
    "quantized_tensors",
    "distillation_loss",
    "LiveTeacher",
    "CachedTeacher",
    "METHODS",
    "TrainConfig",
    "train",
    "save_packed",
    "load_packed",
    "inspect_packed",
]
