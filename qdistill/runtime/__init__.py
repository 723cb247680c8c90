"""Running a packed file: `load_packed` rebuilds its model, dense (float32 weights) or with the quantized weights
kept packed on low-bit CPU kernels (`kernels`, `lowbit`: docs/inference.md). Builds on `qdistill.format`."""

from qdistill.runtime.load import RUNTIMES, load_packed, release_freed_memory

__all__ = ["RUNTIMES", "load_packed", "release_freed_memory"]
