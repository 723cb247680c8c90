"""Exporters of a packed file to other formats: Hugging Face directories (`hf`), ONNX (`onnx`) and GGUF (`gguf`),
the last two imported on use (their packages are optional). Builds on `qdistill.format` and `qdistill.runtime`."""

from qdistill.export.hf import export_hf, save_pretrained_dir

__all__ = ["export_hf", "save_pretrained_dir"]
