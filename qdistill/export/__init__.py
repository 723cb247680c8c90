"""The packed file format, its loader and size inspection."""

from qdistill.export.packed import inspect_packed, is_packed, load_packed, read_packed, save_packed

__all__ = ["inspect_packed", "is_packed", "load_packed", "read_packed", "save_packed"]
