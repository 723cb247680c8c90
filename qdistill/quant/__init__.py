"""Quantizers (one file each) and attaching them to a model."""

from qdistill.quant.attach import DEFAULT_TYPES, QuantizedTensor, attach, default_types, detach, quantized_tensors, select
from qdistill.quant.base import Encoded, Quantizer, kernel_ready, pack_bits, packed_bytes, unpack_bits
from qdistill.quant.fused import fused_quantization
from qdistill.quant.learned import LearnedPointsQuantizer, redistribute_points
from qdistill.quant.uniform import UniformQuantizer

__all__ = [
    "DEFAULT_TYPES",
    "Encoded",
    "LearnedPointsQuantizer",
    "QuantizedTensor",
    "Quantizer",
    "UniformQuantizer",
    "attach",
    "default_types",
    "detach",
    "fused_quantization",
    "kernel_ready",
    "pack_bits",
    "packed_bytes",
    "quantized_tensors",
    "redistribute_points",
    "select",
    "unpack_bits",
]
