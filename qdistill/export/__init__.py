"""The packed file format, its loader and size inspection; export to Hugging Face directories."""

from qdistill.export.hf import export_hf, save_pretrained_dir
from qdistill.export.packed import inspect_packed, is_packed, load_packed, read_packed, save_packed

__all__ = ["export_hf", "inspect_packed", "is_packed", "load_packed", "read_packed", "save_packed", "save_pretrained_dir"]
